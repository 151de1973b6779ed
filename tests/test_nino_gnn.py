"""MetaMerge with NiNo-GNN (METAMERGE §9, method ``metamerge_gnn``): the neural graph and the forward
against the reference's fixtures, invariants that need no reference (graph coverage, eigenvectors,
per-tensor normalisation, per-block mode, seeded edge sampling), the checkpoint loader's refusals,
config and the daemon's step pipeline.

Conformance data lives beside the repository in ``../shared/nino/`` (never copied into it); tests that
need it are skipped, saying so, only when that folder is absent. Everything else runs on a random
NiNo-GNN-shaped checkpoint (hidden 8) written on the fly and on tiny real open_clip models."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergewatch import config
from mergewatch.errors import ConfigError
from mergewatch.nino.checkpoint import load_nino_gnn
from mergewatch.nino.context import MetaMergeError, context_order, expert_mean
from mergewatch.nino.eigenvectors import LpeStore, laplacian_pe
from mergewatch.nino.gnn import metamerge_graph
from mergewatch.nino.graph import AUX_VALUE, SLOTS, TYPE_CONV, build_vit_graph, graph_plan, resize_conv, vit_graphs, vit_spec
from mergewatch.strategies import METHODS
from mergewatch.strategies.metamerge import MetaMergeGNN
from mergewatch.workspace import Workspace
from tests.helpers import CONF, NINO, TINY_CLIP, load_all, make_expert, make_open_clip_base, needs_nino, perturb, tiny_clip_state

GNN_CKPT = NINO / "checkpoints" / "nino_no_posw.pt"
TOL = 1e-5  # fixtures.json: gnn.tolerance_max_abs_suggested


# Helpers -----------------------------------------------------------------------------------------

def fake_gnn_checkpoint(path: Path, hidden: int = 8, seed: int = 0, *, convs: int = 3, rounds: int = 2, n_out: int = 40,
                        edge_in: int = 45, model_args: dict | None = None, extra: dict | None = None, drop: str | None = None) -> Path:
    """A random checkpoint with the keys of nino_no_posw.pt (hidden ``hidden``)."""
    g = torch.Generator().manual_seed(seed)
    H = hidden

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {
        "layer_embed.weight": r(15, H), "node_proj.fc.0.weight": r(H, 8), "node_proj.fc.0.bias": r(H),
        "edge_proj.fc.0.weight": r(H, edge_in), "edge_proj.fc.0.bias": r(H),
        "edge_out.fc.0.weight": r(H, H), "edge_out.fc.0.bias": r(H),
        "edge_out.fc.2.weight": r(9 * n_out, H), "edge_out.fc.2.bias": r(9 * n_out),
    }
    for i in range(convs):
        c = f"gnn.convs.{i}."
        sd.update({c + "edge_encoder.weight": r(2 * H, H), c + "edge_encoder.bias": r(2 * H),
                   c + "pre_nns.0.0.weight": r(H, 2 * H), c + "pre_nns.0.0.bias": r(H),
                   c + "post_nns.0.0.weight": r(H, 2 * H), c + "post_nns.0.0.bias": r(H),
                   c + "lin.weight": r(H, H), c + "lin.bias": r(H)})
    for i in range(rounds):
        for lin in ("lin_e", "lin_s", "lin_t", "lin1"):
            sd[f"gnn.edge_update.{i}.{lin}.weight"] = r(H, H)
            sd[f"gnn.edge_update.{i}.{lin}.bias"] = r(H)
    sd.update(extra or {})
    if drop:
        del sd[drop]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "model_args": {"wte_pos_enc": False} if model_args is None else model_args}, path)
    return path


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory) -> Path:
    return fake_gnn_checkpoint(tmp_path_factory.mktemp("nino_gnn") / "fake_gnn.pt")


def write_config(d: Path, base: Path, policy: str, seed: int = 0) -> Path:
    p = d / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\nseed = {seed}\n[policy]\ndeploy = "metamerge_gnn"\n{policy}\n', "utf-8")
    return p


def fixture_load(name: str) -> dict[str, torch.Tensor]:
    return load_all(CONF / f"{name}.safetensors")


def max_abs_by_key(got: dict, want: dict) -> dict[str, float]:
    assert set(got) == set(want)
    return {k: float((got[k].float() - want[k].float()).abs().max()) for k in want}


def visual_shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def one_block_state(seed: int) -> dict[str, torch.Tensor]:
    cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 1}}
    return tiny_clip_state(seed, cfg=cfg)


# Conformance (needs ../shared/nino) -------------------------------------------------------------

@pytest.fixture(scope="module")
def conf():
    if not (CONF / "fixtures.json").is_file():
        pytest.skip(f"{NINO} is absent (NiNo conformance fixtures); CI has it")
    meta = json.loads((CONF / "fixtures.json").read_text("utf-8"))
    w0 = fixture_load("w0")
    experts = [fixture_load(f"expert{i}") for i in range(1, 5)]
    graph = fixture_load("gnn_graph")
    return meta, w0, experts, graph


@needs_nino
def test_graph_builder_reproduces_the_fixture_graph(conf):
    meta, w0, _, ref = conf
    g = build_vit_graph(vit_spec(visual_shapes(w0)), heads=meta["model"]["visual_heads"])
    info = meta["gnn"]["graph"]
    assert (g.num_nodes, g.num_edges) == (info["num_nodes"], info["num_edges"]) == (1169, 105297)
    assert g.n_params == info["n_visual_params_conv1_3x3"]
    from mergewatch.nino.graph import graph_size

    assert graph_size(vit_spec(visual_shapes(w0)), 2) == (1169, 105297, 105152)
    assert torch.equal(g.edge_index, ref["edge_index"])
    assert torch.equal(g.edge_type, ref["edge_type"])
    assert torch.equal(g.edge_param, ref["edge_param_index"])
    counts = torch.bincount(g.edge_type.long(), minlength=15)
    assert {str(t): int(c) for t, c in enumerate(counts) if c} == info["edges_per_type"]
    # The flat parameter order is the state-dict order of the visual keys.
    assert [t.name for t in g.tensors] == [k for k in meta["model"]["state_dict_key_order"] if k.startswith("visual.")]


@needs_nino
def test_eigenvectors_match_the_fixture_up_to_sign_and_basis(conf, tmp_path):
    """Our Laplacian eigenvectors span the fixture's: columns with a simple eigenvalue agree up to
    sign; the one repeated pair (columns 5, 6) spans the same plane. The cache stores and reuses them."""
    meta, w0, _, ref = conf
    g = build_vit_graph(vit_spec(visual_shapes(w0)), heads=2)
    store = LpeStore("", str(tmp_path / "cache"))
    ours, source = store.get(g)
    assert source == "computed" and ours.shape == (1169, 8)
    want = ref["lpe"]
    for j in (0, 1, 2, 3, 4, 7):
        assert float((ours[:, j].abs() - want[:, j].abs()).abs().max()) < 1e-4, j
    plane = ours[:, 5:7].double()
    resid = want[:, 5:7].double() - plane @ (plane.t() @ want[:, 5:7].double())
    assert float(resid.abs().max()) < 1e-4
    assert (tmp_path / "cache" / f"{g.structure_hash()}.safetensors").is_file()
    again, source = LpeStore("", str(tmp_path / "cache")).get(g)
    assert source == "cache" and torch.equal(again, ours)


@needs_nino
def test_per_horizon_predictions_match(conf):
    """P_1..P_5 of the 2-expert run (visual keys, conv1 as the 3×3 prediction) match gnn_2experts_k*
    and their average matches gnn_2experts, with the fixture's eigenvectors and sampling off."""
    _, w0, experts, ref = conf
    net = load_nino_gnn(GNN_CKPT)
    g = build_vit_graph(vit_spec(visual_shapes(w0)), heads=2)
    per: list[dict] = []
    out = metamerge_graph(net, g, w0, experts[:2], ref["lpe"], per_horizon=per)
    worst = []
    for h in range(5):
        d = max_abs_by_key(per[h], fixture_load(f"gnn_2experts_k{h + 1}"))
        worst.append(max(d.values()))
        assert not {k: v for k, v in d.items() if v > TOL}, f"horizon {h + 1}"
    final = fixture_load("gnn_2experts")
    assert max(float((out[k] - final[k]).abs().max()) for k in out if k != "visual.conv1.weight") <= TOL
    print("max abs diff per horizon k=1..5:", worst)


@needs_nino
def test_workspace_stream_matches_gnn_fixtures(tmp_path, conf):
    """The daemon's own pipeline (config → engine → publish), whole graph, eigenvectors pinned from
    gnn_graph.safetensors: t = 1 deploys expert 1, t = 2, 3, 4 match gnn_{t}experts to ≤ 1e-5 for
    every tensor (conv1 and the text tower are expert means); the manifest records the checkpoint's
    sha256 and the settings."""
    meta, _, experts, _ = conf
    policy = f'checkpoint = "{GNN_CKPT}"\nheads = 2\nlpe = "{CONF / "gnn_graph.safetensors"}"\nlpe_cache = "{tmp_path / "lpe"}"'
    ws = Workspace(config.load(write_config(tmp_path, CONF / "w0.safetensors", policy)))
    diffs = {}
    for t in range(1, 5):
        res = ws.merge(CONF / f"expert{t}.safetensors")
        assert res.status == "merged" and res.step == t
        dep = ws.publishers["deploy"]
        got = load_all(dep.path(dep.current()))
        if t == 1:
            assert all(torch.equal(got[k], experts[0][k]) for k in got)
            continue
        d = max_abs_by_key(got, fixture_load(f"gnn_{t}experts"))
        diffs[t] = max(d.values())
        assert not {k: v for k, v in d.items() if v > TOL}, f"{t} experts"
    print("max abs diff vs gnn_{2,3,4}experts:", diffs)
    pol = ws.publishers["deploy"].manifest(ws.publishers["deploy"].current())["policy"]
    assert pol["name"] == "metamerge_gnn" and pol["checkpoint_sha256"] == meta["gnn"]["checkpoint_sha256"]
    assert pol["nino"]["variant"] == "nino-gnn" and pol["nino"]["hidden"] == 128 and pol["nino"]["rounds"] == 2
    assert (pol["heads"], pol["subgraph"], pol["edge_sample_ratio"], pol["upd_scale"]) == (2, False, 0.0, 2.5)
    assert pol["lpe_sha256"] == meta["files"]["gnn_graph.safetensors"]["sha256"]
    assert pol["reproducibility"].startswith("deterministic") and "lpe_cache" not in pol
    state = json.loads((ws.root / "state" / "4" / "state.json").read_text())["meta"]
    assert state["mode"] == "metamerge-4" and state["lpe"]["visual"].startswith("injected sha256:")


@needs_nino
def test_published_checkpoints_load_or_are_refused():
    net = load_nino_gnn(GNN_CKPT)
    assert (net.hidden, net.n_outputs, net.rounds, net.convs) == (128, 40, 2, 3)
    assert net.sha256 == "2e2186e4a0e50193080eb9074648786ef25cd5ac3149a7df790127fe41101620"
    with pytest.raises(ValueError, match=r"'checkpoint'.*not a NiNo-GNN checkpoint.*'metamerge'"):
        load_nino_gnn(NINO / "checkpoints" / "nino_mlp.pt")


# The graph and the eigenvectors (no reference needed) --------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    sd = tiny_clip_state(0)
    return sd, vit_spec(visual_shapes(sd))


def _real_param_indices(g) -> torch.Tensor:
    p, t = g.edge_param.long(), g.edge_type
    plain = p[(p >= 0) & (t != TYPE_CONV)]
    conv = (p[t == TYPE_CONV].unsqueeze(1) + torch.arange(SLOTS)).reshape(-1)
    return torch.cat([plain, conv])


def test_every_parameter_is_exactly_one_edge_and_blocks_partition_the_graph(tiny):
    """Each visual parameter (conv1 as 3×3) is carried by exactly one edge slot, in whole-graph and
    per-block mode; the per-block graphs hold the same weight edges as the whole graph; node count
    and auxiliary edges follow the layout (self-loop per node, 2 residual diagonals per block)."""
    sd, spec = tiny
    d, L, H = spec.width, spec.blocks, 2
    whole = build_vit_graph(spec, H)
    idx = _real_param_indices(whole)
    assert torch.equal(torch.sort(idx).values, torch.arange(whole.n_params))
    types = torch.bincount(whole.edge_type.long(), minlength=15)
    assert int(types[13]) == whole.num_nodes and int(types[10]) == 2 * d * L and int(types[11]) == 2 * d * L
    nodes = 1 + spec.tokens + spec.in_channels + 2 + d + L * (3 + H + 2 + 2 * d + 3 + d + 1 + spec.hidden[0] + 1 + d) + 2 + spec.out_dim
    assert whole.num_nodes == nodes
    blocks = vit_graphs(spec, H, subgraph=True)
    assert [g.name for g in blocks] == [f"block{b}" for b in range(L)]
    assert [[t.name for t in g.tensors] for g in blocks] == [names for _, names in graph_plan(spec, True)]
    assert sum(g.n_params for g in blocks) == whole.n_params
    for g in blocks:
        assert torch.equal(torch.sort(_real_param_indices(g)).values, torch.arange(g.n_params))
    real = lambda g: int((g.edge_param >= 0).sum())  # noqa: E731
    assert sum(real(g) for g in blocks) == real(whole)
    assert blocks[0].num_nodes + blocks[1].num_nodes == whole.num_nodes + d  # the shared boundary neurons, copied
    # Attention heads: each head node feeds the d/H q and v neurons of its head.
    fan_out = torch.bincount(whole.src[whole.edge_type == 11].long(), minlength=whole.num_nodes)
    assert int((fan_out > 0).sum()) == H * L and bool((fan_out[fan_out > 0] == 2 * d // H).all())
    assert set(AUX_VALUE) == {10, 11, 13}


def test_unknown_architectures_are_refused(tiny):
    sd, spec = tiny
    shapes = visual_shapes(sd)
    with pytest.raises(MetaMergeError, match=r"'visual\.attn_pool\.query' is not part of the open_clip ViT graph"):
        vit_spec({**shapes, "visual.attn_pool.query": (4, 32)})
    bad = dict(shapes)
    del bad["visual.ln_pre.bias"]
    with pytest.raises(MetaMergeError, match=r"needs tensor 'visual\.ln_pre\.bias'"):
        vit_spec(bad)
    with pytest.raises(MetaMergeError, match=r"'visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias' has shape \(31,\)"):
        vit_spec({**shapes, "visual.transformer.resblocks.1.mlp.c_proj.bias": (31,)})
    with pytest.raises(MetaMergeError, match=r"width 32 is not divisible into 3 attention heads"):
        build_vit_graph(spec, 3)


def test_laplacian_eigenvectors_are_orthonormal_nontrivial_and_seeded(tiny):
    """Columns are orthonormal and orthogonal to the trivial eigenvector D^½·1; L v = λ v; the sparse
    solver (forced) agrees with the dense one up to sign; the signs are a function of the graph."""
    from mergewatch.nino import eigenvectors as nino_gnn

    _, spec = tiny
    g = build_vit_graph(spec, 2)
    pe = laplacian_pe(g).double()
    assert torch.allclose(pe.t() @ pe, torch.eye(8, dtype=torch.float64), atol=1e-5)
    s, t = g.src.long(), g.dst.long()
    keep = s != t
    a = torch.zeros(g.num_nodes, g.num_nodes, dtype=torch.float64)
    a[s[keep], t[keep]] = 1.0
    a[t[keep], s[keep]] = 1.0
    deg = a.sum(1)
    assert float((deg.sqrt() @ pe).abs().max()) < 1e-4
    lap = torch.eye(g.num_nodes, dtype=torch.float64) - a / deg.sqrt().outer(deg.sqrt())
    lam = (pe * (lap @ pe)).sum(0)
    assert float((lap @ pe - pe * lam).abs().max()) < 1e-4 and bool((lam > 1e-6).all())
    old = nino_gnn.DENSE_EIG_MAX_NODES
    try:
        nino_gnn.DENSE_EIG_MAX_NODES = 10  # force the Lanczos path on this small graph
        sparse = laplacian_pe(g).double()
    finally:
        nino_gnn.DENSE_EIG_MAX_NODES = old
    simple = [j for j in range(8) if all(abs(float(lam[j] - lam[i])) > 1e-6 for i in range(8) if i != j)]
    assert simple
    for j in simple:
        assert float((sparse[:, j] - pe[:, j]).abs().max()) < 1e-4, j  # canonical + seeded signs: same signs
    repeated = [j for j in range(8) if j not in simple]
    assert repeated  # this graph has a repeated eigenvalue: single-vector Lanczos would miss a copy
    span = sparse[:, repeated]
    assert float((pe[:, repeated] - span @ (span.t() @ pe[:, repeated])).abs().max()) < 1e-4
    assert torch.equal(laplacian_pe(g), laplacian_pe(build_vit_graph(spec, 2)))


def test_injected_eigenvectors_are_checked(tiny, tmp_path):
    _, spec = tiny
    g = build_vit_graph(spec, 2)
    good = tmp_path / "lpe.safetensors"
    save_file({"lpe": torch.randn(g.num_nodes, 8)}, str(good))
    lpe, source = LpeStore(str(good)).get(g)
    assert source == "injected" and lpe.shape == (g.num_nodes, 8)
    with pytest.raises(MetaMergeError, match=r"has no tensor 'lpe\.block0'"):
        LpeStore(str(good)).get(vit_graphs(spec, 2, subgraph=True)[0])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lpe": torch.randn(g.num_nodes - 1, 8)}, str(wrong))
    with pytest.raises(MetaMergeError, match=rf"wrong\.safetensors' tensor 'lpe' has shape \({g.num_nodes - 1}, 8\)"):
        LpeStore(str(wrong)).get(g)
    with pytest.raises(ValueError, match="'lpe' .*cannot read"):
        LpeStore(str(tmp_path / "missing.safetensors"))


# The forward and the merge (random checkpoint, tiny model) ----------------------------------------

@pytest.fixture(scope="module")
def tiny_inputs():
    """A one-block tiny visual tower (about 14k edges) and four seeded experts: the forward tests."""
    sd = one_block_state(1)
    spec = vit_spec(visual_shapes(sd))
    vis = {k: v for k, v in sd.items() if k.startswith("visual.")}
    experts = [{k: v for k, v in perturb(vis, 40 + i, 0.01).items()} for i in range(4)]
    return spec, vis, experts


@pytest.mark.parametrize("n_experts", [2, 4])
def test_upd_scale_zero_returns_the_last_slot_expert(fake_ckpt, tiny_inputs, n_experts):
    """λ = 0: every prediction is z[4], i.e. the residual-base expert (E1 for 2, E4 for 4 experts)
    up to the eps of the normalisation, for every tensor of the graph."""
    spec, base, experts = tiny_inputs
    net = load_nino_gnn(fake_ckpt)
    g = build_vit_graph(spec, 2)
    out = metamerge_graph(net, g, base, experts[:n_experts], laplacian_pe(g), upd_scale=0.0)
    assert set(out) == set(base)
    last = experts[context_order(n_experts)[3]]
    for k, v in out.items():
        want = resize_conv(last[k]) if v.dim() == 4 else last[k]
        assert float((v - want).abs().max()) < 1e-5 * max(1.0, float(want.abs().max())), k


def test_normalisation_is_per_tensor(fake_ckpt, tiny_inputs):
    """W → αW + β on every input of ONE tensor maps its output the same way and leaves every other
    tensor unchanged (up to the eps): the network only sees per-tensor normalised values."""
    spec, base, experts = tiny_inputs
    net = load_nino_gnn(fake_ckpt)
    g = build_vit_graph(spec, 2)
    lpe = laplacian_pe(g)
    out = metamerge_graph(net, g, base, experts[:2], lpe)
    key, alpha, beta = "visual.transformer.resblocks.0.mlp.c_fc.weight", 3.0, 0.5
    assert key in base
    aff = lambda sd: {**sd, key: sd[key] * alpha + beta}  # noqa: E731
    out2 = metamerge_graph(net, g, aff(base), [aff(e) for e in experts[:2]], lpe)
    assert torch.allclose(out2[key], out[key] * alpha + beta, atol=1e-4, rtol=1e-5)
    assert all(torch.allclose(out2[k], out[k], atol=1e-5) for k in out if k != key)
    assert float((out[key] - expert_mean([e[key] for e in experts[:2]])).abs().max()) > 1e-4  # it did something


def test_edge_sampling_is_seeded_and_off_by_default(fake_ckpt, tiny_inputs):
    spec, base, experts = tiny_inputs
    net = load_nino_gnn(fake_ckpt)
    g = build_vit_graph(spec, 2)
    lpe = laplacian_pe(g)

    def run(ratio, seed=None, chunk=32768):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return metamerge_graph(net, g, base, experts[:2], lpe, edge_sample_ratio=ratio, generator=gen, chunk_edges=chunk)

    full, ones = run(0.0), run(1.0)
    assert all(torch.equal(full[k], ones[k]) for k in full)
    small_chunks = run(0.0, chunk=1000)
    assert all(torch.equal(full[k], small_chunks[k]) for k in full)  # chunking does not change the sums
    a, b, c = run(0.2, 7), run(0.2, 7), run(0.2, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: bit-identical
    assert any(not torch.allclose(a[k], c[k]) for k in a) and any(not torch.allclose(a[k], full[k]) for k in a)


def test_one_block_model_subgraph_equals_whole_graph(fake_ckpt, tmp_path):
    """With exactly one transformer block the per-block graph (stem and head attached) is the whole
    graph: same nodes, edges and eigenvectors, bit-identical merge."""
    sd = one_block_state(3)
    spec = vit_spec(visual_shapes(sd))
    whole, (block,) = vit_graphs(spec, 2, subgraph=False)[0], vit_graphs(spec, 2, subgraph=True)
    assert torch.equal(whole.edge_index, block.edge_index) and torch.equal(whole.edge_param, block.edge_param)
    assert whole.structure_hash() == block.structure_hash()
    vis = {k: v for k, v in sd.items() if k.startswith("visual.")}
    experts = [perturb(vis, 70 + i, 0.01) for i in range(3)]
    net = load_nino_gnn(fake_ckpt)
    store = LpeStore("", str(tmp_path))
    a = metamerge_graph(net, whole, vis, experts, store.get(whole)[0])
    b = metamerge_graph(net, block, vis, experts, store.get(block)[0])
    assert store.get(block)[1] == "memory"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_prediction_is_an_error(tmp_path, tiny_inputs):
    spec, base, experts = tiny_inputs
    ckpt = fake_gnn_checkpoint(tmp_path / "huge.pt", extra={"edge_out.fc.2.bias": torch.full((360,), 3e38)})
    g = build_vit_graph(spec, 2)
    with pytest.raises(MetaMergeError, match="non-finite"):
        metamerge_graph(load_nino_gnn(ckpt), g, base, experts[:2], laplacian_pe(g))


# The checkpoint loader ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(edge_in=40), r"wrong shapes.*edge_proj\.fc\.0\.weight: \(8, 40\) \(expected \(8, 45\)\)"),
        (dict(extra={"node_proj.fc.0.weight": torch.zeros(8, 7)}), r"wrong shapes.*node_proj\.fc\.0\.weight: \(8, 7\)"),
        (dict(extra={"gnn.convs.1.edge_encoder.weight": torch.zeros(8, 8)}), r"gnn\.convs\.1\.edge_encoder\.weight: \(8, 8\) \(expected \(16, 8\)\)"),
        (dict(extra={"gnn.edge_update.0.lin_s.bias": torch.zeros(9)}), r"gnn\.edge_update\.0\.lin_s\.bias: \(9,\)"),
        (dict(extra={"layer_embed.weight": torch.zeros(14, 8)}), r"layer_embed\.weight has shape \(14, 8\), expected \(15, hidden\)"),
        (dict(n_out=4), r"4 horizon outputs per slot"),
        (dict(extra={"edge_out.fc.2.weight": torch.zeros(100, 8)}), r"edge_out\.fc\.2\.weight: \(100, 8\)"),
        (dict(drop="edge_proj.fc.0.bias"), r"missing \['edge_proj\.fc\.0\.bias'\]"),
        (dict(drop="gnn.convs.0.lin.bias"), r"missing \['gnn\.convs\.0\.lin\.bias'\]"),
        (dict(extra={"surprise": torch.zeros(1)}), r"unknown \['surprise'\]"),
        (dict(convs=1), r"C >= R"),
        (dict(model_args={"gnn": False}), r"not a NiNo-GNN checkpoint"),
        (dict(model_args={"wte_pos_enc": True}), r"wte_pos_enc"),
        (dict(model_args={"hid": 128}), r"model_args\['hid'\] = 128 but the tensors have hidden size 8"),
        (dict(extra={"edge_out.fc.0.bias": torch.full((8,), float("inf"))}), r"non-finite"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, kwargs, pattern):
    ckpt = fake_gnn_checkpoint(tmp_path / "bad.pt", **kwargs)
    with pytest.raises(ValueError, match=r"^'checkpoint' .*" + pattern):
        load_nino_gnn(ckpt)


def test_checkpoint_file_refusals(tmp_path):
    with pytest.raises(ValueError, match="'checkpoint' is required"):
        load_nino_gnn("")
    with pytest.raises(ValueError, match="'checkpoint' .*no such file"):
        load_nino_gnn(tmp_path / "missing.pt")
    torch.save({"state_dict": {}, "model_args": {}, "obj": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="not a weights-only PyTorch checkpoint"):
        load_nino_gnn(tmp_path / "obj.pt")


# Strategy, config and the step pipeline -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("gnn_stream")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=500 + i, scale=0.01) for i in range(1, 6)]
    return base, experts


def test_registry_and_config(tmp_path, fake_ckpt):
    assert METHODS["metamerge_gnn"] is MetaMergeGNN
    head = 'workspace = "ws"\nbase = "b.safetensors"\n[policy]\ndeploy = "metamerge_gnn"\n'

    def parse(text):
        return config.parse(tomllib.loads(head + text), source=tmp_path / "mw.toml")

    s = parse(f'[policy.metamerge_gnn]\ncheckpoint = "{fake_ckpt}"\nsubgraph = true\nedge_sample_ratio = 0.2\nheads = 2\n')
    assert s.policy.params == {"checkpoint": str(fake_ckpt), "subgraph": True, "edge_sample_ratio": 0.2, "heads": 2}
    mlp_like = tmp_path / "mlp.pt"
    torch.save({"state_dict": {"layer_embed.weight": torch.zeros(15, 4)}, "model_args": {"gnn": False}}, mlp_like)
    cases = [
        ("", "policy.metamerge_gnn", "'checkpoint' is required"),
        (f'checkpoint = "{mlp_like}"', "policy.metamerge_gnn.checkpoint", "not a NiNo-GNN checkpoint"),
        (f'checkpoint = "{fake_ckpt}"\nedge_sample_ratio = 1.5', "policy.metamerge_gnn.edge_sample_ratio", r"\[0, 1\]"),
        (f'checkpoint = "{fake_ckpt}"\nheads = -1', "policy.metamerge_gnn.heads", "'heads'"),
        (f'checkpoint = "{fake_ckpt}"\nsubgraph = "yes"', "policy.subgraph", "expected true or false"),
        (f'checkpoint = "{fake_ckpt}"\nchunk_edges = 0', "policy.metamerge_gnn.chunk_edges", "'chunk_edges'"),
        (f'checkpoint = "{fake_ckpt}"\nlpe = "{tmp_path / "none.safetensors"}"', "policy.metamerge_gnn.lpe", "cannot read"),
        (f'checkpoint = "{fake_ckpt}"\nchunk_rows = 5', "policy.chunk_rows", "unknown key"),
    ]
    for text, key, msg in cases:
        with pytest.raises(ConfigError) as ei:
            parse(text)
        assert ei.value.key == key, (text, ei.value)
        assert re.search(msg, str(ei.value)), (text, str(ei.value))


def test_stream_through_the_workspace_per_block(tmp_path, tiny_stream, fake_ckpt):
    """subgraph = true: t = 1 deploys the expert; t = 2..4 a fresh merge of all experts (finite, same
    keys, shapes, dtypes; conv1 and the text tower are expert means; each block equals the direct
    merge of its graph); t = 5 is refused by default; the manifest says "approximate, stochastic"."""
    base, experts = tiny_stream
    policy = f'checkpoint = "{fake_ckpt}"\nsubgraph = true\nheads = 2\nlpe_cache = "{tmp_path / "lpe"}"'
    ws = Workspace(config.load(write_config(tmp_path, base, policy)))
    base_sd = load_all(base)
    ex = [load_all(e) for e in experts]
    spec = vit_spec(visual_shapes(base_sd))
    for t in range(1, 5):
        ws.merge(experts[t - 1])
        got = load_all(ws.publishers["deploy"].path(t))
        assert set(got) == set(base_sd)
        for k, v in got.items():
            assert v.shape == base_sd[k].shape and v.dtype == base_sd[k].dtype and bool(torch.isfinite(v).all()), k
        if t == 1:
            assert all(torch.equal(got[k], ex[0][k]) for k in got)
            continue
        for k in ("logit_scale", "visual.conv1.weight", "token_embedding.weight"):
            assert torch.equal(got[k], expert_mean([e[k] for e in ex[:t]])), k
        if t == 3:
            g1 = vit_graphs(spec, 2, subgraph=True)[1]
            want = metamerge_graph(ws.strategy.net, g1, base_sd, ex[:3], ws.strategy.lpe_store.get(g1)[0])
            assert all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((ws.root / "state" / "4" / "state.json").read_text())["meta"]
    assert sorted(meta["lpe"]) == ["block0", "block1"]
    assert len(list((tmp_path / "lpe").glob("*.safetensors"))) == 2  # stem + block 0, block 1 + head
    pol = ws.publishers["deploy"].manifest(4)["policy"]
    assert pol["reproducibility"].startswith("approximate, stochastic") and pol["subgraph"] is True
    with pytest.raises(MetaMergeError, match=r"supports 2-4 experts plus the base model \(NiNo context = 5 states\); got 5"):
        ws.merge(experts[4])


def test_sampled_replay_is_bit_identical_and_seed_dependent(tmp_path, tiny_stream, fake_ckpt):
    """edge_sample_ratio = 0.2 (the published setting) draws from the step seed: two workspaces with
    the same seed publish identical bytes; another config seed changes the merge."""
    base, experts = tiny_stream
    policy = f'checkpoint = "{fake_ckpt}"\nheads = 2\nedge_sample_ratio = 0.2\nlpe_cache = "{tmp_path / "lpe"}"'
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        d = tmp_path / f"w{i}"
        d.mkdir()
        ws = Workspace(config.load(write_config(d, base, policy, seed=seed)))
        for p in experts[:2]:
            ws.merge(p)
        outs.append(load_all(ws.publishers["deploy"].path(2)))
        assert "edge sampling 0.2" in ws.publishers["deploy"].manifest(2)["policy"]["reproducibility"]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_batch_cli(tmp_path, tiny_stream, fake_ckpt):
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.cli import main

    base, experts = tiny_stream
    cfg = write_config(tmp_path, base, f'[policy.metamerge_gnn]\ncheckpoint = "{fake_ckpt}"\nheads = 2\nlpe_cache = "{tmp_path / "lpe"}"')
    assert main(["merge", "--config", str(cfg), str(experts[0]), str(experts[1])]) == 0
    ck = LazyCheckpoint(tmp_path / "ws" / "deploy" / "current")
    assert set(ck) == set(LazyCheckpoint(base))


def test_graph_size_formula_matches_the_built_graph(tiny):
    """The whole-graph memory check counts nodes, edges and parameters from shapes alone."""
    from mergewatch.nino.graph import graph_size

    sd, spec = tiny
    for heads in (1, 2, 4):
        g = build_vit_graph(spec, heads)
        assert graph_size(spec, heads) == (g.num_nodes, g.num_edges, g.n_params)
    one = vit_spec(visual_shapes(one_block_state(0)))
    g = build_vit_graph(one, 2)
    assert graph_size(one, 2) == (g.num_nodes, g.num_edges, g.n_params)
    # ViT-B/16 (width 768, 12 blocks of MLP width 3072, 197 tokens, patch 16, 12 heads): METAMERGE §9
    # gives 75,477 nodes and 85,717,461 edges for the reference graph.
    d, h = 768, 3072
    shapes = {"visual.class_embedding": (d,), "visual.positional_embedding": (197, d), "visual.proj": (d, 512),
              "visual.conv1.weight": (d, 3, 16, 16), "visual.ln_pre.weight": (d,), "visual.ln_pre.bias": (d,),
              "visual.ln_post.weight": (d,), "visual.ln_post.bias": (d,)}
    for b in range(12):
        for part, shape in (("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("attn.in_proj_weight", (3 * d, d)), ("attn.in_proj_bias", (3 * d,)),
                            ("attn.out_proj.weight", (d, d)), ("attn.out_proj.bias", (d,)), ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                            ("mlp.c_fc.weight", (h, d)), ("mlp.c_fc.bias", (h,)), ("mlp.c_proj.weight", (d, h)), ("mlp.c_proj.bias", (d,))):
            shapes[f"visual.transformer.resblocks.{b}.{part}"] = shape
    nodes, edges, params = graph_size(vit_spec(shapes), 12)
    assert (nodes, edges) == (75_477, 85_717_461)


def test_stored_and_recomputed_edge_states_agree(fake_ckpt, tiny_inputs):
    """The forward keeps the E × H edge states between its passes when they fit, and recomputes them
    from the inputs otherwise (the whole-tower ViT-B/16 case): bit-identical predictions, for any
    number of worker threads."""
    spec, base, experts = tiny_inputs
    net = load_nino_gnn(fake_ckpt)
    g = build_vit_graph(spec, 2)
    z = torch.randn(g.n_params, 5, generator=torch.Generator().manual_seed(3))
    lpe = laplacian_pe(g)
    stored = net.predict(g, z, lpe, 2, chunk_edges=4096)
    recomputed = net.predict(g, z, lpe, 2, chunk_edges=4096, store_edges_bytes=0)
    assert torch.equal(stored, recomputed) and bool(torch.isfinite(stored).all())
    for threads in (1, 3):  # chunks computed single-threaded, summed in chunk order: bit-identical
        assert torch.equal(net.predict(g, z, lpe, 2, chunk_edges=4096, threads=threads), stored)


def test_pairwise_fold_beyond_four(tmp_path, tiny_stream, fake_ckpt):
    """fold = "pairwise" (daemon extension): t = 5 deploys MetaMerge-GNN(θ0; [deploy_4, θ_5]) over the
    whole model; it is labelled an extension in the manifest."""
    base, experts = tiny_stream
    policy = f'checkpoint = "{fake_ckpt}"\nheads = 2\nfold = "pairwise"\nlpe_cache = "{tmp_path / "lpe"}"'
    ws = Workspace(config.load(write_config(tmp_path, base, policy)))
    for p in experts:
        ws.merge(p)
    dep = ws.publishers["deploy"]
    d4, d5 = load_all(dep.path(4)), load_all(dep.path(5))
    base_sd, e5 = load_all(base), load_all(experts[4])
    g = vit_graphs(vit_spec(visual_shapes(base_sd)), 2, subgraph=False)[0]
    want = metamerge_graph(ws.strategy.net, g, base_sd, [d4, e5], ws.strategy.lpe_store.get(g)[0])
    assert all(torch.equal(d5[k], want[k]) for k in want if k != "visual.conv1.weight")
    assert torch.equal(d5["text_projection"], expert_mean([d4["text_projection"], e5["text_projection"]]))
    pol = dep.manifest(5)["policy"]
    assert any("daemon extension, not from the NiNo paper or blog" in x for x in pol["extensions"])
