"""``specdiff-fx inspect MODEL``: what the rewrite does to a model's graph, and what it costs."""

from __future__ import annotations

import argparse
import sys

from ..policies import POLICIES
from ..testing.tiny_models import TINY_FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a built-in tiny model ({', '.join(TINY_FAMILIES)}) or "
                                      "'package.module:factory' returning (model, example_kwargs)")
    parser.add_argument("--policy", default="fora", choices=list(POLICIES),
                        help="caching policy whose graph variants to show (default: fora)")
    parser.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report to PATH")
    parser.add_argument("--nodes", action="store_true", help="list changes per module instead of per block")
    parser.add_argument("--diff", action="store_true", help="print the unified diff of each variant's graph code")


def run(args: argparse.Namespace) -> int:
    from .capture import load_model
    from .html import write_html
    from .report import inspect_model
    from .text import render_text

    try:
        title, model, kwargs = load_model(args.model)
        report = inspect_model(model, kwargs, args.policy, title)
    except (ValueError, NotImplementedError, ImportError, AttributeError) as exc:
        print(f"specdiff-fx inspect: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_text(report, nodes=args.nodes, code_diff=args.diff))
    if args.html:
        write_html(report, args.html)
        print(f"\nHTML report written to {args.html}")
    return 0
