"""Command line: ``specdiff-fx <command>``, also ``python -m specdiff_fx <command>``.

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, so commands stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("specdiff_fx.demo", "compile a tiny diffusers model with specdiff and compare with plain Inductor"),
    "inspect": ("specdiff_fx.inspect.command", "show what the rewrite did to a model's graph, and what it costs"),
    "bench": ("specdiff_fx.bench.command", "benchmark caching policies on the reference model"),
    "tune": ("specdiff_fx.bench.tune_command", "choose the taylor schedule and forecaster for a speed-up or a PSNR"),
    "scale": ("specdiff_fx.bench.scale", "time each step kind against plain Inductor at real model shapes"),
    "compile-time": ("specdiff_fx.bench.compile_time",
                     "cold and warm compile seconds per policy against plain Inductor, whole-model and regional"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdiff-fx", description="specdiff-fx command line")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue  # command not available in this version
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
