"""The strategy contract: what a continual merging policy declares and computes.

A *strategy* turns (θ0, the new expert θ_t, the buffered experts, its previous state) into its new
state and the published *views* (``deploy`` and ``init``). It never touches files: it describes its
work as a list of **passes** over the model; the engine (``mergewatch.engine``) streams every
tensor through each pass and writes what the pass emits (DESIGN §4).

* A pass's ``tensor_fn(meta, inputs, ctx)`` is a pure function of the tensors of one name (float32)
  and the whole-model scalars in ``ctx.scalars``. It may overwrite the inputs the engine hands over
  (``inputs.owns(t)``: freshly read, unused by the engine afterwards), which lets a technique build
  task vectors and results in the inputs' own buffers instead of next to them. It returns tensors
  for *sinks* (state sets such as ``"ema"`` or ``"S"``, and the views ``"deploy"``/``"init"``) and
  *stats*: tensors that the engine sums over all tensor names. After the pass, ``reduce_fn(stats, ctx)`` turns the sums into scalars
  for later passes (OPCM's λ, global TIES thresholds).
* A sink written in one pass can be read back (``inputs.fresh``) in a later pass of the same step;
  that is how two-pass methods apply a whole-model scalar while writing without keeping a second
  copy of the model in memory.
* ``frozen`` tensors never reach a strategy: the engine copies θ0's value into every sink.
* The strategy's JSON state (``meta``) carries scalars between steps (λ_t, norms, t); tensor state
  sets are stored as float32 safetensors.
* **Prepared sets** (optional, ``prepared_sets`` / ``prepare_passes``): work that depends only on
  the committed state of step t (e.g. OPCM's SVDs of S_t) may be done *ahead*, after step t is
  published and before expert t+1 arrives, so that it is off the arrival → deploy latency. The
  passes read the committed sets (``inputs.state``; no expert) and write the prepared sets next to
  that state. They are a cache, never a source of truth: step t+1 finds them in ``inputs.state``
  when present and must compute exactly the same thing itself when they are absent (so results
  are bit-identical either way, and a lost or unreadable cache costs time only).

Strategies are small objects built from validated config parameters; the registry in
``strategies/__init__.py`` is a plain dict name -> class (STYLE §1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from mergewatch.checkpoint.roles import TensorRole
from mergewatch.errors import ConfigError
from mergewatch.params import Declares, validate
from mergewatch.views import VIEWS



class BufferNeed(str, Enum):
    """Which past experts must stay in the store after a step (the current one is always read)."""

    NONE = "none"  # the running state is enough (ema, ft, OPCM, ...)
    ALL = "all"  # every expert so far (deploy/init "all")


class ViewSource(str, Enum):
    """A view that is not computed by a pass."""

    BASE = "base"  # the base checkpoint itself (init "zs")


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the base's storage dtype: views are cast back to it
    role: TensorRole

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ModelInfo:
    metas: Mapping[str, TensorMeta]  # sorted by name
    n_blocks: int  # L = 1 + largest transformer block index (0 if none)
    table: str  # name of the role table in use

    @property
    def mergeable(self) -> list[TensorMeta]:
        return [m for m in self.metas.values() if m.role.mergeable]


def treatment_counts(strategy: "Strategy", model: ModelInfo) -> dict[str, dict[str, int]]:
    """treatment -> {kind (``TensorRole.label``) -> number of tensors}, sorted; frozen tensors are
    copied from θ0 by the engine and counted as "frozen"."""
    out: dict[str, dict[str, int]] = {}
    for m in model.metas.values():
        tr = strategy.treatment(m) if m.role.mergeable else "frozen"
        by_kind = out.setdefault(tr, {})
        by_kind[m.role.label] = by_kind.get(m.role.label, 0) + 1
    return {tr: dict(sorted(kinds.items())) for tr, kinds in sorted(out.items())}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from (config seed, expert content hash, tensor name, purpose) (SPEC §0)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class StepContext:
    """What a pass may know about the step besides the tensors of one name."""

    t: int  # 1-based number of the expert being merged
    seed: int
    expert_ids: list[str]  # content sha256 of every expert merged, in order, this one last
    model: ModelInfo
    meta: dict  # the strategy's JSON state after step t-1 ({} before the first step)
    scalars: dict = field(default_factory=dict)  # filled by reduce_fn of earlier passes

    def generator(self, name: str, purpose: str, expert_id: str | None = None) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, expert_id or self.expert_ids[-1], name, purpose))
        return g


@dataclass
class TensorInputs:
    """Float32 tensors of one name. ``experts`` are the buffered experts (oldest first) the strategy
    asked for; the last one is always θ_t.

    Ownership: ``owns(t)`` is True for an input that the engine read freshly for this call (from a
    checkpoint file, or converted from another dtype) and never touches again after ``tensor_fn``
    returns, except for writing whatever the pass returns. The pass may then overwrite that tensor
    in place (e.g. τ_i = θ_i − θ0 into the expert's own buffer) or return it (or a result computed
    in it) as an output: no copy of it needs to be alive next to the input. Inputs the engine does
    not own (tensors of an in-memory mapping handed to ``run_step``) are read-only, as is everything
    when ``TensorInputs`` is built by hand without ``owned``. A pass that ignores ownership is
    unaffected; one that uses it must not overwrite a tensor it still reads later, nor one that
    another of its outputs refers to."""

    base: torch.Tensor
    experts: list[torch.Tensor]
    state: dict[str, torch.Tensor]
    fresh: dict[str, torch.Tensor]
    #: ``id()`` of each owned input tensor object as handed over (see ``owns``); empty = nothing
    #: may be overwritten
    owned: frozenset[int] = field(default=frozenset(), repr=False)

    @property
    def expert(self) -> torch.Tensor:
        return self.experts[-1]

    def owns(self, t: torch.Tensor) -> bool:
        """True when ``t`` is one of these inputs and the pass may overwrite it (class docstring)."""
        return id(t) in self.owned


@dataclass
class PassOutput:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


TensorFn = Callable[[TensorMeta, TensorInputs, StepContext], PassOutput]
ReduceFn = Callable[[dict[str, torch.Tensor], StepContext], dict]


@dataclass(frozen=True)
class Pass:
    """One streaming pass. ``reads`` names what the engine loads per tensor: ``"experts"`` (all
    buffered experts; otherwise only θ_t), ``"state"`` (previous state sets), ``"fresh"`` (sinks
    written by earlier passes of this step). θ0 and θ_t are always loaded."""

    name: str
    tensor_fn: TensorFn
    writes: tuple[str, ...] = ()
    reduce_fn: ReduceFn | None = None
    reads: frozenset[str] = frozenset()
    label: str = ""  # shown in progress output
    #: hand freed heap memory back to the kernel after every tensor name, not only after the pass
    #: (``numeric.release_freed_memory``): for passes whose per-tensor work (SVDs, QRs) fragments the
    #: heap enough that the retained memory, not the live tensors, would set the step's peak
    trim: bool = False


class Strategy(Declares):
    """Base class of every merge strategy. Subclasses set ``name``, ``paper`` and ``param_defs``
    (their hyper-parameters; ``defaults`` is derived) and implement ``passes``; the others have
    defaults for a stateless strategy."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    #: True when the strategy assumes experts fine-tuned from θ0 (DFCMM methods: the config
    #: requires init zs).
    requires_zs_init: ClassVar[bool] = False
    #: the ``treatment`` that at least one tensor must get, or the strategy refuses the model
    #: (``check_model``): e.g. "projected" for OPCM. None: any model.
    required_treatment: ClassVar[str | None] = None

    def __init__(self, params: Mapping[str, Any]):
        """``self.params``: every declared parameter, checked (``ParamError``), defaults filled in."""
        self.params = validate(params, self.param_defs, self.name)

    # What must be kept -------------------------------------------------------------------------
    def buffer_need(self) -> BufferNeed:
        return BufferNeed.NONE

    def state_sets(self, t: int) -> tuple[str, ...]:
        """Tensor sets stored after step t (each must be written by some pass)."""
        return ()

    # The step ----------------------------------------------------------------------------------
    def passes(self, ctx: StepContext) -> Sequence[Pass]:
        raise NotImplementedError

    def view_sources(self, ctx: StepContext) -> dict[str, str]:
        """view -> sink written by a pass, or ``ViewSource.BASE``. A method that assumes experts
        fine-tuned from θ0 publishes θ0 itself as the init view."""
        return {"deploy": "deploy", "init": ViewSource.BASE if self.requires_zs_init else "init"}

    def sink_shape(self, sink: str, meta: TensorMeta) -> tuple[int, ...] | None:
        """Shape of tensor ``meta.name`` in ``sink``; ``None`` leaves the name out of that sink.

        Views always have the model's layout. State sets default to it too; a strategy whose state
        is not model-shaped (e.g. WUDI's per-layer d_in × d_in statistics) overrides this."""
        return meta.shape

    def prepared_sets(self, t: int) -> tuple[str, ...]:
        """Sets that ``prepare_passes`` computes ahead from the committed state of step ``t`` for
        step t+1 (module docstring); empty = nothing to prepare. Shapes come from ``sink_shape``."""
        return ()

    def prepare_passes(self, ctx: StepContext) -> Sequence[Pass]:
        """The passes computing ``prepared_sets(ctx.t)`` from the committed state of step ``ctx.t``
        (``ctx.meta`` is that step's meta; ``inputs.state`` its sets; ``inputs.experts`` is empty)."""
        return ()

    def next_meta(self, ctx: StepContext) -> dict:
        """The JSON state to store after this step (scalars of ``ctx.scalars`` worth keeping)."""
        return {"t": ctx.t}

    # What a step does with each tensor -------------------------------------------------------
    def treatment(self, meta: TensorMeta) -> str:
        """What a step does with one mergeable tensor, in a word or two (e.g. "projected" or
        "added"): the steps record how many tensors of each kind got each treatment."""
        return "merged"

    def nothing_selected(self, model: ModelInfo) -> str:
        """Why no tensor of ``model`` gets the ``required_treatment``, and what to do about it."""
        return (f"no tensor of this model is a linear layer for it (role table '{model.table}'): name the model's "
                f"architecture in [model] architecture or mark its linear layers in [model] roles")

    def check_model(self, model: ModelInfo) -> dict[str, dict[str, int]]:
        """``treatment_counts`` of ``model``; a ConfigError naming the strategy when no tensor would
        get its ``required_treatment`` (a method that would silently leave the model as it is)."""
        counts = treatment_counts(self, model)
        if self.required_treatment is not None and not counts.get(self.required_treatment):
            raise ConfigError("model.architecture", f"{self.name}: {self.nothing_selected(model)}")
        return counts

    def describe(self) -> dict:
        """Name and hyper-parameters, for MANIFEST.json."""
        return {"name": self.name, "paper": self.paper, **self.params}
