"""Merge techniques f_merge (SPEC §1.1, §1.2, §2): pure per-tensor functions of float32 tensors.

A technique merges a list of models (full weights θ_i, not task vectors) against θ0, one tensor at
a time. It never sees files or whole models. Techniques that need a whole-model quantity (TIES with
``trim = "global"``) declare *prep passes*: per-tensor statistics that the engine sums over the model,
turned into scalars that ``merge`` then receives in ``MergeInputs.scalars``.

Every technique is a small object built from its validated hyper-parameters; ``TECHNIQUES`` is the
explicit registry name -> class. Named variants (``dare_ties``, ``breadcrumbs``) share the sign
election and disjoint merge of TIES (``SignElectedMerge``) and differ only in how each task vector
is sparsified; each carries its paper reference (STYLE §1).

Conventions that every technique follows:

* λ-scaled techniques (TA, TIES, DARE-TIES, DARE-TA, Breadcrumbs, MagMax) implement ``task_merge``,
  the *unscaled* merged task vector τ_m; ``merge`` is then θ0 + λ·τ_m with λ = ``MergeInputs.lam``
  (LiNeS, when used, has already replaced λ per tensor). Weight Weaving (``weaving.py``) reuses τ_m.
* ``fused_linear`` tensors (q, k, v stacked by rows) are handled block by block wherever a rule is
  not elementwise (TIES ``tensor`` trim, SLERP and Model Stock cosines; SPEC §1.2).
* All randomness comes from ``MergeInputs.generator(purpose, i)`` (seeded per tensor and model by the
  caller), never from the global RNG, so a replay is bit-identical.
* Inputs are read-only, except the models the caller marks as its own in ``MergeInputs.owned``:
  ``merge`` may compute in their buffers (TIES builds τ_i, τ_m and the result there, which keeps a
  step within a few tensors of the largest size). ``task_merge`` never modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, ClassVar

import torch

from mergewatch.checkpoint.roles import Role, TensorRole
from mergewatch.params import Declares, Param, ParamError, validate


@dataclass
class MergeInputs:
    """One tensor name's inputs to a technique (all float32, same shape)."""

    name: str
    role: TensorRole
    base: torch.Tensor  # θ0
    models: Sequence[torch.Tensor]  # θ_1..θ_n in the technique's order
    weights: Sequence[float] | None = None  # WA / SLERP weights (sum 1); None = uniform
    lam: float = 1.0  # λ for this tensor (LiNeS already applied by the caller)
    #: seeded generator for (purpose, model index); index -1 is for pooling decisions
    generator: Callable[[str, int], torch.Generator] | None = None
    scalars: Mapping[str, Any] = field(default_factory=dict)  # results of prep passes
    #: owned[i] True: ``models[i]`` is the caller's own buffer, which it does not use after this
    #: tensor's ``merge``; the technique may overwrite it (default: nothing owned, nothing overwritten)
    owned: Sequence[bool] = ()

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ0 as new tensors (the inputs are never modified)."""
        return [m - self.base for m in self.models]

    def owns(self, i: int) -> bool:
        return i < len(self.owned) and bool(self.owned[i])

    def take_task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ0 for a technique that modifies them: an owned model is turned into its task
        vector in place (``models[i]`` holds τ_i afterwards, the same values as ``θ_i − θ0``), the
        others are new tensors. Only ``merge`` may call this (the call the ownership was granted
        to): ``task_merge`` must leave ``models`` intact, because wrappers such as Weight Weaving
        call it and then read the models again."""
        return [m.sub_(self.base) if self.owns(i) else m - self.base for i, m in enumerate(self.models)]

    def rng(self, purpose: str, i: int) -> torch.Generator:
        """The seeded generator for ``(purpose, i)``; an error if the caller gave none (a technique
        must never fall back to the global RNG: replays would differ)."""
        if self.generator is None:
            raise ValueError(f"{self.name}: this technique draws random numbers ({purpose}) and needs MergeInputs.generator")
        return self.generator(purpose, i)


@dataclass(frozen=True)
class PrepPass:
    """A whole-model statistic a technique needs before merging.

    ``stats(x)`` returns tensors that are summed over all mergeable tensor names; ``finish(totals,
    scalars)`` returns the scalars to add (it sees the scalars of earlier prep passes)."""

    name: str
    stats: Callable[[MergeInputs], dict[str, torch.Tensor]]
    finish: Callable[[dict[str, torch.Tensor], Mapping[str, Any]], dict[str, Any]]


# Parameters ----------------------------------------------------------------------------------
def fraction(name: str, default: float, doc: str, *, closed: bool = False) -> Param:
    """A parameter in [0, 1) (or [0, 1] when ``closed``)."""
    return Param(name, float, default, doc, min=0.0, max=1.0, max_open=not closed)


MERGE_MODES = ("mean", "sum", "max")
#: TIES-family parameters, shared by the presets and continual TIES (``params.with_defaults``)
P_DROP = fraction("p", 0.8, "fraction of each task vector pruned (smallest magnitudes)")
MERGE = Param("merge", str, "mean", "how the entries agreeing with the elected sign are combined", choices=MERGE_MODES)
DARE_P = replace(P_DROP, default=0.7, doc="DARE's drop probability of each entry (the survivors are rescaled by 1/(1 − p))")
TRIM = Param("trim", str, "tensor", "scope of the magnitude trim: each tensor (fused q/k/v blocks apart) or all mergeable tensors (exact)", choices=("tensor", "global"))


def exact_fraction(v: float | Fraction) -> Fraction:
    """The decimal value of ``v`` as written: ``repr`` of a float is the shortest decimal that
    round-trips, so 0.8 is taken as 4/5 (not the binary double just above it)."""
    return v if isinstance(v, Fraction) else Fraction(repr(float(v)))


def exact_floor(frac: float | Fraction, n: int) -> int:
    """⌊frac·n⌋ computed exactly in rational arithmetic (SPEC §1.2 "Counts"): ⌊0.2·20⌋ = 4, where
    float code gives (1 − 0.8)·20 = 3.9999999999999996 → 3."""
    return math.floor(exact_fraction(frac) * n)


# Base class ----------------------------------------------------------------------------------
class Technique(Declares):
    """Subclasses set ``name``, ``paper`` and ``param_defs`` (the hyper-parameters, each a config
    option; ``defaults`` is derived from them)."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    #: True for techniques whose result is θ0 + λ·τ_merged (TA, TIES, DARE, Breadcrumbs, MagMax):
    #: these accept LiNeS and Weight Weaving.
    lambda_scaled: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params = validate(params, self.param_defs, self.name)
        self.validate()

    def validate(self) -> None:
        """Checks across parameters (each parameter alone is checked by its declaration): a
        ``ParamError`` naming them."""

    def describe(self) -> dict:
        """Name, paper and hyper-parameters (for MANIFEST.json)."""
        return {"name": self.name, "paper": self.paper, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def prep_passes(self, n_models: int) -> list[PrepPass]:
        return []

    def merge(self, x: MergeInputs) -> torch.Tensor:
        """θ_merged for this tensor."""
        if self.lambda_scaled:
            return x.base + x.lam * self.task_merge(x)
        raise NotImplementedError

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        """The unscaled merged task vector τ_m (lambda-scaled techniques only)."""
        raise NotImplementedError(f"{self.name} is not a task-vector technique")


def _uniform(x: MergeInputs) -> list[float]:
    n = len(x.models)
    return list(x.weights) if x.weights is not None else [1.0 / n] * n


def per_block(role: TensorRole, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to each linear map a tensor holds, as an out × in matrix (``TensorRole.split``:
    each row block q, k, v of a fused_linear, the transpose of a Conv1D weight), and put the
    results back in the stored layout (``TensorRole.join``); other tensors are passed whole (SPEC
    §1.2 "Fused tensors")."""
    if role.role is not Role.FUSED_LINEAR and not role.transposed:
        return fn(*tensors)
    parts = [role.split(t) for t in tensors]
    return role.join([fn(*blk) for blk in zip(*parts)])


# WA, TA --------------------------------------------------------------------------------------
class WeightAverage(Technique):
    """Σ w_i θ_i (uniform unless weights are given). Wortsman et al. 2022, "Model soups"."""

    name = "wa"
    paper = "Wortsman et al., ICML 2022 (model soups); TIME (Dziadzio et al., CVPR 2025)"

    def merge(self, x: MergeInputs) -> torch.Tensor:
        out = torch.zeros_like(x.base)
        for w, m in zip(_uniform(x), x.models):
            out.add_(m, alpha=w)
        return out


class TaskArithmetic(Technique):
    """θ0 + λ Σ τ_i (sum, not mean). Ilharco et al., ICLR 2023."""

    name = "ta"
    paper = "Ilharco et al., ICLR 2023, 'Editing models with task arithmetic'"
    lambda_scaled = True

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        out = torch.zeros_like(x.base)
        for m in x.models:
            out.add_(m - x.base)
        return out


# TIES family: sparsify each τ_i, elect a sign per coordinate, disjoint merge --------------------


#: Elementwise TIES steps run over flat slices of this many entries, so that their temporaries
#: (elected sign, agreement masks, products, counts) are a few hundred KiB whatever the tensor size,
#: instead of several copies of the largest tensor (the streaming bound is 6 × the largest tensor).
#: 2^15 is torch's parallel grain size: each op on a slice runs on the calling thread, with no
#: OpenMP fork/join per op (measured on the 2-core development VM under load, token embedding,
#: 2 models: 0.6–1.4 s for 2^15 slices, up to 7× that for 2^18–2^22, 1.4–2.4 s for whole tensors).
CHUNK = 1 << 15


def _flat_slices(ts: Sequence[torch.Tensor], size: int = 0) -> Iterable[list[torch.Tensor]]:
    """Aligned slices of ``size`` (default ``CHUNK``) entries of the flattened tensors (views when
    they are contiguous)."""
    size = size or CHUNK
    flats = [t.reshape(-1) for t in ts]
    n = flats[0].numel() if flats else 0
    for s in range(0, n, size):
        yield [f[s : s + size] for f in flats]


def _zero_below(t: torch.Tensor, m: float) -> torch.Tensor:
    """``t[|t| < m] = 0`` in place, slice by slice (no tensor-sized mask)."""
    if not t.is_contiguous():
        return t.masked_fill_(t.abs() < m, 0.0)  # reshape would copy: no in-place slices
    for (c,) in _flat_slices([t]):
        c.masked_fill_(c.abs() < m, 0.0)
    return t


def _disjoint_slice(cs: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """``disjoint_merge`` of one aligned slice of every τ̂_i (a new tensor of the slice's size)."""
    elected = torch.zeros_like(cs[0])
    for t in cs:
        elected += t
    elected.sign_()
    out = torch.zeros_like(cs[0])
    count = torch.zeros_like(cs[0]) if mode == "mean" else None
    for t in cs:
        # t·γ > 0 ⇔ sign(t) = γ ≠ 0 (γ ∈ {−1, 0, 1}; t = 0 never agrees)
        agree = (t * elected) > 0
        if mode == "max":
            cand = torch.where(agree, t, 0.0)
            out = torch.where(cand.abs() > out.abs(), cand, out)
        else:
            out += torch.where(agree, t, 0.0)
            if count is not None:
                count += agree
    if count is not None:
        out.div_(count.clamp_min_(1.0))
    return out


def disjoint_merge(taus: Sequence[torch.Tensor], mode: str = "mean", *, consume: bool = False) -> torch.Tensor:
    """TIES steps 2-3 (Yadav et al. 2023, Alg. 1): elected sign γ = sign(Σ_i τ̂_i) per coordinate,
    then combine only the entries whose sign agrees with γ: ``mean`` (sum / number of agreeing
    entries), ``sum``, or ``max`` (the agreeing entry of largest magnitude). A coordinate whose
    elected sign is 0 (no entries, or entries that cancel exactly) gets 0, i.e. stays at θ0
    (SPEC §1.2: no fallback sign is chosen for such coordinates).

    Every step is elementwise, so it runs slice by slice (``CHUNK`` entries): the result is the
    same bit for bit as on whole tensors, with slice-sized temporaries only. ``taus`` are never
    modified, except that ``consume=True`` (the caller owns ``taus``, distinct tensors) writes the
    result into ``taus[0]``'s buffer and returns it: no tensor-sized allocation at all."""
    first = taus[0]
    out = first if consume and first.is_contiguous() else torch.empty(first.shape, dtype=first.dtype)
    for o, *cs in _flat_slices([out, *taus]):
        # slice j of the result is written after every read of slice j (out may be taus[0])
        o.copy_(_disjoint_slice(cs, mode))
    return out


def ties_keep_rank(p: float, d: int) -> int:
    """k = d − ⌊(1 − p)·d⌋: entries with |x| ≥ the k-th smallest |x| are kept (⌊(1 − p)d⌋ + 1 of
    them without ties). k = 0 means keep everything (p = 0)."""
    return d - exact_floor(1 - exact_fraction(p), d)


def ties_trim(t: torch.Tensor, p: float) -> torch.Tensor:
    """TIES step 1 over the whole of ``t``: zero every entry with |x| below the k-th smallest |x|
    (ties at the threshold are kept, as in the reference ``kthvalue`` / ``>=`` code)."""
    return ties_trim_(t.clone(), p)


def ties_trim_(t: torch.Tensor, p: float) -> torch.Tensor:
    """``ties_trim`` in place (``t`` is the caller's own tensor). The k-th smallest |x| comes from
    an in-place partial sort of one |t| copy (numpy's introselect: the same value as
    ``torch.kthvalue``, without its value and int64 index copies, and much faster); that copy is
    freed before the entries below it are zeroed slice by slice."""
    d = t.numel()
    k = ties_keep_rank(p, d)
    if k <= 0 or d == 0:
        return t
    mag = t.abs().reshape(-1)
    flat = mag.numpy()
    flat.partition(k - 1)
    m = float(flat[k - 1])
    del mag, flat
    return _zero_below(t, m)


def _trim_blocks_(role: TensorRole, t: torch.Tensor, p: float) -> None:
    """``ties_trim_`` of each q/k/v block of a fused_linear tensor (of ``t`` itself otherwise), in
    place: the blocks are views of ``t``, except per-head blocks (GPT-NeoX), which are gathered
    copies and written back."""
    if role.role is not Role.FUSED_LINEAR:
        ties_trim_(t, p)
        return
    blocks = role.split(t)
    for blk in blocks:
        ties_trim_(blk, p)
    if role.heads > 1:
        t.copy_(role.join(blocks))


class SignElectedMerge(Technique):
    """Base of TIES, DARE-TIES and Breadcrumbs: τ_m = disjoint_merge(sparsify(τ_1..τ_n))."""

    lambda_scaled = True

    def sparsify(self, x: MergeInputs, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        # sparsify returns new tensors (of new task vectors): they are this call's own
        return disjoint_merge(self.sparsify(x, x.task_vectors()), self.params["merge"], consume=True)


# Global-trim prep passes: an exact streaming selection over the float32 bit patterns of |τ_i|.
# For x ≥ 0 the int32 bit pattern of a float32 is monotone in x, so the k-th smallest |τ| over the
# model is found by two histogram passes: the high 16 bits (pass 1) pick the bucket that holds the
# k-th value and its rank inside the bucket; the low 16 bits of that bucket's entries (pass 2) give
# the exact value. Histogram counts are summed by the engine in float64, exact up to 2^53 entries.
# |τ_i| is formed slice by slice (θ_i − θ0 per slice), so a prep pass holds only its inputs.
_HI_BINS = 1 << 15  # the sign bit of |x| is 0, so the high half-word is < 2^15
_LO_BINS = 1 << 16


#: entries per slice of the histogram passes: a 2^15-bin histogram is added per slice, so slices
#: are larger than ``CHUNK`` (temporaries of a few MiB)
_HIST_SLICE = 1 << 20


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().to(torch.float32).contiguous().reshape(-1).view(torch.int32)


def _tau_bits(x: MergeInputs, i: int) -> Iterable[torch.Tensor]:
    """The float32 bit patterns of |τ_i| = |θ_i − θ0|, slice by slice (no tensor-sized copy)."""
    for m, b in _flat_slices([x.models[i], x.base], _HIST_SLICE):
        yield _abs_bits(m - b)


def _select_bin(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th smallest entry (1-based), rank inside that bin)."""
    cum = torch.cumsum(hist.to(torch.float64), dim=0)
    b = int(torch.searchsorted(cum, torch.tensor([float(rank)], dtype=torch.float64)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, rank - before


class TIES(SignElectedMerge):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim each τ_i to its top (1 − p) fraction by |value|
    (p = fraction pruned), elect signs, disjoint merge; θ0 + λ·τ_m.

    Trim (SPEC §1.1/§1.2): over the d entries in scope, m = the k-th smallest |x| with
    k = d − ⌊(1 − p)d⌋ (floor computed exactly), keep every entry with |x| ≥ m. Scope ``tensor``:
    each tensor, each row block of a ``fused_linear`` separately. Scope ``global``: all mergeable
    tensors of the model (blocks ignored); the per-model thresholds come from two prep passes and
    arrive as ``scalars["ties.threshold"]``."""

    name = "ties"
    paper = "Yadav et al., NeurIPS 2023, 'TIES-Merging: resolving interference when merging models'"
    param_defs = (P_DROP, MERGE, TRIM)

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        return self._merge_owned(x, x.task_vectors())

    def merge(self, x: MergeInputs) -> torch.Tensor:
        """θ0 + λ·τ_m, computed in the buffers of the models the caller owns (``x.owned``): τ_i
        overwrites θ_i, τ_m overwrites τ_1, then the result (λ·τ_m + θ0, the same IEEE operations
        as θ0 + λ·τ_m) overwrites τ_m. With both models owned, a tensor of d entries needs the
        inputs plus one d-entry scratch copy (the partial sort), nothing else of its size."""
        tau_m = self._merge_owned(x, x.take_task_vectors())
        if x.lam != 1.0:  # 1·τ is τ exactly: skip a pass over the tensor
            tau_m.mul_(x.lam)
        return tau_m.add_(x.base)

    def _merge_owned(self, x: MergeInputs, taus: list[torch.Tensor]) -> torch.Tensor:
        """τ_m from task vectors this call owns (trimmed in place, τ_m written into ``taus[0]``)."""
        p, mode = self.params["p"], self.params["merge"]
        if self.params["trim"] == "global":
            thr = x.scalars.get("ties.threshold")
            if thr is None or len(thr) != len(taus):
                raise ValueError(f"{self.name}: trim='global' needs scalars['ties.threshold'] for {len(taus)} models (run the prep passes)")
            for t, m in zip(taus, thr):
                _zero_below(t, float(m))
        else:
            for t in taus:
                _trim_blocks_(x.role, t, p)
        # sign election and disjoint merge are elementwise: one call over the whole tensor gives
        # the same values as one call per fused block
        return disjoint_merge(taus, mode, consume=True)

    def prep_passes(self, n_models: int) -> list[PrepPass]:
        if self.params["trim"] != "global":
            return []
        p = self.params["p"]

        def hi_stats(x: MergeInputs) -> dict[str, torch.Tensor]:
            hist = torch.zeros((len(x.models), _HI_BINS), dtype=torch.int64)
            for i in range(len(x.models)):
                for bits in _tau_bits(x, i):
                    hist[i] += torch.bincount(bits >> 16, minlength=_HI_BINS)
            return {"ties.hist_hi": hist.to(torch.float64), "ties.count": torch.tensor(float(x.base.numel()), dtype=torch.float64)}

        def hi_finish(totals: dict[str, torch.Tensor], scalars: Mapping[str, Any]) -> dict[str, Any]:
            d = int(totals["ties.count"].item())
            k = ties_keep_rank(p, d)
            buckets, ranks = [], []
            for i in range(n_models):
                if k <= 0 or d == 0:
                    buckets.append(-1), ranks.append(0)  # keep everything: no selection needed
                else:
                    b, r = _select_bin(totals["ties.hist_hi"][i], k)
                    buckets.append(b), ranks.append(r)
            return {"ties.count": d, "ties.rank": k, "ties.bucket": buckets, "ties.bucket_rank": ranks}

        def lo_stats(x: MergeInputs) -> dict[str, torch.Tensor]:
            rows = torch.zeros((len(x.models), _LO_BINS), dtype=torch.int64)
            for i, b in enumerate(x.scalars["ties.bucket"]):
                for bits in _tau_bits(x, i):
                    rows[i] += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=_LO_BINS)
            return {"ties.hist_lo": rows.to(torch.float64)}

        def lo_finish(totals: dict[str, torch.Tensor], scalars: Mapping[str, Any]) -> dict[str, Any]:
            thresholds = []
            for i, (b, r) in enumerate(zip(scalars["ties.bucket"], scalars["ties.bucket_rank"])):
                if b < 0:
                    thresholds.append(0.0)
                    continue
                lo, _ = _select_bin(totals["ties.hist_lo"][i], r)
                bits = torch.tensor([(b << 16) | lo], dtype=torch.int32)
                thresholds.append(float(bits.view(torch.float32).item()))
            return {"ties.threshold": thresholds}

        return [PrepPass("ties.select_hi", hi_stats, hi_finish), PrepPass("ties.select_lo", lo_stats, lo_finish)]


def dare(t: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p (mask ``rand < p``), rescale the
    survivors by 1/(1 − p)."""
    if p == 0.0:
        return t.clone()
    drop = torch.rand(t.shape, generator=g) < p
    return torch.where(drop, torch.zeros_like(t), t / (1.0 - p))


class DARETIES(SignElectedMerge):
    """DARE-TIES: DARE drop-and-rescale of each τ_i (masks from ``generator("dare", i)``), then TIES
    sign election and disjoint merge; θ0 + λ·τ_m.

    Choice: there is no TIES magnitude trim after DARE (DARE's random drop *is* the sparsification,
    as in mergekit's ``dare_ties`` with the reference density); p is DARE's drop probability."""

    name = "dare_ties"
    paper = "Yu et al., ICML 2024, 'Language models are Super Mario' (DARE) + Yadav et al., NeurIPS 2023 (TIES)"
    param_defs = (DARE_P, MERGE)

    def sparsify(self, x: MergeInputs, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        p = float(self.params["p"])
        return [dare(t, p, x.rng("dare", i)) for i, t in enumerate(taus)]


class DARETaskArithmetic(Technique):
    """DARE-TA: DARE drop-and-rescale of each τ_i, then the task-arithmetic sum (no sign election);
    θ0 + λ Σ_i DARE(τ_i)."""

    name = "dare_ta"
    paper = "Yu et al., ICML 2024, 'Language models are Super Mario' (DARE) + Ilharco et al., ICLR 2023 (TA)"
    lambda_scaled = True
    param_defs = (DARE_P,)

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        p = float(self.params["p"])
        out = torch.zeros_like(x.base)
        for i, t in enumerate(x.task_vectors()):
            out += dare(t, p, x.rng("dare", i))
        return out


def breadcrumbs_mask(t: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Boolean keep-mask: per row (last dimension, n entries) drop the ⌊βn⌋ smallest and the ⌊γn⌋
    largest |values|. Equal magnitudes are ranked by position (stable sort), so exactly those counts
    are dropped. A 1-D tensor is one row; a 0-D tensor is one row of one entry. ValueError if a row
    would keep nothing."""
    rows = t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])
    n = rows.shape[-1]
    keep = torch.ones(rows.shape, dtype=torch.bool)
    if rows.numel() == 0:
        return keep.reshape(t.shape)
    n_small, n_large = exact_floor(beta, n), exact_floor(gamma, n)
    if n_small + n_large >= n:
        raise ValueError(f"breadcrumbs: beta={beta}, gamma={gamma} drop all {n} entries of a row")
    order = torch.argsort(rows.abs(), dim=-1, stable=True)
    if n_small:
        keep.scatter_(1, order[:, :n_small], False)
    if n_large:
        keep.scatter_(1, order[:, n - n_large :], False)
    return keep.reshape(t.shape)


class Breadcrumbs(SignElectedMerge):
    """Model Breadcrumbs (-TIES): per row of each τ_i drop the bottom β fraction (small magnitudes)
    and the top γ fraction (outliers) by |value|, then TIES sign election and disjoint merge;
    θ0 + λ·τ_m. Rows are along the last dimension, so the blocks of a ``fused_linear`` (which split
    rows) need no special handling."""

    name = "breadcrumbs"
    paper = "Davari & Belilovsky, ECCV 2024, 'Model Breadcrumbs: scaling multi-task model merging with sparse masks'"
    param_defs = (
        fraction("beta", 0.7, "fraction of each row dropped from the bottom (smallest magnitudes)"),
        fraction("gamma", 0.01, "fraction of each row dropped from the top (outliers); beta + gamma < 1"),
        MERGE,
    )

    def validate(self) -> None:
        b, g = self.params["beta"], self.params["gamma"]
        if exact_fraction(b) + exact_fraction(g) >= 1:
            raise ParamError(self.name, ("beta", "gamma"), f"parameters 'beta' + 'gamma' must be < 1, got {b} + {g}")

    def sparsify(self, x: MergeInputs, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        b, g = self.params["beta"], self.params["gamma"]
        return [torch.where(breadcrumbs_mask(t, b, g), t, torch.zeros_like(t)) for t in taus]


class MagMax(Technique):
    """MagMax (Marczak et al., ECCV 2024): per coordinate the τ_i of largest |τ_i|, ties to the later
    model; θ0 + λ·τ_sel."""

    name = "magmax"
    paper = "Marczak et al., ECCV 2024, 'MagMax: leveraging model merging for seamless continual learning'"
    lambda_scaled = True

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        return magmax_select(x.task_vectors())


def magmax_select(members: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per coordinate the member of largest |value|; on equal magnitudes the later member wins."""
    it = iter(members)
    best = next(it).clone()
    for m in it:
        best = torch.where(m.abs() >= best.abs(), m, best)
    return best


# SLERP, Model Stock ---------------------------------------------------------------------------
SLERP_LINEAR_COS = 0.9995


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(a, b) over the whole tensor in float64; None if either norm is 0."""
    a64, b64 = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    na, nb = float(a64.norm()), float(b64.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return max(-1.0, min(1.0, float(a64 @ b64) / (na * nb)))


def slerp(v0: torch.Tensor, v1: torch.Tensor, c: float) -> torch.Tensor:
    """Spherical interpolation with weight c on v1 (SPEC §1.1): linear when |cos| > 0.9995 or a norm
    is 0, else sin((1−c)Ω)/sin Ω · v0 + sin(cΩ)/sin Ω · v1 with Ω = arccos(cos)."""
    cos = _cosine(v0, v1)
    if cos is None or abs(cos) > SLERP_LINEAR_COS:
        a, b = 1.0 - c, c
    else:
        omega = math.acos(cos)
        s = math.sin(omega)
        a, b = math.sin((1.0 - c) * omega) / s, math.sin(c * omega) / s
    return a * v0 + b * v1


class SLERP(Technique):
    """Spherical linear interpolation of raw weights (Shoemake 1985; as used for model merging by
    mergekit and TIME). Two models: weight ``c`` on the second (``weights[1]`` when weights are
    given). More models: a running spherical mean r = v_1, r ← slerp(r, v_k, c_k) with
    c_k = w_k / Σ_{j≤k} w_j (= 1/k for uniform weights). Cosines are over the whole tensor, each row
    block of a ``fused_linear`` separately."""

    name = "slerp"
    paper = "Shoemake, SIGGRAPH 1985; TIME (Dziadzio et al., CVPR 2025)"
    param_defs = (fraction("c", 0.5, "two models: weight of the second", closed=True),)

    def _steps(self, x: MergeInputs) -> list[float]:
        """The interpolation weight of each model k ≥ 2 in the fold."""
        n = len(x.models)
        if x.weights is None:
            return [float(self.params["c"])] if n == 2 else [1.0 / k for k in range(2, n + 1)]
        w = [float(v) for v in x.weights]
        if len(w) != n or any(not math.isfinite(v) or v < 0 for v in w):
            raise ValueError(f"slerp: weights must be {n} non-negative numbers, got {list(x.weights)}")
        steps, cum = [], w[0]
        for wk in w[1:]:
            cum += wk
            steps.append(wk / cum if cum > 0 else 0.0)
        return steps

    def merge(self, x: MergeInputs) -> torch.Tensor:
        if len(x.models) == 1:
            return x.models[0].clone()
        steps = self._steps(x)

        def fold(*vs: torch.Tensor) -> torch.Tensor:
            r = vs[0]
            for v, c in zip(vs[1:], steps):
                r = slerp(r, v, c)
            return r

        return per_block(x.role, fold, *x.models)


class ModelStock(Technique):
    """Model Stock (Jang et al., ECCV 2024): cos φ = mean over pairs i<j of cos(τ_i, τ_j) (whole
    tensor, each ``fused_linear`` block separately), t = N cos φ / (1 + (N − 1) cos φ),
    θ = t · mean(θ_i) + (1 − t) θ0. N = 1 returns θ_1.

    Guards (choices): the cosine with a zero task vector counts as 0; cos φ is clamped to [0, 1]
    before computing t, so t ∈ [0, 1] (a negative mean cosine, where the paper's geometry does not
    apply and t would be negative or infinite at cos φ = −1/(N − 1), gives θ0)."""

    name = "model_stock"
    paper = "Jang, Yun & Han, ECCV 2024, 'Model Stock: all we need is just a few fine-tuned models'"

    @staticmethod
    def ratio(taus: Sequence[torch.Tensor]) -> float:
        n = len(taus)
        cos = [_cosine(taus[i], taus[j]) for i in range(n) for j in range(i + 1, n)]
        cos_phi = sum(0.0 if c is None else c for c in cos) / len(cos)
        cos_phi = min(1.0, max(0.0, cos_phi))
        return n * cos_phi / (1.0 + (n - 1) * cos_phi)

    def merge(self, x: MergeInputs) -> torch.Tensor:
        if len(x.models) == 1:
            return x.models[0].clone()

        def stock(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
            t = self.ratio([m - base for m in models])
            avg = torch.stack(list(models)).mean(dim=0)
            return t * avg + (1.0 - t) * base

        return per_block(x.role, stock, x.base, *x.models)


# LiNeS, recency weights ------------------------------------------------------------------------
LINES_VARIANTS = ("linear", "quadratic", "sqrt")
#: LiNeS' parameters ([policy.lines])
LINES_PARAMS = (
    Param("alpha", float, 0.5, "λ of the shallowest block and of tensors outside blocks", min=0.0),
    Param("beta", float, 0.5, "added λ at the deepest block", min=0.0),
    Param("variant", str, "linear", "f in alpha + beta·f(ℓ/(L − 1))", choices=LINES_VARIANTS),
)


def lines_scale(block_index: int | None, n_blocks: int, **params: float | str) -> float:
    """LiNeS (Wang et al., ICLR 2025): the λ of a tensor in transformer block ℓ is
    s(ℓ) = α + β·f(ℓ/(L − 1)) with f = identity, square or square root; tensors outside blocks
    (``block_index`` None) get α. With L = 1 the single block has ℓ/(L − 1) := 0 (it is the first
    block: scaled like the shallowest layer). s replaces λ; it does not multiply it (SPEC §1.2).
    ``params``: ``alpha``, ``beta``, ``variant`` (``LINES_PARAMS``)."""
    p = validate(params, LINES_PARAMS, "lines")
    alpha, beta, variant = p["alpha"], p["beta"], p["variant"]
    if block_index is None:
        return float(alpha)
    if not 0 <= block_index < n_blocks:
        raise ValueError(f"lines: block index {block_index} outside 0..{n_blocks - 1}")
    frac = block_index / (n_blocks - 1) if n_blocks > 1 else 0.0
    f = {"linear": frac, "quadratic": frac * frac, "sqrt": math.sqrt(frac)}[variant]
    return float(alpha) + float(beta) * f


_RECENCY: dict[str, Callable[[int], float]] = {
    "uniform": lambda i: 1.0,
    "linear": lambda i: float(i),
    "sqrt": lambda i: math.sqrt(i),
    "quadratic": lambda i: float(i * i),
    "cubic": lambda i: float(i**3),
    "log": lambda i: math.log(i + 1),
}
RECENCY_SCHEMES = (
    *_RECENCY,
    "exp",
    *(f"reverse_{s}" for s in (*_RECENCY, "exp") if s != "uniform"),
)
#: the ALL merge's weights with WA (a TIME parameter)
WEIGHTS = Param("weights", str, "uniform", "ALL merge with WA: weight of expert i (oldest = 1) ∝ 1, i, √i, i², i³, ln(i + 1), 2^(i−1); reverse_*: oldest weighs most", choices=RECENCY_SCHEMES)


def recency_weights(n: int, scheme: str = "uniform") -> list[float]:
    """Weights for n experts oldest → newest (i = 1..n), normalised to sum 1 (SPEC §1): ``uniform``,
    ``linear`` i, ``sqrt`` √i, ``quadratic`` i², ``cubic`` i³, ``exp`` 2^{i−1}, ``log`` ln(i+1), and
    ``reverse_<scheme>`` (the same weights for the reversed order: the oldest weighs most)."""
    WEIGHTS.check(scheme, "recency")
    if n < 1:
        raise ValueError(f"recency weights need n >= 1, got {n}")
    base = scheme.removeprefix("reverse_")
    if base == "exp":
        raw = [math.ldexp(1.0, i - n) for i in range(1, n + 1)]  # 2^{i−1} / 2^{n−1}: no overflow
    else:
        raw = [_RECENCY[base](i) for i in range(1, n + 1)]
    if scheme.startswith("reverse_"):
        raw.reverse()
    total = math.fsum(raw)
    return [r / total for r in raw]


#: name -> class (explicit registry; presets such as dare_ties are classes with their own defaults).
#: Weight Weaving wraps one of the λ-scaled entries (``weaving.WeightWeaving``) and is not listed.
TECHNIQUES: dict[str, type[Technique]] = {
    "wa": WeightAverage,
    "ta": TaskArithmetic,
    "ties": TIES,
    "dare_ties": DARETIES,
    "dare_ta": DARETaskArithmetic,
    "breadcrumbs": Breadcrumbs,
    "magmax": MagMax,
    "slerp": SLERP,
    "model_stock": ModelStock,
}
