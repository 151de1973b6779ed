"""One TOML file -> one typed, validated settings tree (STYLE §2; DESIGN §3.6).

Every key is known: an unknown key, a wrong type or an out-of-range value is a ``ConfigError`` whose
``key`` is the dotted path of the option and whose message says what is allowed. Defaults live here
and only here (the dataclass fields). Strategy and technique hyper-parameters are validated by
building the objects they configure, so a bad value is found at load time, never mid-merge.

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

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mergewatch.errors import ConfigError
from mergewatch.numeric import DEFAULT_THREADS


@dataclass(frozen=True)
class ModelSettings:
    architecture: str = "auto"  # auto | open_clip_full | open_clip_visual | hf_clip_vision | generic | path
    roles: tuple = ()  # extra rules tried first: [{pattern, role, blocks?, ndim?}]
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
    shard_bytes: int = 0  # 0 = one model.safetensors; otherwise shards of at most this many bytes
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
class EngineSettings:
    #: intra-op threads of every step and prepare, whatever OMP_NUM_THREADS says (mergewatch.numeric)
    threads: int = DEFAULT_THREADS


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
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return value
    raise AssertionError(kind)


_FIELD_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple": list}


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
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(key, f"{value} is out of range {lb}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{rb}")
    return value


# Policy ----------------------------------------------------------------------------------------

#: method hyper-parameters that are file paths (resolved relative to the config file)
PATH_PARAMS = ("checkpoint", "lpe", "lpe_cache")
TIME_KEYS = {"w": float, "ema_seed": str, "lambda": float, "weights": str, "include_base": bool}
LINES_KEYS = {"alpha": float, "beta": float, "variant": str, "enabled": bool}
WEAVING_KEYS = {"pool": str, "include_deltas": bool, "lambdas": list, "enabled": bool}


def _policy(data: Any, root: Path | None = None) -> PolicySettings:
    from mergewatch.strategies import METHODS, method_defaults
    from mergewatch.strategies.techniques import TECHNIQUES, recency_weights
    from mergewatch.strategies.time_policy import DEPLOYS, EMA_SEEDS, INITS, valid_combination

    if not isinstance(data, dict):
        raise ConfigError("policy", "expected a table")
    data = dict(data)
    init = _choice("policy.init", data.pop("init", "zs"), INITS)
    deploy = _choice("policy.deploy", data.pop("deploy", "ema"), (*DEPLOYS, *METHODS))
    technique_given = "technique" in data
    technique = _choice("policy.technique", data.pop("technique", "wa"), tuple(TECHNIQUES))
    tables = {k: data.pop(k) for k in list(data) if isinstance(data[k], dict)}

    if deploy in METHODS:
        if init != "zs":
            raise ConfigError("policy.init", f"deploy {deploy!r} merges experts fine-tuned from the base: init must be 'zs'")
        if technique_given:
            raise ConfigError("policy.technique", f"a technique applies to deploy ft/ema/all only, not to {deploy!r}")
        defaults = method_defaults(deploy)
        params = {}
        for where, table in (("policy", data), (f"policy.{deploy}", tables.pop(deploy, {}))):
            for k, v in table.items():
                if k not in defaults:
                    raise ConfigError(f"{where}.{k}", f"unknown key for deploy {deploy!r}; allowed: {', '.join(defaults) or 'none'}")
                params[k] = _typed_like(f"{where}.{k}", v, defaults[k])
                if k in PATH_PARAMS and isinstance(params[k], str) and params[k] and root is not None:
                    params[k] = str(root / params[k])  # relative to the config file, like every path
        for k in tables:
            raise ConfigError(f"policy.{k}", f"unknown table for deploy {deploy!r}")
        settings = PolicySettings(init=init, deploy=deploy, technique="", params=params)
        _build_check(settings)
        return settings

    if not valid_combination(init, deploy):
        raise ConfigError("policy.deploy", f"init {init!r} with deploy {deploy!r} is not a valid TIME combination (zs × ft is meaningless)")
    tech_cls = TECHNIQUES[technique]
    tdefaults = dict(tech_cls.defaults)
    params: dict = {}
    tparams: dict = {}
    for k, v in data.items():
        key = f"policy.{k}"
        if k in TIME_KEYS:
            params[k] = _check_type(key, v, TIME_KEYS[k])
        elif k in tdefaults:
            tparams[k] = _typed_like(key, v, tdefaults[k])
        else:
            allowed = sorted({*TIME_KEYS, *tdefaults, "init", "deploy", "technique"})
            raise ConfigError(key, f"unknown key for technique {technique!r}; allowed: {', '.join(allowed)}")
    lines = weaving = None
    for name, table in tables.items():
        if name == technique:
            for k, v in table.items():
                if k not in tdefaults:
                    raise ConfigError(f"policy.{name}.{k}", f"unknown parameter of {technique!r}; allowed: {', '.join(tdefaults) or 'none'}")
                tparams[k] = _typed_like(f"policy.{name}.{k}", v, tdefaults[k])
        elif name == "lines":
            lines = _subtable("policy.lines", table, LINES_KEYS)
        elif name == "weaving":
            weaving = _subtable("policy.weaving", table, WEAVING_KEYS)
        else:
            raise ConfigError(f"policy.{name}", f"unknown table; allowed: [policy.{technique}], [policy.lines], [policy.weaving]")
    if "w" in params:
        _range("policy.w", params["w"], 0.0, 1.0)
    if "lambda" in params:
        _range("policy.lambda", params["lambda"], 0.0)
    if "ema_seed" in params:
        _choice("policy.ema_seed", params["ema_seed"], EMA_SEEDS)
    if "weights" in params:
        try:
            recency_weights(3, params["weights"])
        except ValueError as e:
            raise ConfigError("policy.weights", str(e)) from e
        if params["weights"] != "uniform" and technique != "wa":
            raise ConfigError("policy.weights", "recency weights apply to technique 'wa' only")
    if params.get("include_base") and "all" not in (init, deploy):
        raise ConfigError("policy.include_base", "include_base applies to the 'all' merge only")
    uses_ema = "ema" in (init, deploy)
    for k in ("w", "ema_seed"):
        if k in params and not uses_ema:
            raise ConfigError(f"policy.{k}", f"'{k}' applies to the EMA merge, but neither init nor deploy is 'ema'")
    if lines is not None and not lines.pop("enabled", True):
        lines = None
    if weaving is not None and not weaving.pop("enabled", True):
        weaving = None
    if lines is not None:
        if not tech_cls.lambda_scaled:
            raise ConfigError("policy.lines", f"LiNeS replaces λ and needs a λ-scaled technique, not {technique!r}")
        for k in ("alpha", "beta"):
            if k in lines:
                _range(f"policy.lines.{k}", lines[k], 0.0)
        if "variant" in lines:
            _choice("policy.lines.variant", lines["variant"], ("linear", "quadratic", "sqrt"))
    if weaving is not None:
        if not tech_cls.lambda_scaled:
            raise ConfigError("policy.weaving", f"Weight Weaving pools over λ and needs a λ-scaled technique, not {technique!r}")
        if "all" not in (init, deploy):
            raise ConfigError("policy.weaving", "Weight Weaving is used with the 'all' merge (init or deploy 'all')")
        if lines is not None:
            raise ConfigError("policy.weaving", "Weight Weaving and LiNeS both replace λ; choose one")
        if "pool" in weaving:
            _choice("policy.weaving.pool", weaving["pool"], ("avg", "random", "magmax"))
        if "lambdas" in weaving:
            lams = weaving["lambdas"]
            if not lams:
                raise ConfigError("policy.weaving.lambdas", "needs at least one value")
            weaving["lambdas"] = [_range(f"policy.weaving.lambdas[{i}]", _check_type(f"policy.weaving.lambdas[{i}]", v, float), 0.0) for i, v in enumerate(lams)]
    settings = PolicySettings(init, deploy, technique, params, tparams, lines, weaving)
    _build_check(settings)
    return settings


def _policy_as_written(data: Any) -> PolicySettings:
    """The policy's names without its checks (``load(light=True)``): they need the strategies, i.e. torch."""
    if not isinstance(data, dict):
        raise ConfigError("policy", "expected a table")
    defaults = PolicySettings()
    names = {k: _check_type(f"policy.{k}", data.get(k, getattr(defaults, k)), str) for k in ("init", "deploy", "technique")}
    return PolicySettings(**names)


def _subtable(prefix: str, table: dict, keys: dict) -> dict:
    out = {}
    for k, v in table.items():
        if k not in keys:
            raise ConfigError(f"{prefix}.{k}", f"unknown key; allowed: {', '.join(keys)}")
        out[k] = _check_type(f"{prefix}.{k}", v, keys[k])
    return out


def _typed_like(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return _check_type(key, value, bool)
    if isinstance(default, int) and not isinstance(default, bool):
        return _check_type(key, value, int)
    if isinstance(default, float):
        return _check_type(key, value, float)
    if isinstance(default, str):
        return _check_type(key, value, str)
    if isinstance(default, (list, tuple)):
        return _check_type(key, value, list)
    return value


def _build_check(policy: PolicySettings) -> None:
    """Build the strategy once so that every hyper-parameter range is checked at load time."""
    from mergewatch.strategies import build_strategy

    prefix = f"policy.{policy.technique or policy.deploy}"
    try:
        build_strategy(policy)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        names = {**policy.technique_params, **policy.params}
        hit = next((k for k in names if f"'{k}'" in msg or f" {k} " in f" {msg} " or msg.startswith(f"{k}")), None)
        raise ConfigError(f"{prefix}.{hit}" if hit else prefix, msg) from e


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
    _range("publish.shard_bytes", publish.shard_bytes, 0)
    _range("publish.keep_states", publish.keep_states, 1)
    metrics = _section(MetricsSettings, data.get("metrics", {}), "metrics")
    host, _, port = metrics.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("metrics.listen", f"expected HOST:PORT, got {metrics.listen!r}")
    buffer = _buffer(data.get("buffer", {}))
    engine = _section(EngineSettings, data.get("engine", {}), "engine")
    _range("engine.threads", engine.threads, 1)
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
