"""OPCM: orthogonal projection-based continual merging (SPEC §3.1; Tang et al. 2025, "Merging models
on the fly without retraining: a sequential approach to scalable continual model merging").

State after step t: the unnormalised running merged task vector S_t (one model-sized float32 set,
``"S"``) and the scalars λ_t, Σ_{i≤t}‖τ_i‖ and t (JSON meta, stored atomically with S by the state
store: λ_t cannot be recovered from the deployed weights). The deployed model is

    θ^m_t = θ0 + S_t / λ_t.

* t = 1: S_1 = τ_1, λ_1 = 1; the deployed model is θ_1 itself (copied, not recomputed as
  θ0 + (θ_1 − θ0), which would round).
* t ≥ 2, per ``linear`` weight (each row block q, k, v of a ``fused_linear`` separately, the
  out × in transpose of a Conv1D weight: ``TensorRole.split``): with
  Δ = S_{t−1} (it has the singular vectors of M_{t−1} = S_{t−1}/λ_{t−1}) and its thin SVD
  Δ = U Σ Vᵀ (p = min(d_out, d_in) pairs),

      c_k = (σ_1 + … + σ_k) / (σ_1 + … + σ_p),   r = #{k : c_k ≤ α},
      Q = Uᵀ τ_t V (p × p),   R = Q on its diagonal and its top-left r × r block, 0 elsewhere,
      τ̃_t = τ_t − U R Vᵀ,

  so that Uᵀ τ̃_t V has a zero diagonal and a zero top-left r × r block: the update is orthogonal
  to the "important" singular directions of the previous merge. Every ``other`` tensor (biases,
  norms, embeddings, class/positional embeddings, ``visual.proj``, a language model's ``lm_head``
  tied or not: no float64 SVD of a vocab × hidden matrix, README "Architectures and roles") takes τ̃_t = τ_t
  (**Decision** of SPEC §3.1: they are all merged, unlike the reference code which skips a few
  by accident of module structure). S_t = S_{t−1} + τ̃_t.
* n_t = ‖τ_t‖ and ‖S_t‖ over all mergeable tensors; λ_t = ‖S_t‖ / (Σ_{i≤t} n_i / t), hence
  ‖M_t‖ = ‖S_t‖/λ_t = mean(n_1..n_t) at every step (the paper's norm-preserving rescaling).

Streaming (SPEC §3.1): pass 1 reads S_{t−1}, writes S_t tensor by tensor and sums ‖S_t‖² and
‖τ_t‖² (float64) over the model; its reduce computes λ_t; pass 2 reads the S_t it just wrote back
from disk (``fresh``) and writes θ0 + S_t/λ_t. No model is ever held whole in memory.

Computed ahead (``prepared_sets``, strategies/base.py): the SVDs of S_t, the bulk of a step's
work (72 float64 SVDs of 768 × 768 matrices for the ViT-B/32 tower), depend only on the committed
state. After step t is published, ``prepare_passes`` stores their factors (``svd_u``, ``svd_s``,
``svd_vh``: U, σ and Vᵀ of every linear map, row blocks stacked) next to state t, and step t+1
projects with them instead of decomposing S_t itself. Without them (batch runs, a lost cache) the
step computes the very same factors (``svd_factors``, then the same float32 rounding), so the
result is bit-identical either way. Cost: the factors take ~1.45× the model's float32 size on disk
(U and Vᵀ of a d_out × d_in map hold (d_out + d_in)·min(d_out, d_in) numbers), kept with the newest
state only (``StateStore.retain``).

Memory: both the projecting and the prepare pass return freed heap memory to the kernel after
every tensor (``Pass.trim``). Their QR/SVD workspaces and products fragment glibc's heap, which
otherwise kept about twice the live tensors (ViT-B/32 step: 1.30 → 0.78 of the foundation bound,
same time, ``bench/dfcmm.py``).

Choices where the spec leaves room (documented here, tested in ``tests/test_opcm.py``):

* The SVD is computed in float64 (a float32 SVD is not accurate enough: ``project_with``); Q,
  R and U R Vᵀ are float32 products of the float64 singular vectors rounded to float32.
* **Zero Δ** (a layer that no previous expert changed): r = 0 and *no* projection, τ̃ = τ. The
  singular vectors of a zero matrix are arbitrary (whatever LAPACK returns), so removing "the
  diagonal" of Q would remove components along meaningless directions. A non-zero but
  rank-deficient Δ follows the formula literally (diagonal over all p pairs).
* ``linear`` tensors must be 2-D; anything else with that role is a configuration error of the
  role table (raised, never silently treated as ``other``).
* A degenerate ‖S_t‖ = 0 (only if every task vector so far is zero) gives λ_t = 1 (θ^m_t = θ0
  either way) instead of a division by zero.
* α is validated to 0 ≤ α < 1: at α = 1 the rank would depend on whether float rounding puts c_p
  at or just below 1 (SPEC §3.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mergewatch.checkpoint.roles import TensorRole
from mergewatch.strategies.base import (
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
)
from mergewatch.strategies.techniques import fraction, per_block


def projection_rank(sigma: torch.Tensor, alpha: float) -> int:
    """r = #{k : c_k ≤ α} with c_k = cumsum(σ)_k / Σσ (singular values, not their squares; SPEC
    §3.1). 0 when Σσ = 0 (zero Δ) or when α < c_1. Computed in float64."""
    s = sigma.detach().to(torch.float64).reshape(-1)
    total = float(s.sum())
    if s.numel() == 0 or not total > 0.0:
        return 0
    c = torch.cumsum(s, dim=0) / total
    return int((c <= float(alpha)).sum())


@dataclass(frozen=True)
class SVDFactors:
    """The thin SVD Δ = U Σ Vᵀ of one linear map, computed in float64 and kept in float32, the
    form in which they are also stored ahead (rounding the float64 vectors changes τ̃ by ~1e-9 of
    ‖S‖, measured on ViT-B/32-shaped blocks; the rank rule sums the float32 σ in float64)."""

    u: torch.Tensor  # d_out × p, float32
    sigma: torch.Tensor  # p, float32
    vh: torch.Tensor  # p × d_in, float32


def svd_factors(delta: torch.Tensor) -> SVDFactors | None:
    """Thin float64 SVD of Δ, or ``None`` for a zero Δ (no directions to protect, module Decision).

    This call is the step's memory peak (the float64 copy of Δ, LAPACK's own copy, U and its
    workspace: ~9.6 float32 copies of Δ for 3072 × 768). **Decision** for a Δ whose long side is at
    least twice its short side (the MLP matrices): QR first, Δ = Q R in float64 (wide Δ: Δᵀ), then
    the SVD of the small square R = U_R Σ Vᵀ, and U = Q U_R as a float32 product. Same factors to
    rounding (τ̃ moved by 2e-8 of ‖S‖ on 3072 × 768 benchmark blocks), same time (LAPACK's gesdd
    takes the QR route itself for such shapes), 52 instead of 86 MiB above the inputs (measured).
    A wide Δ is always decomposed as Δᵀ: LAPACK's SVD is markedly faster on the tall orientation
    (measured 2.4× on 768 × 3072)."""
    if delta.dim() != 2:
        raise ValueError(f"opcm: projection needs a 2-D tensor, got shape {tuple(delta.shape)}")
    if not bool(delta.any()):
        return None
    m, n = delta.shape
    tall = delta.to(torch.float64) if m >= n else delta.T.to(torch.float64)  # long side first
    if tall.shape[0] >= 2 * tall.shape[1]:
        q, r = torch.linalg.qr(tall)
        del tall
        ur, s, vh = torch.linalg.svd(r, full_matrices=False)
        del r
        u = q.to(torch.float32)
        del q
        u = u @ ur.to(torch.float32)
    else:
        u, s, vh = torch.linalg.svd(tall, full_matrices=False)
        del tall
        u = u.to(torch.float32)
    vh = vh.to(torch.float32)
    s = s.to(torch.float32)
    # the factors of Δᵀ = V Σ Uᵀ for a wide Δ: swap and transpose back
    return canonical(u, s, vh) if m >= n else canonical(vh.T, s, u.T)


def canonical(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor) -> SVDFactors:
    """The one memory layout in which ``project_with`` ever sees factors: row-major, freshly
    allocated float32 tensors. LAPACK hands back column-major U and Vᵀ, while factors read back
    from the prepared sets are row-major; the BLAS products of ``project_with`` pick different
    kernels (and, with several threads, different partial sums) for the two layouts, so a step
    with prepared factors rounded differently from one that decomposed S itself. Both paths go
    through here, so they run the very same products (``tests/test_determinism.py``)."""
    return SVDFactors(*(_own_row_major(x) for x in (u, sigma, vh)))


def _own_row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 in a row-major buffer of its own (a slice of a stack is copied: its start
    need not have the allocator's alignment, which BLAS kernels are also sensitive to)."""
    x = x.to(torch.float32)
    if x.is_contiguous() and x.storage_offset() == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


#: the prepared sets holding the factors of every linear map of S_t (row blocks stacked)
FACTOR_SETS = ("svd_u", "svd_s", "svd_vh")


def factor_shapes(role: TensorRole, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of one tensor's stacked factors: with b linear maps of d_i × n (``TensorRole.split``:
    q, k, v of a fused_linear, the transpose of a Conv1D weight), p_i = min(d_i, n) pairs each and
    p = max p_i, U is (Σ d_i) × p, σ is b × p and Vᵀ is (b·p) × n. A block with p_i < p (k and v
    under grouped-query attention) fills the first p_i columns of its U rows, entries of its σ row
    and rows of its Vᵀ part; the rest are zeros. Equal blocks: p_i = p."""
    rows = role.block_rows(shape)
    n = role.matrix_shape(shape)[1]
    p = max(min(r, n) for r in rows)
    return {"svd_u": (sum(rows), p), "svd_s": (len(rows), p), "svd_vh": (len(rows) * p, n)}


def stack_factors(factors: list[SVDFactors | None], role: TensorRole, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The stored form of one tensor's per-block factors; a zero Δ block is stored as zeros (σ = 0
    is how ``unstack_factors`` recognises it: a non-zero Δ has σ_1 > 0)."""
    shapes = factor_shapes(role, shape)
    u, sigma, vh = (torch.zeros(shapes[k], dtype=torch.float32) for k in FACTOR_SETS)
    p = shapes["svd_s"][1]
    off = 0
    for i, (f, rows) in enumerate(zip(factors, role.block_rows(shape), strict=True)):
        if f is not None:
            k = f.sigma.shape[0]
            u[off:off + rows, :k] = f.u
            sigma[i, :k] = f.sigma
            vh[i * p:i * p + k] = f.vh
        off += rows
    return {"svd_u": u, "svd_s": sigma, "svd_vh": vh}


def unstack_factors(stored: Mapping[str, torch.Tensor], role: TensorRole, shape: tuple[int, ...]) -> list[SVDFactors | None]:
    """The per-block factors of ``stack_factors``' output (shapes checked: a stored set that does not
    fit the tensor is an error, never silently used)."""
    shapes = factor_shapes(role, shape)
    for k in FACTOR_SETS:
        if tuple(stored[k].shape) != shapes[k]:
            raise ValueError(f"opcm: prepared {k} has shape {tuple(stored[k].shape)}, expected {shapes[k]}")
    p = shapes["svd_s"][1]
    n = shapes["svd_vh"][1]
    out: list[SVDFactors | None] = []
    off = 0
    for i, rows in enumerate(role.block_rows(shape)):
        k = min(rows, n)
        sigma = stored["svd_s"][i, :k]
        u = stored["svd_u"][off:off + rows]
        off += rows
        if not bool(sigma.any()):
            out.append(None)
            continue
        out.append(canonical(u if k == p else u[:, :k], sigma, stored["svd_vh"][i * p:i * p + k]))
    return out


def project_with(tau: torch.Tensor, f: SVDFactors | None, alpha: float) -> torch.Tensor:
    """τ̃ = τ − U R Vᵀ from precomputed factors of Δ (SPEC §3.1); ``None`` (zero Δ): τ unchanged.

    With r = ``projection_rank(σ, alpha)`` only the entries of Q = Uᵀ τ V that R keeps are formed:
    U R Vᵀ = U diag(Q) Vᵀ + U_r (Q_r − diag(Q_r)) V_rᵀ (Q_r: the top-left r × r block), subtracted
    in place. **Decision**: these products run in float32 (the SVD itself stays float64, which the
    formula needs: with float32 singular vectors the result moved by 3e-2 of ‖S‖ on the benchmark's
    task vectors, whose small singular values are close together); float32 products change τ̃ by
    float32 rounding only (~1e-7 relative) and halve their cost. Returns float32."""
    tau = tau.to(torch.float32)
    if f is None:
        return tau.clone()
    if tau.shape != (f.u.shape[0], f.vh.shape[1]):
        raise ValueError(f"opcm: τ has shape {tuple(tau.shape)}, Δ had {(f.u.shape[0], f.vh.shape[1])}")
    u, vh = f.u, f.vh
    r = projection_rank(f.sigma, alpha)
    tv = tau @ vh.T  # τ V (d_out × p)
    q_top = u[:, :r].T @ tv[:, :r] if r > 0 else None
    q_diag = tv.mul_(u).sum(dim=0)  # Q_kk = u_kᵀ τ v_k for all p pairs
    del tv
    out = tau.clone()  # becomes τ − U R Vᵀ
    out.addmm_(u, q_diag[:, None] * vh, alpha=-1.0)
    if q_top is not None:
        q_top.diagonal().zero_()
        out.addmm_(u[:, :r], q_top @ vh[:r], alpha=-1.0)
    return out


def project_update(tau: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """OPCM's projected update τ̃ = τ − U R Vᵀ of one linear map (SPEC §3.1): ``svd_factors`` of
    ``delta`` (Δ = S_{t−1}, d_out × d_in) then ``project_with``. The result has Uᵀ τ̃ V zero on
    the diagonal and on the top-left r × r block; a zero Δ returns τ unchanged (module docstring).
    Returns float32, the shape of ``tau``."""
    if tau.dim() != 2 or tau.shape != delta.shape:
        raise ValueError(f"opcm: projection needs two 2-D tensors of one shape, got {tuple(tau.shape)} and {tuple(delta.shape)}")
    return project_with(tau, svd_factors(delta), alpha)


def _require_matrix(role: TensorRole, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"opcm: a '{role.role.value}' tensor must be 2-D (out × in), got shape {tuple(x.shape)}; fix the role table")


def opcm_update(role: TensorRole, tau: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """τ̃ for one tensor by role: ``linear`` → ``project_update``; ``fused_linear`` → each row block
    (q, k, v) projected against its own block of Δ, then re-stacked; ``other`` → τ unchanged."""
    if role.matrix:
        _require_matrix(role, tau)
        return per_block(role, lambda t, d: project_update(t, d, alpha), tau, delta)
    return tau


def _sq(t: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """Σ t² in float64, over slices of ``chunk`` entries (a float64 copy of 2 MiB at a time, not of
    the whole tensor; no squared temporary)."""
    acc = torch.zeros((), dtype=torch.float64)
    for part in t.reshape(-1).split(chunk):
        p64 = part.to(torch.float64)
        acc += torch.dot(p64, p64)
    return acc


class OPCM(Strategy):
    """Orthogonal projection-based continual merging (Tang et al. 2025), SPEC §3.1; see the module
    docstring for the equations and the Decisions. Hyper-parameter: ``alpha`` (default 0.5,
    0 ≤ α < 1), the fraction of the singular-value mass of Δ whose directions are protected."""

    name = "opcm"
    paper = "Tang et al. 2025, 'Merging models on the fly without retraining: a sequential approach to scalable continual model merging' (OPCM)"
    requires_zs_init = True
    required_treatment = "projected"
    param_defs = (fraction("alpha", 0.5, "share of the singular-value mass of Δ whose directions are protected (< 1: at 1 the rank depends on float rounding)"),)

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.alpha = self.params["alpha"]

    # Declarations ------------------------------------------------------------------------------
    def treatment(self, meta: TensorMeta) -> str:
        return "projected" if meta.role.matrix else "added"

    def state_sets(self, t: int) -> tuple[str, ...]:
        return ("S",)

    def prepared_sets(self, t: int) -> tuple[str, ...]:
        return FACTOR_SETS

    def sink_shape(self, sink: str, meta: TensorMeta) -> tuple[int, ...] | None:
        if sink not in FACTOR_SETS:
            return meta.shape
        if not meta.role.matrix:
            return None
        _require_matrix(meta.role, torch.empty(meta.shape, device="meta"))
        return factor_shapes(meta.role, meta.shape)[sink]

    def prepare_passes(self, ctx: StepContext) -> list[Pass]:
        return [Pass("factors", self._factors, writes=FACTOR_SETS, reads=frozenset({"state"}), label="opcm SVDs ahead", trim=True)]

    def _factors(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        if not meta.role.matrix:
            return PassOutput()  # not in the factor sets (``sink_shape``)
        s = inp.state["S"]
        factors = [svd_factors(d) for d in meta.role.split(s)]
        return PassOutput(tensors=stack_factors(factors, meta.role, meta.shape))

    def next_meta(self, ctx: StepContext) -> dict:
        s = ctx.scalars
        return {"t": ctx.t, "lambda": s["opcm.lambda"], "sum_norms": s["opcm.sum_norms"]}

    # The step ----------------------------------------------------------------------------------
    def passes(self, ctx: StepContext) -> list[Pass]:
        if ctx.t == 1:
            return [Pass("first", self._first, writes=("S", "deploy"), reduce_fn=self._reduce, label="opcm first expert")]
        prev_t = ctx.meta.get("t")
        if prev_t != ctx.t - 1 or "sum_norms" not in ctx.meta:
            raise ValueError(f"{self.name}: step {ctx.t} needs the state of step {ctx.t - 1}, got meta {ctx.meta!r}")
        return [
            Pass("project", self._project, writes=("S",), reduce_fn=self._reduce, reads=frozenset({"state"}), label="opcm project", trim=True),
            Pass("deploy", self._deploy, writes=("deploy",), reads=frozenset({"fresh"}), label="opcm deploy"),
        ]

    def _first(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        tau = inp.expert - inp.base
        return PassOutput(tensors={"S": tau, "deploy": inp.expert}, stats={"opcm.S_sq": _sq(tau), "opcm.tau_sq": _sq(tau)})

    def _project(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        prev = inp.state["S"]
        if meta.role.matrix:
            _require_matrix(meta.role, prev)
            if all(k in inp.state for k in FACTOR_SETS):  # computed ahead (module docstring)
                factors = unstack_factors(inp.state, meta.role, meta.shape)
            else:
                # The SVDs first, τ afterwards: the float64 SVD is the step's memory peak and τ is
                # not needed for it (same result as ``opcm_update``, one tensor less at the peak).
                factors = [svd_factors(d) for d in meta.role.split(prev)]
            tau = inp.expert - inp.base
            parts = [project_with(t, f, self.alpha) for t, f in zip(meta.role.split(tau), factors, strict=True)]
            del factors
            update = meta.role.join(parts)  # the stored layout (a single untransposed map: parts[0] itself)
            del parts
            s_new = update.add_(prev)
        else:
            tau = inp.expert - inp.base
            s_new = prev + tau
        return PassOutput(tensors={"S": s_new}, stats={"opcm.S_sq": _sq(s_new), "opcm.tau_sq": _sq(tau)})

    def _reduce(self, totals: dict[str, torch.Tensor], ctx: StepContext) -> dict:
        n_t = math.sqrt(float(totals["opcm.tau_sq"])) if "opcm.tau_sq" in totals else 0.0
        s_norm = math.sqrt(float(totals["opcm.S_sq"])) if "opcm.S_sq" in totals else 0.0
        sum_norms = n_t if ctx.t == 1 else float(ctx.meta["sum_norms"]) + n_t
        if ctx.t == 1:
            lam = 1.0
        else:
            mean_norm = sum_norms / ctx.t
            lam = s_norm / mean_norm if s_norm > 0.0 and mean_norm > 0.0 else 1.0
        return {"opcm.lambda": lam, "opcm.sum_norms": sum_norms, "opcm.tau_norm": n_t, "opcm.S_norm": s_norm}

    def _deploy(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        return PassOutput(tensors={"deploy": inp.base + inp.fresh["S"] / ctx.scalars["opcm.lambda"]})
