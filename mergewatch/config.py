"""One TOML file -> one typed, validated settings tree (STYLE §2; DESIGN §3.6).

Every key is known: an unknown key, a wrong type or an out-of-range value is a ``ConfigError`` whose
``key`` is the dotted path of the option and whose message says what is allowed. Defaults live here
and only here (the dataclass fields), except the hyper-parameters of strategies, techniques, LiNeS
and Weight Weaving: those are declared once beside the code that uses them (``Param``,
``mergewatch.params``), and their kinds, paths, defaults, ranges, choices and README tables
(``policy_reference``) all come from those declarations. Their ranges are checked by building the
objects they configure, so a bad value is found at load time, never mid-merge.

Policy keys (SPEC §1–§3): ``[policy]`` holds ``init``, ``deploy``, ``technique`` and the policy's
own hyper-parameters (``w``, ``ema_seed``, ``lambda``, ``weights``, ``include_base``); technique
hyper-parameters may be given in ``[policy]`` or ``[policy.<technique>]`` (e.g. ``[policy.ties]
p = 0.8``); LiNeS in ``[policy.lines]``, Weight Weaving in ``[policy.weaving]``; a DFCMM method's
hyper-parameters in ``[policy]`` or ``[policy.<method>]``.

``load(path, light=True)`` is for the verbs that neither merge nor evaluate (``status``, ``submit``,
``rollback``, ``promote``): building the strategy and opening the ``[eval]`` data and models would
import torch and open_clip (seconds), so the policy is taken as written (``init``, ``deploy`` and
``technique`` are only type-checked) and ``[eval]`` is checked without opening anything; every
other key is checked as usual. Such settings must never be given to the merge engine (issue 14).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mergewatch.errors import ConfigError
from mergewatch.numeric import DEFAULT_THREADS
from mergewatch.params import ENABLED, Param, ParamError, by_name, coerce, inside, interval, markdown_table


@dataclass(frozen=True)
class ModelSettings:
    architecture: str = "auto"  # auto | a table of checkpoint/roles/ (open_clip_full, llama, qwen3, gpt2, ...) | path
    roles: tuple = ()  # extra rules tried first: [{pattern, role, kind?, blocks?, split?, transposed?, ndim?}]
    dtype_policy: str = "float_cast"  # strict | float_cast
    #: the model's configuration, copied into every published version (a bare open_clip model config
    #: {embed_dim, vision_cfg, text_cfg} is published as open_clip's ``open_clip_config.json``)
    config: str = ""
    #: files published beside the weights: ["auto"] = every non-weight file of a base directory
    #: (config.json, tokenizer files, ...), [] = none, or explicit paths (workspace.Companions)
    companions: tuple = ("auto",)


@dataclass(frozen=True)
class PolicySettings:
    init: str = "zs"
    deploy: str = "ema"
    technique: str = "wa"
    #: the policy's own hyper-parameters (TIME: w, ema_seed, lambda, weights, include_base; or a method's)
    params: dict = field(default_factory=dict)
    technique_params: dict = field(default_factory=dict)
    lines: dict | None = None
    weaving: dict | None = None

    @property
    def is_time(self) -> bool:
        from mergewatch.strategies.time_policy import DEPLOYS

        return self.deploy in DEPLOYS


@dataclass(frozen=True)
class WatchSettings:
    events: bool = True  # run the file-event observer (False: rely on the scans alone)
    polling: bool = False
    quiet_seconds: float = 10.0
    rescan_seconds: float = 60.0


@dataclass(frozen=True)
class PublishSettings:
    keep: int = 5  # published versions kept per view
    #: how published files are split: absent = as the base is (its shard boundaries, or one file),
    #: 0 = one model.safetensors, N = shards of at most N bytes (checkpoint/writer.py, FileLayout)
    shard_bytes: int | None = None
    keep_states: int = 2  # committed state directories kept


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class BufferSettings:
    #: which merged experts the store keeps: "all" (nothing is deleted), "needed" (what the policy
    #: still reads) or an integer N (those plus the N most recently merged); buffer/store.py
    keep_experts: str | int = "all"


@dataclass(frozen=True)
class RaySettings:
    """``[engine.ray]``: where and how a step runs on Ray (engine/ray_backend.py, docs/ray.md)."""

    #: "local" (a private cluster on this machine), "auto" (the cluster ``ray start`` runs here),
    #: "ray://HOST:PORT" (Ray Client) or "HOST:PORT" (a cluster's GCS address)
    address: str = "local"
    num_cpus: int = 0  # CPUs of a "local" cluster (0: every core); ignored for a running cluster
    num_cpus_per_task: int = 1  # Ray CPUs reserved per task (size it to [engine] threads)
    task_bytes: int = 64 << 20  # input tensor bytes per task (a larger single tensor: a task of its own)
    max_retries: int = 3  # attempts after a worker or node died mid-task
    #: when the cluster cannot be reached or goes away mid-step: "none" (the step fails) or "local"
    fallback: str = "none"


@dataclass(frozen=True)
class EngineSettings:
    #: intra-op threads of every step and prepare, whatever OMP_NUM_THREADS says (mergewatch.numeric)
    threads: int = DEFAULT_THREADS
    backend: str = "local"  # "local" (this process) | "ray" ([engine.ray])
    ray: RaySettings = field(default_factory=RaySettings)


@dataclass(frozen=True)
class Settings:
    workspace: Path
    base: Path
    seed: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None  # the file it was loaded from
    eval: Any = None  # mergewatch.eval.settings.EvalSettings, or None when no [eval] tasks are configured
    engine: EngineSettings = field(default_factory=EngineSettings)
    buffer: BufferSettings = field(default_factory=BufferSettings)


# Typed value checks -----------------------------------------------------------------------------

def _check_type(key: str, value: Any, kind: type) -> Any:
    try:
        return coerce(value, kind)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


_FIELD_TYPES = {"str": str, "int": int, "int | None": int, "float": float, "bool": bool, "tuple": list}


def _section(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in known:
            raise ConfigError(f"{prefix}.{k}", f"unknown key; allowed keys in [{prefix}]: {', '.join(known)}")
    values = {}
    for k, v in data.items():
        kind = _FIELD_TYPES[known[k].type] if isinstance(known[k].type, str) else known[k].type
        v = _check_type(f"{prefix}.{k}", v, kind)
        values[k] = tuple(v) if kind is list else v
    return cls(**values)


def _choice(key: str, value: Any, allowed) -> str:
    value = _check_type(key, value, str)
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def _range(key: str, value: float, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False) -> float:
    if not inside(value, lo, hi, lo_open, hi_open):
        raise ConfigError(key, f"{value} is out of range {interval(lo, hi, lo_open, hi_open)}")
    return value


# Policy ----------------------------------------------------------------------------------------
# Every key below [policy] is a declared parameter (mergewatch.params): of the TIME policy, its
# technique, LiNeS, Weight Weaving or a method. Here: where each may be written, its kind, paths,
# and the TIME rules across keys; ranges and choices are checked by building the strategy.

def _selectors() -> tuple[Param, ...]:
    """[policy]'s ``init``, ``deploy`` and ``technique`` (defaults: ``PolicySettings``)."""
    from mergewatch.strategies import METHODS, TECHNIQUES
    from mergewatch.strategies.time_policy import DEPLOYS, INITS

    d = PolicySettings()
    return (
        Param("init", str, d.init, "what the next expert is fine-tuned from (the init view): θ0, the latest expert, the EMA or the ALL merge", choices=INITS),
        Param("deploy", str, d.deploy, "what is served: a TIME merge (ft, ema, all) or a method of its own", choices=(*DEPLOYS, *METHODS)),
        Param("technique", str, d.technique, "f_merge of the TIME merges (ema, all)", choices=tuple(TECHNIQUES)),
    )


def _written(where: str, table: dict, declared, root: Path | None, owner: str, extra: tuple[str, ...] = ()) -> dict:
    """The values written in ``table`` (at ``where``) of ``declared`` parameters, each of its kind,
    a path resolved against ``root`` (the config's folder). An unknown name or a wrong kind is named
    by the key where it is written; ranges are checked by ``_build_check``."""
    known = by_name(declared)
    out = {}
    for k, v in table.items():
        if k not in known:
            raise ConfigError(f"{where}.{k}", f"unknown key{owner}; allowed: {', '.join((*extra, *known)) or 'none'}")
        try:
            out[k] = known[k].coerce(v, where)
        except ParamError as e:
            raise ConfigError(f"{where}.{e.key(k)}", str(e)) from e
        if known[k].path and out[k] and root is not None:
            out[k] = str(root / out[k])  # relative to the config file, like every path
    return out


def _policy(data: Any, root: Path | None = None) -> PolicySettings:
    from mergewatch.strategies import METHODS, TECHNIQUES, TimePolicy
    from mergewatch.strategies.techniques import LINES_PARAMS
    from mergewatch.strategies.time_policy import valid_combination
    from mergewatch.strategies.weaving import WeightWeaving

    if not isinstance(data, dict):
        raise ConfigError("policy", "expected a table")
    data = dict(data)
    technique_given = "technique" in data
    init, deploy, technique = (_declared(f"policy.{p.name}", p, data.pop(p.name, p.default)) for p in _selectors())
    tables = {k: data.pop(k) for k in list(data) if isinstance(data[k], dict)}

    if deploy in METHODS:
        method = METHODS[deploy]
        if method.requires_zs_init and init != "zs":
            raise ConfigError("policy.init", f"deploy {deploy!r} merges experts fine-tuned from the base: init must be 'zs'")
        if technique_given:
            raise ConfigError("policy.technique", f"a technique applies to deploy ft/ema/all only, not to {deploy!r}")
        hint = f" for deploy {deploy!r}"
        params = _written("policy", data, method.param_defs, root, hint)
        params.update(_written(f"policy.{deploy}", tables.pop(deploy, {}), method.param_defs, root, hint))
        for k in tables:
            raise ConfigError(f"policy.{k}", f"unknown table for deploy {deploy!r}")
        return _build_check(PolicySettings(init=init, deploy=deploy, technique="", params=params))

    if not valid_combination(init, deploy):
        raise ConfigError("policy.deploy", f"init {init!r} with deploy {deploy!r} is not a valid TIME combination (zs × ft is meaningless)")
    tech = TECHNIQUES[technique]
    # [policy] holds the TIME parameters and the technique's; [policy.<technique>] the latter too
    written = _written("policy", data, (*TimePolicy.param_defs, *tech.param_defs), root, f" for technique {technique!r}", ("init", "deploy", "technique"))
    params = {k: v for k, v in written.items() if k in TimePolicy.defaults}
    tparams = {k: v for k, v in written.items() if k not in TimePolicy.defaults}
    lines = weaving = None
    for name, table in tables.items():
        if name == technique:
            tparams.update(_written(f"policy.{name}", table, tech.param_defs, root, f" of technique {technique!r}"))
        elif name == "lines":
            lines = _written("policy.lines", table, (*LINES_PARAMS, ENABLED), root, "")
        elif name == "weaving":
            weaving = _written("policy.weaving", table, (*WeightWeaving.param_defs, ENABLED), root, "")
        else:
            raise ConfigError(f"policy.{name}", f"unknown table; allowed: [policy.{technique}], [policy.lines], [policy.weaving]")
    if lines is not None and not lines.pop("enabled", True):
        lines = None
    if weaving is not None and not weaving.pop("enabled", True):
        weaving = None
    _time_rules(init, deploy, tech, params, lines, weaving)
    return _build_check(PolicySettings(init, deploy, technique, params, tparams, lines, weaving))


def _time_rules(init: str, deploy: str, tech, params: dict, lines: dict | None, weaving: dict | None) -> None:
    """What a TIME key needs of the other keys (SPEC §1, §2)."""
    if params.get("weights", "uniform") != "uniform" and tech.name != "wa":
        raise ConfigError("policy.weights", "recency weights apply to technique 'wa' only")
    if params.get("include_base") and "all" not in (init, deploy):
        raise ConfigError("policy.include_base", "include_base applies to the 'all' merge only")
    for k in ("w", "ema_seed"):
        if k in params and "ema" not in (init, deploy):
            raise ConfigError(f"policy.{k}", f"'{k}' applies to the EMA merge, but neither init nor deploy is 'ema'")
    if lines is not None and not tech.lambda_scaled:
        raise ConfigError("policy.lines", f"LiNeS replaces λ and needs a λ-scaled technique, not {tech.name!r}")
    if weaving is not None:
        if not tech.lambda_scaled:
            raise ConfigError("policy.weaving", f"Weight Weaving pools over λ and needs a λ-scaled technique, not {tech.name!r}")
        if "all" not in (init, deploy):
            raise ConfigError("policy.weaving", "Weight Weaving is used with the 'all' merge (init or deploy 'all')")
        if lines is not None:
            raise ConfigError("policy.weaving", "Weight Weaving and LiNeS both replace λ; choose one")


def _build_check(policy: PolicySettings) -> PolicySettings:
    """Build the strategy once, so that every range and choice is checked at load time. A
    ``ParamError`` is reported at ``policy.<table>.<name>`` when that parameter is written (in
    [policy] or its table), else at the table (e.g. a required ``checkpoint`` left out)."""
    from mergewatch.strategies import TimePolicy, build_strategy

    written = {
        policy.deploy: policy.params,
        TimePolicy.name: policy.params,
        policy.technique: policy.technique_params,
        "lines": policy.lines or {},
        "weaving": policy.weaving or {},
    }
    try:
        build_strategy(policy)
    except ParamError as e:
        table = "policy" if e.where == TimePolicy.name else f"policy.{e.where}"
        hit = next((n for n in e.names if n in written.get(e.where, {})), None)
        raise ConfigError(f"{table}.{e.key(hit)}" if hit else table, str(e)) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"policy.{policy.technique or policy.deploy}", str(e)) from e
    return policy


def _declared(key: str, param: Param, value: Any) -> Any:
    """``value`` of a declared parameter written at ``key``, checked."""
    try:
        return param.check(value, "policy")
    except ParamError as e:
        raise ConfigError(key, str(e)) from e


def policy_reference() -> str:
    """The README's tables of the [policy] keys, from the declarations (``tests/test_params.py``
    checks that the README holds exactly this; ``python -m mergewatch.config`` prints it)."""
    from mergewatch.strategies import METHODS, TECHNIQUES, TimePolicy
    from mergewatch.strategies.techniques import LINES_PARAMS
    from mergewatch.strategies.weaving import WeightWeaving

    parts = [("`[policy]`", (*_selectors(), *TimePolicy.param_defs))]
    parts += [(f"`[policy.{n}]` or `[policy]`: technique `{n}`", c.param_defs) for n, c in TECHNIQUES.items() if c.param_defs]
    parts += [("`[policy.lines]`: LiNeS", (*LINES_PARAMS, ENABLED)), ("`[policy.weaving]`: Weight Weaving", (*WeightWeaving.param_defs, ENABLED))]
    parts += [(f"`[policy.{n}]` or `[policy]`: deploy `{n}`", c.param_defs) for n, c in METHODS.items() if c.param_defs]
    bare = [f"technique `{n}`" for n, c in TECHNIQUES.items() if not c.param_defs] + [f"deploy `{n}`" for n, c in METHODS.items() if not c.param_defs]
    tables = [f"**{title}**\n\n{markdown_table(defs)}" for title, defs in parts]
    return "\n\n".join([*tables, "No parameters: " + ", ".join(bare) + "."])


def _policy_as_written(data: Any) -> PolicySettings:
    """The policy's names without its checks (``load(light=True)``): they need the strategies, i.e. torch."""
    if not isinstance(data, dict):
        raise ConfigError("policy", "expected a table")
    defaults = PolicySettings()
    names = {k: _check_type(f"policy.{k}", data.get(k, getattr(defaults, k)), str) for k in ("init", "deploy", "technique")}
    return PolicySettings(**names)


def _companion_paths(model: ModelSettings, root: Path) -> ModelSettings:
    """``model.config`` and explicit ``model.companions`` resolved against the config's folder; each
    must be an existing regular file, and two may not share a file name."""
    from dataclasses import replace

    def existing(key: str, value: Any) -> str:
        p = root / _check_type(key, value, str)
        if not p.is_file():
            raise ConfigError(key, f"{p} is not a file")
        return str(p)

    config = existing("model.config", model.config) if model.config else ""
    companions = model.companions
    if companions != ("auto",):
        companions = tuple(existing(f"model.companions[{i}]", c) for i, c in enumerate(companions))
        names = [Path(c).name for c in companions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError("model.companions", f"two files named {dup[0]!r}: published files need distinct names")
    return replace(model, config=config, companions=companions)


def _buffer(data: Any) -> BufferSettings:
    if not isinstance(data, dict):
        raise ConfigError("buffer", f"expected a table, got {data!r}")
    for k in data:
        if k != "keep_experts":
            raise ConfigError(f"buffer.{k}", "unknown key; allowed keys in [buffer]: keep_experts")
    keep = data.get("keep_experts", BufferSettings.keep_experts)
    ok_int = isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0
    if not (ok_int or keep in ("all", "needed")):
        raise ConfigError("buffer.keep_experts", f'expected "all", "needed" or an integer >= 0, got {keep!r}')
    return BufferSettings(keep)


def _engine(data: Any) -> EngineSettings:
    """``[engine]`` and its ``[engine.ray]`` table (read even when the backend is local: a typo
    there is still an error)."""
    from dataclasses import replace

    if not isinstance(data, dict):
        raise ConfigError("engine", f"expected a table, got {data!r}")
    data = dict(data)
    ray = _section(RaySettings, data.pop("ray", {}), "engine.ray")
    engine = replace(_section(EngineSettings, data, "engine"), ray=ray)
    _range("engine.threads", engine.threads, 1)
    _choice("engine.backend", engine.backend, ("local", "ray"))
    host, _, port = ray.address.removeprefix("ray://").rpartition(":")
    if ray.address not in ("local", "auto") and not (host and port.isdigit()):
        raise ConfigError("engine.ray.address", f'expected "local", "auto", "ray://HOST:PORT" or "HOST:PORT", got {ray.address!r}')
    _range("engine.ray.num_cpus", ray.num_cpus, 0)
    _range("engine.ray.num_cpus_per_task", ray.num_cpus_per_task, 1)
    _range("engine.ray.task_bytes", ray.task_bytes, 1)
    _range("engine.ray.max_retries", ray.max_retries, 0)
    _choice("engine.ray.fallback", ray.fallback, ("none", "local"))
    return engine


# Loading ---------------------------------------------------------------------------------------

TOP_KEYS = ("workspace", "base", "seed", "model", "policy", "buffer", "watch", "publish", "metrics", "engine", "eval")


def parse(data: dict, *, source: Path | None = None, light: bool = False) -> Settings:
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(k, f"unknown key; allowed top-level keys: {', '.join(TOP_KEYS)}")
    root = source.parent if source else Path.cwd()
    for req in ("workspace", "base"):
        if req not in data:
            raise ConfigError(req, "required")
    workspace = root / _check_type("workspace", data["workspace"], str)
    base = root / _check_type("base", data["base"], str)
    seed = _check_type("seed", data.get("seed", 0), int)
    model = _section(ModelSettings, data.get("model", {}), "model")
    _choice("model.dtype_policy", model.dtype_policy, ("strict", "float_cast"))
    model = _companion_paths(model, root)
    for i, r in enumerate(model.roles):
        if not isinstance(r, dict):
            raise ConfigError(f"model.roles[{i}]", "each override is a table {pattern, role}")
    if model.roles or model.architecture != "auto":
        from mergewatch.checkpoint.roles import RoleTable, load_table

        if model.architecture != "auto":
            load_table(model.architecture)
        RoleTable("overrides", []).with_overrides(list(model.roles))
    watch = _section(WatchSettings, data.get("watch", {}), "watch")
    _range("watch.quiet_seconds", watch.quiet_seconds, 0.0)
    _range("watch.rescan_seconds", watch.rescan_seconds, 0.0, lo_open=True)
    publish = _section(PublishSettings, data.get("publish", {}), "publish")
    _range("publish.keep", publish.keep, 1)
    if publish.shard_bytes is not None:
        _range("publish.shard_bytes", publish.shard_bytes, 0)
    _range("publish.keep_states", publish.keep_states, 1)
    metrics = _section(MetricsSettings, data.get("metrics", {}), "metrics")
    host, _, port = metrics.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("metrics.listen", f"expected HOST:PORT, got {metrics.listen!r}")
    buffer = _buffer(data.get("buffer", {}))
    engine = _engine(data.get("engine", {}))
    policy = _policy_as_written(data.get("policy", {})) if light else _policy(data.get("policy", {}), root)
    from mergewatch.eval.settings import parse_eval

    evaluation = parse_eval(data.get("eval"), root, base, light=light)
    return Settings(workspace, base, seed, model, policy, watch, publish, metrics, source, evaluation, engine, buffer)


def load(path: str | Path, *, light: bool = False) -> Settings:
    """The settings of a config file; ``light``: see the module's docstring."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from e
    return parse(data, source=path.resolve(), light=light)


if __name__ == "__main__":  # the README's parameter tables (policy_reference)
    print(policy_reference())
