"""Safetensors files written and read in one pass over their bytes, hashed on the way (SPEC C-1..C-3, P-3/P-4).

Writing: the header is built here and each tensor's own memory is written straight to the file (no serialised
copy of the state), while a second thread hashes the same bytes in file order; then one fsync. Reading: the
header's every entry is checked first (dtype, shape, offsets contiguous and covering the data exactly), then the
data is read once, straight into one new tensor per entry, while a second thread hashes each chunk just read;
the caller compares the digest before it uses any tensor.

Digests: BLAKE3 (the ``blake3`` package) for every file written now; sha256 for files written before it (the
manifest names the algorithm per file). Both hash functions release the GIL on large buffers, so hashing runs
beside the ``write``/``readinto`` system calls on a second core.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Mapping
from typing import Any, Literal

import blake3
import safetensors.torch
import torch

from esper.core.io import bounded

Algorithm = Literal["blake3", "sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("blake3", "sha256")
WRITE_ALGORITHM: Algorithm = "blake3"
MAX_HEADER = 100 << 20  # safetensors' own bound
_CHUNK = 8 << 20
_THREADED = 16 << 20  # below this a second thread costs more than it saves (GIL hand-offs, thread start)

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
CODES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPES.items()}


class FormatError(ValueError):
    """The bytes are not a well-formed safetensors file (named, never loaded)."""


def hasher(algorithm: str) -> Any:
    if algorithm == "blake3":
        # one thread: it already runs beside the write/readinto calls and outpaces them (~1.6 GB/s here);
        # more would compete with the I/O thread for the cores
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")  # pragma: no cover - the schema limits it


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def layout(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[memoryview]] | None:
    """The safetensors header and the data pieces in file order (largest element first, then by name, as the
    safetensors library orders them, so every offset is aligned to its dtype). None when a dtype has no
    safetensors code (the caller then serialises through the library, which names the problem)."""
    if any(t.dtype not in DTYPES for t in tensors.values()):
        return None
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    pieces: list[memoryview] = []
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        pieces.append(_bytes_of(t))
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, pieces


def write_file(path: os.PathLike[str] | str, tensors: Mapping[str, torch.Tensor],
               algorithm: str = WRITE_ALGORITHM, *, sync: bool = True) -> tuple[str, int]:
    """Write ``tensors`` (contiguous CPU tensors, each alone in its storage) as a new safetensors file, hash it
    while writing, fsync it (unless ``sync`` is False: the caller fsyncs it, with others). Returns (hex digest,
    bytes written)."""
    laid = layout(tensors)
    if laid is None:
        pieces = [memoryview(safetensors.torch.save(dict(tensors)))]
    else:
        head, data = laid
        pieces = [memoryview(head), *data]
    total = sum(len(p) for p in pieces)
    h = hasher(algorithm)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if total < _THREADED:
            for p in pieces:
                h.update(p)
                _write_all(fd, p)
        else:
            worker = _Hasher(h, pieces)
            try:
                for p in pieces:
                    _write_all(fd, p)
            finally:
                worker.join()
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest(), total


def write_bytes(path: os.PathLike[str] | str, data: bytes) -> None:
    """Write ``data`` to a new file (not fsynced: the caller fsyncs it, with others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(data))
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    for i in range(0, len(view), _CHUNK):
        chunk = view[i:i + _CHUNK]
        while chunk:
            chunk = chunk[os.write(fd, chunk):]


class _Hasher:
    """Hash pieces in the order given, on a thread of its own when ``threaded`` (else at once); ``join`` waits
    for the last piece and re-raises what the thread raised."""

    def __init__(self, h: Any, pieces: list[memoryview] | None = None, *, threaded: bool = True) -> None:
        self.h = h
        self.error: BaseException | None = None
        self.queue: queue.SimpleQueue[memoryview | None] | None = None
        if threaded:
            self.queue = queue.SimpleQueue()
            self.thread = threading.Thread(target=self._run, name="esper-hash", daemon=True)
            self.thread.start()
        for p in pieces or ():
            self.add(p)

    def add(self, piece: memoryview) -> None:
        if self.queue is None:
            self.h.update(piece)
        else:
            self.queue.put(piece)

    def _run(self) -> None:
        assert self.queue is not None
        while (piece := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.h.update(piece)
                except BaseException as exc:  # noqa: BLE001  # pragma: no cover - re-raised by join
                    self.error = exc

    def join(self) -> None:
        if self.queue is None:
            return
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:  # pragma: no cover
            raise self.error


Span = tuple[int, int, torch.dtype, list[int], str]  # begin, end (data offsets), dtype, shape, key


def header_length(prefix: bytes, total: int) -> int:
    """The header length a file of ``total`` bytes declares in its first 8 bytes; FormatError if it cannot fit."""
    if total < 8 or len(prefix) < 8:
        raise FormatError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER or 8 + n > total:
        raise FormatError(f"header length {n} does not fit the file ({total} bytes)")
    return int(n)


def plan(header_bytes: bytes, data_bytes: int) -> list[Span]:
    """Every header entry checked (a known dtype, a shape of non-negative ints, offsets whose size is the
    shape's, together covering ``data_bytes`` exactly without overlap), in file order. FormatError names the
    first problem."""
    try:
        header = bounded.loads_json(header_bytes)
    except bounded.ParseError as exc:
        raise FormatError(f"header is not valid JSON: {bounded.clip(str(exc), 200)}") from exc
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    spans: list[Span] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise FormatError("__metadata__ is not an object of strings")
            continue
        spans.append((*_entry(key, entry), key))
    spans.sort(key=lambda s: (s[0], s[1], s[4]))
    expect = 0
    for begin, end, _, _, key in spans:
        if begin != expect:
            raise FormatError(f"tensor {key!r}: data starts at {begin}, expected {expect} (gap or overlap)")
        expect = end
    if expect != data_bytes:
        raise FormatError(f"data ends at {expect}, the file has {data_bytes} bytes of data")
    return spans


def read_tensors(fh: Any, size: int, algorithm: str) -> tuple[str, dict[str, torch.Tensor] | FormatError, int]:
    """Read at most ``size`` bytes of ``fh`` (from its start) straight into a new tensor per header entry,
    hashing every byte on a second thread as soon as it is read. The header is checked (``plan``) before any
    tensor is allocated, so together they never need more memory than the file's size; the caller compares the
    digest before it uses a tensor. Returns (hex digest, the tensors or the header's FormatError, bytes read;
    one more than ``size`` when the file grew while it was read).

    One tensor per entry rather than one buffer for the file: each allocation is the size of one tensor, which
    the allocator serves from memory it already holds, where one file-sized buffer is a fresh mapping whose every
    page faults on first write (that was a third of a 10M-parameter restore)."""
    h = hasher(algorithm)
    hashing = _Hasher(h, threaded=size >= _THREADED)
    try:
        spans, read = _read_header(fh, size, hashing)
        tensors: dict[str, torch.Tensor] = {}
        for _, _, dtype, shape, key in spans if isinstance(spans, list) else ():
            t = tensors[key] = torch.empty(shape, dtype=dtype)
            got = _read_into(fh, _bytes_of(t), hashing)
            read += got
            if got < t.numel() * t.element_size():
                break  # the file shrank while it was read: the caller reports it
        # what no entry covers (a file whose header is no plan) is only hashed, so its digest is still compared
        while read < size and (chunk := fh.read(min(_CHUNK, size - read))):
            read += len(chunk)
            hashing.add(memoryview(chunk))
    finally:
        hashing.join()
    grew = len(fh.read(1)) if read == size else 0
    return h.hexdigest(), spans if isinstance(spans, FormatError) else tensors, read + grew


def _read_header(fh: Any, size: int, hashing: _Hasher) -> tuple[list[Span] | FormatError, int]:
    prefix = fh.read(min(8, size))
    hashing.add(memoryview(prefix))
    try:
        n = header_length(prefix, size)
    except FormatError as exc:
        return exc, len(prefix)
    header = fh.read(n)
    hashing.add(memoryview(header))
    if len(header) < n:
        return FormatError("the file ended inside its header"), 8 + len(header)
    try:
        return plan(header, size - 8 - n), 8 + n
    except FormatError as exc:
        return exc, 8 + n


def _read_into(fh: Any, view: memoryview, hashing: _Hasher) -> int:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:got + _CHUNK])
        if not n:
            break
        hashing.add(view[got:got + n])
        got += n
    return got


def _entry(key: str, entry: Any) -> tuple[int, int, torch.dtype, list[int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"tensor {key!r}: entry must be {{dtype, shape, data_offsets}}")
    dtype = CODES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"tensor {key!r}: unknown dtype {bounded.clip(str(entry['dtype']), 40)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"tensor {key!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise FormatError(f"tensor {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise FormatError(f"tensor {key!r}: {offsets[1] - offsets[0]} bytes for shape {shape}, needs {need}")
    return offsets[0], offsets[1], dtype, shape
