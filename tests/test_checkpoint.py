"""Reader, sharded layout, malformed-input refusal, writer and content hash (mergewatch.checkpoint)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergewatch.checkpoint import LazyCheckpoint, TensorSpec, atomic_directory, content_sha256, write_checkpoint
from mergewatch.checkpoint.hashing import ContentHasher
from mergewatch.checkpoint.reader import read_header
from mergewatch.checkpoint.writer import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointWriter,
    clear_staging,
    plan_shards,
    write_safetensors_file,
)
from mergewatch.errors import CheckpointError


# ----------------------------------------------------------------------------------------------
# helpers


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every supported dtype plus 0-d and empty tensors, with non-trivial values."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(-5, 5, dtype=torch.int64) * (2**40),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3) - 3,
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(3, 0, dtype=torch.float16),
    }


def assert_same(a: dict, b) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, k
        assert tuple(x.shape) == tuple(y.shape), k
        assert torch.equal(x, y), k


def raw_safetensors(header: dict, data: bytes, pad: bool = True) -> bytes:
    """Hand-made safetensors bytes, so tests can describe files the writer would never produce."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def data_region(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def error_of(path) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        LazyCheckpoint(path)
    return ei.value


# ----------------------------------------------------------------------------------------------
# reader: interoperability with the safetensors library


def test_our_files_load_with_safetensors(tmp_path):
    t = mixed_tensors()
    p = tmp_path / "ours.safetensors"
    write_safetensors_file(p, t, metadata={"origin": "test"})
    assert_same(t, load_file(p))
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"origin": "test"}


def test_safetensors_files_load_with_lazy_checkpoint(tmp_path):
    t = mixed_tensors()
    p = tmp_path / "theirs.safetensors"
    save_file(t, p, metadata={"k": "v"})
    ck = LazyCheckpoint(p)
    assert_same(t, ck)
    assert ck.metadata == {"k": "v"}
    assert ck["scalar"].shape == () and ck["scalar"].item() == 3.25
    assert ck["empty_2d"].shape == (3, 0) and ck["empty_2d"].dtype == torch.float16
    assert ck.info("bf16").dtype == "BF16" and ck.info("bool").torch_dtype is torch.bool
    assert ck.nbytes == sum(v.numel() * v.element_size() for v in t.values())
    assert ck.largest_tensor_bytes == 80  # i64: 10 x 8
    assert len(ck) == len(t) and "f32" in ck and "nope" not in ck
    with pytest.raises(KeyError):
        ck["nope"]


def test_keys_are_sorted(tmp_path):
    names = ["zeta", "alpha", "m.2.w", "m.10.w", "Beta", "_x"]
    p = tmp_path / "a.safetensors"
    save_file({n: torch.full((2,), float(i)) for i, n in enumerate(names)}, p)
    ck = LazyCheckpoint(p)
    assert list(ck) == sorted(names)
    assert list(ck.keys()) == sorted(names)
    assert list(ck.infos()) == sorted(names)


def test_header_length_with_pickle_like_first_byte_is_accepted(tmp_path):
    """Regression: a header length of 128 (or 640) starts with byte 0x80 like a pickle."""
    hits = set()
    for length in range(1, 600):
        p = tmp_path / "x.safetensors"
        save_file({"x" * length: torch.arange(3.0)}, p)
        (n,) = struct.unpack("<Q", p.read_bytes()[:8])
        if n % 256 == 0x80:
            hits.add(n // 256)
            assert torch.equal(LazyCheckpoint(p)["x" * length], torch.arange(3.0))
        if {0, 2} <= hits:
            break
    assert {0, 2} <= hits  # both 80 00 .. and 80 02 .. (the pickle protocol-2 prefix) were exercised


def test_returned_tensors_are_private_copies(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4)}, p)
    ck = LazyCheckpoint(p)
    t = ck["w"]
    t += 1  # writable, and must not alias anything shared
    assert torch.equal(ck["w"], torch.ones(4))


# ----------------------------------------------------------------------------------------------
# reader: one tensor at a time


def test_getitem_reads_only_that_tensors_bytes(tmp_path):
    t = {"a": torch.arange(8.0), "b": torch.arange(16.0) * -1, "c": torch.arange(4, dtype=torch.int64)}
    p = tmp_path / "a.safetensors"
    save_file(t, p)
    info_b = LazyCheckpoint(p).info("b")
    raw = bytearray(p.read_bytes())
    raw[info_b.start : info_b.start + info_b.nbytes] = b"\xff" * info_b.nbytes  # NaN garbage
    p.write_bytes(bytes(raw))
    ck = LazyCheckpoint(p)
    assert torch.equal(ck["a"], t["a"])
    assert torch.equal(ck["c"], t["c"])
    assert torch.isnan(ck["b"]).all()


def test_construction_reads_no_tensor_data(tmp_path):
    t = {"a": torch.zeros(64), "b": torch.zeros(3, 7, dtype=torch.float64)}
    p = tmp_path / "a.safetensors"
    save_file(t, p)
    start = data_region(p)
    garbage = os.urandom(p.stat().st_size - start)
    p.write_bytes(p.read_bytes()[:start] + garbage)
    ck = LazyCheckpoint(p)  # header valid, data garbage: construction must not care
    assert sorted(ck) == ["a", "b"]
    got = b"".join(bytes(ck[k].reshape(-1).view(torch.uint8).numpy()) for k in sorted(ck, key=lambda k: ck.info(k).start))
    assert got == garbage


def test_file_shrinking_after_open_is_a_short_read(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"a": torch.ones(16), "b": torch.ones(16)}, p)
    ck = LazyCheckpoint(p)
    last = max(ck, key=lambda k: ck.info(k).start)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"tensor '{last}': short read"):
        ck[last]


# ----------------------------------------------------------------------------------------------
# sharded checkpoints


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    t = {f"layer.{i}.w": torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    t["bias"] = torch.arange(5, dtype=torch.int64)
    d = tmp_path / "sharded"
    write_checkpoint(d, t, shard_bytes=600)  # each 8x8 f32 is 256 bytes: two per shard
    return d, t


def test_sharded_round_trip(sharded):
    d, t = sharded
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) >= 3
    assert (d / INDEX_FILE).is_file() and not (d / SINGLE_FILE).exists()
    ck = LazyCheckpoint(d)
    assert ck.index_path == d / INDEX_FILE
    assert sorted(ck.files) == shards
    assert list(ck) == sorted(t)
    assert_same(t, ck)
    assert ck.metadata["total_size"] == str(sum(v.numel() * v.element_size() for v in t.values()))
    # each shard is a standalone safetensors file too
    merged = {}
    for s in shards:
        merged.update(load_file(s))
    assert_same(t, merged)


def test_content_hash_independent_of_layout(tmp_path, sharded):
    d, t = sharded
    single = tmp_path / "single.safetensors"
    write_safetensors_file(single, t)
    other = tmp_path / "theirs.safetensors"
    save_file(t, other, metadata={"different": "metadata"})  # other header order and metadata
    h = content_sha256(LazyCheckpoint(d))
    assert h == content_sha256(LazyCheckpoint(single)) == content_sha256(LazyCheckpoint(other))
    assert len(h) == 64


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_FILE).read_text())


def _write_index(d: Path, idx: dict) -> None:
    (d / INDEX_FILE).write_text(json.dumps(idx))


def test_index_naming_missing_shard(sharded):
    d, _ = sharded
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    e = error_of(d)
    assert "missing" in str(e) and victim.name in str(e)


def test_tensor_in_wrong_shard(sharded):
    d, _ = sharded
    idx = _index(d)
    shards = sorted(set(idx["weight_map"].values()))
    name = next(k for k, v in idx["weight_map"].items() if v == shards[0])
    idx["weight_map"][name] = shards[1]
    _write_index(d, idx)
    e = error_of(d)
    assert f"'{name}'" in str(e) and shards[0] in str(e) and shards[1] in str(e)


def test_index_lists_tensor_no_shard_holds(sharded):
    d, _ = sharded
    idx = _index(d)
    idx["weight_map"]["ghost.weight"] = sorted(idx["weight_map"].values())[0]
    _write_index(d, idx)
    e = error_of(d)
    assert "no shard holds" in str(e) and "ghost.weight" in str(e)


def test_shard_holds_tensor_the_index_does_not_list(sharded):
    d, _ = sharded
    idx = _index(d)
    del idx["weight_map"]["layer.3.w"]
    _write_index(d, idx)
    e = error_of(d)
    assert "'layer.3.w'" in str(e) and "does not list" in str(e)


def test_tensor_in_two_shards(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"a": torch.ones(2)}, d / "s1.safetensors")
    save_file({"a": torch.ones(2)}, d / "s2.safetensors")
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    e = error_of(d)
    assert "'a'" in str(e)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "invalid index"),
        (json.dumps({"metadata": {}}), "weight_map"),
        (json.dumps([1, 2]), "weight_map"),
        (json.dumps({"weight_map": {"a": "../outside.safetensors"}}), "invalid shard name"),
        (json.dumps({"weight_map": {"a": 3}}), "invalid shard name"),
        (json.dumps({"weight_map": {"a": ["x"]}}), "invalid shard name"),
    ],
)
def test_invalid_index_file(sharded, content, needle):
    d, _ = sharded
    (d / INDEX_FILE).write_text(content)
    e = error_of(d)
    assert needle in str(e) and INDEX_FILE in str(e)


def test_two_safetensors_without_index(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    save_file({"a": torch.ones(2)}, d / "a.safetensors")
    save_file({"b": torch.ones(2)}, d / "b.safetensors")
    e = error_of(d)
    assert "2 .safetensors files" in str(e) and "index" in str(e)


def test_two_index_files(sharded):
    d, _ = sharded
    (d / "other.safetensors.index.json").write_text((d / INDEX_FILE).read_text())
    assert "several index files" in str(error_of(d))


def test_directory_with_one_safetensors(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    save_file({"a": torch.arange(3.0)}, d / "weights.safetensors")
    ck = LazyCheckpoint(d)
    assert ck.index_path is None and torch.equal(ck["a"], torch.arange(3.0))


def test_empty_directory_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no .safetensors" in str(error_of(tmp_path / "empty"))
    assert "no such file" in str(error_of(tmp_path / "absent.safetensors"))


def test_directory_with_only_pickles(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    torch.save({"a": torch.ones(2)}, d / "pytorch_model.bin")
    e = error_of(d)
    assert "pytorch_model.bin" in str(e) and "pickle" in str(e) and "arbitrary code" in str(e)


# ----------------------------------------------------------------------------------------------
# malformed files


@pytest.fixture
def good(tmp_path) -> Path:
    p = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(16.0), "b": torch.ones(4, 4, dtype=torch.float64)}, p)
    return p


def test_zero_byte_file(tmp_path):
    p = tmp_path / "zero.safetensors"
    p.write_bytes(b"")
    e = error_of(p)
    assert "empty" in str(e) and str(p) in str(e)
    assert e.path == str(p)


def test_few_bytes_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    assert "too short" in str(error_of(p))


def test_truncated_in_data(good):
    good.write_bytes(good.read_bytes()[: data_region(good) + 40])
    e = error_of(good)
    assert "truncated" in str(e)


def test_truncated_in_header(good):
    good.write_bytes(good.read_bytes()[: data_region(good) // 2])
    e = error_of(good)
    assert "header claims" in str(e) and "truncated" in str(e)


def test_header_length_larger_than_file(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 5000) + b'{"a": 1}')
    e = error_of(p)
    assert "header claims 5000 bytes" in str(e)


@pytest.mark.parametrize("n", [0, 2**40, 2**64 - 1])
def test_implausible_header_length(tmp_path, n):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", n) + b"{}" * 10)
    assert "not plausible" in str(error_of(p))


def test_header_json_corrupt(good):
    raw = bytearray(good.read_bytes())
    i = raw.index(b'"dtype"')
    raw[i : i + 3] = b"\x00]!"
    good.write_bytes(bytes(raw))
    assert "not valid JSON" in str(error_of(good))


def test_header_not_starting_with_brace(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"[]      ")
    assert "does not start with '{'" in str(error_of(p))


def test_header_not_an_object(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"{}" + b" " * 6)
    assert len(LazyCheckpoint(p)) == 0  # an empty object is a valid (empty) checkpoint
    p.write_bytes(raw_safetensors({"a": [1, 2]}, b""))
    assert "tensor 'a': header entry is not an object" in str(error_of(p))


def test_duplicate_tensor_name_in_header(tmp_path):
    p = tmp_path / "dup.safetensors"
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    e = error_of(p)
    assert "duplicate" in str(e) and "'a'" in str(e)


F32_4 = {"dtype": "F32", "shape": [4]}


@pytest.mark.parametrize(
    "header, data_len, needle",
    [
        # offsets overlap: b starts inside a
        ({"a": {**F32_4, "data_offsets": [0, 16]}, "b": {**F32_4, "data_offsets": [8, 24]}}, 24, "overlaps"),
        # gap between a and b
        ({"a": {**F32_4, "data_offsets": [0, 16]}, "b": {**F32_4, "data_offsets": [20, 36]}}, 36, "gap of 4 bytes"),
        # shape * itemsize != span
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16, "needs 12"),
        ({"a": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 32]}}, 32, "needs 16"),
        # data beyond the file end
        ({"a": {**F32_4, "data_offsets": [0, 16]}}, 10, "truncated"),
        # trailing bytes no tensor covers
        ({"a": {**F32_4, "data_offsets": [0, 16]}}, 24, "padded"),
        # reversed / negative offsets
        ({"a": {**F32_4, "data_offsets": [16, 0]}}, 16, "offsets"),
        ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [-4, -4]}}, 0, "offsets"),
        # malformed fields
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, 16, "invalid shape"),
        ({"a": {**F32_4, "data_offsets": [0]}}, 16, "invalid data_offsets"),
        ({"a": {**F32_4}}, 16, "invalid data_offsets"),
        # unsupported dtypes
        ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, 4, "unsupported dtype 'F8_E4M3'"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported dtype 'C64'"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype None"),
        # metadata must be str -> str
        ({"__metadata__": {"n": 3}, "a": {**F32_4, "data_offsets": [0, 16]}}, 16, "__metadata__"),
    ],
)
def test_header_lies(tmp_path, header, data_len, needle):
    p = tmp_path / "lie.safetensors"
    p.write_bytes(raw_safetensors(header, b"\0" * data_len))
    e = error_of(p)
    assert needle in str(e), str(e)
    assert str(p) in str(e)
    if "a" in header and needle not in ("padded", "__metadata__"):
        assert "'a'" in str(e) or "'b'" in str(e)


def test_unpadded_header_and_zero_length_tensors_accepted(tmp_path):
    p = tmp_path / "ok.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "b": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]},
        "c": {"dtype": "U8", "shape": [0, 5], "data_offsets": [4, 4]},
    }
    p.write_bytes(raw_safetensors(header, struct.pack("<hh", -2, 9), pad=False))
    ck = LazyCheckpoint(p)
    assert ck["a"].shape == (0,) and ck["c"].shape == (0, 5)
    assert ck["b"].tolist() == [-2, 9]
    infos, meta = read_header(p)
    assert sorted(infos) == ["a", "b", "c"] and meta == {}


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_renamed_to_safetensors(tmp_path, legacy):
    p = tmp_path / "sneaky.safetensors"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, buf, _use_new_zipfile_serialization=not legacy)
    p.write_bytes(buf.getvalue())
    e = error_of(p)
    msg = str(e)
    assert "pickle" in msg and "arbitrary code" in msg and str(p) in msg


def test_tiny_pickle_renamed_to_safetensors(tmp_path):
    import pickle

    p = tmp_path / "tiny.safetensors"
    p.write_bytes(pickle.dumps(1, protocol=4))  # shorter than the 8-byte length field
    assert "pickle" in str(error_of(p))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt", ".PT"])
def test_pickle_suffixes_refused(tmp_path, suffix):
    p = tmp_path / f"model{suffix}"
    save_file({"a": torch.ones(2)}, p)  # even valid safetensors bytes: the path says pickle
    e = error_of(p)
    assert "refusing to load a pickle-based checkpoint" in str(e) and "arbitrary code" in str(e)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        read_header(p)


# ----------------------------------------------------------------------------------------------
# writer


def _specs(t: dict) -> list[TensorSpec]:
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in t.items()]


def test_plan_shards():
    s = [TensorSpec(n, torch.float32, (k,)) for n, k in [("a", 10), ("b", 10), ("c", 100), ("d", 5), ("e", 5)]]
    plan = plan_shards(s, 80)
    assert [[x.name for x in sh] for sh in plan] == [["a", "b"], ["c"], ["d", "e"]]
    assert [[x.name for x in sh] for sh in plan_shards(s, None)] == [["a", "b", "c", "d", "e"]]
    assert [[x.name for x in sh] for sh in plan_shards(s, 1)] == [["a"], ["b"], ["c"], ["d"], ["e"]]


def test_shards_respect_shard_bytes(tmp_path):
    t = {
        "a": torch.zeros(20),  # 80 bytes
        "b": torch.zeros(20),
        "big": torch.zeros(100),  # 400 bytes > shard_bytes: own shard
        "c": torch.zeros(10, dtype=torch.float64),  # 80
        "d": torch.zeros(5),  # 20
    }
    d = tmp_path / "out"
    w = write_checkpoint(d, t, shard_bytes=200)
    ck = LazyCheckpoint(d)
    per_shard: dict[str, list[str]] = {}
    for name in ck:
        per_shard.setdefault(ck.info(name).file.name, []).append(name)
    for names in per_shard.values():
        data = sum(ck.info(n).nbytes for n in names)
        assert data <= 200 or names == ["big"]
    assert ["big"] in per_shard.values()
    assert len(per_shard) == 3
    idx = _index(d)
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    assert set(idx["weight_map"]) == set(t)
    for name, shard in idx["weight_map"].items():
        assert ck.info(name).file.name == shard
    assert set(w.files) == {*per_shard, INDEX_FILE}
    names = sorted(per_shard)
    assert names == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


def test_reported_file_hashes_match_files(tmp_path):
    t = {f"w{i}": torch.randn(10, 10) for i in range(5)}
    for shard_bytes in (None, 500):
        d = tmp_path / f"out{shard_bytes}"
        w = write_checkpoint(d, t, shard_bytes=shard_bytes)
        on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
        assert w.files == on_disk
        assert w.content_sha256 == content_sha256(LazyCheckpoint(d))
        assert w.bytes_written == sum((d / n).stat().st_size for n in w.files if n != INDEX_FILE)
    assert len(w.files) == 6  # 5 shards + index


def test_metadata_single_file_header_and_sharded_index(tmp_path):
    t = {"a": torch.ones(10), "b": torch.ones(10)}
    write_checkpoint(tmp_path / "s", t, metadata={"step": "3"})
    assert LazyCheckpoint(tmp_path / "s").metadata == {"step": "3"}
    write_checkpoint(tmp_path / "m", t, shard_bytes=40, metadata={"step": "3"})
    meta = LazyCheckpoint(tmp_path / "m").metadata
    assert meta["step"] == "3" and meta["total_size"] == "80"


def test_writer_layout_checks(tmp_path):
    specs = [TensorSpec("b", torch.float32, (2,)), TensorSpec("a", torch.float16, (3,))]

    def fresh():
        d = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        return CheckpointWriter(d, specs)

    w = fresh()
    assert [s.name for s in w.specs] == ["a", "b"]  # canonical order
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor 'a' is \(4,\)"):
        fresh().write("a", torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="tensor 'a' is .*float32"):
        fresh().write("a", torch.zeros(3))
    w = fresh()
    w.write("a", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written, first: b"):
        w.close()
    w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="unexpected extra tensor 'c'"):
        w.write("c", torch.zeros(1))
    w.close()
    assert list(LazyCheckpoint(w.directory / SINGLE_FILE)) == ["a", "b"]


def test_writer_rejects_duplicate_and_unsupported_specs(tmp_path):
    with pytest.raises(ValueError, match="'x' appears twice"):
        CheckpointWriter(tmp_path, [TensorSpec("x", torch.float32, (1,)), TensorSpec("x", torch.float32, (2,))])
    with pytest.raises(ValueError, match="tensor 'z' has dtype torch.complex64"):
        CheckpointWriter(tmp_path, [TensorSpec("z", torch.complex64, (1,))])
    assert list(tmp_path.iterdir()) == []  # refused before creating any file


def test_writer_noncontiguous_and_empty(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    t = {"t": base.t(), "s": base[:, 1], "none": torch.empty(0, 2)}
    p = tmp_path / "nc.safetensors"
    write_safetensors_file(p, t)
    assert_same({k: v.contiguous() for k, v in t.items()}, load_file(p))
    q = tmp_path / "nothing.safetensors"
    write_safetensors_file(q, {})
    assert len(LazyCheckpoint(q)) == 0 and load_file(q) == {}


def test_write_safetensors_file_is_clean(tmp_path):
    p = tmp_path / "sub" / "m.safetensors"
    t = mixed_tensors()
    h = write_safetensors_file(p, t)
    assert h == content_sha256(LazyCheckpoint(p))
    assert sorted(x.name for x in p.parent.iterdir()) == ["m.safetensors"]  # no temp dirs left
    h2 = write_safetensors_file(p, {"other": torch.ones(1)})  # replaces the file atomically
    assert h2 != h and list(LazyCheckpoint(p)) == ["other"]


def test_atomic_directory_success(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as stage:
        assert stage.parent == tmp_path / ".staging"
        (stage / "f.txt").write_text("hi")
        (stage / "sub").mkdir()
        (stage / "sub" / "g.txt").write_text("yo")
        assert not final.exists()
    assert (final / "f.txt").read_text() == "hi" and (final / "sub" / "g.txt").read_text() == "yo"
    assert list((tmp_path / ".staging").iterdir()) == []


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as stage:
            (stage / "partial.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not final.exists()
    assert not stage.exists()
    assert list((tmp_path / ".staging").iterdir()) == []


def test_atomic_directory_failing_writer_leaves_nothing(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(ValueError):
        with atomic_directory(final) as stage:
            w = CheckpointWriter(stage, [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))])
            w.write("a", torch.zeros(2))
            w.close()  # "b" never written
    assert not final.exists() and list((tmp_path / ".staging").iterdir()) == []


def test_atomic_directory_refuses_existing_final(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "keep").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_directory(final) as stage:
            (stage / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["keep"]
    assert not (tmp_path / ".staging").exists() or list((tmp_path / ".staging").iterdir()) == []


def test_atomic_directory_custom_staging_root_and_clear(tmp_path):
    root = tmp_path / "stg"
    with atomic_directory(tmp_path / "x", staging_root=root) as stage:
        assert stage.parent == root
    (root / "leftover").mkdir()
    (root / "leftover" / "f").write_text("x")
    (root / "stray.tmp").write_text("x")
    assert clear_staging(root) == 2
    assert list(root.iterdir()) == []
    assert clear_staging(tmp_path / "absent") == 0


# ----------------------------------------------------------------------------------------------
# content hash


def test_content_hash_sensitivity(tmp_path):
    base = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}

    def h(t):
        p = tmp_path / f"h{len(list(tmp_path.iterdir()))}.safetensors"
        write_safetensors_file(p, t)
        return content_sha256(LazyCheckpoint(p))

    ref = h(base)
    assert h(dict(base)) == ref
    variants = [
        {"a": base["a"], "c": base["b"]},  # renamed tensor
        {"a": base["a"].reshape(3, 2), "b": base["b"]},  # same bytes, other shape
        {"a": base["a"].view(torch.int32), "b": base["b"]},  # same bytes, other dtype
        {"a": base["a"], "b": torch.tensor([1.0, 1.0, 1.0, 1.0000001])},  # one value
        {"a": base["a"]},  # missing tensor
        {"ab": torch.cat([base["a"].reshape(-1), base["b"]])},  # boundaries moved
    ]
    hashes = {h(v) for v in variants}
    assert ref not in hashes and len(hashes) == len(variants)


def test_content_hasher_needs_sorted_order():
    h = ContentHasher()
    h.add("b", "F32", (1,), b"\0" * 4)
    with pytest.raises(ValueError, match="sorted order"):
        h.add("a", "F32", (1,), b"\0" * 4)
    with pytest.raises(ValueError, match="sorted order"):
        h.add("b", "F32", (1,), b"\0" * 4)


def test_given_shards_interleaved_in_name_order_with_metadata_in_every_header(tmp_path):
    """The base's shard boundaries (Hugging Face groups by module, so shards interleave in name
    order: layers.1 < layers.10 < layers.2): every shard is appended to in name order, the files
    read back as written, every header carries the metadata and the index has total_size."""
    from mergewatch.checkpoint.writer import FileLayout

    t = {f"layers.{i}.w": torch.full((4,), float(i)) for i in range(12)}
    shards = (tuple(f"layers.{i}.w" for i in range(0, 6)), tuple(f"layers.{i}.w" for i in range(6, 12)))
    layout = FileLayout(shards=shards, metadata=(("format", "pt"),))
    d = tmp_path / "m"
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
    with atomic_directory(d) as stage:
        w = CheckpointWriter(stage, specs, layout=layout)
        for s in w.specs:  # layers.0, layers.1, layers.10, layers.11, layers.2, ...: both shards open
            w.write(s.name, t[s.name])
        w.close()
    assert sorted(w.files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_FILE]
    c = LazyCheckpoint(d)
    assert all(torch.equal(c[k], v) for k, v in t.items())
    assert {f.name: [n for n in c if c.info(n).file == f] for f in c.files} == {
        "model-00001-of-00002.safetensors": sorted(shards[0]), "model-00002-of-00002.safetensors": sorted(shards[1])}
    for f in c.files:
        with safe_open(f, "pt") as st:
            assert st.metadata() == {"format": "pt"}
    assert json.loads((d / INDEX_FILE).read_text())["metadata"]["total_size"] == 12 * 16
    assert w.files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    # the layout of that checkpoint is itself, and it describes it; other layouts do not
    same = FileLayout.of(c, metadata={"format": "pt"})
    assert same.shards == tuple(tuple(sorted(s)) for s in shards) and same.describes(c)
    assert not FileLayout.of(c).describes(c)  # no metadata: the headers say otherwise
    assert not FileLayout.of(c, shard_bytes=0, metadata={"format": "pt"}).describes(c)
    # a layout for the base serves a state set holding a subset of its names: empty shards dropped
    sub = [s for s in specs if s.name in shards[1]]
    w2 = CheckpointWriter(tmp_path, sub, layout=layout)
    assert w2._names == ["model.safetensors"]
    with pytest.raises(ValueError, match="belong to no shard"):
        CheckpointWriter(tmp_path, [TensorSpec("stray", torch.float32, (1,))], layout=layout)
    with pytest.raises(ValueError, match="either a layout or shard_bytes"):
        CheckpointWriter(tmp_path, specs, layout=layout, shard_bytes=10)
