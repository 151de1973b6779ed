"""Checking an expert against the base before anything is merged (SPEC §0).

``check_expert`` reads the expert once, tensor by tensor: it compares keys, shapes and dtypes with
the base, finds NaN/Inf values, and computes the content hash on the way, so validation costs one
read of the expert. Every problem is reported (not just the first), each on its own line.

Tied embeddings. transformers ties an output head to the input embedding (``tie_word_embeddings``)
and does not store the head; some savers store it anyway. An expert holding such a head that the
base does not store is accepted when the head equals the expert's own embedding bit for bit: the
duplicate is dropped (left out of the content hash and of the merge, and logged) since the merged
embedding is the head. A head that differs was trained untied, which a tied base cannot hold: a clear
error says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mergewatch.checkpoint.hashing import ContentHasher
from mergewatch.checkpoint.reader import FLOAT_CODES, LazyCheckpoint
from mergewatch.checkpoint.hashing import tensor_bytes
from mergewatch.errors import IncompatibleExpertError, Problem

#: "strict": every dtype equals the base's; "float_cast": floating tensors may differ in float dtype
#: (they are cast to the base's storage dtype), other tensors must match exactly.
DTYPE_POLICIES = ("strict", "float_cast")

#: output heads that transformers ties to an input embedding -> the embeddings they may duplicate
#: (Llama/Qwen/Mistral/Phi, GPT-2, OPT, GPT-NeoX, BLOOM; BERT's masked-LM decoder)
TIED_HEADS: Mapping[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "model.decoder.embed_tokens.weight",
        "gpt_neox.embed_in.weight",
        "transformer.word_embeddings.weight",
    ),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertReport:
    content_sha256: str
    n_tensors: int
    nbytes: int
    #: tied duplicates left out (head -> the embedding it equals): module docstring
    dropped: dict[str, str] = field(default_factory=dict)


def tied_heads(expert: LazyCheckpoint, base: LazyCheckpoint) -> dict[str, str]:
    """Heads ``expert`` stores and ``base`` does not, whose embedding both store with the head's
    shape: head -> embedding (headers only; ``check_expert`` compares the values)."""
    out = {}
    for head, embeddings in TIED_HEADS.items():
        if head in expert and head not in base:
            for emb in embeddings:
                if emb in base and emb in expert and expert.info(head).shape == base.info(emb).shape:
                    out[head] = emb
                    break
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``. One min/max reduction (NaN propagates into both, an infinity shows up
    as the min or the max) instead of ``isfinite(t).all()``, which materialises a bool tensor of
    t's size and runs ~50x slower on CPU (it dominated a WA step's compute)."""
    if t.numel() == 0 or not (t.dtype.is_floating_point or t.dtype.is_complex):
        return True
    if t.dtype.is_complex:
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def compare_layout(expert: LazyCheckpoint, base: LazyCheckpoint, dtype_policy: str = "float_cast") -> list[str]:
    """Key, shape and dtype mismatches of ``expert`` against ``base`` (headers only, no tensor read).
    A tied head (``tied_heads``) is not an unexpected key: ``check_expert`` checks its values."""
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}")
    problems: list[str] = []
    ek, bk = set(expert) - set(tied_heads(expert, base)), set(base)
    for k in sorted(bk - ek):
        problems.append(Problem("missing_key", f"missing tensor '{k}' (in the base, not in the expert)"))
    for k in sorted(ek - bk):
        problems.append(Problem("unexpected_key", f"unexpected tensor '{k}' (in the expert, not in the base)"))
    for k in sorted(ek & bk):
        e, b = expert.info(k), base.info(k)
        if e.shape != b.shape:
            problems.append(Problem("shape", f"shape mismatch for '{k}': expert {list(e.shape)} vs base {list(b.shape)}"))
        if e.dtype != b.dtype:
            both_float = e.dtype in FLOAT_CODES and b.dtype in FLOAT_CODES
            if dtype_policy == "strict" or not both_float:
                problems.append(Problem("dtype", f"dtype mismatch for '{k}': expert {e.dtype} vs base {b.dtype} (dtype_policy={dtype_policy})"))
    return problems


def check_expert(
    expert: LazyCheckpoint,
    base: LazyCheckpoint,
    dtype_policy: str = "float_cast",
    progress: Callable[[int, int], None] | None = None,
) -> ExpertReport:
    """Validate ``expert`` fully; raise ``IncompatibleExpertError`` listing every problem."""
    problems = compare_layout(expert, base, dtype_policy)
    if problems:
        raise IncompatibleExpertError(problems)
    ties = tied_heads(expert, base)
    for head, emb in ties.items():
        a, b = expert[head], expert[emb]
        if a.dtype != b.dtype or not torch.equal(a, b):
            diff = float((a.float() - b.float()).abs().max())
            problems.append(Problem(
                "unexpected_key",
                f"'{head}' is not in the base (tied to '{emb}', tie_word_embeddings) but the expert's differs from its "
                f"'{emb}' (max |difference| {diff:.3g}{'' if a.dtype == b.dtype else f', dtype {a.dtype} vs {b.dtype}'}): "
                f"it was trained with untied embeddings, which the tied base cannot hold; merge it into an untied base "
                f"that stores '{head}', or save the expert tied",
            ))
    if problems:
        raise IncompatibleExpertError(problems)
    h = ContentHasher()
    names = [n for n in expert if n not in ties]
    for i, name in enumerate(names):
        t = expert[name]
        info = expert.info(name)
        if t.dtype.is_floating_point and t.numel() and not all_finite(t):
            bad = ~torch.isfinite(t)
            if bad.any():
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(bad.sum()) - n_nan
                problems.append(Problem("nonfinite", f"non-finite values in '{name}': {n_nan} NaN, {n_inf} Inf"))
        h.add(name, info.dtype, info.shape, tensor_bytes(t))
        if progress:
            progress(i + 1, len(names))
    if problems:
        raise IncompatibleExpertError(problems)
    for head, emb in ties.items():
        log.info("tied duplicate '%s' dropped from %s: equal to '%s' (tie_word_embeddings)", head, expert.path, emb)
    return ExpertReport(h.hexdigest(), len(names), sum(expert.info(n).nbytes for n in names), dict(ties))
