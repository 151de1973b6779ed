"""The Ray backend (engine/ray_backend.py) against real Ray: the same bytes as the local engine for
every kind of strategy, a worker killed mid-task, config errors, and a daemon on Ray end to end.

One private Ray cluster (2 CPUs, no dashboard) serves the whole module; the executor joins it
(``ray_backend.connect`` keeps a cluster the process already has)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.engine.ray_backend import STAGING, RayExecutor, task_groups
from mergewatch.errors import ConfigError
from mergewatch.workspace import Workspace
from tests.helpers import make_expert, make_open_clip_base

#: small tasks: the tiny models are ~100 KB, so every pass is spread over many tasks
RAY = '[engine]\nbackend = "ray"\n[engine.ray]\ntask_bytes = 40000\n'


@pytest.fixture(scope="module")
def cluster():
    import ray

    # generous node health checks: under `pytest -n 2` the other worker's torch jobs can starve the
    # raylet's heartbeats on 2 cores, and a node marked dead takes this (driver) process with it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"health_check_failure_threshold": 60, "health_check_timeout_ms": 30000,
                             "health_check_period_ms": 3000})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=400 + i) for i in range(1, 4)]
    return base, experts


def _workspace(root: Path, base: Path, policy: str, extra: str = "") -> Workspace:
    root.mkdir(parents=True)
    (root / "base.safetensors").symlink_to(base)
    (root / "mw.toml").write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 9\n{extra}\n[policy]\n{policy}\n', "utf-8")
    return Workspace(config.load(root / "mw.toml"))


def _files(d: Path) -> dict[str, object]:
    """relative path -> sha256 of every tensor file under ``d`` (and index), and the content and file
    hashes each published MANIFEST records (records and manifests also hold times)."""
    out: dict[str, object] = {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in sorted(d.rglob("*.safetensors*")) if p.is_file()}
    for m in sorted(d.rglob("MANIFEST.json")):
        man = json.loads(m.read_text("utf-8"))
        out[str(m.relative_to(d))] = (man["content_sha256"], man["files"], man["experts"])
    return out


def _records(ws_root: Path) -> list[dict]:
    """What each committed state records of its content (sets, views, meta), step by step."""
    out = []
    for rec in sorted((ws_root / "state").glob("*/state.json")):
        r = json.loads(rec.read_text("utf-8"))
        out.append({k: r[k] for k in ("t", "sets", "views", "meta")})
    return out


def _run_both(tmp: Path, stream, policy: str, *, prepare: bool = False) -> tuple[Workspace, list]:
    """The same stream merged by the local and the Ray backend; asserts they are byte-identical
    (state sets, views, published versions, records) and returns the Ray workspace and its step
    outcomes."""
    base, experts = stream
    wss = {"local": _workspace(tmp / "local", base, policy), "ray": _workspace(tmp / "ray", base, policy, RAY)}
    outcomes: dict[str, list] = {"local": [], "ray": []}
    for name, ws in wss.items():
        for e in experts:
            outcomes[name].append(ws.merge(e))
            if prepare:
                outcomes[name].append(ws.prepare())
    want, got = (tmp / "local" / "ws", tmp / "ray" / "ws")
    assert [o.status for o in outcomes["ray"] if hasattr(o, "status")] == ["merged"] * 3
    for sub in ("state", "deploy", "init"):
        assert _files(got / sub) == _files(want / sub), sub
    assert _records(got) == _records(want)
    assert len(_files(want / "state")) >= 4  # really compared something (two kept states)
    assert not list(got.rglob(STAGING))  # no scratch left behind
    return wss["ray"], outcomes["ray"]


def test_continual_ema_and_wa_are_byte_identical(tmp_path, cluster, stream):
    ws, outs = _run_both(tmp_path, stream, 'init = "ema"\ndeploy = "ema"\ntechnique = "wa"')
    for o in outs:
        assert o.engine["backend"] == "ray"
        assert o.engine["tasks"] > 3 and o.engine["retries"] == 0
        assert o.engine["task_seconds_max"] > 0


def test_deploy_all_with_global_ties_is_byte_identical(tmp_path, cluster, stream):
    """Two passes and a whole-model scalar (the global trimming threshold) reduced in the driver."""
    ws, outs = _run_both(tmp_path, stream, 'init = "ft"\ndeploy = "all"\ntechnique = "ties"\n[policy.ties]\ntrim = "global"')
    assert len(ws.strategy.passes(_ctx(ws))) >= 2


def _ctx(ws: Workspace):
    from mergewatch.strategies.base import StepContext

    snap = ws.latest()
    return StepContext(t=snap.t + 1, seed=9, expert_ids=snap.expert_ids + ["x" * 64], model=ws.model_info, meta=snap.meta)


@pytest.mark.parametrize("prepare", [False, True], ids=["in-step", "prepared"])
def test_opcm_is_byte_identical_with_and_without_prepared_sets(tmp_path, cluster, stream, prepare):
    ws, outs = _run_both(tmp_path, stream, 'deploy = "opcm"', prepare=prepare)
    prepared = [o for o in outs if o is not None and not hasattr(o, "status")]
    if prepare:
        assert prepared and all(p.engine["backend"] == "ray" and p.engine["tasks"] > 0 for p in prepared)
        assert [o.prepared for o in outs if hasattr(o, "status")][1:] == ["used", "used"]


def test_nufilt_is_byte_identical(tmp_path, cluster, stream):
    _run_both(tmp_path, stream, 'deploy = "nufilt"\n[policy.nufilt]\nr_p = 8\nr_l = 4\nsteps = 5', prepare=True)


def test_wudi_is_byte_identical(tmp_path, cluster, stream):
    _run_both(tmp_path, stream, 'deploy = "wudi"\n[policy.wudi]\nsteps = 5')


def test_a_worker_killed_mid_task_is_retried_and_the_result_is_unchanged(tmp_path, cluster, stream, monkeypatch):
    """The first attempt to write a name's outputs SIGKILLs its worker (faults.crash_once); Ray runs
    the task again in a new worker, the killed attempt's files are never read, the retry is counted."""
    policy = 'deploy = "opcm"'
    base, experts = stream
    ref = _workspace(tmp_path / "local", base, policy)
    for e in experts:
        ref.merge(e)
    ws = _workspace(tmp_path / "ray", base, policy, RAY)
    outs = [ws.merge(experts[0])]
    monkeypatch.setenv("MERGEWATCH_CRASH_AT", "ray_task:1")
    outs.append(ws.merge(experts[1]))
    monkeypatch.delenv("MERGEWATCH_CRASH_AT")
    outs.append(ws.merge(experts[2]))
    assert [o.engine["retries"] for o in outs] == [0, 1, 0]
    assert outs[1].engine["workers"] >= 1
    for sub in ("state", "deploy", "init"):
        assert _files(tmp_path / "ray" / "ws" / sub) == _files(tmp_path / "local" / "ws" / sub), sub
    assert _records(tmp_path / "ray" / "ws") == _records(tmp_path / "local" / "ws")


def test_a_strategy_error_in_a_task_is_raised_as_itself_and_nothing_is_committed(tmp_path, cluster, stream):
    """A non-finite output found in a worker is the same StrategyError the local engine raises."""
    from mergewatch.checkpoint.writer import write_safetensors_file
    from mergewatch.engine.work import StrategyError
    from mergewatch.strategies.base import StepContext

    base, experts = stream
    ws = _workspace(tmp_path / "ray", base, 'deploy = "ema"\ninit = "ema"', RAY)
    bad = {k: v.clone() for k, v in LazyCheckpoint(experts[0]).items()}
    name = next(m.name for m in ws.model_info.mergeable if m.numel > 100)
    bad[name][0] = float("inf")
    write_safetensors_file(tmp_path / "bad.safetensors", bad)
    ctx = StepContext(t=1, seed=9, expert_ids=["a" * 64], model=ws.model_info, meta={})
    run = RayExecutor(ws.settings.engine.ray, threads=2)
    out = tmp_path / "stage"
    out.mkdir()
    with pytest.raises(StrategyError, match="non-finite"):
        run(ws.strategy, ws.strategy.passes(ctx), ctx, ws.base, [LazyCheckpoint(tmp_path / "bad.safetensors")], {}, out, None, None)
    assert not (out / STAGING).exists()


def test_tasks_group_names_by_input_bytes(tmp_path, stream):
    from mergewatch.engine.local import _Sources
    from mergewatch.strategies.base import StepContext

    base, experts = stream
    ws = _workspace(tmp_path / "ws", base, 'deploy = "ema"\ninit = "ema"')
    ctx = StepContext(t=1, seed=9, expert_ids=["a" * 64], model=ws.model_info, meta={})
    p = ws.strategy.passes(ctx)[0]
    sources = _Sources(ws.base, [LazyCheckpoint(experts[0])], {}, {})
    mergeable = [m.name for m in ws.model_info.mergeable]
    groups = task_groups(p, ctx, sources, 40_000)
    assert [n for g in groups for n in g] == mergeable  # every mergeable name once, in order
    for g in groups:  # base + θ_t, float32: within the bound, or one name alone
        size = sum(8 * ws.model_info.metas[n].numel for n in g)
        assert size <= 40_000 or len(g) == 1
    assert task_groups(p, ctx, sources, 1 << 40) == [mergeable]
    assert len(task_groups(p, ctx, sources, 1)) == len(mergeable)


@pytest.mark.parametrize(
    "text,key",
    [
        ('[engine]\nbackend = "spark"', "engine.backend"),
        ('[engine]\nbackend = 1', "engine.backend"),
        ('[engine]\nray = "auto"', "engine.ray"),
        ('[engine.ray]\naddres = "auto"', "engine.ray.addres"),
        ('[engine.ray]\naddress = "somewhere"', "engine.ray.address"),
        ('[engine.ray]\naddress = "ray://host"', "engine.ray.address"),
        ('[engine.ray]\nnum_cpus_per_task = 0', "engine.ray.num_cpus_per_task"),
        ('[engine.ray]\ntask_bytes = 0', "engine.ray.task_bytes"),
        ('[engine.ray]\ntask_bytes = "64M"', "engine.ray.task_bytes"),
        ('[engine.ray]\nmax_retries = -1', "engine.ray.max_retries"),
        ('[engine.ray]\nfallback = "retry"', "engine.ray.fallback"),
        ('[engine.ray]\nnum_cpus = -2', "engine.ray.num_cpus"),
    ],
)
def test_bad_engine_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as ei:
        config.parse(tomllib.loads(f'workspace = "w"\nbase = "b"\n{text}\n'), source=Path("/tmp/x/mw.toml"), light=True)
    assert ei.value.key == key, str(ei.value)


def test_engine_config_defaults_and_values():
    s = config.parse(tomllib.loads('workspace = "w"\nbase = "b"\n'), source=Path("/tmp/x/mw.toml"), light=True)
    assert s.engine.backend == "local" and s.engine.ray.address == "local" and s.engine.ray.fallback == "none"
    s = config.parse(tomllib.loads('workspace = "w"\nbase = "b"\n' + RAY + 'address = "ray://head:10001"\nfallback = "local"\n'),
                     source=Path("/tmp/x/mw.toml"), light=True)
    assert (s.engine.backend, s.engine.ray.address, s.engine.ray.task_bytes, s.engine.ray.fallback) == ("ray", "ray://head:10001", 40000, "local")


def test_daemon_on_ray_merges_three_drops_end_to_end(tmp_path, cluster, stream):
    """``mergewatch run`` as a real process, joined to this module's cluster by its address: three
    drops merged and published (the same bytes as in this process, locally), the tasks in each
    step's log event and in the metrics, the prepared sets computed on the cluster too."""
    import ray

    from mergewatch.daemon.inbox import submit
    from tests.daemon_support import DaemonProcess, fetch_metrics, free_port, ledger_rows, metric_value, wait_for, write_config

    base, experts = stream
    (tmp_path / "base.safetensors").symlink_to(base)
    port = free_port()
    address = ray.get_runtime_context().gcs_address
    cfg = write_config(tmp_path, policy='deploy = "opcm"', port=port,
                       extra=f'[engine]\nbackend = "ray"\n[engine.ray]\naddress = "{address}"\ntask_bytes = 40000\n')
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        for e in experts:
            submit(e, tmp_path / "ws" / "inbox")
        wait_for(lambda: [r.status for r in ledger_rows(tmp_path / "ws")] == ["merged"] * 3, 120, "3 merged")
        wait_for(lambda: any(x.get("event") == "prepared" and x.get("step") == 3 for x in d.lines()), 60, "prepared after step 3")
        text = fetch_metrics(port)
    finally:
        assert d.stop() == 0, d.log()
    merged = [x for x in d.lines() if x.get("event") == "merged"]
    assert len(merged) == 3 and all(x["engine"]["backend"] == "ray" and x["engine"]["tasks"] > 3 for x in merged), merged
    tasks = sum(x["engine"]["tasks"] for x in merged)
    assert metric_value(text, "mergewatch_engine_tasks_total", 'work="step"') == tasks
    assert metric_value(text, "mergewatch_engine_task_duration_seconds_count", 'work="step"') == tasks
    assert metric_value(text, "mergewatch_engine_task_retries_total", 'work="step"') == 0
    assert metric_value(text, "mergewatch_engine_tasks_total", 'work="prepare"') > 0
    ref = _workspace(tmp_path / "local", base, 'deploy = "opcm"')
    for e in experts:
        ref.merge(e)
    assert _files(tmp_path / "ws" / "deploy" / "3") == _files(tmp_path / "local" / "ws" / "deploy" / "3")
