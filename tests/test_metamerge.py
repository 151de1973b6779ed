"""MetaMerge with NiNo-MLP (METAMERGE.md): conformance with the reference's outputs, invariants that need
no reference, the checkpoint loader's refusals, config and the daemon's step pipeline.

Conformance data lives beside the repository in ``../shared/nino/`` (never copied into it); tests that
need it are skipped, saying so, only when that folder is absent. Everything else runs on a random
NiNo-shaped checkpoint written on the fly."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import Role, TensorRole
from mergewatch.errors import ConfigError
from mergewatch.nino.checkpoint import load_nino_mlp
from mergewatch.nino.context import MetaMergeError, context_order, expert_mean
from mergewatch.nino.context import moments as _moments
from mergewatch.nino.mlp import metamerge_tensor, type_segments
from mergewatch.strategies import METHODS
from mergewatch.strategies.base import ModelInfo, StepContext, TensorMeta
from mergewatch.strategies.metamerge import MetaMerge
from mergewatch.workspace import Workspace
from tests.helpers import CONF, NINO, load_all, make_expert, make_open_clip_base, needs_nino

MLP_CKPT = NINO / "checkpoints" / "nino_mlp.pt"
TOL = 1e-6  # fixtures.json: mlp.tolerance_max_abs


# Helpers -----------------------------------------------------------------------------------------

def fake_checkpoint(path: Path, hidden: int = 8, seed: int = 0, *, layers: int = 3, n_types: int = 15, context: int = 5,
                    n_out: int = 40, model_args: dict | None = None, extra: dict | None = None, drop: str | None = None) -> Path:
    """A random checkpoint shaped like nino_mlp.pt (the same keys; hidden ``hidden``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {"layer_embed.weight": r(n_types, hidden), "edge_proj.fc.0.weight": r(hidden, context), "edge_proj.fc.0.bias": r(hidden)}
    for i in range(layers):
        sd[f"edge_mlp.fc.{2 * i}.weight"] = r(hidden, hidden)
        sd[f"edge_mlp.fc.{2 * i}.bias"] = r(hidden)
    sd[f"edge_mlp.fc.{2 * layers}.weight"] = r(n_out, hidden)
    sd[f"edge_mlp.fc.{2 * layers}.bias"] = r(n_out)
    sd.update(extra or {})
    if drop:
        del sd[drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "model_args": {"gnn": False} if model_args is None else model_args}, path)
    return path


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory) -> Path:
    return fake_checkpoint(tmp_path_factory.mktemp("nino") / "fake_mlp.pt")


def write_config(d: Path, base: Path, policy: str) -> Path:
    p = d / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\n[policy]\ndeploy = "metamerge"\n{policy}\n', "utf-8")
    return p


def fixture_load(name: str) -> dict[str, torch.Tensor]:
    return load_all(CONF / f"{name}.safetensors")


def max_abs_by_key(got: dict, want: dict) -> dict[str, float]:
    assert set(got) == set(want)
    return {k: float((got[k].float() - want[k].float()).abs().max()) if want[k].numel() else 0.0 for k in want}


# Conformance (needs ../shared/nino) -------------------------------------------------------------

@pytest.fixture(scope="module")
def conf_inputs():
    if not (CONF / "fixtures.json").is_file():
        pytest.skip(f"{NINO} is absent (NiNo conformance fixtures); CI has it")
    meta = json.loads((CONF / "fixtures.json").read_text("utf-8"))
    w0 = fixture_load("w0")
    experts = [fixture_load(f"expert{i}") for i in range(1, 5)]
    return meta, w0, experts


@needs_nino
def test_workspace_stream_matches_mlp_fixtures(tmp_path, conf_inputs):
    """The daemon's own step pipeline (config → engine → publish) after experts 1..4 of the fixture
    stream: t = 1 deploys expert 1, t = 2, 3, 4 match mlp_{t}experts to ≤ 1e-6 for every tensor."""
    meta, w0, experts = conf_inputs
    ws = Workspace(config.load(write_config(tmp_path, CONF / "w0.safetensors", f'checkpoint = "{MLP_CKPT}"')))
    diffs = {}
    for t in range(1, 5):
        res = ws.merge(CONF / f"expert{t}.safetensors")
        assert res.status == "merged" and res.step == t
        dep = ws.publishers["deploy"]
        got = load_all(dep.path(dep.current()))
        if t == 1:
            assert all(torch.equal(got[k], experts[0][k]) for k in got)
            continue
        d = max_abs_by_key(got, fixture_load(f"mlp_{t}experts"))
        diffs[t] = max(d.values())
        bad = {k: v for k, v in d.items() if v > TOL}
        assert not bad, f"{t} experts: tensors beyond {TOL}: {bad}"
    print("max abs diff vs mlp_{2,3,4}experts:", diffs)
    # The manifest records the checkpoint's sha256 and the settings used.
    man = ws.publishers["deploy"].manifest(ws.publishers["deploy"].current())
    pol = man["policy"]
    assert pol["name"] == "metamerge"
    assert pol["checkpoint_sha256"] == meta["mlp"]["checkpoint_sha256"]
    assert pol["nino"]["hidden"] == 128 and pol["nino"]["hidden_layers"] == 3
    assert (pol["upd_scale"], pol["fold"], pol["slot0"]) == (2.5, "none", "chained")
    assert pol["horizons"] == [1, 2, 3, 4, 5] and "extensions" not in pol and "threads" not in pol
    assert json.loads((ws.root / "state" / "4" / "state.json").read_text())["meta"]["mode"] == "metamerge-4"


def _resized(t: torch.Tensor) -> torch.Tensor:
    """The reference's pre-step for conv1 (METAMERGE §3): the patch kernel resized to 3×3."""
    return F.interpolate(t, size=(3, 3), mode="bilinear", align_corners=False)


def _horizons(net, w0, experts, *, chain: bool) -> list[dict[str, torch.Tensor]]:
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(5)]
    for k in w0:
        if not k.startswith("visual."):
            continue
        base, ex = w0[k], [e[k] for e in experts[:2]]
        if k == "visual.conv1.weight":
            base, ex = _resized(base), [_resized(e) for e in ex]
        per: list[torch.Tensor] = []
        metamerge_tensor(net, k, base, ex, chain=chain, per_horizon=per)
        for h in range(5):
            out[h][k] = per[h]
    return out


@needs_nino
def test_per_horizon_predictions_match(conf_inputs):
    """P_1..P_5 of the 2-expert run (visual keys, conv1 as the 3×3 prediction) match mlp_2experts_k*."""
    _, w0, experts = conf_inputs
    net = load_nino_mlp(MLP_CKPT)
    got = _horizons(net, w0, experts, chain=True)
    worst = []
    for h in range(5):
        d = max_abs_by_key(got[h], fixture_load(f"mlp_2experts_k{h + 1}"))
        worst.append(max(d.values()))
        bad = {k: v for k, v in d.items() if v > TOL}
        assert not bad, f"horizon {h + 1}: {bad}"
    print("max abs diff per horizon k=1..5:", worst)


@needs_nino
def test_clean_slot0_variant_fails_conformance(conf_inputs):
    """Chaining regression: without the overwrite behaviour (slot 0 = W0 at every horizon) the same
    comparison fails — so the conformance tests above can fail."""
    _, w0, experts = conf_inputs
    net = load_nino_mlp(MLP_CKPT)
    clean = _horizons(net, w0, experts, chain=False)
    assert max(max_abs_by_key(clean[0], fixture_load("mlp_2experts_k1")).values()) <= TOL  # k = 1 is the same
    assert max(max_abs_by_key(clean[1], fixture_load("mlp_2experts_k2")).values()) > 1e-3
    final = fixture_load("mlp_2experts")
    worst = max(
        float((metamerge_tensor(net, k, w0[k], [e[k] for e in experts[:2]], chain=False) - final[k]).abs().max())
        for k in w0 if k.startswith("visual.") and k != "visual.conv1.weight"
    )
    assert worst > 1e-3  # METAMERGE §4.1: up to 1.9e-2


@needs_nino
def test_literal_forward_also_conforms(conf_inputs):
    """§4.4 written out literally (no folded first layer, all 40 head rows) agrees with the fast path
    and the fixture: the folding only changes float32 rounding."""
    _, w0, experts = conf_inputs
    net = load_nino_mlp(MLP_CKPT)
    want = fixture_load("mlp_3experts")
    for k in ("visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "visual.ln_pre.weight"):
        ex = [e[k] for e in experts[:3]]
        lit = metamerge_tensor(net, k, w0[k], ex, reference=True)
        fast = metamerge_tensor(net, k, w0[k], ex)
        assert float((lit - want[k]).abs().max()) <= TOL
        assert float((lit - fast).abs().max()) <= TOL


@needs_nino
def test_published_checkpoints_load_or_are_refused():
    mlp = load_nino_mlp(MLP_CKPT)
    assert (mlp.hidden, mlp.context, mlp.n_outputs, mlp.n_types, mlp.n_layers) == (128, 5, 40, 15, 3)
    assert mlp.sha256 == "34d9ff3703274fa07615e27937dac8ea07f375ed95b5bde6d39abd8c41c06f52"
    h32 = load_nino_mlp(NINO / "checkpoints" / "nino_mlp_h32.pt")
    assert (h32.hidden, h32.n_layers, h32.model_args["hid"]) == (32, 3, 32)
    with pytest.raises(ValueError, match=r"'checkpoint'.*not a NiNo-MLP checkpoint.*GNN"):
        load_nino_mlp(NINO / "checkpoints" / "nino_no_posw.pt")


# Invariants (no reference needed) ----------------------------------------------------------------

def _rand(shape, seed, scale=0.02, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset


@pytest.mark.parametrize("n_experts,last", [(2, 0), (3, 2), (4, 3)])
def test_upd_scale_zero_returns_last_slot(fake_ckpt, n_experts, last):
    """λ = 0: P_k = z[4] σ + μ for every k, i.e. the last-slot expert (E1, E3, E4) up to the eps
    of the normalisation: x4 − (x4 − μ) eps / (σ + eps)."""
    net = load_nino_mlp(fake_ckpt)
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    base = _rand((16, 8), 1)
    experts = [base + _rand((16, 8), 10 + i, 0.005) for i in range(n_experts)]
    out = metamerge_tensor(net, name, base, experts, upd_scale=0.0)
    assert context_order(n_experts)[3] == last
    e = experts[last]
    assert float((out - e).abs().max()) < 1e-4
    x = torch.stack([base.reshape(-1), *(experts[i].reshape(-1) for i in context_order(n_experts))], 1)
    mu, sigma, denom = _moments(x)  # slot 0 changes with chaining but P_k = x4 − (x4−μ_k)·eps/(σ_k+eps) ≈ x4 each time
    assert float((out - e).abs().max()) <= float((e - mu).abs().max()) * 1e-6 / sigma * 1.5 + 1e-7


def test_affine_equivariance(fake_ckpt):
    """W → αW + β on every input of one tensor maps its output the same way (up to the eps)."""
    net = load_nino_mlp(fake_ckpt)
    name = "visual.proj"
    base = _rand((12, 6), 2, scale=1.0)
    experts = [base + _rand((12, 6), 20 + i, 0.3) for i in range(3)]
    out = metamerge_tensor(net, name, base, experts)
    alpha, beta = 3.0, 0.5
    out2 = metamerge_tensor(net, name, alpha * base + beta, [alpha * e + beta for e in experts])
    assert torch.allclose(out2, alpha * out + beta, atol=1e-4, rtol=1e-5)


def test_type_ids_follow_the_generic_rule():
    assert type_segments("visual.ln_pre.weight", (64,)) == [(0, 64, 4)]
    assert type_segments("visual.class_embedding", (64,)) == [(0, 64, 5)]
    assert type_segments("visual.positional_embedding", (17, 64)) == [(0, 17 * 64, 6)]
    assert type_segments("visual.proj", (64, 32)) == [(0, 64 * 32, 1)]
    assert type_segments("visual.transformer.resblocks.0.mlp.c_fc.weight", (256, 64)) == [(0, 256 * 64, 1)]
    assert type_segments("visual.transformer.resblocks.0.attn.in_proj_bias", (192,)) == [(0, 192, 2)]
    assert type_segments("visual.conv1.weight", (64, 3, 3, 3)) == [(0, 64 * 27, 3)]
    d = 64 * 64
    assert type_segments("visual.transformer.resblocks.1.attn.in_proj_weight", (192, 64)) == [(0, d, 7), (d, 2 * d, 8), (2 * d, 3 * d, 9)]


def test_expert_count_limits():
    assert context_order(2) == (0, 1, 1, 0) and context_order(3) == (0, 1, 1, 2) and context_order(4) == (0, 1, 2, 3)
    for n in (1, 5):
        with pytest.raises(MetaMergeError, match=rf"supports 2-4 experts plus the base model \(NiNo context = 5 states\); got {n}"):
            context_order(n)


def test_chunking_does_not_change_the_result(fake_ckpt):
    net = load_nino_mlp(fake_ckpt)
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    base = _rand((24, 8), 3)
    experts = [base + _rand((24, 8), 30 + i, 0.004) for i in range(2)]
    a = metamerge_tensor(net, name, base, experts, chunk_rows=7)
    b = metamerge_tensor(net, name, base, experts, chunk_rows=100000)
    assert torch.allclose(a, b, atol=1e-7, rtol=0)
    for threads in (1, 2, 3):  # same chunks, each computed single-threaded: bit-identical
        assert torch.equal(metamerge_tensor(net, name, base, experts, chunk_rows=7, threads=threads), a)
    assert torch.equal(expert_mean(experts), (experts[0] + experts[1]) / 2)


def test_non_finite_prediction_is_an_error(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "huge.pt", extra={"edge_mlp.fc.6.bias": torch.full((40,), 3e38)})
    net = load_nino_mlp(ckpt)
    base = _rand((4, 4), 4)
    with pytest.raises(MetaMergeError, match="non-finite"):
        metamerge_tensor(net, "visual.proj", base, [base + 0.01, base - 0.01])


# The checkpoint loader ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(context=4), r"wrong shapes.*edge_proj\.fc\.0\.weight: \(8, 4\) \(expected \(8, 5\)\)"),
        (dict(n_types=14), r"14 type ids, expected 15"),
        (dict(n_out=4), r"4 horizon outputs, MetaMerge needs at least 5"),
        (dict(extra={"edge_mlp.fc.2.weight": torch.zeros(8, 7)}), r"wrong shapes.*edge_mlp\.fc\.2\.weight: \(8, 7\)"),
        (dict(extra={"edge_mlp.fc.0.bias": torch.zeros(9)}), r"wrong shapes.*edge_mlp\.fc\.0\.bias: \(9,\)"),
        (dict(drop="edge_proj.fc.0.bias"), r"missing \['edge_proj\.fc\.0\.bias'\]"),
        (dict(drop="edge_mlp.fc.2.bias"), r"missing edge_mlp\.fc\.2\.bias"),
        (dict(extra={"gnn.convs.0.lin.weight": torch.zeros(2, 2)}), r"not a NiNo-MLP checkpoint"),
        (dict(extra={"surprise": torch.zeros(1)}), r"unknown \['surprise'\]"),
        (dict(extra={"edge_mlp.fc.10.weight": torch.zeros(8, 8), "edge_mlp.fc.10.bias": torch.zeros(8)}), r"numbered 0, 2, 4"),
        (dict(model_args={"gnn": True}), r"not a NiNo-MLP checkpoint"),
        (dict(model_args={}), r"not a NiNo-MLP checkpoint"),
        (dict(model_args={"gnn": False, "hid": 128}), r"model_args\['hid'\] = 128 but the tensors have hidden size 8"),
        (dict(extra={"layer_embed.weight": torch.full((15, 8), float("nan"))}), r"non-finite"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, kwargs, pattern):
    ckpt = fake_checkpoint(tmp_path / "bad.pt", **kwargs)
    with pytest.raises(ValueError, match=r"^'checkpoint' .*" + pattern):
        load_nino_mlp(ckpt)


def test_checkpoint_inference_and_other_refusals(tmp_path):
    net = load_nino_mlp(fake_checkpoint(tmp_path / "h16.pt", hidden=16, layers=2, n_out=12))
    assert (net.hidden, net.n_layers, net.n_outputs, net.context, net.n_types) == (16, 2, 12, 5, 15)
    with pytest.raises(ValueError, match="'checkpoint' is required"):
        load_nino_mlp("")
    with pytest.raises(ValueError, match="'checkpoint' .*no such file"):
        load_nino_mlp(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="'checkpoint' .*not a weights-only PyTorch checkpoint"):
        load_nino_mlp(tmp_path / "junk.pt")
    # A pickle with an arbitrary object is refused by the weights-only unpickler.
    torch.save({"state_dict": {}, "model_args": {"gnn": False}, "obj": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="not a weights-only PyTorch checkpoint"):
        load_nino_mlp(tmp_path / "obj.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict with 'state_dict'"):
        load_nino_mlp(tmp_path / "list.pt")


# Strategy, config and the step pipeline -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm_stream")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=200 + i, scale=0.01) for i in range(1, 6)]
    return base, experts


def test_registry_and_config(tmp_path, fake_ckpt):
    assert METHODS["metamerge"] is MetaMerge
    base = 'workspace = "ws"\nbase = "b.safetensors"\n[policy]\ndeploy = "metamerge"\n'

    def parse(text):
        return config.parse(tomllib.loads(base + text), source=tmp_path / "mw.toml")

    s = parse(f'checkpoint = "{fake_ckpt}"\nupd_scale = 0.3\n')
    assert s.policy.params == {"checkpoint": str(fake_ckpt), "upd_scale": 0.3}
    s = parse(f'[policy.metamerge]\ncheckpoint = "{fake_ckpt}"\nfold = "pairwise"\n')
    assert s.policy.params["fold"] == "pairwise"
    bad = fake_checkpoint(tmp_path / "bad.pt", context=3)
    cases = [
        ("", "policy.metamerge", "'checkpoint' is required"),
        (f'checkpoint = "{tmp_path / "nope.pt"}"', "policy.metamerge.checkpoint", "no such file"),
        (f'checkpoint = "{bad}"', "policy.metamerge.checkpoint", "wrong shapes"),
        ("checkpoint = 3", "policy.checkpoint", "expected a string"),
        (f'checkpoint = "{fake_ckpt}"\nupd_scale = -1', "policy.metamerge.upd_scale", "'upd_scale'"),
        (f'checkpoint = "{fake_ckpt}"\nfold = "chain"', "policy.metamerge.fold", "'fold' must be one of none, pairwise"),
        (f'checkpoint = "{fake_ckpt}"\nslot0 = "clean"', "policy.metamerge.slot0", "'slot0'"),
        (f'checkpoint = "{fake_ckpt}"\nchunk_rows = 0', "policy.metamerge.chunk_rows", "'chunk_rows'"),
        (f'checkpoint = "{fake_ckpt}"\nthreads = -1', "policy.metamerge.threads", "'threads'"),
        (f'checkpoint = "{fake_ckpt}"\nhorizons = 3', "policy.horizons", "unknown key"),
        (f'checkpoint = "{fake_ckpt}"\ninit = "ema"', "policy.init", "init must be 'zs'"),
    ]
    for text, key, msg in cases:
        with pytest.raises(ConfigError) as ei:
            parse(text)
        assert ei.value.key == key, (text, ei.value)
        assert re.search(msg, str(ei.value)), (text, str(ei.value))


def test_stream_through_the_workspace(tmp_path, tiny_stream, fake_ckpt):
    """t = 1 deploys the expert; t = 2..4 a fresh merge of all experts (finite, same keys, shapes and
    dtypes); t = 5 is refused by default, naming the count and the limit; init stays θ0."""
    base, experts = tiny_stream
    ws = Workspace(config.load(write_config(tmp_path, base, f'checkpoint = "{fake_ckpt}"')))
    base_sd = load_all(base)
    ex = [load_all(e) for e in experts]
    for t in range(1, 5):
        ws.merge(experts[t - 1])
        got = load_all(ws.publishers["deploy"].path(t))
        assert set(got) == set(base_sd)
        for k, v in got.items():
            assert v.shape == base_sd[k].shape and v.dtype == base_sd[k].dtype, k
            assert bool(torch.isfinite(v).all()), k
        if t == 1:
            assert all(torch.equal(got[k], ex[0][k]) for k in got)
        else:
            assert torch.equal(got["logit_scale"], expert_mean([e["logit_scale"] for e in ex[:t]]))
            assert torch.equal(got["visual.conv1.weight"], expert_mean([e["visual.conv1.weight"] for e in ex[:t]]))
            k = "visual.transformer.resblocks.1.attn.in_proj_weight"
            want = metamerge_tensor(ws.strategy.net, k, base_sd[k], [e[k] for e in ex[:t]])
            assert torch.equal(got[k], want)
    assert ws.publishers["init"].manifest(ws.publishers["init"].current())["step"] == 0  # θ0
    assert len(ws.store.ids()) == 4  # every expert is kept for the fresh merges
    with pytest.raises(MetaMergeError, match=r"supports 2-4 experts plus the base model \(NiNo context = 5 states\); got 5"):
        ws.merge(experts[4])
    assert ws.publishers["deploy"].current() == 4


def test_pairwise_fold_beyond_four(tmp_path, tiny_stream, fake_ckpt):
    """fold = "pairwise" (daemon extension): t = 5 deploys MetaMerge(θ0; [deploy_4, θ_5]) for the
    whole model; steps 2..4 are unchanged; it is labelled an extension in the manifest."""
    base, experts = tiny_stream
    ws = Workspace(config.load(write_config(tmp_path, base, f'checkpoint = "{fake_ckpt}"\nfold = "pairwise"')))
    for p in experts:
        ws.merge(p)
    dep = ws.publishers["deploy"]
    d4, d5 = load_all(dep.path(4)), load_all(dep.path(5))
    merged4 = load_all(ws.root / "state" / "4" / "sets" / "merged")
    assert all(torch.equal(merged4[k], d4[k]) for k in d4)  # float32 base: the state is the deployed model
    base_sd, e5 = load_all(base), load_all(experts[4])
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(d5[k], metamerge_tensor(ws.strategy.net, k, base_sd[k], [d4[k], e5[k]]))
    assert torch.equal(d5["text_projection"], expert_mean([d4["text_projection"], e5["text_projection"]]))
    pol = dep.manifest(5)["policy"]
    assert any("daemon extension, not from the NiNo paper or blog" in x for x in pol["extensions"])
    assert json.loads((ws.root / "state" / "5" / "state.json").read_text())["meta"]["mode"] == "pairwise-fold"


def test_half_precision_base_keeps_its_dtype(tmp_path, fake_ckpt):
    base = make_open_clip_base(tmp_path / "b16.safetensors", dtype=torch.bfloat16)
    experts = [make_expert(base, tmp_path / f"h{i}.safetensors", seed=300 + i) for i in range(2)]
    ws = Workspace(config.load(write_config(tmp_path, base, f'checkpoint = "{fake_ckpt}"')))
    for p in experts:
        ws.merge(p)
    got = load_all(ws.publishers["deploy"].path(2))
    assert all(v.dtype == torch.bfloat16 and bool(torch.isfinite(v).all()) for v in got.values())


def test_only_open_clip_naming_is_accepted(fake_ckpt):
    strat = MetaMerge({"checkpoint": str(fake_ckpt)})
    meta = TensorMeta("w", (2, 2), torch.float32, TensorRole(Role.LINEAR))
    for table, ok in (("generic", False), ("hf_clip_vision", False), ("open_clip_visual", True)):
        ctx = StepContext(t=2, seed=0, expert_ids=["a", "b"], model=ModelInfo({"w": meta}, 0, table), meta={})
        if ok:
            assert strat._mset_prefix(ctx) == ""  # vision-only state dict without the "visual." prefix
        else:
            with pytest.raises(MetaMergeError, match="only open_clip ViT"):
                strat.passes(ctx)


def test_batch_cli(tmp_path, tiny_stream, fake_ckpt):
    from mergewatch.cli import main

    base, experts = tiny_stream
    cfg = write_config(tmp_path, base, f'[policy.metamerge]\ncheckpoint = "{fake_ckpt}"\nupd_scale = 1.0')
    assert main(["merge", "--config", str(cfg), str(experts[0]), str(experts[1])]) == 0
    ck = LazyCheckpoint(tmp_path / "ws" / "deploy" / "current")
    assert set(ck) == set(LazyCheckpoint(base))
