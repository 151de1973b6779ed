"""The sinks of a pass: the checkpoints it writes into a step's directory.

    sets/<name>/...    tensor state sets (float32, ``work.state_dtype``)
    views/<view>/...   published views (the base's storage dtype)

``PassSinks.open`` creates one ``CheckpointWriter`` per sink of a pass, with the layout the
strategy declares (``Strategy.sink_shape``); ``write`` takes one name's outputs (or, for a frozen
name, θ0's tensor) in name order; ``close`` finishes the files and returns their hashes.

Mirroring. Sinks that receive the very same tensors (TIME's init = deploy = ema on a float32 base)
are written once: a follower only mirrors its leader (same file layout) while every tensor it gets
is the leader's tensor object, and gets hard links to the leader's files at the end. If a follower
ever gets a different tensor, it is materialised on the spot (the tensors so far read back from the
leader's file) and written normally from then on.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from mergewatch.checkpoint.writer import CheckpointWriter, FileLayout, TensorSpec
from mergewatch.engine.work import StrategyError, sink_dtype
from mergewatch.strategies.base import VIEWS, ModelInfo, Pass, Strategy


def sink_path(directory: Path, sink: str, views: Sequence[str] = VIEWS) -> Path:
    return directory / ("views" if sink in views else "sets") / sink


class PassSinks:
    """The open writers of one pass's sinks (module docstring), leaders before their followers."""

    def __init__(self, writers: dict[str, CheckpointWriter]):
        self.writers = writers
        #: sink -> name -> shape (a name a sink leaves out is absent)
        self.shapes = {sink: {sp.name: sp.shape for sp in w.specs} for sink, w in writers.items()}
        #: follower -> its leader, while the follower still only mirrors it
        self.mirror = _followers(writers)

    @classmethod
    def open(cls, strategy: Strategy, p: Pass, model: ModelInfo, out_dir: Path, done: Collection[str],
             layout: FileLayout | None) -> PassSinks:
        """Writers for ``p.writes`` under ``out_dir``, each split into files as ``layout`` says (the
        same for every sink, so that sinks with the same tensors have the same files: mirroring);
        ``done`` are the sinks earlier passes wrote."""
        writers: dict[str, CheckpointWriter] = {}
        for sink in p.writes:
            if sink in done or sink in writers:
                raise StrategyError(f"{strategy.name}: sink '{sink}' written twice in one step")
            d = sink_path(out_dir, sink)
            d.mkdir(parents=True)
            writers[sink] = CheckpointWriter(d, _specs(strategy, sink, model), layout=layout or FileLayout())
        return cls(writers)

    def layout(self, name: str) -> dict[str, tuple[int, ...]]:
        """sink -> shape of ``name`` there, for every sink that holds ``name``."""
        return {sink: shapes[name] for sink, shapes in self.shapes.items() if name in shapes}

    def write_frozen(self, name: str, tensor: torch.Tensor) -> None:
        """θ0's value of a frozen name, into every sink that holds it."""
        for sink, w in self.writers.items():
            if name in self.shapes[sink] and sink not in self.mirror:
                w.write(name, tensor)

    def write(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """One name's outputs (sink -> tensor in the sink's dtype, ``work.tensor_work``)."""
        for sink, tensor in tensors.items():  # leaders and diverged followers first
            if sink not in self.mirror:
                self.writers[sink].write(name, tensor)
        for sink, leader in list(self.mirror.items()):
            if sink not in tensors or tensors[sink] is tensors[leader]:
                continue
            self._materialise(sink, leader, name)
            self.writers[sink].write(name, tensors[sink])
            del self.mirror[sink]

    def _materialise(self, sink: str, leader: str, name: str) -> None:
        """Write into follower ``sink`` what it mirrored so far (every name before ``name``)."""
        w, lw = self.writers[sink], self.writers[leader]
        while w.specs[w.position].name != name:
            prior = w.specs[w.position].name
            w.write(prior, lw.read_back(prior))

    def close(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Finish every sink: sink -> (content sha256, file name -> sha256)."""
        hashes = {}
        for sink, w in self.writers.items():
            if sink in self.mirror:
                w.adopt(self.writers[self.mirror[sink]])  # leaders come first: already closed
            else:
                w.close()
            hashes[sink] = (w.content_sha256, dict(w.files))
        return hashes

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers.values())


def _specs(strategy: Strategy, sink: str, model: ModelInfo) -> list[TensorSpec]:
    """The layout of ``sink``: every name it holds, its dtype (``work.sink_dtype``) and shape."""
    specs = []
    for name, meta in model.metas.items():
        shape = meta.shape if sink in VIEWS else strategy.sink_shape(sink, meta)
        if shape is not None:
            specs.append(TensorSpec(name, sink_dtype(sink, meta), tuple(shape)))
    return specs


def _followers(writers: Mapping[str, CheckpointWriter]) -> dict[str, str]:
    """follower -> leader: a sink with the same file layout as an earlier one mirrors it."""
    mirror: dict[str, str] = {}
    leaders: dict[tuple, str] = {}
    for sink, w in writers.items():
        key = w.layout_key
        if key in leaders:
            mirror[sink] = leaders[key]
        else:
            leaders[key] = sink
    return mirror


def drop_scratch(out_dir: Path, written: Iterable[str], keep: set[str]) -> None:
    """Scratch sinks (written by a pass for a later one, but neither kept nor published) are removed."""
    for sink in written:
        if sink not in keep:
            shutil.rmtree(sink_path(out_dir, sink))
