"""Parameter roles (SPEC §0) from architecture rule tables kept as data (STYLE §4).

Each table (``roles/*.json``) lists ordered regex rules ``{"pattern", "role", ["blocks"], ["ndim"]}``;
the first rule whose pattern matches (``re.search``) the tensor name, and whose ``ndim`` (if given)
equals the tensor's, decides the role; otherwise ``default``. Integer and bool tensors are always
``frozen`` whatever the table says (they are buffers such as position ids, never merged). A
``fused_linear`` rule gives ``blocks``, the number of equal row blocks (q, k, v -> 3).

Tables are auto-detected from key names: the first built-in table (in ``DETECTION_ORDER``) all of
whose ``detect_all`` patterns match at least one key wins; ``generic`` matches anything. The config
can name a built-in table or a path to a JSON file of the same shape, and add override rules that
are tried before the table's own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from mergewatch.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch only in annotations: config checks role tables without it (issue 14)
    import torch

TABLE_DIR = Path(__file__).with_name("roles")
DETECTION_ORDER = ("open_clip_full", "open_clip_visual", "hf_clip_vision", "bert", "generic")


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


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    role: Role
    blocks: int = 1
    ndim: int | None = None

    @classmethod
    def parse(cls, d: dict, where: str) -> "Rule":
        if not isinstance(d, dict):
            raise ConfigError(where, f"a rule must be an object {{pattern, role, [blocks], [ndim]}}, got {d!r}")
        unknown = set(d) - {"pattern", "role", "blocks", "ndim", "note"}
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
        return cls(pat, role, blocks, ndim)


@dataclass
class RoleTable:
    name: str
    rules: list[Rule]
    default: Role = Role.OTHER
    block_pattern: re.Pattern | None = None
    detect_all: list[re.Pattern] = field(default_factory=list)
    description: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RoleTable":
        if not isinstance(d, dict):
            raise ConfigError(where, "a role table must be a JSON object")
        unknown = set(d) - {"name", "description", "detect_all", "block_pattern", "rules", "default"}
        if unknown:
            raise ConfigError(where, f"unknown table field(s) {sorted(unknown)}")
        rules_in = d.get("rules", [])
        if not isinstance(rules_in, list):
            raise ConfigError(f"{where}.rules", "must be a list of rules")
        rules = [Rule.parse(r, f"{where}.rules[{i}]") for i, r in enumerate(rules_in)]
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
        return RoleTable(self.name, extra + self.rules, self.default, self.block_pattern, self.detect_all, self.description)

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
                role, blocks = r.role, r.blocks
                break
        else:
            role, blocks = self.default, 1
        if role in (Role.LINEAR, Role.FUSED_LINEAR) and len(shape) != 2:
            raise CheckpointError(name, f"role table '{self.name}' says {role.value} but the tensor has shape {tuple(shape)}")
        if role is Role.FUSED_LINEAR and shape[0] % blocks:
            raise CheckpointError(name, f"fused_linear with {blocks} blocks needs rows divisible by {blocks}, got {shape[0]}")
        return TensorRole(role, blocks, blk)


def builtin_tables() -> dict[str, RoleTable]:
    return {n: load_table(n) for n in DETECTION_ORDER}


def load_table(name_or_path: str) -> RoleTable:
    """A built-in table by name, or a JSON file by path."""
    p = TABLE_DIR / f"{name_or_path}.json"
    if not p.is_file():
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(
                "model.architecture", f"unknown architecture {name_or_path!r}: use 'auto', one of {list(DETECTION_ORDER)} or a path to a JSON table"
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


def resolve_table(architecture: str, keys: Iterable[str], overrides: Sequence[dict] = ()) -> RoleTable:
    table = detect_table(keys) if architecture == "auto" else load_table(architecture)
    return table.with_overrides(overrides) if overrides else table


def num_blocks(table: RoleTable, keys: Iterable[str]) -> int:
    """L = 1 + the largest block index in the model (SPEC §1.2, LiNeS); 0 if no blocks."""
    idx = [b for b in (table.block_index(k) for k in keys) if b is not None]
    return 1 + max(idx) if idx else 0
