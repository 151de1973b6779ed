"""Process-level settings of the numeric kernels that a merge step's bits depend on.

**Threads.** MKL (torch's BLAS/LAPACK on x86) and torch's own reductions split a product or a sum
into per-thread partial results, so the low bits of a matrix product, an SVD or a norm depend on
the number of threads that computed it. A step must not depend on how its process was started
(``OMP_NUM_THREADS``, torch's default of one thread per core, an evaluation that changed the count
in the same process): the engine runs every pass under ``pinned_threads(engine.threads)``, so a
replay, a crash recovery and a step that uses factors prepared ahead compute the same bits on one
machine. Another CPU kind (other vector units, another MKL code path) or another ``engine.threads``
may round differently; a workspace's committed states are never recomputed, so that only ever
changes steps still to come.

**Heap.** ``release_freed_memory`` hands freed heap memory back to the kernel (engine passes with
``trim``, MetaMerge between blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

# torch is imported where it is used: the configuration imports this module, and the light CLI
# verbs (status, submit, ...) must start without torch.

#: ``[engine] threads``' default: a fixed number, not "one per core", so that a workspace's results
#: do not change with the machine's size or the environment of the process that replays a step.
DEFAULT_THREADS = 2


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op (OpenMP/MKL) thread count set to ``n``, then restore it.
    The count is per calling thread in OpenMP terms; the engine calls this in the thread that
    computes."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    import torch

    prev = torch.get_num_threads()
    if prev != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def _load_malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere (musl, macOS)."""
    try:
        import ctypes
        import ctypes.util

        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


#: Hand heap memory freed during a pass back to the kernel when the pass ends. glibc serves tensors
#: below its dynamic mmap threshold (which rises up to 32 MiB as large blocks are freed) from the
#: heap and keeps freed chunks there, so without this a long-running daemon kept a step's
#: fragmented heap after the step (TIES on the ViT-B/32 vision tower: ~190 MiB private memory left
#: behind after a step whose live tensors never exceeded ~120 MiB). Trimming once per pass (not
#: per tensor) keeps heap reuse inside the pass, which avoids re-faulting fresh pages per tensor.
release_freed_memory = _load_malloc_trim()
