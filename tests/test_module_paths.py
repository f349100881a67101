from specdiff_fx.passes.module_paths import block_of, group_nodes_by_block, module_path_of, normalize_module_path
from specdiff_fx.testing.tiny_models import tiny_dit


def test_normalize_dynamo_paths():
    raw = "L['self'].__dict__['_modules']['transformer_blocks'].0.attn1"
    assert normalize_module_path(raw) == "transformer_blocks.0.attn1"
    assert normalize_module_path("L['self'].__dict__['_modules']['proj_out_2']") == "proj_out_2"
    assert normalize_module_path("L['self'].transformer_blocks[3].ff.net[0]") == "transformer_blocks.3.ff.net.0"
    assert normalize_module_path("L['self']") == ""


def test_normalize_paths_through_forward_hooks():
    """diffusers' context-parallel hooks wrap forward: the module is reached via the bound
    method or a wrapper's closure cell (paths as dynamo recorded them for FLUX and Qwen-Image)."""
    flux = "L['function_reference'].forward.__self__.__dict__['_modules']['transformer_blocks'].0.attn"
    assert normalize_module_path(flux) == "transformer_blocks.0.attn"
    qwen = ("L['self'].__dict__['_modules']['transformer_blocks'].0.forward.func.__closure__[0].cell_contents"
            ".forward.func.__closure__[0].cell_contents.forward.__self__.attn")
    assert normalize_module_path(qwen) == "transformer_blocks.0.attn"
    assert normalize_module_path("L['self'].forward_proj.__self__") == "forward_proj.__self__"


def test_block_of():
    assert block_of("transformer_blocks.3.attn.to_q") == "transformer_blocks.3"
    assert block_of("down_blocks.0.resnets.1.conv1") == "down_blocks.0"
    assert block_of("proj_out") == "proj_out"
    assert block_of("") == ""


def test_groups_follow_blocks(capture):
    case = tiny_dit(layers=3)
    gm, _ = capture(case.model, case.make_inputs())
    groups = group_nodes_by_block(gm)
    blocks = [b for b in groups if b.startswith("transformer_blocks.")]
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    for block in blocks:
        assert all(module_path_of(n).startswith(block) for n in groups[block])
