"""Architecture role tables: auto-detection, roles, block indices, overrides, custom tables."""

from __future__ import annotations

import json

import pytest
import torch

from mergewatch.checkpoint.roles import (
    DETECTION_ORDER,
    Role,
    RoleTable,
    TensorRole,
    builtin_tables,
    detect_table,
    load_table,
    num_blocks,
    resolve_table,
)
from mergewatch.errors import CheckpointError, ConfigError
from tests.helpers import TINY_CLIP, tiny_clip_state


@pytest.fixture(scope="module")
def clip_state() -> dict[str, torch.Tensor]:
    return tiny_clip_state()


@pytest.fixture(scope="module")
def visual_own_state() -> dict[str, torch.Tensor]:
    """``model.visual.state_dict()``: the vision tower's keys without the ``visual.`` prefix."""
    import open_clip

    torch.manual_seed(0)
    return {k: v.detach() for k, v in open_clip.CLIP(**TINY_CLIP).visual.state_dict().items()}


def hf_clip_vision(prefix: bool = True, layers: int = 2, hidden: int = 32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key names and shapes of transformers' CLIPVisionModelWithProjection (image 32, patch 8)."""
    f32, i64 = torch.float32, torch.int64
    p = "vision_model." if prefix else ""
    keys = {
        f"{p}embeddings.class_embedding": ((hidden,), f32),
        f"{p}embeddings.patch_embedding.weight": ((hidden, 3, 8, 8), f32),
        f"{p}embeddings.position_embedding.weight": ((17, hidden), f32),
        f"{p}embeddings.position_ids": ((1, 17), i64),
        f"{p}pre_layrnorm.weight": ((hidden,), f32),
        f"{p}pre_layrnorm.bias": ((hidden,), f32),
        f"{p}post_layernorm.weight": ((hidden,), f32),
        f"{p}post_layernorm.bias": ((hidden,), f32),
    }
    for i in range(layers):
        L = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{L}self_attn.{proj}.weight"] = ((hidden, hidden), f32)
            keys[f"{L}self_attn.{proj}.bias"] = ((hidden,), f32)
        for ln in ("layer_norm1", "layer_norm2"):
            keys[f"{L}{ln}.weight"] = ((hidden,), f32)
            keys[f"{L}{ln}.bias"] = ((hidden,), f32)
        keys[f"{L}mlp.fc1.weight"] = ((4 * hidden, hidden), f32)
        keys[f"{L}mlp.fc1.bias"] = ((4 * hidden,), f32)
        keys[f"{L}mlp.fc2.weight"] = ((hidden, 4 * hidden), f32)
        keys[f"{L}mlp.fc2.bias"] = ((hidden,), f32)
    if prefix:
        keys["visual_projection.weight"] = ((16, hidden), f32)
    return keys


def roles_of(table: RoleTable, state: dict) -> dict[str, TensorRole]:
    out = {}
    for k, v in state.items():
        shape, dtype = (v if isinstance(v, tuple) else (tuple(v.shape), v.dtype))
        out[k] = table.role_of(k, shape, dtype)
    return out


# ----------------------------------------------------------------------------------------------
# detection


def test_detects_open_clip_full(clip_state):
    assert detect_table(clip_state).name == "open_clip_full"
    assert resolve_table("auto", clip_state).name == "open_clip_full"


def test_detects_open_clip_visual_with_prefix(clip_state):
    visual = [k for k in clip_state if k.startswith("visual.")]
    assert detect_table(visual).name == "open_clip_visual"


def test_detects_open_clip_visual_without_prefix(visual_own_state):
    assert "conv1.weight" in visual_own_state and "transformer.resblocks.0.attn.in_proj_weight" in visual_own_state
    assert detect_table(visual_own_state).name == "open_clip_visual"


@pytest.mark.parametrize("prefix", [True, False])
def test_detects_hf_clip_vision(prefix):
    assert detect_table(hf_clip_vision(prefix)).name == "hf_clip_vision"


@pytest.mark.parametrize(
    "keys",
    [
        ["fc.weight", "fc.bias"],
        ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"],  # llama-like, not CLIP vision
        ["transformer.resblocks.0.attn.in_proj_weight"],  # open_clip text tower only
        [],
    ],
)
def test_detects_generic(keys):
    assert detect_table(keys).name == "generic"


def test_builtin_tables_load():
    tables = builtin_tables()
    assert list(tables) == list(DETECTION_ORDER)
    for name, t in tables.items():
        assert t.name == name and t.description


# ----------------------------------------------------------------------------------------------
# roles


def test_open_clip_full_roles(clip_state):
    table = load_table("open_clip_full")
    r = roles_of(table, clip_state)
    for k, tr in r.items():
        if k.endswith("attn.in_proj_weight"):
            assert tr.role is Role.FUSED_LINEAR and tr.blocks == 3, k
        elif k.endswith(("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            assert tr.role is Role.LINEAR and tr.blocks == 1, k
        else:
            assert tr.role is Role.OTHER, k
    assert r["visual.proj"].role is Role.OTHER
    assert r["text_projection"].role is Role.OTHER
    assert r["visual.conv1.weight"].role is Role.OTHER
    assert r["visual.ln_pre.weight"].role is Role.OTHER and r["ln_final.weight"].role is Role.OTHER
    assert r["token_embedding.weight"].role is Role.OTHER  # 2-D but an embedding
    matrices = sorted(k for k, tr in r.items() if tr.matrix)
    # 2 visual + 1 text blocks, 4 matrices each
    assert len(matrices) == 12
    assert all(tr.mergeable for tr in r.values())


@pytest.mark.parametrize("prefixed", [True, False])
def test_open_clip_visual_roles(clip_state, visual_own_state, prefixed):
    state = {k: v for k, v in clip_state.items() if k.startswith("visual.")} if prefixed else visual_own_state
    p = "visual." if prefixed else ""
    table = load_table("open_clip_visual")
    r = roles_of(table, state)
    assert r[f"{p}transformer.resblocks.1.attn.in_proj_weight"] == TensorRole(Role.FUSED_LINEAR, 3, 1)
    assert r[f"{p}transformer.resblocks.0.attn.in_proj_bias"].role is Role.OTHER
    assert r[f"{p}transformer.resblocks.0.attn.out_proj.weight"] == TensorRole(Role.LINEAR, 1, 0)
    assert r[f"{p}transformer.resblocks.1.mlp.c_fc.weight"].role is Role.LINEAR
    assert r[f"{p}transformer.resblocks.1.mlp.c_proj.weight"].role is Role.LINEAR
    assert r[f"{p}proj"] == TensorRole(Role.OTHER, 1, None)
    assert r[f"{p}conv1.weight"].role is Role.OTHER
    assert r[f"{p}ln_post.weight"].role is Role.OTHER
    assert r[f"{p}class_embedding"].role is Role.OTHER
    assert r[f"{p}positional_embedding"].role is Role.OTHER
    assert sum(tr.matrix for tr in r.values()) == 8


@pytest.mark.parametrize("prefix", [True, False])
def test_hf_clip_vision_roles(prefix):
    keys = hf_clip_vision(prefix)
    p = "vision_model." if prefix else ""
    table = load_table("hf_clip_vision")
    r = roles_of(table, keys)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert r[f"{p}encoder.layers.1.self_attn.{proj}.weight"] == TensorRole(Role.LINEAR, 1, 1)
        assert r[f"{p}encoder.layers.1.self_attn.{proj}.bias"].role is Role.OTHER
    assert r[f"{p}encoder.layers.0.mlp.fc1.weight"] == TensorRole(Role.LINEAR, 1, 0)
    assert r[f"{p}encoder.layers.0.mlp.fc2.weight"].role is Role.LINEAR
    assert r[f"{p}encoder.layers.0.layer_norm1.weight"].role is Role.OTHER
    assert r[f"{p}encoder.layers.0.layer_norm2.bias"].role is Role.OTHER
    assert r[f"{p}embeddings.patch_embedding.weight"].role is Role.OTHER
    assert r[f"{p}embeddings.position_embedding.weight"].role is Role.OTHER  # 2-D embedding, not linear
    assert r[f"{p}embeddings.class_embedding"].role is Role.OTHER
    assert r[f"{p}pre_layrnorm.weight"].role is Role.OTHER
    assert r[f"{p}post_layernorm.weight"].role is Role.OTHER
    pos = r[f"{p}embeddings.position_ids"]
    assert pos.role is Role.FROZEN and not pos.mergeable and not pos.matrix
    # frozen by the table's own rule, not only because the buffer is integer
    assert table.role_of(f"{p}embeddings.position_ids", (1, 17), torch.float32).role is Role.FROZEN
    if prefix:
        assert r["visual_projection.weight"] == TensorRole(Role.LINEAR, 1, None)
    assert sum(tr.matrix for tr in r.values()) == 2 * 6 + prefix
    assert num_blocks(table, keys) == 2


def test_integer_and_bool_tensors_always_frozen():
    for name in ("open_clip_full", "open_clip_visual", "hf_clip_vision", "generic"):
        t = load_table(name)
        for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
            assert t.role_of("visual.transformer.resblocks.0.attn.in_proj_weight", (6, 2), dtype).role is Role.FROZEN
            assert t.role_of("fc.weight", (2, 2), dtype).role is Role.FROZEN


def test_generic_roles():
    t = load_table("generic")
    assert t.role_of("encoder.layer.3.dense.weight", (8, 4), torch.float32) == TensorRole(Role.LINEAR, 1, 3)
    assert t.role_of("lm_head.weight", (10, 4), torch.bfloat16).role is Role.LINEAR
    assert t.role_of("encoder.layer.3.dense.bias", (8,), torch.float32).role is Role.OTHER
    assert t.role_of("embeddings.word_embeddings.weight", (100, 4), torch.float32).role is Role.OTHER
    assert t.role_of("wte.weight", (100, 4), torch.float32).role is Role.OTHER
    assert t.role_of("h.0.ln_1.weight", (4,), torch.float32).role is Role.OTHER
    assert t.role_of("encoder.LayerNorm.weight", (4,), torch.float32).role is Role.OTHER
    assert t.role_of("encoder.Embedding.weight", (100, 4), torch.float32).role is Role.OTHER  # case-insensitive
    assert t.role_of("encoder.LayerNorm.weight", (4, 4), torch.float32).role is Role.OTHER
    assert t.role_of("blocks.0.norm1.weight", (4, 4), torch.float32).role is Role.OTHER  # 2-D but a norm
    assert t.role_of("conv.weight", (4, 3, 3, 3), torch.float32).role is Role.OTHER  # ndim 4
    assert t.role_of("attn.in_proj_weight", (12, 4), torch.float32).role is Role.OTHER
    assert t.role_of("scale", (), torch.float32).role is Role.OTHER


def test_block_index_parsing(clip_state):
    full = load_table("open_clip_full")
    assert full.block_index("visual.transformer.resblocks.1.mlp.c_fc.weight") == 1
    assert full.block_index("transformer.resblocks.0.ln_1.bias") == 0
    assert full.block_index("visual.transformer.resblocks.12.attn.in_proj_weight") == 12
    assert full.block_index("visual.proj") is None
    assert full.block_index("visual.ln_post.weight") is None
    assert num_blocks(full, clip_state) == 2  # the vision tower's 2 layers (text has 1)
    hf = load_table("hf_clip_vision")
    assert hf.block_index("vision_model.encoder.layers.11.mlp.fc1.weight") == 11
    assert hf.block_index("vision_model.post_layernorm.weight") is None
    gen = load_table("generic")
    assert gen.block_index("model.layers.7.mlp.up_proj.weight") == 7
    assert gen.block_index("transformer.h.11.attn.c_attn.weight") == 11
    assert gen.block_index("encoder.block.2.layer.1.DenseReluDense.wi.weight") == 2
    assert gen.block_index("mesh.3.weight") is None  # 'h.3.' only as a whole module name
    assert num_blocks(gen, ["a.weight", "b"]) == 0
    assert num_blocks(load_table("open_clip_visual"), [k for k in clip_state if k.startswith("visual.")]) == 2


def test_role_of_shape_errors():
    t = load_table("open_clip_full")
    with pytest.raises(CheckpointError, match="rows divisible by 3"):
        t.role_of("visual.transformer.resblocks.0.attn.in_proj_weight", (10, 4), torch.float32)
    with pytest.raises(CheckpointError, match="linear but the tensor has shape"):
        t.role_of("visual.transformer.resblocks.0.mlp.c_fc.weight", (4,), torch.float32)


# ----------------------------------------------------------------------------------------------
# overrides and custom tables


def test_overrides_take_precedence(clip_state):
    overrides = [
        {"pattern": r"^visual\.proj$", "role": "linear", "note": "treat as a linear map"},
        {"pattern": r"mlp\.c_fc\.weight$", "role": "other"},
        {"pattern": r"^logit_scale$", "role": "frozen"},
        {"pattern": r"^token_embedding\.weight$", "role": "fused_linear", "blocks": 4},
        {"pattern": r"in_proj_weight$", "role": "linear", "ndim": 1},  # ndim mismatch: never applies
    ]
    t = resolve_table("auto", clip_state, overrides)
    assert t.name == "open_clip_full"
    r = roles_of(t, clip_state)
    assert r["visual.proj"].role is Role.LINEAR
    assert r["visual.transformer.resblocks.0.mlp.c_fc.weight"].role is Role.OTHER
    assert r["logit_scale"].role is Role.FROZEN
    assert r["token_embedding.weight"] == TensorRole(Role.FUSED_LINEAR, 4, None)
    assert r["visual.transformer.resblocks.0.attn.in_proj_weight"].role is Role.FUSED_LINEAR
    # the base table is untouched
    assert load_table("open_clip_full").role_of("visual.proj", (32, 16), torch.float32).role is Role.OTHER
    # overrides on a named (not auto-detected) table
    t2 = resolve_table("generic", ["x.weight"], [{"pattern": "^x\\.weight$", "role": "other"}])
    assert t2.role_of("x.weight", (2, 2), torch.float32).role is Role.OTHER
    assert resolve_table("generic", ["x.weight"]).role_of("x.weight", (2, 2), torch.float32).role is Role.LINEAR


@pytest.mark.parametrize(
    "rule, needle",
    [
        ({"pattern": "([unclosed", "role": "linear"}, "regex"),
        ({"role": "linear"}, "regex"),
        ({"pattern": "x", "role": "matrix"}, "role must be one of"),
        ({"pattern": "x"}, "role must be one of"),
        ({"pattern": "x", "role": "fused_linear"}, "'blocks'"),
        ({"pattern": "x", "role": "fused_linear", "blocks": 1}, "'blocks'"),
        ({"pattern": "x", "role": "fused_linear", "blocks": "3"}, "'blocks'"),
        ({"pattern": "x", "role": "linear", "blocks": 3}, "'blocks'"),
        ({"pattern": "x", "role": "linear", "ndim": "2"}, "'ndim'"),
        ({"pattern": "x", "role": "linear", "dims": 2}, "unknown rule field"),
        ("x.weight=linear", "must be an object"),
    ],
)
def test_invalid_override(clip_state, rule, needle):
    good = {"pattern": "y", "role": "other"}
    with pytest.raises(ConfigError) as ei:
        resolve_table("auto", clip_state, [good, rule])
    assert ei.value.key == "model.roles[1]"
    assert needle in str(ei.value) and "model.roles[1]" in str(ei.value)


def test_overrides_must_be_a_list(clip_state):
    with pytest.raises(ConfigError) as ei:
        resolve_table("auto", clip_state, {"pattern": "x", "role": "linear"})
    assert ei.value.key == "model.roles"


def test_load_custom_table_by_path(tmp_path):
    table = {
        "name": "my_arch",
        "description": "a test architecture",
        "detect_all": ["^stem\\."],
        "block_pattern": "stage(\\d+)\\.",
        "rules": [
            {"pattern": "qkv\\.weight$", "role": "fused_linear", "blocks": 3},
            {"pattern": "\\.weight$", "ndim": 2, "role": "linear"},
            {"pattern": "^buf$", "role": "frozen"},
        ],
        "default": "other",
    }
    p = tmp_path / "my_arch.json"
    p.write_text(json.dumps(table))
    t = load_table(str(p))
    assert t.name == "my_arch" and t.description == "a test architecture"
    assert t.role_of("stage2.qkv.weight", (9, 3), torch.float32) == TensorRole(Role.FUSED_LINEAR, 3, 2)
    assert t.role_of("stage0.fc.weight", (4, 3), torch.float32) == TensorRole(Role.LINEAR, 1, 0)
    assert t.role_of("stage0.fc.bias", (4,), torch.float32) == TensorRole(Role.OTHER, 1, 0)
    assert t.role_of("buf", (3,), torch.float32).role is Role.FROZEN
    assert t.matches(["stem.conv.weight"]) and not t.matches(["body.conv.weight"])
    assert resolve_table(str(p), ["whatever"]).name == "my_arch"
    assert num_blocks(t, ["stage0.a", "stage3.b", "head"]) == 4
    # custom tables are not auto-detected: auto stays with the built-ins
    assert detect_table(["stem.conv.weight"]).name == "generic"


def test_custom_table_default_role(tmp_path):
    p = tmp_path / "frozen_default.json"
    p.write_text(json.dumps({"name": "fd", "rules": [{"pattern": "w$", "role": "linear"}], "default": "frozen"}))
    t = load_table(str(p))
    assert t.role_of("a.w", (2, 2), torch.float32).role is Role.LINEAR
    assert t.role_of("a.b", (2,), torch.float32).role is Role.FROZEN
    assert t.block_index("layers.0.w") is None  # no block_pattern


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"rules": [], "colour": "red"}), "unknown table field"),
        (json.dumps({"rules": [{"pattern": "x", "role": "bogus"}]}), "role must be one of"),
        (json.dumps({"rules": {"pattern": "x"}}), "list of rules"),
        (json.dumps({"default": "bogus"}), "must be one of"),
        (json.dumps({"block_pattern": "layers\\.\\d+"}), "capturing group"),
        (json.dumps({"block_pattern": "(unclosed"}), "invalid regex"),
        (json.dumps({"detect_all": ["(unclosed"]}), "invalid regex"),
    ],
)
def test_invalid_custom_table(tmp_path, content, needle):
    p = tmp_path / "bad_table.json"
    p.write_text(content)
    with pytest.raises(ConfigError) as ei:
        load_table(str(p))
    assert needle in str(ei.value)


def test_unknown_architecture(tmp_path):
    with pytest.raises(ConfigError) as ei:
        resolve_table("resnet_9000", ["a"])
    assert ei.value.key == "model.architecture" and "resnet_9000" in str(ei.value)
    assert "open_clip_full" in str(ei.value)
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_table(str(tmp_path / "absent.json"))
