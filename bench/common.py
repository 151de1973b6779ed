"""Shared benchmark helpers: open_clip-shaped checkpoints on disk, clean memory measurement, I/O floors.

* **Checkpoints.** ``layout(spec)`` builds an open_clip model from its bundled config on the ``meta``
  device (shapes only, no memory, no download) and returns ``name -> (shape, dtype)`` for the full CLIP
  or its vision tower. ``ensure_checkpoints`` writes a seeded random base and ``n`` experts (base +
  seeded Gaussian perturbation) to disk **tensor by tensor** with the project's streaming writer, so a
  model larger than RAM can be generated; files are cached under ``bench/out/models/`` and reused
  while the recipe (spec, seed, scale, format version) is unchanged.
* **Measurement.** ``run_worker("module:function", args)`` runs ``function(args, meter)`` in a fresh
  interpreter (imports done first), so every case starts from a clean heap. ``Meter`` samples
  ``/proc/self/status`` (``RssAnon``: private anonymous memory; ``VmRSS``) from a background thread
  and resets the kernel's peak-RSS counter (``VmHWM``) per phase; each phase reports its wall time
  and its peak above the *idle baseline* taken by ``meter.baseline()`` (DESIGN §4: peak memory is
  private memory above the idle process; RSS is printed beside it because clean page-cache pages of
  memory-mapped inputs count in RSS but are reclaimable).
* **I/O floor.** ``io_floor`` reads given files and writes files of given sizes with ``fsync``: the
  time any implementation needs just to move the same bytes.

Run ``python bench/common.py --selftest`` to check the meter on a known allocation.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
MiB = 1 << 20
RESULT_TAG = "@@BENCH-RESULT "

#: bump when the generation recipe changes (invalidates cached checkpoints)
RECIPE_VERSION = 1


# Formatting ------------------------------------------------------------------------------------
def bound_bytes(largest: int) -> int:
    """The foundation issue's memory goal for one step: 6 × the largest single tensor + 64 MiB."""
    return 6 * largest + 64 * MiB


def workspace_settings(args: dict, seed: int = 0):
    """Settings of a benchmark workspace: ``args`` names ``workspace``, ``base`` and ``policy``."""
    from mergewatch import config

    return config.parse({"workspace": args["workspace"], "base": args["base"], "seed": seed, "policy": args["policy"]})


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, k in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= k:
            return f"{sign}{n / k:.1f} {unit}" if unit != "GiB" else f"{sign}{n / k:.2f} {unit}"
    return f"{sign}{int(n)} B"


def fmt_table(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# open_clip layouts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """An open_clip architecture (bundled config name) and which part of it: ``full`` or ``visual``."""

    arch: str
    tower: str = "full"

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        arch, _, tower = text.partition(":")
        tower = tower or "full"
        if tower not in ("full", "visual"):
            raise ValueError(f"model {text!r}: tower must be 'full' or 'visual'")
        return cls(arch, tower)

    @property
    def key(self) -> str:
        return f"{self.arch}-{self.tower}"

    @property
    def label(self) -> str:
        return self.arch if self.tower == "full" else f"{self.arch}:visual"


def layout(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], "torch.dtype"]]:
    """``name -> (shape, dtype)`` of a randomly initialisable open_clip model, built on the meta device
    from open_clip's bundled config (no weights are read or downloaded; nothing is allocated)."""
    import open_clip
    import torch

    cfg = open_clip.get_model_config(spec.arch)
    if cfg is None:
        raise ValueError(f"open_clip has no bundled config named {spec.arch!r}")
    cfg = dict(cfg)
    custom_text = cfg.pop("custom_text", False)
    for k in ("multimodal_cfg", "quick_gelu", "cast_dtype", "init_logit_bias"):
        if k == "multimodal_cfg" and k in cfg:
            raise ValueError(f"{spec.arch}: CoCa-style models are not supported by this benchmark")
        cfg.pop(k, None)
    with torch.device("meta"):
        model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    sd = model.visual.state_dict() if spec.tower == "visual" else model.state_dict()
    return {k: (tuple(v.shape), v.dtype) for k, v in sorted(sd.items())}


def layout_stats(lay: dict) -> dict:
    """Total bytes, tensor count and the largest tensor of a layout."""
    import torch

    sizes = {k: math.prod(s) * (torch.finfo(d).bits if d.is_floating_point else torch.iinfo(d).bits) // 8 for k, (s, d) in lay.items()}
    big = max(sizes, key=sizes.get)
    return {"nbytes": sum(sizes.values()), "n_tensors": len(sizes), "largest_name": big, "largest_bytes": sizes[big],
            "params": sum(math.prod(s) for s, _ in lay.values())}


def _name_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_tensor(name: str, shape: tuple[int, ...], dtype, seed: int):
    """A seeded random initial value in the spirit of open_clip's init (norm weights 1, biases 0,
    embeddings N(0, 0.02²), weights N(0, 1/fan_in)); each tensor has its own generator so any tensor
    can be regenerated alone, in any order."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(1 / 0.07), dtype=dtype)
    if leaf.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and leaf == "weight":  # LayerNorm scales
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_name_seed("init", seed, name))
    if "embedding" in name:
        std = 0.02 if "token" in name else 0.01
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0] if shape else 1
        std = fan_in ** -0.5
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def perturbation(name: str, shape: tuple[int, ...], seed: int, scale: float):
    """The seeded noise an expert adds to the base (float32)."""
    import torch

    g = torch.Generator().manual_seed(_name_seed("expert", seed, name))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(scale)


def write_streamed(path: Path, lay: dict, produce: Callable[[str], "torch.Tensor"]) -> None:
    """Write a single ``.safetensors`` file atomically, one tensor at a time (``produce(name)`` is
    called in canonical order and its result dropped right after it is written)."""
    from mergewatch.checkpoint.writer import SINGLE_FILE, CheckpointWriter, TensorSpec, fsync_path

    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        w = CheckpointWriter(tmp, [TensorSpec(k, d, s) for k, (s, d) in lay.items()])
        for spec in w.specs:
            w.write(spec.name, produce(spec.name))
        w.close()
        os.replace(tmp / SINGLE_FILE, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_checkpoints(root: Path, lay: dict, stamp_data: dict, n_experts: int, seed: int, regenerate: bool, log,
                        delta) -> tuple[Path, list[Path]]:
    """Stream ``base.safetensors`` (``init_tensor``) and ``expert-<i>.safetensors`` = base +
    ``delta(name, base_tensor, i)`` on floating tensors into ``root``, unless ``recipe.json`` there
    already equals ``stamp_data`` (then the cached files are reused)."""
    import torch

    from mergewatch.checkpoint.reader import LazyCheckpoint

    base = root / "base.safetensors"
    experts = [root / f"expert-{i}.safetensors" for i in range(1, n_experts + 1)]
    stamp = root / "recipe.json"
    try:
        cached = json.loads(stamp.read_text())
    except (OSError, ValueError):
        cached = None
    fresh = regenerate or cached != stamp_data
    if fresh:
        stamp.unlink(missing_ok=True)
    if fresh or not base.is_file():
        t = time.perf_counter()
        write_streamed(base, lay, lambda n: init_tensor(n, *lay[n], seed))
        log(f"  generated {base.relative_to(REPO)} ({fmt_bytes(layout_stats(lay)['nbytes'])}) in {time.perf_counter() - t:.1f} s")
    ckpt = LazyCheckpoint(base)
    for i, path in enumerate(experts, start=1):
        if fresh or not path.is_file():
            t = time.perf_counter()

            def produce(n, _i=i):
                v = ckpt[n]
                if not v.dtype.is_floating_point:
                    return v
                return (v.to(torch.float32) + delta(n, v, _i)).to(v.dtype)

            write_streamed(path, lay, produce)
            log(f"  generated {path.relative_to(REPO)} in {time.perf_counter() - t:.1f} s")
    stamp.write_text(json.dumps(stamp_data, indent=1))
    return base, experts


def ensure_checkpoints(spec: ModelSpec, n_experts: int = 2, *, seed: int = 0, scale: float = 0.01,
                       root: Path | None = None, regenerate: bool = False, log=print) -> dict:
    """Base and ``n_experts`` experts of ``spec`` on disk (generated once, then cached).

    Returns ``{"base": Path, "experts": [Path, ...], "stats": layout_stats}``. Expert ``i`` is
    ``base + N(0, scale²)`` on every floating tensor, seeded by ``(seed + i, name)``."""
    root = Path(root or OUT_DIR / "models") / spec.key
    root.mkdir(parents=True, exist_ok=True)
    lay = layout(spec)
    stats = layout_stats(lay)
    recipe = {"version": RECIPE_VERSION, "arch": spec.arch, "tower": spec.tower, "seed": seed, "scale": scale,
              "nbytes": stats["nbytes"]}
    base, experts = _cached_checkpoints(
        root, lay, recipe, n_experts, seed, regenerate, log, lambda n, v, i: perturbation(n, v.shape, seed + i, scale)
    )
    return {"base": base, "experts": experts, "stats": stats}


# Page cache ------------------------------------------------------------------------------------
def warm(paths: Iterable[Path], chunk: int = 16 * MiB) -> None:
    """Read files once so that they are in the page cache (what a daemon usually sees)."""
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def evict(paths: Iterable[Path]) -> None:
    """Drop files' clean pages from the page cache (no root needed); flushes dirty pages first."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def clone_tree(src: Path, dst: Path) -> None:
    """A hard-linked copy of a directory tree (symlinks kept): a cheap fresh copy of a workspace whose
    files are only ever replaced by rename, never rewritten in place."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True, copy_function=os.link)


def files_under(path: Path) -> list[Path]:
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


# I/O floor -------------------------------------------------------------------------------------
def io_floor(inputs: Sequence[Path], output_sizes: Sequence[int], scratch: Path, chunk: int = 8 * MiB) -> dict:
    """Read every input file fully, then write one file per output size (fsync each, then the
    directory). Returns the byte counts and the read and write times."""
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    buf = bytearray(chunk)
    payload = memoryview(os.urandom(chunk))
    t0 = time.perf_counter()
    read = 0
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                read += k
    t1 = time.perf_counter()
    written = 0
    for i, size in enumerate(output_sizes):
        with open(scratch / f"out-{i}.bin", "wb", buffering=0) as f:
            left = size
            while left:
                k = f.write(payload[: min(left, chunk)])
                left -= k
            os.fsync(f.fileno())
        written += size
    fd = os.open(scratch, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t2 = time.perf_counter()
    shutil.rmtree(scratch, ignore_errors=True)
    return {"bytes_read": read, "bytes_written": written, "read_seconds": t1 - t0, "write_seconds": t2 - t1}


# Memory measurement ----------------------------------------------------------------------------
def read_status() -> tuple[int, int]:
    """(RSS, private anonymous resident bytes) of this process from ``/proc/self/status``."""
    rss = anon = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
                break  # RssAnon comes after VmRSS
    return rss, anon


def _read_hwm() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap memory to the kernel (glibc), so the baseline is the idle process."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Meter:
    """Samples RSS and private anonymous memory every ``interval`` seconds in a background thread.

    ``baseline()`` fixes the idle reference; ``phase(name)`` measures one stretch of work: wall time,
    peak private memory and peak RSS above the baseline (the RSS peak is also read from the kernel's
    exact ``VmHWM`` counter, reset at the start of the phase), and the memory left at its end."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.base_rss, self.base_anon = read_status()
        self.phases: dict[str, dict] = {}
        self._max_rss = self._max_anon = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = read_status()
            if rss > self._max_rss:
                self._max_rss = rss
            if anon > self._max_anon:
                self._max_anon = anon
            self._samples += 1
            time.sleep(self.interval)

    def baseline(self) -> None:
        trim_heap()
        self.base_rss, self.base_anon = read_status()

    @contextmanager
    def phase(self, name: str):
        trim_heap()
        rss0, anon0 = read_status()
        hwm_ok = _reset_hwm()
        self._max_rss, self._max_anon, self._samples = rss0, anon0, 0
        c0 = os.times()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            c1 = os.times()
            peak_rss_now, peak_anon_now = self._max_rss, self._max_anon
            gc.collect()  # "left at the end" should not count garbage waiting for the cycle collector
            rss1, anon1 = read_status()
            peak_rss = max(peak_rss_now, rss1, _read_hwm() if hwm_ok else 0)
            peak_anon = max(peak_anon_now, anon1)
            self.phases[name] = {
                "seconds": dt,
                # CPU time of this process (all threads), less sensitive than wall time to other load
                "cpu_seconds": (c1.user - c0.user) + (c1.system - c0.system),
                "sys_seconds": c1.system - c0.system,
                "peak_private": peak_anon - self.base_anon,
                "peak_rss": peak_rss - self.base_rss,
                "start_private": anon0 - self.base_anon,
                "end_private": anon1 - self.base_anon,
                "samples": self._samples,
            }

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(target: str, args: dict, *, interval: float = 0.001, timeout: float | None = None) -> dict:
    """Run ``target`` ("module:function" importable from ``bench/``) as ``function(args, meter)`` in a
    fresh interpreter and return ``{"phases": {...}, "result": <its return value>, "baseline": {...}}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--interval", str(interval)]
    proc = subprocess.run(cmd, input=json.dumps(args, default=str), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise RuntimeError(f"benchmark worker {target} failed (exit {proc.returncode})")


def _worker_main(target: str, interval: float) -> None:
    # Import everything a case may need before the baseline: the baseline is "the idle process after
    # imports", so import-time memory is not charged to the measured step.
    import torch  # noqa: F401
    import safetensors.torch  # noqa: F401

    import mergewatch.workspace  # noqa: F401

    sys.path.insert(0, str(BENCH_DIR))
    module, _, func = target.partition(":")
    fn = getattr(importlib.import_module(module), func)
    args = json.loads(sys.stdin.read() or "{}")
    meter = Meter(interval)
    try:
        result = fn(args, meter)
    finally:
        meter.close()
    out = {"phases": meter.phases, "result": result, "baseline": {"rss": meter.base_rss, "private": meter.base_anon}}
    sys.stdout.write(RESULT_TAG + json.dumps(out, default=str) + "\n")
    sys.stdout.flush()


# Low-rank experts (DFCMM benchmarks: bench/dfcmm.py) ---------------------------------------------
#: open_clip linear maps (name suffix -> row blocks): what the DFCMM methods project or optimise
LINEAR_SUFFIXES = {"attn.in_proj_weight": 3, "attn.out_proj.weight": 1, "mlp.c_fc.weight": 1, "mlp.c_proj.weight": 1}


def linear_blocks(name: str, shape: tuple[int, ...]) -> int:
    """Row blocks of an open_clip linear weight (3 for the fused q/k/v ``in_proj_weight``), 0 otherwise."""
    if len(shape) != 2:
        return 0
    for suffix, blocks in LINEAR_SUFFIXES.items():
        if name == suffix or name.endswith("." + suffix):
            return blocks
    return 0


def layout_with(spec: ModelSpec, vision: dict | None = None, text: dict | None = None) -> dict:
    """``layout(spec)`` of the bundled config with some ``vision_cfg`` / ``text_cfg`` keys replaced,
    e.g. ``vision={"layers": 2}``: the same tensor shapes as the full architecture, fewer blocks
    (per-tensor costs and the largest tensor unchanged). Meta device only, nothing downloaded."""
    import open_clip
    import torch

    cfg = open_clip.get_model_config(spec.arch)
    if cfg is None:
        raise ValueError(f"open_clip has no bundled config named {spec.arch!r}")
    cfg = json.loads(json.dumps(cfg))  # deep copy: the bundled dict is shared
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        raise ValueError(f"{spec.arch}: CoCa-style models are not supported by this benchmark")
    for k in ("quick_gelu", "cast_dtype", "init_logit_bias"):
        cfg.pop(k, None)
    with torch.device("meta"):
        model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    sd = model.visual.state_dict() if spec.tower == "visual" else model.state_dict()
    return {k: (tuple(v.shape), v.dtype) for k, v in sorted(sd.items())}


@dataclass(frozen=True)
class LowRankRecipe:
    """How an expert differs from the base. Each row block (m × n) of a linear weight gets
    τ = Q_a diag(s) Q_bᵀ + E: a seeded rank r ∈ [rank_min, rank_max] with orthonormal Q_a, Q_b and
    geometrically decaying s_k ∝ decay^k scaled to ‖τ_lr‖_F = rel · ‖W0 block‖_F, plus a dense
    Gaussian tail E whose largest singular value is about ``tail`` · s_1 (far below float32's
    numerical-rank tolerance σ_1 · max(m, n) · 2^-23, so the task vector is numerically rank r but
    its small singular pairs are generic, not an arbitrary LAPACK basis). Every other floating
    tensor gets N(0, other²) noise."""

    rank_min: int = 4
    rank_max: int = 16
    rel: float = 0.05
    decay: float = 0.8
    tail: float = 1e-6
    other: float = 1e-3

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in ("rank_min", "rank_max", "rel", "decay", "tail", "other")}


def lowrank_perturbation(name: str, base_value, seed: int, recipe: LowRankRecipe = LowRankRecipe()):
    """The seeded task vector (float32, shape of ``base_value``) an expert adds to the base tensor
    (see ``LowRankRecipe``); a fused q/k/v weight gets one independent low-rank term per block."""
    import torch

    shape = tuple(base_value.shape)
    g = torch.Generator().manual_seed(_name_seed("lowrank", seed, name))
    blocks = linear_blocks(name, shape)
    if not blocks:
        return torch.randn(shape, generator=g, dtype=torch.float32).mul_(recipe.other)
    parts = []
    for w0 in base_value.to(torch.float64).chunk(blocks, dim=0):
        m, n = w0.shape
        r = int(torch.randint(recipe.rank_min, recipe.rank_max + 1, (1,), generator=g))
        qa, _ = torch.linalg.qr(torch.randn((m, r), generator=g, dtype=torch.float64))
        qb, _ = torch.linalg.qr(torch.randn((n, r), generator=g, dtype=torch.float64))
        s = recipe.decay ** torch.arange(r, dtype=torch.float64)
        s *= recipe.rel * float(w0.norm()) / float(s.norm())
        noise = torch.randn((m, n), generator=g, dtype=torch.float64)
        noise *= recipe.tail * float(s[0]) / (math.sqrt(m) + math.sqrt(n))
        parts.append((qa * s) @ qb.T + noise)
    return torch.cat(parts, dim=0).to(torch.float32)


def ensure_lowrank_checkpoints(spec: ModelSpec, n_experts: int = 3, *, vision: dict | None = None, seed: int = 0,
                               recipe: LowRankRecipe = LowRankRecipe(), root: Path | None = None,
                               regenerate: bool = False, log=print) -> dict:
    """Base (``init_tensor``) and ``n_experts`` experts θ_i = θ0 + ``lowrank_perturbation`` (seed
    ``seed + i``) of ``layout_with(spec, vision)``, streamed to disk and cached under
    ``bench/out/models/lowrank-<spec>[-L<layers>]/`` while the recipe is unchanged. Returns
    ``{"base": Path, "experts": [Path, ...], "stats": layout_stats, "layout": layout}``."""
    lay = layout_with(spec, vision)
    stats = layout_stats(lay)
    suffix = "".join(f"-{k}{v}" for k, v in sorted((vision or {}).items()))
    root = Path(root or OUT_DIR / "models") / f"lowrank-{spec.key}{suffix}"
    root.mkdir(parents=True, exist_ok=True)
    meta = {"version": 1, "arch": spec.arch, "tower": spec.tower, "vision": vision or {}, "seed": seed,
            "recipe": recipe.as_dict(), "nbytes": stats["nbytes"]}
    base, experts = _cached_checkpoints(
        root, lay, meta, n_experts, seed, regenerate, log, lambda n, v, i: lowrank_perturbation(n, v, seed + i, recipe)
    )
    return {"base": base, "experts": experts, "stats": stats, "layout": lay}


# Self-test -------------------------------------------------------------------------------------
def selftest_alloc(args: dict, meter: Meter) -> dict:
    """Allocate and touch ``mib`` MiB, free it: the phase must report about that peak."""
    import torch

    meter.baseline()
    with meter.phase("alloc"):
        x = torch.ones(args["mib"] * MiB // 4)
        time.sleep(0.02)
        del x
    return {}


def _selftest() -> int:
    r = run_worker("common:selftest_alloc", {"mib": 256})
    ph = r["phases"]["alloc"]
    print(f"allocated 256 MiB: peak private {fmt_bytes(ph['peak_private'])}, peak RSS {fmt_bytes(ph['peak_rss'])}, "
          f"{ph['samples']} samples; baseline private {fmt_bytes(r['baseline']['private'])}")
    ok = 250 * MiB <= ph["peak_private"] <= 270 * MiB
    print("ok" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help="module:function to run measured (internal)")
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--selftest", action="store_true")
    ns = ap.parse_args()
    if ns.worker:
        _worker_main(ns.worker, ns.interval)
    elif ns.selftest:
        sys.exit(_selftest())
    else:
        ap.print_help()
