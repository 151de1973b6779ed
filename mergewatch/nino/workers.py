"""The worker threads NiNo's chunked inference runs on (both variants).

Rows (MLP) or edges (GNN) are processed in chunks, and the chunks are spread over a few worker
threads, each computing whole chunks single-threaded: no OpenMP barrier per small matrix product
(those collapse throughput when the CPU is shared), and results that depend on neither the thread
count nor how the chunks are scheduled.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}


def _single_threaded() -> None:
    # Runs in our own worker threads only: OpenMP's thread count is per calling thread, so the
    # caller's threads keep their setting.
    torch.set_num_threads(1)


def chunk_pool(threads: int) -> ThreadPoolExecutor:
    """Chunk-level parallelism: ``threads`` worker threads each running whole chunks single-threaded
    (torch releases the GIL inside ops). Versus intra-op threads on every small matrix product this
    avoids one OpenMP barrier per op, which is what collapses throughput (by 4x measured) when the
    CPU is shared with other processes. Used for one thread too, so that every chunk is always
    computed single-threaded (results independent of the thread count)."""
    n = max(1, threads or torch.get_num_threads())
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nino", initializer=_single_threaded)
    return _POOLS[n]
