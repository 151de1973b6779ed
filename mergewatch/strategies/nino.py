"""NiNo-MLP: the pre-trained per-scalar "nowcasting" network used by MetaMerge, and the merge of one
tensor with it (METAMERGE.md §2–§4; Knyazev et al., "Accelerating Training with Neuron Interaction
and Nowcasting Networks", ICLR 2025; MetaMerge blog, bknyaz.github.io, 2026-02-19).

Written from the specification only. Three pieces:

* ``load_nino_mlp(path)``: reads a local checkpoint with ``torch.load(..., weights_only=True)``
  (never a pickle of arbitrary objects, never a download), infers the shape parameters from the
  tensors (hidden size H, context length, number of horizon outputs, number of type ids, number of
  hidden layers), validates every shape and refuses anything else with a message that says what
  was expected.
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

import hashlib
import io
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergewatch.errors import MergewatchError

#: NiNo's context: 5 states (METAMERGE §1). The published checkpoints all have it.
CONTEXT = 5
#: Type ids of the reference (0 and 10–14 are graph-only; the MLP path uses 1–9).
N_TYPE_IDS = 15
#: Horizons MetaMerge asks for and averages (§4.5).
HORIZONS = (1, 2, 3, 4, 5)
#: Expert counts the reference defines (§6).
MIN_EXPERTS, MAX_EXPERTS = 2, 4
EPS = 1e-6  # added to σ when normalising (not when de-normalising), §4.2

TYPE_LINEAR, TYPE_OTHER, TYPE_CONV, TYPE_NORM, TYPE_CLASS_EMB, TYPE_POS_EMB = 1, 2, 3, 4, 5, 6
TYPE_Q, TYPE_K, TYPE_V = 7, 8, 9


class MetaMergeError(MergewatchError):
    """MetaMerge cannot merge these inputs (expert count, non-finite result, ...)."""


# Context order ---------------------------------------------------------------------------------

def context_order(n_experts: int) -> tuple[int, int, int, int]:
    """0-based expert indices of context slots 1..4 (slot 0 is the base or the previous horizon's
    prediction), METAMERGE §4.1:

    T = 2: E1 E2 E2 E1;  T = 3: E1 E2 E2 E3;  T = 4: E1 E2 E3 E4.  Slot 4 is the residual base."""
    if n_experts == 2:
        return (0, 1, 1, 0)
    if n_experts == 3:
        return (0, 1, 1, 2)
    if n_experts == 4:
        return (0, 1, 2, 3)
    raise MetaMergeError(
        f"metamerge supports {MIN_EXPERTS}-{MAX_EXPERTS} experts plus the base model "
        f"(NiNo context = {CONTEXT} states); got {n_experts}"
    )


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


# Checkpoint --------------------------------------------------------------------------------------

_HIDDEN_RE = re.compile(r"^edge_mlp\.fc\.(\d+)\.(weight|bias)$")


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
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _single_threaded() -> None:
    # Runs in our own worker threads only: OpenMP's thread count is per calling thread, so the
    # caller's threads keep their setting.
    torch.set_num_threads(1)


def _pool(threads: int) -> ThreadPoolExecutor:
    """Chunk-level parallelism: ``threads`` worker threads each running whole chunks single-threaded
    (torch releases the GIL inside ops). Versus intra-op threads on every small matrix product this
    avoids one OpenMP barrier per op, which is what collapses throughput (by 4x measured) when the
    CPU is shared with other processes. Used for one thread too, so that every chunk is always
    computed single-threaded (results independent of the thread count)."""
    n = max(1, threads or torch.get_num_threads())
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nino", initializer=_single_threaded)
    return _POOLS[n]


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


def _refuse(path, msg: str) -> ValueError:
    return ValueError(f"'checkpoint' {path}: {msg}")


def read_nino_checkpoint(path: str | Path, what: str) -> tuple[Path, str, Mapping, Mapping]:
    """``(path, sha256, state_dict, model_args)`` of a NiNo checkpoint, read with
    ``torch.load(weights_only=True)`` only; ``ValueError`` naming ``'checkpoint'`` for a missing path,
    an unreadable or non-weights-only file, or a file that is not ``{"state_dict", "model_args"}``."""
    if not str(path):
        raise ValueError(f"'checkpoint' is required: the path of a local {what}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise _refuse(p, "no such file (NiNo checkpoints are never downloaded; give a local path)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _refuse(p, f"cannot read: {e.strerror or e}") from e
    sha = hashlib.sha256(raw).hexdigest()
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise _refuse(p, f"not a weights-only PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise _refuse(p, "expected a dict with 'state_dict' and 'model_args' (a NiNo checkpoint)")
    sd, args = obj["state_dict"], obj.get("model_args", {})
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _refuse(p, "'state_dict' must map names to tensors")
    if not isinstance(args, Mapping):
        raise _refuse(p, "'model_args' must be a dict")
    return p, sha, sd, args


def float32_weights(path: Path, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A NiNo state dict as contiguous float32 tensors; ``ValueError`` naming ``'checkpoint'`` for a
    tensor that is not floating point or holds non-finite values."""
    for k, v in sd.items():
        if not v.dtype.is_floating_point:
            raise _refuse(path, f"tensor {k!r} has dtype {v.dtype}, expected floating point")
        if not bool(torch.isfinite(v).all()):
            raise _refuse(path, f"tensor {k!r} has non-finite values")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


def load_nino_mlp(path: str | Path) -> NinoMLP:
    """Load and validate a NiNo-MLP checkpoint (``nino_mlp.pt``, ``nino_mlp_h32.pt``).

    Raises ``ValueError`` naming the parameter ``'checkpoint'`` for a missing path, an unreadable
    or non-weights-only file, a NiNo-GNN checkpoint, unknown or missing keys, wrong shapes or
    non-finite values."""
    p, sha, sd, args = read_nino_checkpoint(path, "NiNo-MLP checkpoint (e.g. nino_mlp.pt)")
    if args.get("gnn") is not False or any(k.startswith(("gnn.", "node_proj.", "edge_out.")) for k in sd):
        raise _refuse(
            p,
            f"not a NiNo-MLP checkpoint (model_args={dict(args)!r}; the MLP variant has model_args['gnn'] = False and no "
            "gnn.*/node_proj.*/edge_out.* keys); NiNo-GNN checkpoints such as nino_no_posw.pt are not supported",
        )
    sd = float32_weights(p, sd)

    fixed = {"layer_embed.weight", "edge_proj.fc.0.weight", "edge_proj.fc.0.bias"}
    missing = sorted(fixed - set(sd))
    layer_ids = sorted({int(m.group(1)) for k in sd if (m := _HIDDEN_RE.match(k))})
    unknown = sorted(k for k in sd if k not in fixed and not _HIDDEN_RE.match(k))
    if missing or unknown:
        raise _refuse(p, f"unexpected keys for NiNo-MLP: missing {missing}, unknown {unknown}")
    if layer_ids != list(range(0, 2 * len(layer_ids), 2)) or len(layer_ids) < 2:
        raise _refuse(p, f"edge_mlp.fc layers must be numbered 0, 2, 4, ... (at least one hidden layer and the head), got {layer_ids}")
    for i in layer_ids:
        for part in ("weight", "bias"):
            if f"edge_mlp.fc.{i}.{part}" not in sd:
                raise _refuse(p, f"missing edge_mlp.fc.{i}.{part}")

    def shape_of(k: str) -> tuple[int, ...]:
        return tuple(sd[k].shape)

    emb = shape_of("layer_embed.weight")
    if len(emb) != 2:
        raise _refuse(p, f"layer_embed.weight must be 2-D (type ids × hidden), got {emb}")
    n_types, hidden = emb
    expect: dict[str, tuple[int, ...]] = {
        "edge_proj.fc.0.weight": (hidden, CONTEXT),
        "edge_proj.fc.0.bias": (hidden,),
    }
    *hidden_ids, head_id = layer_ids
    for i in hidden_ids:
        expect[f"edge_mlp.fc.{i}.weight"] = (hidden, hidden)
        expect[f"edge_mlp.fc.{i}.bias"] = (hidden,)
    head = shape_of(f"edge_mlp.fc.{head_id}.weight")
    n_outputs = head[0] if len(head) == 2 else -1
    expect[f"edge_mlp.fc.{head_id}.weight"] = (n_outputs, hidden)
    expect[f"edge_mlp.fc.{head_id}.bias"] = (n_outputs,)
    wrong = [f"{k}: {shape_of(k)} (expected {s})" for k, s in expect.items() if shape_of(k) != s]
    ctx_in = shape_of("edge_proj.fc.0.weight")
    if wrong:
        raise _refuse(p, f"wrong shapes for a NiNo-MLP with hidden {hidden} and context {CONTEXT}: " + "; ".join(wrong))
    if n_types != N_TYPE_IDS:
        raise _refuse(p, f"layer_embed.weight has {n_types} type ids, expected {N_TYPE_IDS}")
    if hidden < 1:
        raise _refuse(p, f"hidden size must be positive, got {hidden}")
    if n_outputs < max(HORIZONS):
        raise _refuse(p, f"the head has {n_outputs} horizon outputs, MetaMerge needs at least {max(HORIZONS)}")
    if "hid" in args and args["hid"] != hidden:
        raise _refuse(p, f"model_args['hid'] = {args['hid']!r} but the tensors have hidden size {hidden}")
    assert ctx_in == (hidden, CONTEXT)

    A, a, L = sd["edge_proj.fc.0.weight"], sd["edge_proj.fc.0.bias"], sd["layer_embed.weight"]
    hw = tuple(sd[f"edge_mlp.fc.{i}.weight"] for i in hidden_ids)
    hb = tuple(sd[f"edge_mlp.fc.{i}.bias"] for i in hidden_ids)
    B0, b0 = hw[0].double(), hb[0].double()
    w1 = (B0 @ A.double()).to(torch.float32).contiguous()
    b1 = ((a.double() + L.double()) @ B0.t() + b0).to(torch.float32).contiguous()  # (n_types, H)
    return NinoMLP(
        path=str(p),
        sha256=sha,
        model_args={k: v for k, v in args.items() if isinstance(v, (bool, int, float, str))},
        hidden=hidden,
        context=CONTEXT,
        n_outputs=n_outputs,
        n_types=n_types,
        n_layers=len(hidden_ids),
        layer_embed=L,
        in_weight=A,
        in_bias=a,
        hidden_weights=hw,
        hidden_biases=hb,
        out_weight=sd[f"edge_mlp.fc.{head_id}.weight"],
        out_bias=sd[f"edge_mlp.fc.{head_id}.bias"],
        _w1=w1,
        _b1=b1,
    )


# One tensor --------------------------------------------------------------------------------------

def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    """μ, the unbiased σ and σ + eps of the context matrix X (n × 5, every entry pooled), §4.2.

    Computed as the reference does, with torch's float32 ``mean``/``std`` over the n × 5 layout,
    and σ + eps rounded in float32. Computing them in float64 instead is more accurate but lands
    about one float32 step away from the reference at times; that shifts every output by ~1e-7
    relative, and the shift grows ~2.5× per chained horizon (1e-6 at k = 5)."""
    mu = x.mean()
    sigma = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return float(mu), float(sigma), float(sigma + EPS)


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
    pool = _pool(threads)
    total: torch.Tensor | None = None
    for k in horizons:
        mu, sigma, denom = _moments(x)
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


def expert_mean(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(E1 + E2 + ... + ET) / T, summed in expert order then divided (the A-set, §3)."""
    acc = experts[0].detach().to(torch.float32).clone()
    for e in experts[1:]:
        acc.add_(e.to(torch.float32))
    return acc.div_(len(experts))
