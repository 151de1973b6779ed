"""Reading the NiNo checkpoints (``nino_mlp.pt``, ``nino_mlp_h32.pt``, ``nino_no_posw.pt``).

A checkpoint is read from a local path only (never downloaded) with ``torch.load(...,
weights_only=True)`` (never a pickle of arbitrary objects); the shape parameters are inferred from
the tensors (hidden size H, context length, horizon outputs, type ids, layers, rounds), every shape
is validated and anything else is refused with a ``ValueError`` that names the parameter
``'checkpoint'`` and says what was expected.

* ``load_nino_mlp(path)`` -> ``mlp.NinoMLP`` (METAMERGE §2, §4.4).
* ``load_nino_gnn(path)`` -> ``gnn.NinoGNN`` (METAMERGE §9).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mergewatch.nino.context import CONTEXT, HORIZONS, N_TYPE_IDS
from mergewatch.nino.eigenvectors import N_LPE
from mergewatch.nino.gnn import NinoGNN
from mergewatch.nino.graph import EDGE_IN, SLOTS
from mergewatch.nino.mlp import NinoMLP, fold_first_layer

#: NiNo-MLP keys besides the fixed ones: hidden layers and the head.
_HIDDEN_RE = re.compile(r"^edge_mlp\.fc\.(\d+)\.(weight|bias)$")
#: NiNo-GNN keys besides ``_FIXED``: message-passing rounds and edge updates.
_CONV_RE = re.compile(r"^gnn\.convs\.(\d+)\.(edge_encoder|pre_nns\.0\.0|post_nns\.0\.0|lin)\.(weight|bias)$")
_UPD_RE = re.compile(r"^gnn\.edge_update\.(\d+)\.(lin_e|lin_s|lin_t|lin1)\.(weight|bias)$")
_FIXED = (
    "layer_embed.weight",
    "node_proj.fc.0.weight", "node_proj.fc.0.bias",
    "edge_proj.fc.0.weight", "edge_proj.fc.0.bias",
    "edge_out.fc.0.weight", "edge_out.fc.0.bias",
    "edge_out.fc.2.weight", "edge_out.fc.2.bias",
)


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
    w1, b1 = fold_first_layer(A, a, L, hw[0], hb[0])
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


def load_nino_gnn(path: str | Path) -> NinoGNN:
    """Load and validate a NiNo-GNN checkpoint (``nino_no_posw.pt``).

    Raises ``ValueError`` naming ``'checkpoint'`` for a missing path, an unreadable or
    non-weights-only file, a NiNo-MLP checkpoint, unknown or missing keys, wrong shapes or non-finite
    values. Hidden size H comes from ``layer_embed.weight`` (15 × H); every other shape follows."""
    p, sha, sd, args = read_nino_checkpoint(path, "NiNo-GNN checkpoint (nino_no_posw.pt)")
    if args.get("gnn", True) is False or not any(k.startswith("gnn.") for k in sd):
        raise _refuse(p, f"not a NiNo-GNN checkpoint (model_args={dict(args)!r}, no gnn.* keys); NiNo-MLP checkpoints such as nino_mlp.pt belong to method 'metamerge'")
    if args.get("wte_pos_enc"):
        raise _refuse(p, "model_args['wte_pos_enc'] is set: word-embedding positional encoding is for language models, not the ViT graph")
    sd = float32_weights(p, sd)
    missing = sorted(set(_FIXED) - set(sd))
    unknown = sorted(k for k in sd if k not in _FIXED and not _CONV_RE.match(k) and not _UPD_RE.match(k))
    if missing or unknown:
        raise _refuse(p, f"unexpected keys for NiNo-GNN: missing {missing}, unknown {unknown}")
    conv_ids = sorted({int(m.group(1)) for k in sd if (m := _CONV_RE.match(k))})
    upd_ids = sorted({int(m.group(1)) for k in sd if (m := _UPD_RE.match(k))})
    if not upd_ids or upd_ids != list(range(len(upd_ids))) or conv_ids != list(range(len(conv_ids))) or len(conv_ids) < len(upd_ids):
        raise _refuse(p, f"gnn.convs must be numbered 0..C-1 and gnn.edge_update 0..R-1 with R >= 1 and C >= R; got convs {conv_ids}, edge_update {upd_ids}")
    emb = tuple(sd["layer_embed.weight"].shape)
    if len(emb) != 2 or emb[0] != N_TYPE_IDS or emb[1] < 1:
        raise _refuse(p, f"layer_embed.weight has shape {emb}, expected ({N_TYPE_IDS}, hidden)")
    H = emb[1]
    head = tuple(sd["edge_out.fc.2.weight"].shape)
    n_out = head[0] // SLOTS if len(head) == 2 and head[0] % SLOTS == 0 else -1
    expect: dict[str, tuple[int, ...]] = {
        "node_proj.fc.0.weight": (H, N_LPE), "node_proj.fc.0.bias": (H,),
        "edge_proj.fc.0.weight": (H, EDGE_IN), "edge_proj.fc.0.bias": (H,),
        "edge_out.fc.0.weight": (H, H), "edge_out.fc.0.bias": (H,),
        "edge_out.fc.2.weight": (SLOTS * n_out, H), "edge_out.fc.2.bias": (SLOTS * n_out,),
    }
    for i in conv_ids:
        c = f"gnn.convs.{i}."
        expect.update({
            c + "edge_encoder.weight": (2 * H, H), c + "edge_encoder.bias": (2 * H,),
            c + "pre_nns.0.0.weight": (H, 2 * H), c + "pre_nns.0.0.bias": (H,),
            c + "post_nns.0.0.weight": (H, 2 * H), c + "post_nns.0.0.bias": (H,),
            c + "lin.weight": (H, H), c + "lin.bias": (H,),
        })
    for i in upd_ids:
        for lin in ("lin_e", "lin_s", "lin_t", "lin1"):
            expect[f"gnn.edge_update.{i}.{lin}.weight"] = (H, H)
            expect[f"gnn.edge_update.{i}.{lin}.bias"] = (H,)
    absent = sorted(set(expect) - set(sd))
    if absent:
        raise _refuse(p, f"missing {absent}")
    wrong = [f"{k}: {tuple(sd[k].shape)} (expected {s})" for k, s in expect.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise _refuse(p, f"wrong shapes for a NiNo-GNN with hidden {H}, {EDGE_IN} edge inputs and {N_LPE} eigenvectors: " + "; ".join(wrong))
    if n_out < max(HORIZONS):
        raise _refuse(p, f"the head has {n_out} horizon outputs per slot, MetaMerge needs at least {max(HORIZONS)}")
    if "hid" in args and args["hid"] != H:
        raise _refuse(p, f"model_args['hid'] = {args['hid']!r} but the tensors have hidden size {H}")
    return NinoGNN(
        path=str(p), sha256=sha,
        model_args={k: v for k, v in args.items() if isinstance(v, (bool, int, float, str))},
        hidden=H, n_outputs=n_out, rounds=len(upd_ids), convs=len(conv_ids), w=sd,
    )
