"""Laplacian positional encoding of a neural graph: the node input of NiNo-GNN (METAMERGE.md §9),
and where a graph's eigenvectors come from (injected, cached on disk, or computed).

``laplacian_pe``: the 8 eigenvectors after the trivial one of the symmetric-normalised Laplacian of
the undirected, unweighted graph (self-loops removed, duplicate pairs counted once), by scipy's
sparse block solver LOBPCG (dense ``eigh`` only below 2,000 nodes); each column's sign is first made
canonical (largest-magnitude entry positive), then flipped by a seeded random sign (seed = hash of
the graph), like the reference's random sign per column. The eigenbasis of a repeated eigenvalue is
not unique (the fixture graph has one such pair), so results depend on the solver unless the
eigenvectors are pinned: ``LpeStore`` caches them on disk keyed by the graph's structure hash and
accepts injected ones.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergewatch.nino.context import MetaMergeError

if TYPE_CHECKING:
    from mergewatch.nino.graph import NeuralGraph

#: Laplacian eigenvectors per node.
N_LPE = 8
#: Below this node count the eigenvectors come from a dense ``eigh`` (exact and fast when small).
DENSE_EIG_MAX_NODES = 2000
LPE_VERSION = "nino-gnn-lpe-v1"


def _sign_seed(structure_hash: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{LPE_VERSION}/sign/{structure_hash}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def laplacian_pe(graph: NeuralGraph, k: int = N_LPE) -> torch.Tensor:
    """(num_nodes, k) float32: eigenvectors 2..k+1 (ascending eigenvalue) of L = I − D^−½ A D^−½,
    A the undirected unweighted adjacency without self-loops; canonical then seeded random column
    signs (module docstring). Above ``DENSE_EIG_MAX_NODES`` nodes scipy's block solver LOBPCG on the
    sparse L (block of 2(k+1) vectors, seeded start; unconverged pairs are an error), a dense
    ``eigh`` below."""
    import numpy as np
    import scipy.sparse as sp

    n = graph.num_nodes
    if n < k + 2:
        raise MetaMergeError(f"nino-gnn: graph '{graph.name}' has {n} nodes, too few for {k} eigenvectors")
    s, t = graph.src.numpy().astype(np.int64), graph.dst.numpy().astype(np.int64)
    keep = s != t
    s, t = s[keep], t[keep]
    a = sp.coo_matrix((np.ones(2 * len(s), dtype=np.float64), (np.concatenate([s, t]), np.concatenate([t, s]))), shape=(n, n)).tocsr()
    a.sum_duplicates()
    a.data[:] = 1.0  # unweighted: a pair linked twice (q and k) counts once
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    norm_a = sp.diags(dinv) @ a @ sp.diags(dinv)
    if n <= DENSE_EIG_MAX_NODES:
        vals, vecs = np.linalg.eigh(np.eye(n) - norm_a.toarray())
    else:
        # A block solver: repeated eigenvalues are common in these symmetric graphs, and single-vector
        # Lanczos (eigsh) misses copies of a repeated eigenvalue. Seeded start: a deterministic solve.
        from scipy.sparse.linalg import lobpcg

        lap = (sp.identity(n, format="csr") - norm_a).tocsr()
        m = min(n - 1, 2 * (k + 1))
        x0 = np.random.default_rng(_sign_seed(graph.structure_hash()) ^ 0x5EED).standard_normal((n, m))
        vals, vecs, resid = lobpcg(lap, x0, largest=False, tol=1e-9, maxiter=max(500, n // 4), retResidualNormsHistory=True)
        last = np.asarray(resid[-1]) if len(resid) else np.zeros(m)
        order_m = np.argsort(vals, kind="stable")[: k + 1]
        if float(np.max(last[order_m])) > 1e-5:
            raise MetaMergeError(
                f"nino-gnn: the Laplacian eigensolver did not converge for graph '{graph.name}' (residual {float(np.max(last[order_m])):.2e}); "
                "inject eigenvectors with 'lpe'"
            )
    order = np.argsort(vals, kind="stable")[1 : k + 1]
    pe = torch.from_numpy(np.ascontiguousarray(vecs[:, order])).to(torch.float32)
    big = pe.abs().argmax(0)
    pe = pe * torch.sign(pe[big, torch.arange(k)]).clamp(min=0).mul(2).sub(1)  # largest entry positive
    g = torch.Generator().manual_seed(_sign_seed(graph.structure_hash()))
    signs = torch.randint(0, 2, (k,), generator=g).to(torch.float32).mul(2).sub(1)
    return (pe * signs).contiguous()


class LpeStore:
    """Eigenvectors per graph: injected (a safetensors file: key ``lpe`` for a whole-model graph,
    ``lpe.<graph name>`` e.g. ``lpe.block3`` per block), else the on-disk cache
    ``<cache_dir>/<structure hash>.safetensors`` (written atomically), else computed and cached.
    Also kept in memory for the process's lifetime (a daemon computes them once)."""

    def __init__(self, inject: str = "", cache_dir: str | None = None):
        self.inject_path = inject
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}
        self._injected: dict[str, torch.Tensor] = {}
        self.inject_sha256 = ""
        if inject:
            from safetensors import SafetensorError
            from safetensors.torch import load as st_load

            p = Path(inject).expanduser()
            try:
                raw = p.read_bytes()
                self._injected = {k: v for k, v in st_load(raw).items() if k == "lpe" or k.startswith("lpe.")}
            except (OSError, SafetensorError) as e:
                raise ValueError(f"'lpe' {p}: cannot read the eigenvectors ({e})") from e
            if not self._injected:
                raise ValueError(f"'lpe' {p}: no tensor named 'lpe' or 'lpe.<graph>' in the file")
            self.inject_sha256 = hashlib.sha256(raw).hexdigest()

    def get(self, graph: NeuralGraph) -> tuple[torch.Tensor, str]:
        """(eigenvectors, source) with source one of ``injected``, ``cache``, ``memory``, ``computed``."""
        key = f"lpe.{graph.name}"
        if self._injected:
            t = self._injected.get(key, self._injected.get("lpe") if graph.name == "visual" else None)
            if t is None:
                raise MetaMergeError(f"metamerge_gnn: '{self.inject_path}' has no tensor '{key}' for graph {graph.name} (present: {sorted(self._injected)})")
            if tuple(t.shape) != (graph.num_nodes, N_LPE) or not bool(torch.isfinite(t).all()):
                raise MetaMergeError(
                    f"metamerge_gnn: '{self.inject_path}' tensor '{key if key in self._injected else 'lpe'}' has shape {tuple(t.shape)}, "
                    f"graph {graph.name} needs ({graph.num_nodes}, {N_LPE}) finite values"
                )
            return t.to(torch.float32), "injected"
        h = graph.structure_hash()
        if h in self._memory:
            return self._memory[h], "memory"
        path = self.cache_dir / f"{h}.safetensors" if self.cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                t = load_file(str(path)).get("lpe")
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                t = None
            if t is not None and tuple(t.shape) == (graph.num_nodes, N_LPE) and bool(torch.isfinite(t).all()):
                self._memory[h] = t
                return t, "cache"
        t = laplacian_pe(graph)
        self._memory[h] = t
        if path is not None:
            from safetensors.torch import save_file

            tmp = None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lpe-", suffix=".tmp")
                os.close(fd)
                save_file({"lpe": t}, tmp, metadata={"structure_sha256": h, "version": LPE_VERSION})
                os.replace(tmp, path)
            except OSError as e:  # an unwritable cache costs a recomputation next time, not the step
                return t, f"computed (not cached: {e.strerror or e})"
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        return t, "computed"
