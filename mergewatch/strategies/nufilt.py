"""NuFILT: null-space filtering for data-free continual model merging (SPEC §3.2; Qiu et al., ICLR
2026, "Null-space filtering for data-free continual model merging").

State after step t: the merged model W^m_t (state set ``"merged"``, float32). The deployed model is
W^m_t itself; the init view is θ0 (a DFCMM method: every expert is fine-tuned from the base).

For expert t ≥ 2 and each *selected* layer (a ``linear`` weight, or one row block q, k, v of a
``fused_linear``, as an out × in matrix: ``TensorRole.split``), with τ = W_t − W0 and
Δ = W^m_{t−1} − W0 (both d_out × d_in; operators act on the input side, τ·R):

* U = the first r_p right singular vectors of Δ (d_in × k, k ≤ r_p), V1 = the first r_v right
  singular vectors of τ, P = I − U Uᵀ (the projector onto the complement of Δ's principal input
  subspace: the "null space" that filters τ).
* LoRA factors in input space: B ∈ R^{d_in × r_l} = 0, A ∈ R^{r_l × d_in} ~ N(0, lora_std²).
* Loss (SPEC §3.2)

      L(B, A) = ‖τ V1 − (Δ + τ(P + BA)) V1‖²_F + ‖Δ U − (Δ + τ(P + BA)) U‖²_F,

  the first term keeps the new expert's behaviour on its own principal input directions, the
  second keeps the previous merge's behaviour on Δ's (it equals ‖τ B A U‖²_F since P U = 0).
  Adam (lr, betas, eps 1e-8, no weight decay), ``steps`` full-batch steps.
* Fuse: W^m_t = W^m_{t−1} + τ (P + B A). Biases and every other tensor are untouched.

The paper optimises the sum of the per-layer losses with one Adam optimiser. The layers share no
parameter and Adam's update is elementwise (each entry's moments depend only on its own gradient,
and ∂(Σ_ℓ L_ℓ)/∂(B_ℓ, A_ℓ) = ∂L_ℓ/∂(B_ℓ, A_ℓ)), so one optimiser per layer gives the same iterates;
that is what lets the engine stream the model one tensor at a time (``nufilt_layer``).

Decisions and choices where the spec leaves room (tested in ``tests/test_nufilt.py``):

* **Selection** by the role table's kinds (``kinds``, default attn_in, attn_out, mlp_in: "the
  attention q, k, v and output projections and the first MLP matrix", SPEC §3.2): open_clip's
  ``in_proj_weight``/``out_proj``/``c_fc``, HF CLIP's q/k/v/out_proj and fc1, BERT's query/key/value,
  attention output and intermediate dense, Llama/Qwen's q/k/v/o_proj and *both* gate_proj and
  up_proj (the SwiGLU's two first matrices), GPT-2's c_attn, attn.c_proj and mlp.c_fc. ``select``
  (name regexes, re.search) replaces the kinds when given. A step that would select no layer is
  refused (``check_model``): a model whose table names no kinds (``generic``) needs ``select`` or
  an architecture.
* **t = 1** (SPEC Decision): P = I and no LoRA solve, W^m_1 = θ0 + τ_1 = θ_1 on the selected layers
  (θ_1's values are copied, not recomputed as θ0 + (θ_1 − θ0), which would round).
* **Other tensors** (everything not selected, including the second MLP matrix ``c_proj``/``fc2``,
  biases, norms, embeddings): ``others = "base"`` (default, the reference behaviour) keeps θ0 and
  stores nothing for them; ``others = "ta"`` keeps the running average of the experts,
  W^m_t = ((t − 1)·W^m_{t−1} + θ_t) / t (W^m_1 = θ_1), i.e. θ0 + mean(τ_1..τ_t): the continual weight
  average of SPEC §3.4 (task arithmetic with λ = 1/t), computed with exactly that formula in float32.
* **SVDs** run in float64 on the float32 tensors. ``svd = "full"`` (default) is a thin LAPACK SVD
  (of xᵀ for a wide x, of the R of x = QR for a tall one: the same σ and V, U is never formed);
  ``svd = "randomized"`` is a seeded randomized range finder (Halko, Martinsson & Tropp 2011,
  Alg. 4.4: Gaussian test matrix of k + max(10, k/2) columns, 6 QR-stabilised power iterations, then
  the SVD of the small projected matrix), seeded from ``ctx.generator(layer, "nufilt-svd-…")``; it
  falls back to the full SVD when the sketch would not be smaller than the matrix. Its subspace
  matches the full SVD's to tolerance on matrices with a spectral gap after k (tested).
* **Rank limits**: k = min(r_p, d_out, d_in) (the tiny test models have d_in = 32 < 128), and
  singular vectors whose singular value is numerically zero (σ ≤ σ_1 · max(d_out, d_in) · ε_float32,
  the usual matrix-rank tolerance for float32 data) are dropped: they are an arbitrary basis of
  the null space (whatever LAPACK returns) and the result would depend on it. A zero Δ (a layer
  no previous expert changed) therefore gives U = ∅, P = I and L = ‖τ B A V1‖²_F, which is
  stationary at B = 0: the update is τ, as at t = 1. A zero τ gives V1 = ∅ and the update 0.
* The loss is evaluated with the products reassociated for cost (constants τ V1 − Δ V1 − τ P V1
  and −τ P U computed once, then (τ B)(A V1) and (τ B)(A U) per step): identical to the literal
  form up to float rounding (``nufilt_loss`` is the literal form; tested).
* LoRA init: A is drawn from ``ctx.generator(f"{name}#{block}", "nufilt-lora")`` (block 0 for a
  plain ``linear``), i.e. seeded by (config seed, expert content hash, tensor name, block), so a
  replay is bit-identical (torch CPU kernels are deterministic for a fixed thread count).
* Everything except the SVDs runs in float32 (SPEC §0); the fused update τ(P + BA) is float32.
* **Δ's subspace is computed ahead** (``prepared_sets``, strategies/base.py): U depends only on
  the committed state (Δ = W^m_t − W0), so after step t is published the daemon stores every
  selected layer's U (``delta_u``: one zero-padded d_in × k block per row block, ``delta_rank``:
  their ranks) next to state t, and step t+1 only decomposes τ. Without them (batch runs, a lost
  cache) the step computes the same U itself; the result is bit-identical either way (U is used
  in float32, the form in which it is stored). For that, the randomized SVD of Δ is seeded with
  the last expert *merged into Δ* (expert t, ``ctx.generator(..., expert_id=...)``), not with the
  new expert t+1; the other seeds (τ's SVD, the LoRA init) stay those of the new expert.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergewatch.strategies.base import (
    ModelInfo,
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
)
from mergewatch.params import Param, ParamError

#: attention q, k, v (a fused qkv: each row block is its own layer), the attention output
#: projection and the first MLP matrix (both gate and up of a SwiGLU), by the role tables' kinds.
#: Not the second MLP matrix (``c_proj`` / ``fc2`` / ``down_proj``).
DEFAULT_KINDS = ("attn_in", "attn_out", "mlp_in")
#: the kinds a role table gives to linear maps (``roles.KINDS``): the ones NuFILT can select
LINEAR_KINDS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "head")
OTHERS = ("base", "ta")
SVD_METHODS = ("full", "randomized")
ADAM_EPS = 1e-8


# Subspaces -----------------------------------------------------------------------------------
def _numerical_rank_keep(s: torch.Tensor, shape: Sequence[int]) -> int:
    """How many leading singular values are numerically non-zero (float32 data tolerance)."""
    if s.numel() == 0 or not float(s[0]) > 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def _thin_svd_right(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and Vᵀ of the thin SVD x = U Σ Vᵀ (float64). A wide x is decomposed as xᵀ = V Σ Uᵀ:
    LAPACK is much faster on the tall orientation."""
    if x64.shape[0] < x64.shape[1]:
        v, s, _ = torch.linalg.svd(x64.T, full_matrices=False)
        return s, v.T
    _, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return s, vh


def top_right_singular_vectors(
    x: torch.Tensor, k: int, method: str = "full", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The first (up to) ``k`` right singular vectors of ``x`` (m × n) as the columns of an
    n × r float64 matrix, r = min(k, m, n, numerical rank) (module docstring).

    ``method = "randomized"``: Gaussian sketch of l = k + max(10, k // 2) columns drawn from
    ``generator``, 6 power iterations with QR re-orthonormalisation, SVD of the l × n projection.
    When l ≥ min(m, n) the sketch saves nothing and the full SVD is used."""
    x64 = x.detach().to(torch.float64)
    m, n = x64.shape
    k = min(int(k), m, n)
    if k <= 0 or not bool((x64 != 0).any()):
        return x64.new_zeros((n, 0))
    l = k + max(10, k // 2)
    if method == "full" or l >= min(m, n):
        if m >= 2 * n:  # x = QR has the σ and V of R: Q and U are never formed (about half the time)
            x64 = torch.linalg.qr(x64, mode="r")[1]
        s, vh = _thin_svd_right(x64)
    elif method == "randomized":
        if generator is None:
            raise ValueError("nufilt: the randomized SVD needs a seeded generator")
        omega = torch.randn((n, l), generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(x64 @ omega)
        for _ in range(6):
            z, _ = torch.linalg.qr(x64.T @ q)
            q, _ = torch.linalg.qr(x64 @ z)
        _, s, vh = torch.linalg.svd(q.T @ x64, full_matrices=False)
    else:
        raise ValueError(f"nufilt: parameter 'svd' must be one of {list(SVD_METHODS)}, got {method!r}")
    r = min(k, _numerical_rank_keep(s, (m, n)))
    return vh[:r].T.contiguous()


# One layer -----------------------------------------------------------------------------------
def nufilt_loss(tau: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, v1: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The literal SPEC §3.2 loss ‖τV1 − (Δ + τ(P + BA))V1‖²_F + ‖ΔU − (Δ + τ(P + BA))U‖²_F with
    P = I − UUᵀ, forming the d_out × d_in merged update explicitly (a reference for tests)."""
    eye = torch.eye(tau.shape[1], dtype=tau.dtype)
    p = eye - u @ u.T
    merged = delta + tau @ (p + b @ a)
    return ((tau @ v1 - merged @ v1) ** 2).sum() + ((delta @ u - merged @ u) ** 2).sum()


class LayerLoss:
    """The SPEC §3.2 loss of one layer as a function of (B, A), with the constant products hoisted:
    c1 = τV1 − ΔV1 − τPV1 and c2 = ΔU − ΔU − τPU = −τPU (≈ 0 since PU = 0), so that

        L(B, A) = ‖c1 − (τB)(AV1)‖²_F + ‖c2 − (τB)(AU)‖²_F,

    the literal loss (``nufilt_loss``) with its products reassociated. Inputs are used in float32."""

    def __init__(self, tau: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, v1: torch.Tensor):
        self.tau = tau.detach().to(torch.float32)
        delta = delta.detach().to(torch.float32)
        self.u = u.detach().to(torch.float32)
        self.v1 = v1.detach().to(torch.float32)
        self.tau_p = self.tau - (self.tau @ self.u) @ self.u.T  # τP, P = I − UUᵀ
        self.c1 = self.tau @ self.v1 - delta @ self.v1 - self.tau_p @ self.v1
        self.c2 = -(self.tau_p @ self.u)

    def __call__(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        tb = self.tau @ b
        return ((self.c1 - tb @ (a @ self.v1)) ** 2).sum() + ((self.c2 - tb @ (a @ self.u)) ** 2).sum()

    def update(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """τ(P + BA) = τP + (τB)A."""
        return self.tau_p + (self.tau @ b) @ a


@dataclass
class LayerResult:
    update: torch.Tensor  # τ(P + BA), float32 d_out × d_in
    losses: list[float]  # loss before each Adam step and after the last (steps + 1 values)
    b: torch.Tensor
    a: torch.Tensor


def nufilt_layer(
    tau: torch.Tensor,
    delta: torch.Tensor,
    u: torch.Tensor,
    v1: torch.Tensor,
    a0: torch.Tensor,
    *,
    lr: float = 1e-3,
    steps: int = 50,
    betas: tuple[float, float] = (0.9, 0.999),
) -> LayerResult:
    """Solve one selected layer (SPEC §3.2): B = 0 (d_in × r_l), A = ``a0`` (r_l × d_in), Adam
    (eps 1e-8, no weight decay) on ``LayerLoss`` for ``steps`` full-batch steps; returns τ(P + BA)
    and the loss history. ``u`` (d_in × k) and ``v1`` (d_in × r) have orthonormal columns."""
    loss_fn = LayerLoss(tau, delta, u, v1)
    with torch.enable_grad():
        b = torch.zeros((loss_fn.tau.shape[1], a0.shape[0]), dtype=torch.float32, requires_grad=True)
        a = a0.detach().to(torch.float32).clone().requires_grad_(True)
        opt = torch.optim.Adam([b, a], lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=0.0, foreach=False)
        losses: list[float] = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(b, a)
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
    with torch.no_grad():
        losses.append(float(loss_fn(b, a)))
        update = loss_fn.update(b, a)
    return LayerResult(update.detach(), losses, b.detach(), a.detach())


# The strategy --------------------------------------------------------------------------------
class NuFILT(Strategy):
    """Null-space filtering continual merging (Qiu et al., ICLR 2026), SPEC §3.2; the equations and
    Decisions are in the module docstring.

    Hyper-parameters: ``param_defs`` (the defaults are the paper's global setting)."""

    name = "nufilt"
    paper = "Qiu et al., ICLR 2026, 'Null-space filtering for data-free continual model merging' (NuFILT)"
    requires_zs_init = True
    required_treatment = "filtered"
    param_defs = (
        Param("r_p", int, 128, "rank of Δ's protected input subspace U", min=1),
        Param("r_l", int, 64, "LoRA rank", min=1),
        Param("r_v", int, 8, "rank of τ's principal subspace V1", min=1),
        Param("lr", float, 1e-3, "Adam learning rate of the LoRA fit", min=0.0, min_open=True),
        Param("steps", int, 50, "Adam steps per layer", min=0),
        Param("betas", list, (0.9, 0.999), "Adam betas", item=float, length=2, min=0.0, max=1.0, max_open=True),
        Param("lora_std", float, 0.02, "standard deviation of A's initialisation", min=0.0, min_open=True),
        Param("kinds", list, DEFAULT_KINDS, f"kinds of linear layers filtered (role tables; any of {', '.join(LINEAR_KINDS)})", item=str),
        Param("select", list, None, "regular expressions of the filtered linear layers (re.search), replacing `kinds`; unset: by kind", item=str),
        Param("others", str, "base", "the mergeable tensors not selected: θ0 (stored as nothing), or the running average of the experts", choices=OTHERS),
        Param("svd", str, "full", "SVD of Δ: exact, or randomized (seeded)", choices=SVD_METHODS),
    )

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        for i, k in enumerate(self.params["kinds"]):
            if k not in LINEAR_KINDS:
                raise ParamError(self.name, "kinds", f"parameter 'kinds' must list kinds of linear layers ({', '.join(LINEAR_KINDS)}), got {k!r}", index=i)
        self.kinds = frozenset(self.params["kinds"])
        patterns = None
        if self.params["select"] is not None:
            patterns = []
            for s in self.params["select"]:
                try:
                    patterns.append(re.compile(s))
                except re.error as e:
                    raise ParamError(self.name, "select", f"parameter 'select' has an invalid regular expression {s!r}: {e}") from e
        self.patterns = patterns
        self.others = self.params["others"]

    # Declarations ------------------------------------------------------------------------------
    def selected(self, meta: TensorMeta) -> bool:
        """A ``linear``/``fused_linear`` tensor of one of ``kinds``, or whose name matches a
        ``select`` pattern when those are given."""
        if not meta.role.matrix:
            return False
        if self.patterns is not None:
            return any(pat.search(meta.name) for pat in self.patterns)
        return meta.role.kind in self.kinds

    def treatment(self, meta: TensorMeta) -> str:
        if self.selected(meta):
            return "filtered"
        return "averaged" if self.others == "ta" else "kept at base"

    def nothing_selected(self, model: ModelInfo) -> str:
        how = f"select = {self.params['select']}" if self.patterns is not None else f"kinds = {sorted(self.kinds)}"
        return (f"{how} selects no linear layer of this model (role table '{model.table}'): name its architecture in "
                f"[model] architecture, give kinds to its layers in [model] roles, or set select")

    def state_sets(self, t: int) -> tuple[str, ...]:
        return ("merged",)

    def sink_shape(self, sink: str, meta: TensorMeta) -> tuple[int, ...] | None:
        if sink == "merged":
            # with others = "base" the unselected tensors are θ0 by definition: not stored
            keep = meta.role.mergeable and (self.selected(meta) or self.others == "ta")
            return meta.shape if keep else None
        if sink in PREPARED_SETS:
            return subspace_shapes(meta, self.params["r_p"])[sink] if self.selected(meta) else None
        return meta.shape

    def prepared_sets(self, t: int) -> tuple[str, ...]:
        return PREPARED_SETS

    def prepare_passes(self, ctx: StepContext) -> list[Pass]:
        return [Pass("subspaces", self._subspaces, writes=PREPARED_SETS, reads=frozenset({"state"}), label="nufilt SVDs ahead", trim=True)]

    @staticmethod
    def _generator(ctx: StepContext, layer: str, purpose: str, *, ahead: bool = False) -> torch.Generator:
        """The seeded generator of one layer and purpose. Δ's randomized SVD is seeded with the last
        expert merged into Δ (module docstring): expert t when preparing from state t (``ahead``),
        the one before the new expert inside step t+1."""
        if purpose == "nufilt-svd-delta":
            return ctx.generator(layer, purpose, expert_id=ctx.expert_ids[-1] if ahead else ctx.expert_ids[-2])
        return ctx.generator(layer, purpose)

    def _subspaces(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        if not self.selected(meta):
            return PassOutput()
        shapes = subspace_shapes(meta, self.params["r_p"])
        u_all = torch.zeros(shapes["delta_u"], dtype=torch.float32)
        ranks = torch.zeros(shapes["delta_rank"], dtype=torch.float32)
        delta = inp.state["merged"] - inp.base
        for j, delta_j in enumerate(meta.role.split(delta)):
            u = self.delta_subspace(delta_j, lambda purpose, _l=f"{meta.name}#{j}": self._generator(ctx, _l, purpose, ahead=True))
            u_all[j, :, : u.shape[1]] = u
            ranks[j] = u.shape[1]
        return PassOutput(tensors={"delta_u": u_all, "delta_rank": ranks})

    def passes(self, ctx: StepContext) -> list[Pass]:
        return [
            Pass(
                name="merge",
                tensor_fn=self._merge,
                writes=("deploy", "merged"),
                reduce_fn=_loss_totals,
                reads=frozenset({"state"}) if ctx.t > 1 else frozenset(),
                label="nufilt",
                trim=True,  # SVD/Adam workspaces fragment the heap (Pass.trim)
            )
        ]

    # The merge ---------------------------------------------------------------------------------
    def delta_subspace(self, delta: torch.Tensor, generator_for) -> torch.Tensor:
        """U of one layer (row block): the first r_p right singular vectors of Δ, float32 (the form
        in which the loss uses them and in which they are prepared ahead)."""
        svd = self.params["svd"]
        gen = generator_for("nufilt-svd-delta") if svd == "randomized" else None
        return top_right_singular_vectors(delta, self.params["r_p"], svd, gen).to(torch.float32)

    def merge_layer(self, tau: torch.Tensor, delta: torch.Tensor, generator_for, u: torch.Tensor | None = None) -> LayerResult:
        """τ(P + BA) for one layer (one row block); ``generator_for(purpose)`` gives the seeded
        generators for the LoRA init and the randomized SVDs; ``u``: Δ's subspace when it was
        computed ahead (``delta_subspace``)."""
        prm = self.params
        svd = prm["svd"]
        if u is None:
            u = self.delta_subspace(delta, generator_for)
        v1 = top_right_singular_vectors(tau, prm["r_v"], svd, generator_for("nufilt-svd-tau") if svd == "randomized" else None)
        a0 = torch.randn((prm["r_l"], tau.shape[1]), generator=generator_for("nufilt-lora"), dtype=torch.float32) * prm["lora_std"]
        return nufilt_layer(tau, delta, u, v1, a0, lr=prm["lr"], steps=prm["steps"], betas=tuple(prm["betas"]))

    def _merge(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        t = ctx.t
        if self.selected(meta):
            if t == 1:
                merged = inp.expert.clone()
                return PassOutput(tensors={"deploy": merged, "merged": merged})
            prev = inp.state["merged"]
            tau = inp.expert - inp.base
            delta = prev - inp.base
            nb = meta.role.row_blocks
            ahead = unstack_subspaces(inp.state, meta) if all(k in inp.state for k in PREPARED_SETS) else [None] * nb
            updates = []
            first = last = 0.0
            for j, (tau_j, delta_j) in enumerate(zip(meta.role.split(tau), meta.role.split(delta), strict=True)):
                layer = f"{meta.name}#{j}"
                res = self.merge_layer(tau_j, delta_j, lambda purpose, _l=layer: self._generator(ctx, _l, purpose), u=ahead[j])
                updates.append(res.update)
                first += res.losses[0]
                last += res.losses[-1]
            merged = prev + meta.role.join(updates)
            stats = {"loss_first": torch.tensor(first, dtype=torch.float64), "loss_last": torch.tensor(last, dtype=torch.float64)}
            return PassOutput(tensors={"deploy": merged, "merged": merged}, stats=stats)
        if self.others == "ta":
            merged = inp.expert.clone() if t == 1 else ((t - 1) * inp.state["merged"] + inp.expert) / t
            return PassOutput(tensors={"deploy": merged, "merged": merged})
        return PassOutput(tensors={"deploy": inp.base})


#: the prepared sets: Δ's subspace U of every selected layer, computed ahead (module docstring)
PREPARED_SETS = ("delta_u", "delta_rank")


def subspace_shapes(meta: TensorMeta, r_p: int) -> dict[str, tuple[int, ...]]:
    """Stored shapes for one selected tensor: nb linear maps of d_i × d_in (``TensorRole.split``),
    k = min(r_p, max d_i, d_in) columns at most (fewer when Δ's numerical rank or a block's rows are
    lower: zero-padded)."""
    rows = meta.role.block_rows(meta.shape)
    d_in = meta.role.matrix_shape(meta.shape)[1]
    return {"delta_u": (len(rows), d_in, min(r_p, max(rows), d_in)), "delta_rank": (len(rows),)}


def unstack_subspaces(stored: Mapping[str, torch.Tensor], meta: TensorMeta) -> list[torch.Tensor]:
    """Each row block's U (d_in × rank, a fresh contiguous float32 tensor) from the prepared sets."""
    u, ranks = stored["delta_u"], stored["delta_rank"]
    nb = meta.role.row_blocks
    if u.dim() != 3 or u.shape[0] != nb or u.shape[1] != meta.role.matrix_shape(meta.shape)[1] or tuple(ranks.shape) != (nb,):
        raise ValueError(f"nufilt: prepared subspace of '{meta.name}' has shapes {tuple(u.shape)}, {tuple(ranks.shape)}")
    out = []
    for j in range(nb):
        r = int(ranks[j])
        if not 0 <= r <= u.shape[2] or float(ranks[j]) != r:
            raise ValueError(f"nufilt: prepared rank {float(ranks[j])} of '{meta.name}' block {j} is out of range")
        out.append(u[j, :, :r].contiguous())  # contiguous like the step's own (a copy unless r is the full width)
    return out


def _loss_totals(totals: dict[str, torch.Tensor], ctx: StepContext) -> dict:
    """Summed first/last NuFILT losses over the selected layers (progress/metrics only)."""
    return {f"nufilt_{k}": float(v) for k, v in totals.items() if math.isfinite(float(v))}
