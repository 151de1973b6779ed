"""TIME policies end to end through the engine, the state store and the publisher (SPEC §1)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.strategies.time_policy import DEPLOYS, INITS, valid_combination
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert, make_open_clip_base

VALID_PAIRS = [(i, d) for i, d in itertools.product(INITS, DEPLOYS) if valid_combination(i, d)]


def write_config(tmp: Path, policy: str, extra: str = "") -> Path:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 7\n{extra}\n[policy]\n{policy}\n', "utf-8")
    return p


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=100 + i) for i in range(1, 4)]
    return d, base, experts


def expected_views(init: str, deploy: str, base: dict, experts: list[dict], w: float, seed: str = "zs"):
    """The formulas of SPEC §1 with WA, computed naively on whole state dicts (float32)."""
    f = {k: v.float() for k, v in base.items()}
    ema = None
    all_ = None
    outs = []
    for t, e in enumerate(experts, 1):
        e = {k: v.float() for k, v in e.items()}
        if seed == "first" and t == 1:
            ema = e
        else:
            prev = f if ema is None else ema
            ema = {k: w * e[k] + (1 - w) * prev[k] for k in e}
        seen = [{k: v.float() for k, v in x.items()} for x in experts[:t]]
        all_ = {k: sum(x[k] for x in seen) / t for k in e}
        pick = {"ft": e, "ema": ema, "all": all_, "zs": f}
        outs.append((pick[init], pick[deploy]))
    return outs


def assert_close_state(a: dict, b: dict, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=1e-5, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("init,deploy", VALID_PAIRS)
def test_three_expert_stream_every_pair(tmp_path, stream, init, deploy):
    d, base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    cfg = write_config(tmp_path, f'init = "{init}"\ndeploy = "{deploy}"\ntechnique = "wa"' + ('\nw = 0.3' if "ema" in (init, deploy) else ""))
    ws = Workspace(config.load(cfg))
    w = 0.3
    base_sd = load_all(base)
    ex_sd = [load_all(e) for e in experts]
    want = expected_views(init, deploy, base_sd, ex_sd, w)
    for t, path in enumerate(experts, 1):
        res = ws.merge(path)
        assert res.status == "merged" and res.step == t
        want_init, want_deploy = want[t - 1]
        dep = ws.publishers["deploy"]
        cur = dep.current()
        assert cur == t
        assert_close_state(load_all(dep.path(cur)), want_deploy)
        ini = ws.publishers["init"]
        assert_close_state(load_all(ini.path(ini.current())), want_init)
        man = dep.manifest(cur)
        assert man["step"] == t and man["experts"] == ws.merged_ids()
    # init zs is published once (its content never changes); the others once per step.
    n_init = len(ws.publishers["init"].versions())
    assert n_init == (1 if init == "zs" else 3)
    if init == "zs":
        assert ws.publishers["init"].manifest(1)["step"] == 0
    # exact WA recursion for the EMA: the stored state is float32 and matches the naive formula
    if "ema" in (init, deploy):
        ema = load_all(Path(ws.root / "state" / "3" / "sets" / "ema"))
        prev = {k: v.float() for k, v in base_sd.items()}
        for e in ex_sd:
            prev = {k: w * e[k].float() + (1 - w) * prev[k] for k in prev}
        for k, v in ema.items():
            if v.dtype.is_floating_point:
                torch.testing.assert_close(v, prev[k], atol=1e-6, rtol=1e-6)


def test_ema_seed_first(tmp_path, stream):
    d, base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    cfg = write_config(tmp_path, 'init = "ema"\ndeploy = "ema"\nema_seed = "first"\nw = 0.5')
    ws = Workspace(config.load(cfg))
    ex = [load_all(e) for e in experts]
    want = expected_views("ema", "ema", load_all(base), ex, 0.5, seed="first")
    for t, p in enumerate(experts, 1):
        ws.merge(p)
        got = load_all(ws.publishers["deploy"].path(t))
        assert_close_state(got, want[t - 1][1])
    # step 1 is the first expert exactly
    assert all(torch.equal(load_all(ws.publishers["deploy"].path(1))[k], ex[0][k]) for k in ex[0])


def test_duplicate_is_skipped(tmp_path, stream):
    d, base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    ws = Workspace(config.load(write_config(tmp_path, 'init = "ema"\ndeploy = "ema"')))
    assert ws.merge(experts[0]).status == "merged"
    again = ws.merge(experts[0])
    assert again.status == "duplicate" and again.step is None
    assert ws.publishers["deploy"].versions() == [1]


def test_all_keeps_every_expert_ema_keeps_none(tmp_path, stream):
    """With ``[buffer] keep_experts = "needed"`` the store keeps what the policy still reads."""
    d, base, experts = stream
    for policy, kept in (('init = "zs"\ndeploy = "all"', 3), ('init = "ema"\ndeploy = "ema"', 0)):
        sub = tmp_path / str(kept)
        sub.mkdir()
        (sub / "base.safetensors").symlink_to(base)
        ws = Workspace(config.load(write_config(sub, policy, '[buffer]\nkeep_experts = "needed"')))
        for p in experts:
            ws.merge(p)
        assert len(ws.store.ids()) == kept
        if kept:
            assert set(ws.store.ids()) == set(ws.merged_ids())


@pytest.mark.parametrize("keep, kept", [(None, 3), ('"all"', 3), ("1", 1), ("0", 0), ('"needed"', 0)])
def test_keep_experts_decides_what_the_store_deletes(tmp_path, stream, keep, kept):
    """By default nothing is deleted (a daemon's store holds the only copy of a moved drop); an
    integer keeps the most recently merged ones; a stored sidecar goes with its expert."""
    d, base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    extra = "" if keep is None else f"[buffer]\nkeep_experts = {keep}"
    ws = Workspace(config.load(write_config(tmp_path, 'init = "ema"\ndeploy = "ema"', extra)))
    sides = []
    for p in experts:
        out = ws.merge(p)
        side = tmp_path / f"{p.stem}.json"
        side.write_text('{"task": "t"}', "utf-8")
        ws.store.keep_sidecar(out.expert_id, side)  # as the daemon does when it claims a drop
        sides.append(ws.store.sidecar_path(out.expert_id))
        ws.apply_retention()
    assert ws.store.ids() == sorted(ws.merged_ids()[len(experts) - kept:])
    assert [s.is_file() for s in sides] == [i >= len(experts) - kept for i in range(len(experts))]


@pytest.mark.parametrize("bad", ['"some"', "-1", "true", "1.5"])
def test_keep_experts_is_validated(tmp_path, bad):
    (tmp_path / "base.safetensors").write_bytes(b"")
    with pytest.raises(config.ConfigError) as e:
        config.load(write_config(tmp_path, 'deploy = "ema"', f"[buffer]\nkeep_experts = {bad}"))
    assert e.value.key == "buffer.keep_experts"


def test_resume_with_other_policy_is_refused(tmp_path, stream):
    d, base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    ws = Workspace(config.load(write_config(tmp_path, 'init = "ema"\ndeploy = "ema"\nw = 0.5')))
    ws.merge(experts[0])
    ws2 = Workspace(config.load(write_config(tmp_path, 'init = "ema"\ndeploy = "ema"\nw = 0.4')))
    with pytest.raises(Exception, match="different policy"):
        ws2.merge(experts[1])
