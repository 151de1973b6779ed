"""WUDI-Merging (SPEC §3.3; Cheng et al., ICML 2025, "Whoever started the interference should end
it: guiding data-free model merging via task vectors").

Per linear map (every ``linear`` weight; each row block q, k, v of a ``fused_linear`` separately;
always as an out × in matrix, the transpose of a Conv1D weight: ``TensorRole.split``; the rows of
τ_i are the output units, so a Conv1D weight used as stored would swap inputs and outputs) the
merged task vector τ_m minimises the interference of the merge with each task's own inputs,
approximated by the rows of its task vector (the paper's Eq. for L(τ_m)):

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F.

With G_i = τ_iᵀ τ_i / ‖τ_i‖²_F (d_in × d_in, PSD), L(τ_m) = Σ_i tr((τ_m − τ_i) G_i (τ_m − τ_i)ᵀ), a
convex quadratic with gradient ∇L = 2 (τ_m A − B), A = Σ_i G_i, B = Σ_i τ_i G_i; its minimisers solve
τ_m A = B, the minimum-norm one is τ_m* = B A⁺. Every other tensor (``other`` role: biases, norms,
embeddings, projections used as x @ proj) takes the mean of the τ_i. The deployed model is θ0 + τ_m;
the init view is θ0 (a DFCMM method).

Two solvers (``solver``):

* ``"adam"`` (default): the reference continual form used as the NuFILT paper's baseline. t = 1:
  M_1 = τ_1. t ≥ 2: WUDI on the *pair* {M_{t−1}, τ_t}, starting from M_{t−1} + τ_t, Adam (lr 1e-5,
  betas 0.9/0.999, eps 1e-8, no weight decay) for 50 full-batch steps in float32 (``wudi_adam``,
  with the analytic gradient ∇L below instead of autograd: no graph, ~5 copies of the layer);
  ``other`` tensors M_t = (M_{t−1} + τ_t)/2 (so older experts' weight halves at every step, as in the
  reference: it is not the mean over all experts). State: ``"merged"`` = M_t (float32).
* ``"exact"``: the closed form, continual over *all* experts so far. State per linear map: the
  sufficient statistics A_t = A_{t−1} + G_t (set ``"A"``) and B_t = B_{t−1} + τ_t G_t (set ``"B"``),
  updated in O(d_out d_in²) per expert; a ``fused_linear`` stores its per-block statistics stacked
  by rows: A as (blocks·d_in) × d_in, B in the tensor's own shape. ``other`` tensors keep the running
  mean m_t = ((t − 1)·m_{t−1} + τ_t)/t (set ``"mean"``). τ_m = B_t A_t⁺ is recomputed every step.

Choices where the spec leaves room (tested in ``tests/test_wudi.py``):

* **Pseudo-inverse** (``wudi_solve``): float64 eigendecomposition of the symmetrised A; eigenvalues
  ≤ ``rcond`` · λ_max are treated as zero (default rcond = 1e-5). The statistics are stored as
  float32 state sets (DESIGN: a resumed run is then bit-identical), which perturbs A by ~1e-7 λ_max:
  the default keeps 1/λ well away from amplifying that rounding. Dropped directions v have
  B v ≈ 0 too (vᵀ A v = Σ vᵀ G_i v small ⇒ every G_i v small), so the gradient at the solution is
  ≈ 0 and exactly 0 in the exact null space of A (the directions no τ_i uses, where the sum of the
  τ_i that the Adam form starts from is 0 as well).
* A zero task vector (‖τ_i‖ = 0) contributes nothing (G_i = 0) instead of 0/0.
* A step's statistics are accumulated in float64 (A_{t−1} as read from the float32 state plus
  G_t) and solved before being rounded to float32 for storage, so a resumed run reads exactly
  what an uninterrupted one used.
* ``linear`` tensors must be 2-D; anything else with that role is a role-table error (raised).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from mergewatch.params import Param
from mergewatch.strategies.techniques import per_block
from mergewatch.views import VIEWS

SOLVERS = ("adam", "exact")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


# The objective and its solvers -----------------------------------------------------------------
def wudi_loss(x: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """L(x) = Σ_i ‖(x − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F (zero τ_i skipped), in x's dtype."""
    total = x.new_zeros(())
    for tau in taus:
        n2 = (tau * tau).sum()
        if not float(n2) > 0.0:
            continue
        total = total + (((x - tau) @ tau.T) ** 2).sum() / n2
    return total


class WudiGradient:
    """The analytic gradient ∇L(x) = 2 Σ_i (x − τ_i) G_i of ``wudi_loss``, G_i = τ_iᵀ τ_i / ‖τ_i‖²_F
    (zero τ_i skipped), with preallocated buffers: no autograd graph and no allocation per call.

    Two evaluation orders, chosen by shape (same gradient to float32 rounding, tested against
    autograd; the residual x − τ_i is always formed first, as autograd does, so nothing large
    cancels):

    * d_in ≤ d_out ("gram", attention and the first MLP matrix): 2 G_i precomputed once (float64,
      rounded to float32), then one (d_out × d_in) · (d_in × d_in) product per τ_i per call.
    * d_in > d_out ("rows", the second MLP matrix): ((x − τ_i) τ_iᵀ) (2/‖τ_i‖²) τ_i, autograd's own
      order, through a d_out × d_out buffer; G_i would be d_in × d_in (36 MiB for 3072).

    Cost per call: 2 d_out d_in² per τ_i ("gram") or 4 d_out² d_in ("rows"); autograd's forward
    and backward cost 4 d_out² d_in per τ_i and keep the d_out × d_out products of the graph
    (3072² for the first MLP matrix)."""

    def __init__(self, taus: Sequence[torch.Tensor]):
        taus = [t.detach().to(torch.float32) for t in taus]
        if not taus or any(t.dim() != 2 or t.shape != taus[0].shape for t in taus):
            raise ValueError(f"wudi: the gradient needs 2-D task vectors of one shape, got {[tuple(t.shape) for t in taus]}")
        d_out, d_in = taus[0].shape
        self.mode = "gram" if d_in <= d_out else "rows"
        self.terms: list[tuple[torch.Tensor, torch.Tensor | float]] = []
        for tau in taus:
            n2 = (tau * tau).sum()
            if not float(n2) > 0.0:
                continue
            if self.mode == "gram":
                t64 = tau.to(torch.float64)
                self.terms.append((tau, ((t64.T @ t64) * (2.0 / float(n2))).to(torch.float32)))
            else:
                self.terms.append((tau, n2))
        self._resid = torch.empty((d_out, d_in))
        self._grad = torch.empty((d_out, d_in))
        self._rows = torch.empty((d_out, d_out)) if self.mode == "rows" and self.terms else None

    @property
    def scratch(self) -> torch.Tensor:
        """A d_out × d_in buffer that is free between calls (``wudi_adam`` reuses it)."""
        return self._resid

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """∇L(x) (float32) in an internal buffer that the next call overwrites."""
        g, d = self._grad, self._resid
        if not self.terms:
            return g.zero_()
        for i, (tau, stat) in enumerate(self.terms):
            torch.sub(x, tau, out=d)
            if self.mode == "gram":
                if i == 0:
                    torch.mm(d, stat, out=g)
                else:
                    g.addmm_(d, stat)
            else:
                e = torch.mm(d, tau.T, out=self._rows).mul_(2).div_(stat)
                if i == 0:
                    torch.mm(e, tau, out=g)
                else:
                    g.addmm_(e, tau)
        return g


def wudi_adam(
    taus: Sequence[torch.Tensor],
    init: torch.Tensor,
    *,
    lr: float = 1e-5,
    steps: int = 50,
    betas: tuple[float, float] = ADAM_BETAS,
    overwrite_init: bool = False,
) -> torch.Tensor:
    """Minimise ``wudi_loss`` from ``init`` with Adam (eps 1e-8, no weight decay) for ``steps``
    full-batch steps, in float32: the reference solver. Returns the float32 result.

    The gradient is ``WudiGradient`` (analytic, no autograd graph) and the update is
    ``torch.optim.Adam``'s single-tensor step written out with the same operations in the same order
    (bit-identical to it for the same gradients, tested), so that its d_out × d_in temporary goes
    into the gradient's free buffer. Working set: x, Adam's two moments, the gradient and one
    buffer (5 copies of the tensor) instead of autograd's graph. ``overwrite_init``: ``init`` (a
    float32 tensor the caller no longer needs) becomes the optimisation variable, saving a copy."""
    grad_fn = WudiGradient(taus)
    if overwrite_init and init.dtype == torch.float32 and init.is_contiguous() and not init.requires_grad:
        x = init
    else:
        x = init.detach().to(torch.float32, copy=True)
    if x.shape != grad_fn.scratch.shape:
        raise ValueError(f"wudi: init has shape {tuple(x.shape)}, the task vectors {tuple(grad_fn.scratch.shape)}")
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, steps + 1):
        adam_step_(x, grad_fn(x), exp_avg, exp_avg_sq, step, lr=lr, betas=betas, buffer=grad_fn.scratch)
    return x


def adam_step_(
    x: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
    buffer: torch.Tensor | None = None,
) -> None:
    """Step ``step`` (1-based) of ``torch.optim.Adam`` (foreach=False, capturable=False, no weight
    decay, no amsgrad) on ``x`` in place: the operations of torch/optim/adam.py's
    ``_single_tensor_adam`` in their order, with its one temporary (the denominator) written into
    ``buffer`` when given. Bit-identical to ``torch.optim.Adam`` (tested)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    denom = torch.sqrt(exp_avg_sq, out=buffer) if buffer is not None else exp_avg_sq.sqrt()
    denom.div_(bias_correction2**0.5).add_(eps)
    x.addcdiv_(exp_avg, denom, value=-step_size)


def gram_stats(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, τ G) in float64 with G = τᵀτ / ‖τ‖²_F (both zero for a zero τ)."""
    t64 = tau.detach().to(torch.float64)
    n2 = float((t64 * t64).sum())
    if not n2 > 0.0:
        d_in = t64.shape[1]
        return t64.new_zeros((d_in, d_in)), torch.zeros_like(t64)
    g = (t64.T @ t64) / n2
    return g, t64 @ g


def wudi_solve(a: torch.Tensor, b: torch.Tensor, rcond: float = 1e-5) -> torch.Tensor:
    """τ_m = B A⁺ (float64): eigh of the symmetrised A, eigenvalues ≤ rcond·λ_max dropped."""
    a64 = a.detach().to(torch.float64)
    a64 = (a64 + a64.T) / 2
    b64 = b.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(a64)
    lmax = float(evals.max()) if evals.numel() else 0.0
    if not lmax > 0.0:
        return torch.zeros_like(b64)
    keep = evals > rcond * lmax
    v = evecs[:, keep]
    return ((b64 @ v) / evals[keep]) @ v.T


def wudi_exact(taus: Sequence[torch.Tensor], rcond: float = 1e-5) -> torch.Tensor:
    """The batch closed form τ_m* = (Σ τ_i G_i)(Σ G_i)⁺ over ``taus`` (float64)."""
    a = b = None
    for tau in taus:
        g, tg = gram_stats(tau)
        a = g if a is None else a + g
        b = tg if b is None else b + tg
    return wudi_solve(a, b, rcond)


def _require_2d(role: TensorRole, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"wudi: a '{role.role.value}' tensor must be 2-D (out × in), got shape {tuple(x.shape)}; fix the role table")


# The strategy --------------------------------------------------------------------------------
class WUDI(Strategy):
    """WUDI-Merging (Cheng et al., ICML 2025), SPEC §3.3; equations and Decisions in the module
    docstring. Hyper-parameters: ``param_defs``."""

    name = "wudi"
    paper = "Cheng et al., ICML 2025, 'Whoever started the interference should end it: guiding data-free model merging via task vectors' (WUDI-Merging)"
    requires_zs_init = True
    required_treatment = "solved"
    param_defs = (
        Param("solver", str, "adam", "adam: the reference's paired continual form; exact: closed form over all experts", choices=SOLVERS),
        Param("lr", float, 1e-5, "Adam learning rate", min=0.0, min_open=True),
        Param("steps", int, 50, "Adam steps per layer", min=0),
        Param("rcond", float, 1e-5, "exact solver: pseudo-inverse tolerance, relative to λ_max(A)", min=0.0, max=1.0, min_open=True, max_open=True),
    )

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.solver = self.params["solver"]

    # Declarations ------------------------------------------------------------------------------
    def treatment(self, meta: TensorMeta) -> str:
        return "solved" if meta.role.matrix else "averaged"

    def state_sets(self, t: int) -> tuple[str, ...]:
        return ("merged",) if self.solver == "adam" else ("A", "B", "mean")

    def sink_shape(self, sink: str, meta: TensorMeta) -> tuple[int, ...] | None:
        if sink in VIEWS:
            return meta.shape
        if not meta.role.mergeable:
            return None
        matrix = meta.role.matrix
        if sink == "merged":
            return meta.shape
        if sink == "A":
            if not (matrix and len(meta.shape) == 2):
                return None
            d_in = meta.role.matrix_shape(meta.shape)[1]
            return (meta.role.row_blocks * d_in, d_in)
        if sink == "B":
            return meta.shape if matrix else None
        if sink == "mean":
            return None if matrix else meta.shape
        return meta.shape

    def passes(self, ctx: StepContext) -> list[Pass]:
        fn = self._adam if self.solver == "adam" else self._exact
        return [
            Pass(
                name="merge",
                tensor_fn=fn,
                writes=("deploy", *self.state_sets(ctx.t)),
                reads=frozenset({"state"}) if ctx.t > 1 else frozenset(),
                label=f"wudi {self.solver}",
                trim=True,  # SVD/Adam workspaces fragment the heap (Pass.trim)
            )
        ]

    # Solvers -----------------------------------------------------------------------------------
    def _adam(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        tau = inp.expert - inp.base
        if ctx.t == 1:
            m = tau
        elif meta.role.matrix:
            _require_2d(meta.role, tau)
            prm = self.params

            def pair(m_prev: torch.Tensor, tau_t: torch.Tensor) -> torch.Tensor:
                return wudi_adam([m_prev, tau_t], m_prev + tau_t, lr=prm["lr"], steps=prm["steps"], overwrite_init=True)

            m = per_block(meta.role, pair, inp.state["merged"], tau)
        else:
            m = (inp.state["merged"] + tau) / 2
        return PassOutput(tensors={"deploy": inp.base + m, "merged": m})

    def _exact(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        t = ctx.t
        tau = inp.expert - inp.base
        if not meta.role.matrix:
            mean = tau if t == 1 else ((t - 1) * inp.state["mean"] + tau) / t
            return PassOutput(tensors={"deploy": inp.base + mean, "mean": mean})
        _require_2d(meta.role, tau)
        nb = meta.role.row_blocks
        d_in = meta.role.matrix_shape(tau.shape)[1]
        a_prev = inp.state["A"].chunk(nb, dim=0) if t > 1 else [None] * nb
        b_prev = meta.role.split(inp.state["B"]) if t > 1 else [None] * nb
        a_out, b_out, m_out = [], [], []
        for tau_j, a_j, b_j in zip(meta.role.split(tau), a_prev, b_prev, strict=True):
            g, tg = gram_stats(tau_j)
            a_new = g if a_j is None else a_j.to(torch.float64) + g
            b_new = tg if b_j is None else b_j.to(torch.float64) + tg
            a_out.append(a_new)
            b_out.append(b_new)
            m_out.append(wudi_solve(a_new, b_new, self.params["rcond"]))
        a_cat = torch.cat(a_out, dim=0)
        assert a_cat.shape == (nb * d_in, d_in)
        m = meta.role.join(m_out).to(torch.float32)
        return PassOutput(
            tensors={
                "deploy": inp.base + m,
                "A": a_cat.to(torch.float32),
                "B": meta.role.join(b_out).to(torch.float32),
            }
        )
