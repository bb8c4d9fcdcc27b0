"""Issue 15: safetensors files written from the tensors' own memory and hashed while written; read once, hashed
as read, straight into one tensor per entry, every header entry checked before a tensor is made."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import blake3
import pytest
import safetensors
import safetensors.torch
import torch

from esper.core.checkpoint import stream


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(2100, 2100, generator=g),  # > the threaded and the own-storage thresholds
        "b": torch.randn(7, generator=g),
        "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "step": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(9, dtype=torch.uint8),
        "empty": torch.empty(0, 4),
        "f16": torch.randn(2, generator=g).to(torch.float16),
    }


def _read(path: Path, algorithm: str = "blake3") -> tuple[str, dict[str, torch.Tensor] | stream.FormatError, int]:
    with open(path, "rb") as fh:
        return stream.read_tensors(fh, path.stat().st_size, algorithm)


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    got = _read(path)[1]
    assert isinstance(got, dict), got
    return got


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_write_then_read_round_trips_and_the_digest_is_of_the_file(tmp_path: Path, algorithm: str) -> None:
    state = _state()
    path = tmp_path / "x.safetensors"
    digest, nbytes = stream.write_file(path, state, algorithm)
    blob = path.read_bytes()
    assert nbytes == len(blob)
    want = blake3.blake3(blob) if algorithm == "blake3" else hashlib.sha256(blob)
    assert digest == want.hexdigest()
    # the safetensors library reads it (and validates it) as its own
    ref = safetensors.torch.load(blob)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(state)
    got_digest, loaded, read = _read(path, algorithm)
    assert got_digest == digest and read == len(blob)
    assert isinstance(loaded, dict) and sorted(loaded) == sorted(state)
    for k, t in state.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k], t) and torch.equal(ref[k], t)
        # each tensor alone in a storage it fully covers (torch.set_rng_state reads a state from its storage)
        assert loaded[k].untyped_storage().nbytes() == loaded[k].nbytes


def test_files_the_library_wrote_load_the_same(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    loaded = _loaded(path)
    assert all(torch.equal(loaded[k], t) for k, t in state.items())


def _file(tmp_path: Path, header: object, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "forged.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _refused(path: Path) -> stream.FormatError:
    """A forged file is hashed whole (so its digest can be compared) and gives its FormatError, no tensor."""
    digest, got, read = _read(path)
    assert read == path.stat().st_size and digest == blake3.blake3(path.read_bytes()).hexdigest()
    assert isinstance(got, stream.FormatError), got
    return got


@pytest.mark.parametrize(("header", "data", "words"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "data ends"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap or overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "gap or overlap"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "entry must be"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ([1, 2], b"", "not a JSON object"),
])
def test_malformed_headers_are_named_not_loaded(tmp_path: Path, header: object, data: bytes, words: str) -> None:
    assert words in str(_refused(_file(tmp_path, header, data)))


@pytest.mark.parametrize(("raw", "words"), [
    (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
    (b"\x01\x02", "shorter than"),
])
def test_header_length_beyond_the_file_is_refused(tmp_path: Path, raw: bytes, words: str) -> None:
    path = tmp_path / "forged.safetensors"
    path.write_bytes(raw)
    assert words in str(_refused(path))


@pytest.mark.parametrize("keep", [20, -100])  # inside the header; inside the data
def test_a_file_that_shrinks_while_read_is_reported_short(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "x.safetensors"
    stream.write_file(path, _state())
    size = path.stat().st_size
    left = keep if keep > 0 else size + keep
    with open(path, "rb") as fh:
        with open(path, "r+b") as w:
            w.truncate(left)
        _, got, read = stream.read_tensors(fh, size, "blake3")
    assert read == left
    if keep > 0:
        assert isinstance(got, stream.FormatError) and "inside its header" in str(got)


def test_a_file_that_grows_while_read_is_reported_long(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    stream.write_file(path, _state())
    size = path.stat().st_size
    with open(path, "ab") as w:
        w.write(b"extra")
    with open(path, "rb") as fh:
        _, got, read = stream.read_tensors(fh, size, "blake3")
    assert read == size + 1 and isinstance(got, dict)


@pytest.mark.parametrize(("entry", "ok"), [
    ({"algorithm": "blake3", "digest": "a" * 64, "bytes": 1}, True),
    ({"algorithm": "sha256", "digest": "a" * 64, "bytes": 1}, True),
    ({"sha256": "a" * 64, "bytes": 1}, True),  # written before the algorithm was named: sha256
    ({"algorithm": "md5", "digest": "a" * 64, "bytes": 1}, False),
    ({"algorithm": "blake3", "bytes": 1}, False),
    ({"digest": "a" * 64, "bytes": 1}, False),
    ({"algorithm": "blake3", "digest": "a" * 64, "sha256": "a" * 64, "bytes": 1}, False),
    ({"algorithm": "blake3", "digest": "a" * 63, "bytes": 1}, False),
    ({"bytes": 1}, False),
])
def test_a_file_entry_names_its_algorithm_or_is_the_older_sha256_form(entry: dict, ok: bool) -> None:
    from esper.core.checkpoint.manifest import FileEntry
    if ok:
        e = FileEntry.model_validate(entry)
        assert e.algo == entry.get("algorithm", "sha256") and e.hexdigest == "a" * 64
    else:
        with pytest.raises(ValueError):
            FileEntry.model_validate(entry)
