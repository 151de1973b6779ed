"""NiNo-MLP: the pre-trained per-scalar "nowcasting" network used by MetaMerge, and the merge of one
tensor with it (METAMERGE.md §2–§4; Knyazev et al., "Accelerating Training with Neuron Interaction
and Nowcasting Networks", ICLR 2025; MetaMerge blog, bknyaz.github.io, 2026-02-19).

Written from the specification only. Two pieces (the checkpoint is read and validated by
``checkpoint.load_nino_mlp``):

* ``NinoMLP.delta(z, type_id, k)``: the network's forward for a batch of normalised contexts,
  METAMERGE §4.4.
* ``metamerge_tensor(...)``: §4.1–§4.5 for one tensor: the 5-slot context of the experts, the
  per-tensor normalisation (recomputed per horizon), horizons k = 1..5 chained through slot 0 (the
  reference's overwrite behaviour), the last-slot residual, de-normalisation and the average.

Exactness vs speed. The input projection h0 = A z + a + L[τ] has no activation, so it is folded into
the first hidden layer: B0 h0 + b0 = (B0 A) z + (B0 (a + L[τ]) + b0), with the products computed once
in float64 and stored in float32. This removes one of the three H × H matrix products per scalar
(a third of the work) and changes results only at float32 rounding level (the conformance tests
check ≤ 1e-6 against the reference's outputs). Hidden layers use oneDNN's fused linear + SiLU when
this torch build has it (true float32, about twice MKL's ``addmm`` + ``silu`` on this machine), with
``addmm`` + in-place SiLU as the fallback. Rows are processed in chunks of ``chunk_rows`` so that the
activations stay in cache (8192 × H floats = 4 MB for H = 128), and the chunks of one horizon are
spread over a few worker threads, each computing whole chunks single-threaded: no OpenMP barrier per
small matrix product (those collapse throughput when the CPU is shared), and results that do not
depend on the thread count or the chunk size.

Numerical sensitivity. Chaining feeds P_{k−1} back into slot 0, and the network amplifies a
perturbation of slot 0 by roughly 2–3× per horizon, so a one-ulp difference at k = 1 (any change of
summation order) becomes ~50 ulps at k = 5. On the conformance model this implementation is within
3e-8 of the reference at k = 1, 7.4e-7 at k = 5 and 1.2e-7 on the final (averaged) merges; the
literal formulation (``reference=True``) is within 2.7e-7 at k = 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergewatch.nino.context import CONTEXT, HORIZONS, MetaMergeError, context_order, moments
from mergewatch.nino.workers import chunk_pool

TYPE_LINEAR, TYPE_OTHER, TYPE_CONV, TYPE_NORM, TYPE_CLASS_EMB, TYPE_POS_EMB = 1, 2, 3, 4, 5, 6
TYPE_Q, TYPE_K, TYPE_V = 7, 8, 9


# Type ids ---------------------------------------------------------------------------------------

def type_segments(name: str, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, end, type id) ranges over the row-major flattened tensor, METAMERGE §4.3.

    Generic rule, first match wins: 1-D ``*.weight`` → 4 (norm); ``*class_embedding`` → 5;
    ``*positional_embedding`` → 6; a fused ``*in_proj_weight`` (3d × d) → 7/8/9 for its q, k, v row
    blocks; 4-D → 3 (conv); 2-D whose name lacks ``embed`` → 1 (linear); otherwise → 2. Only the
    open_clip ViT naming is verified against the reference."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    ndim = len(shape)
    if ndim == 1 and name.endswith(".weight"):
        tid = TYPE_NORM
    elif name.endswith("class_embedding"):
        tid = TYPE_CLASS_EMB
    elif name.endswith("positional_embedding"):
        tid = TYPE_POS_EMB
    elif name.endswith("in_proj_weight") and ndim == 2 and shape[0] % 3 == 0:
        block = (shape[0] // 3) * shape[1]
        return [(0, block, TYPE_Q), (block, 2 * block, TYPE_K), (2 * block, 3 * block, TYPE_V)]
    elif ndim == 4:
        tid = TYPE_CONV
    elif ndim == 2 and "embed" not in name:
        tid = TYPE_LINEAR
    else:
        tid = TYPE_OTHER
    return [(0, n, tid)]


# The network --------------------------------------------------------------------------------------

def _linear_fused_silu_available() -> bool:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.linspace(-2.0, 2.0, 12).reshape(4, 3)  # fixed values: the global RNG is not touched
        w = torch.linspace(1.0, -1.0, 6).reshape(2, 3)
        b = torch.tensor([0.25, -0.5])
        got = op(x, w, b, "swish", [], "")
        want = torch.nn.functional.silu(torch.addmm(b, x, w.t()))
        return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6))
    except Exception:  # noqa: BLE001 - any failure means: use the portable path
        return False


_FUSED: bool | None = None


def _fused_ok() -> bool:
    global _FUSED
    if _FUSED is None:
        _FUSED = _linear_fused_silu_available()
    return _FUSED


DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class NinoMLP:
    """A validated NiNo-MLP checkpoint (float32 tensors) and its inferred shape parameters."""

    path: str
    sha256: str
    model_args: dict
    hidden: int  # H
    context: int  # 5
    n_outputs: int  # horizon outputs of the head (40 in the published checkpoints)
    n_types: int  # 15
    n_layers: int  # hidden H × H layers of edge_mlp (3 in the published checkpoints)
    layer_embed: torch.Tensor  # (n_types, H)
    in_weight: torch.Tensor  # (H, 5)
    in_bias: torch.Tensor  # (H,)
    hidden_weights: tuple[torch.Tensor, ...]  # n_layers × (H, H)
    hidden_biases: tuple[torch.Tensor, ...]
    out_weight: torch.Tensor  # (n_outputs, H)
    out_bias: torch.Tensor  # (n_outputs,)
    # Folded first layer (module docstring): W1 = B0 A, b1[τ] = B0 (a + L[τ]) + b0.
    _w1: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    _b1: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]

    def describe(self) -> dict:
        return {
            "variant": "nino-mlp",
            "checkpoint_sha256": self.sha256,
            "hidden": self.hidden,
            "context": self.context,
            "horizon_outputs": self.n_outputs,
            "type_ids": self.n_types,
            "hidden_layers": self.n_layers,
            "model_args": dict(self.model_args),
        }

    def delta(self, z: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
        """δ for horizon ``k`` (1-based) of every row of ``z`` (rows × 5, normalised context,
        slot order of §4.1), all rows of type ``type_id`` (§4.4). Returns a (rows,) float32."""
        w1, b1 = self._w1, self._b1[type_id]
        if _fused_ok():
            op = torch.ops.mkldnn._linear_pointwise
            h = op(z, w1, b1, "swish", [], "")
            for w, b in zip(self.hidden_weights[1:], self.hidden_biases[1:]):
                h = op(h, w, b, "swish", [], "")
        else:
            h = torch.nn.functional.silu(torch.addmm(b1, z, w1.t()), inplace=True)
            for w, b in zip(self.hidden_weights[1:], self.hidden_biases[1:]):
                h = torch.nn.functional.silu(torch.addmm(b, h, w.t()), inplace=True)
        return torch.mv(h, self.out_weight[k - 1]).add_(self.out_bias[k - 1])

    def delta_reference(self, z: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
        """§4.4 literally (no folding, all output rows computed): for tests and the benchmark's
        straightforward baseline."""
        h = z @ self.in_weight.t() + self.in_bias + self.layer_embed[type_id]
        for w, b in zip(self.hidden_weights, self.hidden_biases):
            h = torch.nn.functional.silu(h @ w.t() + b)
        return (h @ self.out_weight.t() + self.out_bias)[:, k - 1]


def fold_first_layer(in_weight: torch.Tensor, in_bias: torch.Tensor, layer_embed: torch.Tensor,
                     w0: torch.Tensor, b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W1, b1)`` of the folded first layer (module docstring): W1 = B0 A, b1[τ] = B0 (a + L[τ]) + b0,
    computed in float64 and stored in float32; b1 has one row per type id."""
    B0, b0 = w0.double(), b0.double()
    w1 = (B0 @ in_weight.double()).to(torch.float32).contiguous()
    b1 = ((in_bias.double() + layer_embed.double()) @ B0.t() + b0).to(torch.float32).contiguous()  # (n_types, H)
    return w1, b1


# One tensor --------------------------------------------------------------------------------------
def metamerge_tensor(
    net: NinoMLP,
    name: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    upd_scale: float = 2.5,
    chain: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 0,
    horizons: Sequence[int] = HORIZONS,
    reference: bool = False,
    per_horizon: list | None = None,
) -> torch.Tensor:
    """MetaMerge of one M-set tensor (METAMERGE §4.1–§4.5); float32, the shape of ``base``.

    ``experts`` in the caller's (documented, stable) order, 2–4 of them. ``chain=True`` is the
    reference's overwrite behaviour (slot 0 at horizon k ≥ 2 is the prediction P_{k−1}); ``False``
    keeps W0 in slot 0 at every horizon (a daemon extension, not the reference). ``per_horizon``, if
    given, receives P_1..P_5. ``reference=True`` runs §4.4 literally (slower; tests, benchmark).
    Chunks of ``chunk_rows`` scalars run on ``threads`` worker threads (0: torch's intra-op thread
    count); each chunk is computed single-threaded, so the result does not depend on ``threads``."""
    order = context_order(len(experts))
    shape = tuple(base.shape)
    n = base.numel()
    for e in experts:
        if e.numel() != n:
            raise MetaMergeError(f"metamerge: '{name}': experts and base differ in size")
    # X (n × 5): column 0 = slot 0 (W0, then P_{k-1} when chaining), columns 1..4 the experts.
    x = torch.empty((n, CONTEXT), dtype=torch.float32)
    x[:, 0] = base.detach().reshape(-1)
    for col, i in enumerate(order, start=1):
        x[:, col] = experts[i].detach().reshape(-1)
    segments = type_segments(name, shape)
    lam = float(upd_scale)
    forward = net.delta_reference if reference else net.delta
    tasks = [(i, min(i + chunk_rows, end), tid) for start, end, tid in segments for i in range(start, end, chunk_rows)]
    pool = chunk_pool(threads)
    total: torch.Tensor | None = None
    for k in horizons:
        mu, sigma, denom = moments(x)
        pred = torch.empty(n, dtype=torch.float32)

        def run(task: tuple[int, int, int], _k=k, _mu=mu, _sigma=sigma, _denom=denom, _pred=pred) -> None:
            i, j, tid = task
            z = x[i:j].sub(_mu).div_(_denom)
            d = forward(z, tid, _k)
            # z' = z[4] + λ δ;  P = z' σ + μ (no eps when de-normalising)
            _pred[i:j] = d.mul_(lam).add_(z[:, 4]).mul_(_sigma).add_(_mu)

        for f in [pool.submit(run, task) for task in tasks]:
            f.result()
        if per_horizon is not None:
            per_horizon.append(pred.view(shape).clone())
        total = pred.clone() if total is None else total.add_(pred)
        if chain:
            x[:, 0] = pred
        del pred
    assert total is not None
    out = total.div_(len(horizons)).view(shape)
    if not bool(torch.isfinite(out).all()):
        raise MetaMergeError(f"metamerge: non-finite values in the NiNo prediction for '{name}'")
    return out
