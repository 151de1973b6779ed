"""Parameter roles (SPEC §0) from architecture rule tables kept as data (STYLE §4).

Each table (``roles/*.json``) lists ordered regex rules ``{"pattern", "role", ["kind"], ["blocks"],
["split"], ["transposed"], ["ndim"]}``; the first rule whose pattern matches (``re.search``) the tensor
name, and whose ``ndim`` (if given) equals the tensor's, decides the role; otherwise ``default``.
Integer and bool tensors are always ``frozen`` whatever the table says (they are buffers such as
position ids, never merged).

* ``role`` says how the math treats a tensor: ``linear`` (a linear map, out × in), ``fused_linear``
  (several linear maps stacked by rows: q, k, v), ``other`` (merged elementwise) or ``frozen``.
* ``kind`` says what the tensor *is* (``KINDS``: attn_in, attn_out, mlp_in, mlp_out, embedding,
  lm_head, norm, head): methods select layers by kind (NuFILT: attn_in, attn_out, mlp_in), and
  every step records how many tensors of each kind it treated. A tensor without a kind is counted
  under its role.
* ``blocks`` (fused_linear only, >= 2): how many linear maps are stacked. ``split`` says how the
  rows divide (``fused_rows``): ``"equal"`` (default; open_clip's q, k, v), ``"gqa"`` (Phi-3's
  ``qkv_proj``: q has H·d rows, k and v K·d each under grouped-query attention) or ``"heads"``
  (GPT-NeoX's ``query_key_value``: q, k, v of d rows each, repeated for every head h = 0..H−1).
* ``transposed: true``: the tensor is stored in × out (GPT-2's Conv1D). Projection methods work on
  its transpose (``TensorRole.split``/``join``), so a Conv1D model merges exactly as the same
  model written with ``nn.Linear``.

Block sizes of ``"gqa"`` and ``"heads"`` come from the model's ``config.json`` (``model_config``):
H = ``num_attention_heads``, K = ``num_key_value_heads`` (default H), d = ``head_dim`` (default
hidden_size / H). Without a config, ``"gqa"`` takes q = d_in rows (H·d equals the hidden size in
Phi-3, whose head_dim is hidden_size / H) and halves the rest; ``"heads"`` needs the head count and
is an error. The sizes are checked against the tensor's rows either way.

A table may ``extend`` another (its rules are tried first, then the parent's; block pattern and
default are inherited unless given; ``detect_all`` is its own). Tables are auto-detected from key
names: the first built-in table in ``DETECTION_ORDER`` all of whose ``detect_all`` patterns match at
least one key wins; ``generic`` matches anything. Order matters where names overlap: ``qwen3``
(q_norm/k_norm) before ``llama`` (whose patterns a Qwen3 also matches); Qwen2 and Mistral use the
very names of Llama, so ``auto`` gives them the ``llama`` table (same roles; ``qwen2``/``mistral`` can
be named). The config can name a built-in table or a path to a JSON file of the same shape, and add
override rules that are tried before the table's own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from mergewatch.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch only in annotations: config checks role tables without it (issue 14)
    import torch

TABLE_DIR = Path(__file__).with_name("roles")
DETECTION_ORDER = ("open_clip_full", "open_clip_visual", "hf_clip_vision", "bert", "qwen3", "phi3", "gpt_neox", "gpt2", "llama", "generic")
#: built-in tables that auto-detection never picks (their names are those of ``llama``)
NAMED_ONLY = ("qwen2", "mistral")

#: what a tensor is (a rule's ``kind``), for selection and the role counts of every step
KINDS = {
    "attn_in": "attention query/key/value projections (q, k, v; a fused qkv)",
    "attn_out": "attention output projection (o_proj, out_proj, c_proj of attention)",
    "mlp_in": "first MLP matrices (fc1, c_fc, gate/up; a fused gate_up)",
    "mlp_out": "second MLP matrix (fc2, c_proj, down_proj)",
    "embedding": "token/position embeddings (and a patch embedding)",
    "lm_head": "the output vocabulary projection of a language model",
    "norm": "LayerNorm/RMSNorm weights and biases",
    "head": "task or projection heads outside the blocks (CLIP projections, BERT pooler)",
}
SPLITS = ("equal", "gqa", "heads")


class Role(str, Enum):
    LINEAR = "linear"
    FUSED_LINEAR = "fused_linear"
    OTHER = "other"
    FROZEN = "frozen"


@dataclass(frozen=True)
class TensorRole:
    role: Role
    blocks: int = 1  # row blocks of a fused_linear
    block_index: int | None = None  # transformer block ℓ parsed from the name (LiNeS)
    #: what the tensor is (``KINDS``; "" = unnamed). Not part of equality: it selects and counts,
    #: the math of a tensor is set by the other fields
    kind: str = field(default="", compare=False)
    #: rows of each block within one head group (matrix orientation); () = ``blocks`` equal blocks
    sizes: tuple[int, ...] = ()
    heads: int = 1  # the block pattern repeats once per head (GPT-NeoX interleaves q, k, v per head)
    transposed: bool = False  # stored in × out (Conv1D): the linear map is the transpose

    @property
    def label(self) -> str:
        """The name a step counts this tensor under: its kind, else its role."""
        return self.kind or self.role.value

    @property
    def mergeable(self) -> bool:
        return self.role is not Role.FROZEN

    @property
    def matrix(self) -> bool:
        """A linear map (or stack of them): the tensors that projection methods work on."""
        return self.role in (Role.LINEAR, Role.FUSED_LINEAR)

    @property
    def row_blocks(self) -> int:
        """How many linear maps the tensor stacks by rows: ``blocks`` for a fused_linear (q, k, v),
        else 1."""
        return self.blocks if self.role is Role.FUSED_LINEAR else 1

    # The linear maps of a matrix tensor ---------------------------------------------------------
    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """(d_out, d_in) of the stored ``shape`` (reversed for a transposed tensor)."""
        return (shape[1], shape[0]) if self.transposed and len(shape) == 2 else tuple(shape)

    def block_rows(self, shape: Sequence[int]) -> list[int]:
        """d_out of each linear map the tensor holds (one entry unless fused)."""
        d_out = self.matrix_shape(shape)[0]
        if self.role is not Role.FUSED_LINEAR:
            return [d_out]
        if not self.sizes:
            return [d_out // self.blocks] * self.blocks
        return [s * self.heads for s in self.sizes]

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The linear maps held by ``t`` as d_out × d_in matrices: ``t`` (or its transpose) for a
        linear tensor, each block for a fused one. Views of ``t`` except for per-head blocks
        (``heads`` > 1), which are gathered into copies."""
        m = t.T if self.transposed else t
        if self.role is not Role.FUSED_LINEAR:
            return [m]
        if self.heads == 1:
            return list(m.split(list(self.sizes))) if self.sizes else list(m.chunk(self.blocks, dim=0))
        grouped = m.reshape(self.heads, sum(self.sizes), m.shape[1])
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        return [grouped[:, o:o + s].reshape(-1, m.shape[1]) for o, s in zip(offsets, self.sizes)]

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``split``: the blocks (d_out_i × d_in each) back in the stored layout.
        A single untransposed block is returned as it is (no copy)."""
        import torch  # not at module level: the config checks tables without torch (issue 14)

        if self.heads > 1:
            d_in = parts[0].shape[1]
            m = torch.cat([p.reshape(self.heads, -1, d_in) for p in parts], dim=1).reshape(-1, d_in)
        else:
            m = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)
        return m.T.contiguous() if self.transposed else m


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    role: Role
    blocks: int = 1
    ndim: int | None = None
    kind: str = ""
    split: str = "equal"
    transposed: bool = False

    @classmethod
    def parse(cls, d: dict, where: str) -> "Rule":
        if not isinstance(d, dict):
            raise ConfigError(where, f"a rule must be an object {{pattern, role, [kind], [blocks], [split], [transposed], [ndim]}}, got {d!r}")
        unknown = set(d) - {"pattern", "role", "kind", "blocks", "split", "transposed", "ndim", "note"}
        if unknown:
            raise ConfigError(where, f"unknown rule field(s) {sorted(unknown)}")
        try:
            pat = re.compile(d["pattern"])
        except (KeyError, re.error, TypeError) as e:
            raise ConfigError(where, f"rule needs a valid regex 'pattern': {e}") from e
        try:
            role = Role(d.get("role"))
        except ValueError as e:
            raise ConfigError(where, f"role must be one of {[r.value for r in Role]}, got {d.get('role')!r}") from e
        blocks = d.get("blocks", 1)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or (role is Role.FUSED_LINEAR and blocks < 2) or (role is not Role.FUSED_LINEAR and "blocks" in d):
            raise ConfigError(where, "'blocks' (>= 2) is required for fused_linear rules and only for them")
        ndim = d.get("ndim")
        if ndim is not None and (not isinstance(ndim, int) or isinstance(ndim, bool) or ndim < 0):
            raise ConfigError(where, f"'ndim' must be a non-negative integer, got {ndim!r}")
        kind = d.get("kind", "")
        if kind not in ("", *KINDS):
            raise ConfigError(where, f"'kind' must be one of {list(KINDS)}, got {kind!r}")
        split = d.get("split", "equal")
        if split not in SPLITS or (split != "equal" and role is not Role.FUSED_LINEAR) or (split == "gqa" and blocks != 3):
            raise ConfigError(where, f"'split' must be one of {list(SPLITS)}, for fused_linear rules only ('gqa': 3 blocks q, k, v), got {split!r}")
        transposed = d.get("transposed", False)
        if not isinstance(transposed, bool) or (transposed and role not in (Role.LINEAR, Role.FUSED_LINEAR)):
            raise ConfigError(where, "'transposed' is true or false, and true only for linear or fused_linear rules (weights stored in x out)")
        return cls(pat, role, blocks, ndim, kind, split, transposed)


@dataclass
class RoleTable:
    name: str
    rules: list[Rule]
    default: Role = Role.OTHER
    block_pattern: re.Pattern | None = None
    detect_all: list[re.Pattern] = field(default_factory=list)
    description: str = ""
    #: the model's config.json (``model_config``): head counts for fused blocks of unequal size
    config: Mapping = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RoleTable":
        if not isinstance(d, dict):
            raise ConfigError(where, "a role table must be a JSON object")
        unknown = set(d) - {"name", "description", "extends", "detect_all", "block_pattern", "rules", "default"}
        if unknown:
            raise ConfigError(where, f"unknown table field(s) {sorted(unknown)}")
        parent = None
        if "extends" in d:
            parent = load_table(d["extends"]) if isinstance(d["extends"], str) and d["extends"] != d.get("name") else None
            if parent is None:
                raise ConfigError(f"{where}.extends", f"must name another table, got {d['extends']!r}")
            d = {"block_pattern": parent.block_pattern.pattern if parent.block_pattern else None, "default": parent.default.value, **d}
        rules_in = d.get("rules", [])
        if not isinstance(rules_in, list):
            raise ConfigError(f"{where}.rules", "must be a list of rules")
        rules = [Rule.parse(r, f"{where}.rules[{i}]") for i, r in enumerate(rules_in)] + (parent.rules if parent else [])
        try:
            default = Role(d.get("default", "other"))
        except ValueError as e:
            raise ConfigError(f"{where}.default", f"must be one of {[r.value for r in Role]}, got {d.get('default')!r}") from e
        bp = d.get("block_pattern")
        block_pattern = None
        if bp:
            try:
                block_pattern = re.compile(bp)
            except (re.error, TypeError) as e:
                raise ConfigError(f"{where}.block_pattern", f"invalid regex: {e}") from e
            # block_index() reads group 1: without a group every lookup would raise IndexError later.
            if block_pattern.groups < 1:
                raise ConfigError(f"{where}.block_pattern", "needs a capturing group for the block number, e.g. 'layers\\.(\\d+)\\.'")
        detect_in = d.get("detect_all", [])
        if not isinstance(detect_in, list):
            raise ConfigError(f"{where}.detect_all", "must be a list of regexes")
        detect_all = []
        for i, pat in enumerate(detect_in):
            try:
                detect_all.append(re.compile(pat))
            except (re.error, TypeError) as e:
                raise ConfigError(f"{where}.detect_all[{i}]", f"invalid regex: {e}") from e
        return cls(
            name=d.get("name", where),
            rules=rules,
            default=default,
            block_pattern=block_pattern,
            detect_all=detect_all,
            description=d.get("description", ""),
        )

    def with_overrides(self, overrides: Sequence[dict], where: str = "model.roles") -> "RoleTable":
        if isinstance(overrides, (str, bytes, dict)):
            raise ConfigError(where, "must be a list of rules")
        extra = [Rule.parse(r, f"{where}[{i}]") for i, r in enumerate(overrides)]
        return replace(self, rules=extra + self.rules)

    def with_config(self, config: Mapping) -> "RoleTable":
        return replace(self, config=dict(config))

    def matches(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        return all(any(p.search(k) for k in keys) for p in self.detect_all)

    def block_index(self, name: str) -> int | None:
        if self.block_pattern is None:
            return None
        m = self.block_pattern.search(name)
        return int(m.group(1)) if m else None

    def role_of(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> TensorRole:
        blk = self.block_index(name)
        if not (dtype.is_floating_point or dtype.is_complex):
            return TensorRole(Role.FROZEN, 1, blk)
        for r in self.rules:
            if r.ndim is not None and r.ndim != len(shape):
                continue
            if r.pattern.search(name):
                break
        else:
            return TensorRole(self.default, 1, blk)
        role, blocks = r.role, r.blocks
        if role in (Role.LINEAR, Role.FUSED_LINEAR) and len(shape) != 2:
            raise CheckpointError(name, f"role table '{self.name}' says {role.value} but the tensor has shape {tuple(shape)}")
        if role is not Role.FUSED_LINEAR:
            return TensorRole(role, blocks, blk, r.kind, transposed=r.transposed)
        rows, d_in = (shape[1], shape[0]) if r.transposed else (shape[0], shape[1])
        if r.split == "equal":
            if rows % blocks:
                raise CheckpointError(name, f"fused_linear with {blocks} blocks needs rows divisible by {blocks}, got {rows}")
            return TensorRole(role, blocks, blk, r.kind, transposed=r.transposed)
        sizes, heads = fused_rows(r.split, blocks, rows, d_in, self.config, name)
        return TensorRole(role, blocks, blk, r.kind, sizes, heads, r.transposed)


def fused_rows(split: str, blocks: int, rows: int, d_in: int, config: Mapping, name: str) -> tuple[tuple[int, ...], int]:
    """(rows of each block within a head group, number of head groups) of a fused tensor with
    ``rows`` output rows (module docstring): ``"gqa"`` -> ((H·d, K·d, K·d), 1), ``"heads"`` ->
    ((d,) * blocks, H). Checked against ``rows``: a mismatch is a CheckpointError naming the tensor."""
    heads = _config_int(config, "num_attention_heads", name)
    if split == "heads":
        if heads is None:
            raise CheckpointError(name, "q, k, v are interleaved per head: the head count comes from the model's config.json "
                                        "(num_attention_heads); none was found beside the base: set [model] config")
        if rows % (heads * blocks):
            raise CheckpointError(name, f"{rows} rows are not {heads} heads × {blocks} blocks of equal size")
        return (rows // (heads * blocks),) * blocks, heads
    if heads is None:  # q = d_in rows (H·d = hidden size), k and v share the rest
        q, kv2 = d_in, rows - d_in
        sizes = (q, kv2 // 2, kv2 // 2)
        how = "q = d_in rows (no config.json)"
    else:
        kv = _config_int(config, "num_key_value_heads", name) or heads
        d = _config_int(config, "head_dim", name) or (_config_int(config, "hidden_size", name) or 0) // heads
        sizes = (heads * d, kv * d, kv * d)
        how = f"config.json: {heads} heads, {kv} key/value heads of {d}"
    if sum(sizes) != rows or min(sizes) <= 0:
        raise CheckpointError(name, f"q, k, v blocks {sizes} ({how}) do not add up to the tensor's {rows} rows")
    return sizes, 1


def _config_int(config: Mapping, key: str, name: str) -> int | None:
    v = config.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(name, f"config.json has {key} = {v!r}, expected a positive integer")
    return v


def model_config(base: str | Path, config: str | Path = "") -> dict:
    """The model's Hugging Face configuration: ``[model] config`` when it is a JSON file, else
    ``config.json`` in a base directory; {} without one (or for a non-HF JSON: unused keys)."""
    p = Path(config) if config and Path(config).suffix == ".json" else Path(base) / "config.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("model.config", f"{p}: unreadable JSON: {e}") from e
    return d if isinstance(d, dict) else {}


def builtin_tables() -> dict[str, RoleTable]:
    return {n: load_table(n) for n in DETECTION_ORDER}


def load_table(name_or_path: str) -> RoleTable:
    """A built-in table by name, or a JSON file by path."""
    p = TABLE_DIR / f"{name_or_path}.json"
    if not p.is_file():
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(
                "model.architecture",
                f"unknown architecture {name_or_path!r}: use 'auto', one of {list(DETECTION_ORDER + NAMED_ONLY)} or a path to a JSON table",
            )
    try:
        d = json.loads(p.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("model.architecture", f"{p}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError("model.architecture", f"{p}: a role table must be a JSON object")
    return RoleTable.from_dict(d, p.stem)


def detect_table(keys: Iterable[str]) -> RoleTable:
    keys = list(keys)
    for name in DETECTION_ORDER:
        t = load_table(name)
        if t.matches(keys):
            return t
    raise AssertionError("the generic table matches every model")  # pragma: no cover


def resolve_table(architecture: str, keys: Iterable[str], overrides: Sequence[dict] = (), config: Mapping | None = None) -> RoleTable:
    """The table for ``architecture`` ("auto": detected from ``keys``), with the override rules tried
    first and the model's ``config`` (``model_config``) for fused block sizes."""
    table = detect_table(keys) if architecture == "auto" else load_table(architecture)
    table = table.with_overrides(overrides) if overrides else table
    return table.with_config(config) if config else table


def num_blocks(table: RoleTable, keys: Iterable[str]) -> int:
    """L = 1 + the largest block index in the model (SPEC §1.2, LiNeS); 0 if no blocks."""
    idx = [b for b in (table.block_index(k) for k in keys) if b is not None]
    return 1 + max(idx) if idx else 0
