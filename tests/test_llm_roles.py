"""The right layers, said out loud (issue 19 §2): role tables for Llama / Qwen2 / Qwen3 / Mistral,
GPT-2 (Conv1D, stored in × out), Phi-3 (fused q, k, v of unequal sizes), GPT-NeoX (q, k, v
interleaved per head) and BERT, tested on tiny models built from transformers configs (never
downloaded); NuFILT selects by kind; every method counts what it treats and refuses a model it would
leave as it is; embeddings and lm_head are merged elementwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import Role, load_table, model_config, resolve_table
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.engine import build_model_info
from mergewatch.errors import CheckpointError, ConfigError
from mergewatch.strategies.base import treatment_counts
from mergewatch.strategies.nufilt import NuFILT
from mergewatch.strategies.opcm import OPCM, opcm_update, project_update
from mergewatch.strategies.wudi import wudi_exact
from mergewatch.workspace import Workspace
from tests.helpers import load_all
from tests.hf_support import (
    low_rank_experts,
    tiny_bert,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_llama,
    tiny_mistral,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)

pytest.importorskip("transformers")

#: per architecture: (builder, detected table, tensors per kind, or per role for unnamed ones)
LLAMA_LIKE = {"attn_in": 6, "attn_out": 2, "mlp_in": 4, "mlp_out": 2, "embedding": 1, "lm_head": 1, "norm": 5}
MODELS = {
    "qwen3": (tiny_qwen3, "qwen3", {**LLAMA_LIKE, "norm": 9}),  # + q_norm, k_norm per layer
    "llama": (tiny_llama, "llama", LLAMA_LIKE),
    "mistral": (tiny_mistral, "llama", LLAMA_LIKE),  # the same names: auto gives the llama table
    "qwen2": (tiny_qwen2, "llama", {**LLAMA_LIKE, "other": 6}),  # + q/k/v biases
    "gpt2": (tiny_gpt2, "gpt2", {"attn_in": 2, "attn_out": 2, "mlp_in": 2, "mlp_out": 2, "embedding": 2, "norm": 10, "other": 8}),
    "phi3": (tiny_phi3, "phi3", {"attn_in": 2, "attn_out": 2, "mlp_in": 2, "mlp_out": 2, "embedding": 1, "lm_head": 1, "norm": 5}),
    "gpt_neox": (tiny_gpt_neox, "gpt_neox", {"attn_in": 2, "attn_out": 2, "mlp_in": 2, "mlp_out": 2, "embedding": 1, "lm_head": 1, "norm": 10, "other": 8}),
    "bert": (tiny_bert, "bert", {"attn_in": 6, "attn_out": 2, "mlp_in": 2, "mlp_out": 2, "embedding": 3, "norm": 10, "head": 2, "other": 12}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llm-bases")
    return {name: builder(d) for name, (builder, _, _) in MODELS.items()}


def _info(base: Path, architecture: str = "auto", overrides: tuple = ()):
    ckpt = LazyCheckpoint(base)
    return build_model_info(ckpt, resolve_table(architecture, list(ckpt), overrides, model_config(base)))


def _counts(info) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in info.metas.values():
        out[m.role.label] = out.get(m.role.label, 0) + 1
    return out


# Tables ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(MODELS))
def test_auto_detects_the_table_and_counts_roles(bases, arch):
    _, table, counts = MODELS[arch]
    info = _info(bases[arch])
    assert info.table == table
    assert _counts(info) == counts
    assert info.n_blocks == 2  # LiNeS block indices parse on every family


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral", "qwen2"])
def test_llama_family_roles_by_name(bases, arch):
    """Every Llama-family table gives q, k, v (GQA: k and v have 16 rows) as separate linear maps,
    o_proj, gate/up, down by kind; embedding and lm_head are 'other'. Named tables work on each."""
    info = _info(bases[arch], architecture=arch)
    assert info.table == arch
    m = info.metas
    for p, kind, rows in (("self_attn.q_proj", "attn_in", 32), ("self_attn.k_proj", "attn_in", 16), ("self_attn.v_proj", "attn_in", 16),
                          ("self_attn.o_proj", "attn_out", 32), ("mlp.gate_proj", "mlp_in", 64), ("mlp.up_proj", "mlp_in", 64),
                          ("mlp.down_proj", "mlp_out", 32)):
        r = m[f"model.layers.1.{p}.weight"].role
        assert (r.role, r.kind, r.block_index, r.block_rows(m[f"model.layers.1.{p}.weight"].shape)) == (Role.LINEAR, kind, 1, [rows]), p
    assert m["model.embed_tokens.weight"].role.role is Role.OTHER and m["model.embed_tokens.weight"].role.kind == "embedding"
    assert m["lm_head.weight"].role.role is Role.OTHER and m["lm_head.weight"].role.kind == "lm_head"
    assert _counts(info) == MODELS[arch][2]


def test_gpt2_conv1d_is_transposed(bases):
    info = _info(bases["gpt2"])
    c_attn = info.metas["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (32, 96)  # in × 3·out as stored
    r = c_attn.role
    assert (r.role, r.blocks, r.transposed, r.kind) == (Role.FUSED_LINEAR, 3, True, "attn_in")
    assert r.matrix_shape(c_attn.shape) == (96, 32) and r.block_rows(c_attn.shape) == [32, 32, 32]
    w = torch.randn(c_attn.shape)
    q, k, v = r.split(w)
    # GPT-2: query, key, value = (x @ W + b).split(n_embd, dim=2): column blocks of the stored W
    assert torch.equal(q, w[:, :32].T) and torch.equal(k, w[:, 32:64].T) and torch.equal(v, w[:, 64:].T)
    assert torch.equal(r.join([q, k, v]), w)
    fc = info.metas["transformer.h.1.mlp.c_fc.weight"]
    assert fc.shape == (32, 128) and fc.role.transposed and fc.role.matrix_shape(fc.shape) == (128, 32)


def test_phi3_fused_qkv_has_unequal_blocks_from_the_config(bases):
    """Phi-3's attention slices q = [:H·d], k, v = the next K·d rows each (modeling_phi3): the split
    must give those, from config.json or, without one, from the shape (q = d_in rows)."""
    from transformers import Phi3Config

    cfg = Phi3Config.from_pretrained(bases["phi3"])
    info = _info(bases["phi3"])
    meta = info.metas["model.layers.0.self_attn.qkv_proj.weight"]
    r = meta.role
    assert (r.role, r.sizes, r.heads, r.kind) == (Role.FUSED_LINEAR, (32, 16, 16), 1, "attn_in")
    w = torch.randn(meta.shape)
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)  # as Phi3Attention
    q_pos = cfg.num_attention_heads * head_dim
    kv = cfg.num_key_value_heads * head_dim
    q, k, v = r.split(w)
    assert torch.equal(q, w[:q_pos]) and torch.equal(k, w[q_pos:q_pos + kv]) and torch.equal(v, w[q_pos + kv:])
    assert torch.equal(r.join([q, k, v]), w)
    gate_up = info.metas["model.layers.0.mlp.gate_up_proj.weight"].role
    assert (gate_up.role, gate_up.blocks, gate_up.sizes, gate_up.kind) == (Role.FUSED_LINEAR, 2, (), "mlp_in")
    # without a config: the same blocks from the shape
    table = load_table("phi3")
    assert table.role_of(meta.name, meta.shape, torch.float32).sizes == (32, 16, 16)
    # a config that does not fit the tensor is an error naming it
    bad = table.with_config({"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 32})
    with pytest.raises(CheckpointError, match="do not add up") as ei:
        bad.role_of(meta.name, meta.shape, torch.float32)
    assert meta.name in str(ei.value)


def test_gpt_neox_qkv_is_interleaved_per_head(bases):
    """GPT-NeoX: qkv.view(..., H, 3·d).chunk(3, -1) (modeling_gpt_neox): q of head h is rows
    [3dh, 3dh + d). The q block is then exactly the query projection, heads in order."""
    info = _info(bases["gpt_neox"])
    meta = info.metas["gpt_neox.layers.1.attention.query_key_value.weight"]
    r = meta.role
    assert (r.sizes, r.heads) == ((8, 8, 8), 4)
    w = torch.randn(meta.shape)
    x = torch.randn(5, 32)
    qkv = (x @ w.T).view(5, 4, 24)
    q_ref, k_ref, v_ref = (t.reshape(5, 32) for t in qkv.chunk(3, dim=-1))
    q, k, v = r.split(w)
    for blk, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(x @ blk.T, ref)
    assert torch.equal(r.join([q, k, v]), w)
    with pytest.raises(CheckpointError, match="config.json"):
        load_table("gpt_neox").role_of(meta.name, meta.shape, torch.float32)  # no head count


def test_projection_of_fused_blocks_equals_separate_maps(bases):
    """OPCM and WUDI on a fused tensor of unequal (Phi-3) or interleaved (GPT-NeoX) blocks equal the
    same methods on the separate q, k, v matrices."""
    g = torch.Generator().manual_seed(0)
    for arch, name in (("phi3", "model.layers.0.self_attn.qkv_proj.weight"), ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.weight")):
        meta = _info(bases[arch]).metas[name]
        r = meta.role
        tau, delta = torch.randn(meta.shape, generator=g), torch.randn(meta.shape, generator=g)
        fused = opcm_update(r, tau, delta, 0.5)
        separate = r.join([project_update(t, d, 0.5) for t, d in zip(r.split(tau), r.split(delta))])
        torch.testing.assert_close(fused, separate)
        assert not torch.allclose(fused, project_update(tau, delta, 0.5), atol=1e-3)  # not one whole matrix
        blocks = [wudi_exact([a, b]) for a, b in zip(r.split(delta), r.split(tau))]
        assert [tuple(b.shape) for b in blocks] == [(n, 32) for n in r.block_rows(meta.shape)]


def test_named_table_errors_list_every_table():
    with pytest.raises(ConfigError) as ei:
        load_table("qwen9")
    for name in ("qwen3", "qwen2", "mistral", "llama", "gpt2", "phi3", "gpt_neox", "bert"):
        assert name in str(ei.value)


@pytest.mark.parametrize(
    "rule, needle",
    [
        ({"pattern": "x", "role": "linear", "kind": "mlp"}, "'kind' must be one of"),
        ({"pattern": "x", "role": "linear", "split": "gqa"}, "'split'"),
        ({"pattern": "x", "role": "fused_linear", "blocks": 2, "split": "gqa"}, "'split'"),
        ({"pattern": "x", "role": "other", "transposed": True}, "'transposed'"),
    ],
)
def test_invalid_rule_fields(rule, needle):
    with pytest.raises(ConfigError, match=needle):
        load_table("generic").with_overrides([rule])


# Selection and counts --------------------------------------------------------------------------
def test_nufilt_default_selects_by_kind_on_every_family(bases):
    s = NuFILT({})
    picked = {arch: sorted(m.name for m in _info(bases[arch]).metas.values() if s.selected(m)) for arch in ("qwen3", "gpt2", "bert", "phi3")}
    assert picked["qwen3"] == sorted(f"model.layers.{i}.{p}.weight" for i in range(2)
                                     for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))
    assert picked["gpt2"] == sorted(f"transformer.h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc"))
    assert picked["bert"] == sorted(f"encoder.layer.{i}.{p}.weight" for i in range(2)
                                    for p in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense"))
    assert picked["phi3"] == sorted(f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"))
    # an explicit select replaces the kinds
    only_q = NuFILT({"select": [r"q_proj\.weight$"]})
    assert sum(only_q.selected(m) for m in _info(bases["qwen3"]).metas.values()) == 2
    with pytest.raises(ValueError, match="'kinds'"):
        NuFILT({"kinds": ["norm"]})


def test_treatment_counts_per_method(bases):
    info = _info(bases["qwen3"])
    assert treatment_counts(OPCM({}), info) == {
        "added": {"embedding": 1, "lm_head": 1, "norm": 9},
        "projected": {"attn_in": 6, "attn_out": 2, "mlp_in": 4, "mlp_out": 2},
    }
    assert treatment_counts(NuFILT({"others": "ta"}), info) == {
        "averaged": {"embedding": 1, "lm_head": 1, "mlp_out": 2, "norm": 9},
        "filtered": {"attn_in": 6, "attn_out": 2, "mlp_in": 4},
    }


def _toml(tmp: Path, base: Path, policy: str, model: str = "") -> Path:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\nseed = 0\n[model]\n{model}\n[policy]\n{policy}\n', "utf-8")
    return p


@pytest.mark.parametrize(
    "policy, model, needle",
    [
        ('deploy = "nufilt"', 'architecture = "generic"', "nufilt: kinds = .* selects no linear layer"),
        ('deploy = "nufilt"\n[policy.nufilt]\nselect = ["no_such_layer"]', "", "nufilt: select = .* selects no linear layer"),
        ('deploy = "opcm"', "roles = [{pattern = '.', role = 'other'}]", "opcm: no tensor of this model is a linear layer"),
        ('deploy = "wudi"', "roles = [{pattern = '.', role = 'other'}]", "wudi: no tensor"),
    ],
)
def test_a_method_that_would_treat_nothing_is_refused(tmp_path, bases, policy, model, needle):
    with pytest.raises(ConfigError, match=needle) as ei:
        Workspace(config.load(_toml(tmp_path, bases["qwen3"], policy, model)))
    assert ei.value.key == "model.architecture"


# End to end on tiny LLMs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_stream(tmp_path_factory, bases):
    d = tmp_path_factory.mktemp("qwen3-experts")
    return bases["qwen3"], low_rank_experts(bases["qwen3"], d, 2, seed=5)


def test_nufilt_changes_o_gate_up_on_qwen3(tmp_path, qwen3_stream):
    """The issue's bug: NuFILT left o_proj, gate_proj and up_proj at θ0 on Llama/Qwen names."""
    base, experts = qwen3_stream
    ws = Workspace(config.load(_toml(tmp_path, base, 'deploy = "nufilt"\n[policy.nufilt]\nr_p = 4\nr_l = 2\nr_v = 2\nsteps = 2')))
    for e in experts:
        ws.merge(e)
    got, theta0 = load_all(ws.publishers["deploy"].path(2)), load_all(base)
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert not torch.equal(got[f"model.layers.{i}.self_attn.{p}.weight"], theta0[f"model.layers.{i}.self_attn.{p}.weight"]), p
        for p in ("gate_proj", "up_proj"):
            assert not torch.equal(got[f"model.layers.{i}.mlp.{p}.weight"], theta0[f"model.layers.{i}.mlp.{p}.weight"]), p
        assert torch.equal(got[f"model.layers.{i}.mlp.down_proj.weight"], theta0[f"model.layers.{i}.mlp.down_proj.weight"])
    assert torch.equal(got["lm_head.weight"], theta0["lm_head.weight"])  # others = base
    manifest = ws.publishers["deploy"].manifest(2)
    assert manifest["treated"]["filtered"] == {"attn_in": 6, "attn_out": 2, "mlp_in": 4}
    assert manifest["treated"]["kept at base"] == {"embedding": 1, "lm_head": 1, "mlp_out": 2, "norm": 9}
    assert json.loads((ws.states.latest().directory / "state.json").read_text())["treated"] == manifest["treated"]


def test_opcm_merges_embeddings_and_lm_head_elementwise(tmp_path, qwen3_stream):
    """OPCM projects the linear maps of the blocks only: lm_head and the embedding get τ added, so
    θ^m_2 = θ0 + (τ1 + τ2)/λ there, and no SVD factors are ever prepared for them."""
    base, experts = qwen3_stream
    ws = Workspace(config.load(_toml(tmp_path, base, 'deploy = "opcm"')))
    ws.merge(experts[0])
    ws.prepare()
    prepared = ws.states.latest().prepared()["svd_u"]
    assert "lm_head.weight" not in prepared and "model.embed_tokens.weight" not in prepared
    assert "model.layers.0.mlp.down_proj.weight" in prepared
    ws.merge(experts[1])
    lam = ws.latest().meta["lambda"]
    got, theta0 = load_all(ws.publishers["deploy"].path(2)), load_all(base)
    e1, e2 = load_all(experts[0]), load_all(experts[1])
    for k in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(got[k], theta0[k] + ((e1[k] - theta0[k]) + (e2[k] - theta0[k])) / lam)
    k = "model.layers.0.self_attn.q_proj.weight"  # projected: not the plain sum
    assert not torch.allclose(got[k], theta0[k] + ((e1[k] - theta0[k]) + (e2[k] - theta0[k])) / lam, atol=1e-6)
    assert ws.publishers["deploy"].manifest(2)["treated"]["added"] == {"embedding": 1, "lm_head": 1, "norm": 9}


#: the GPT-2 Conv1D weights written as nn.Linear would hold them (out × in), with these rules
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LINEAR_RULES = (
    "roles = [{pattern = 'attn\\.c_attn\\.weight$', role = 'fused_linear', blocks = 3, kind = 'attn_in'},"
    " {pattern = 'attn\\.c_proj\\.weight$', role = 'linear', kind = 'attn_out'},"
    " {pattern = 'mlp\\.c_fc\\.weight$', role = 'linear', kind = 'mlp_in'},"
    " {pattern = 'mlp\\.c_proj\\.weight$', role = 'linear', kind = 'mlp_out'}]"
)


def _conv1d(name: str) -> bool:
    return name.endswith(tuple(f"{c}.weight" for c in CONV1D))


def _as_linear(src: Path, dst: Path) -> Path:
    state = {k: (v.T.contiguous() if _conv1d(k) else v) for k, v in load_all(src).items()}
    write_safetensors_file(dst, state)
    return dst


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, bases):
    """GPT-2 experts as saved (Conv1D) and the same weights in nn.Linear orientation."""
    d = tmp_path_factory.mktemp("gpt2-pair")
    experts = low_rank_experts(bases["gpt2"], d / "conv", 3, seed=9, scale=0.5)  # τ ≫ the tolerance below
    lin_base = _as_linear(bases["gpt2"] / "model.safetensors", d / "linear-base.safetensors")
    lin_experts = [_as_linear(e, d / f"linear-{e.name}") for e in experts]
    return (bases["gpt2"], experts), (lin_base, lin_experts)


@pytest.mark.parametrize(
    "policy",
    [
        'deploy = "opcm"',
        'deploy = "wudi"\n[policy.wudi]\nsolver = "exact"',
        'deploy = "wudi"\n[policy.wudi]\nsteps = 5\nlr = 1e-3',
        # steps = 0: τ(I − UUᵀ), no seeded LoRA init (the seeds hash the expert bytes, which differ)
        'deploy = "nufilt"\n[policy.nufilt]\nr_p = 4\nsteps = 0',
    ],
    ids=["opcm", "wudi-exact", "wudi-adam", "nufilt"],
)
def test_gpt2_conv1d_merges_as_its_linear_version(tmp_path, gpt2_pair, policy):
    """Projection methods work on the out × in map: a Conv1D model merges exactly as the same model
    written with nn.Linear (every weight transposed back), to float32 rounding. Treating the stored
    in × out tensor as the map would split c_attn into the wrong blocks and project on the wrong
    side (NuFILT's input subspace, WUDI's Gram matrix)."""
    (conv_base, conv_experts), (lin_base, lin_experts) = gpt2_pair
    out = {}
    for name, base, experts, model in (("conv", conv_base, conv_experts, ""), ("linear", lin_base, lin_experts, 'architecture = "gpt2"\n' + LINEAR_RULES)):
        (tmp_path / name).mkdir()
        ws = Workspace(config.load(_toml(tmp_path / name, base, policy, model)))
        for e in experts:
            ws.merge(e)
        out[name] = load_all(ws.publishers["deploy"].path(3))
    theta0 = load_all(conv_base)
    # Adam normalises each entry's step: a gradient entry at rounding level moves by up to lr either
    # way (seen: 3 of 3072 entries by 3e-6); the projections themselves agree to float32 rounding
    atol = 2e-5 if "lr" in policy else 1e-6
    moved = 0
    for k, v in out["conv"].items():
        want = out["linear"][k].T if _conv1d(k) else out["linear"][k]
        torch.testing.assert_close(v, want, rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        moved += _conv1d(k) and float((v - theta0[k]).abs().max()) > 1e-3
    assert moved == 8 if "nufilt" not in policy else moved == 6  # NuFILT keeps mlp.c_proj at θ0


@pytest.mark.parametrize("policy", ['deploy = "opcm"', 'deploy = "nufilt"\n[policy.nufilt]\nr_p = 24\nr_l = 2\nr_v = 2\nsteps = 2'], ids=["opcm", "nufilt"])
def test_prepared_sets_of_unequal_blocks_give_the_same_result(tmp_path, tmp_path_factory, bases, policy):
    """The sets prepared ahead stack Phi-3's q (32 rows), k and v (16 rows) with different numbers
    of singular pairs (zero-padded): a step using them is bit-identical to one computing them."""
    experts = low_rank_experts(bases["phi3"], tmp_path_factory.mktemp("phi3-experts"), 3, seed=3)
    out = {}
    for ahead in (False, True):
        d = tmp_path / str(ahead)
        d.mkdir()
        ws = Workspace(config.load(_toml(d, bases["phi3"], policy)))
        used = []
        for e in experts:
            used.append(ws.merge(e).prepared)
            if ahead:
                assert ws.prepare() is not None
        assert used == (["none", "used", "used"] if ahead else ["none"] * 3)
        out[ahead] = load_all(ws.publishers["deploy"].path(3))
    assert out[True].keys() == out[False].keys()
    for k in out[True]:
        assert torch.equal(out[True][k], out[False][k]), k
    theta0 = load_all(bases["phi3"])
    assert not torch.equal(out[True]["model.layers.0.self_attn.qkv_proj.weight"], theta0["model.layers.0.self_attn.qkv_proj.weight"])
