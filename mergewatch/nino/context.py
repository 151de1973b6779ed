"""What both NiNo variants share: the 5-state context MetaMerge builds from θ0 and the experts
(METAMERGE.md §1, §4.1–§4.2, §4.5, §6), and the A-set's plain expert mean (§3).

* ``context_order``: which expert fills which context slot (slot 0 is θ0, then the previous horizon's
  prediction when chaining).
* ``moments``: the per-tensor normalisation of the context.
* ``HORIZONS``: the horizons asked for and averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# Normalisation ------------------------------------------------------------------------------------

def moments(x: torch.Tensor) -> tuple[float, float, float]:
    """μ, the unbiased σ and σ + eps of the context matrix X (n × 5, every entry pooled), §4.2.

    Computed as the reference does, with torch's float32 ``mean``/``std`` over the n × 5 layout,
    and σ + eps rounded in float32. Computing them in float64 instead is more accurate but lands
    about one float32 step away from the reference at times; that shifts every output by ~1e-7
    relative, and the shift grows ~2.5× per chained horizon (1e-6 at k = 5)."""
    mu = x.mean()
    sigma = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return float(mu), float(sigma), float(sigma + EPS)


def expert_mean(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(E1 + E2 + ... + ET) / T, summed in expert order then divided (the A-set, §3)."""
    acc = experts[0].detach().to(torch.float32).clone()
    for e in experts[1:]:
        acc.add_(e.to(torch.float32))
    return acc.div_(len(experts))
