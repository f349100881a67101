"""Graph analyses and rewrites. Each is a pure function over torch-level FX graphs.

Knows torch.fx (and sympy), never the runtime, the CLI or diffusers classes.
"""

from ..buffers import BufferRole, BufferSpec
from .branch_cache_variants import (
    build_branch_record_variant,
    build_branch_reuse_variant,
)
from .graph_copy import copy_graph_module
from .graph_inputs import GraphInputs, find_graph_inputs
from .module_paths import block_of, group_nodes_by_block, module_path_of, normalize_module_path
from .residual_branches import BRANCH_KINDS, ResidualBranch, count_kinds, find_residual_branches

__all__ = [
    "BRANCH_KINDS", "BufferRole", "BufferSpec", "GraphInputs", "ResidualBranch", "block_of",
    "build_branch_record_variant", "build_branch_reuse_variant", "copy_graph_module",
    "count_kinds", "find_graph_inputs", "find_residual_branches", "group_nodes_by_block",
    "module_path_of", "normalize_module_path",
]
