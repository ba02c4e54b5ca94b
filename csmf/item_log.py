"""The write-ahead item log: every item write (upsert or delete) as one checksummed record,
appended and fsynced before the write is applied or acknowledged (docs/design.md#item-writes).

```
file    = MAGIC record*
MAGIC   = b"csmf-item-log/1\\n"                                 16 bytes
record  = b"REC1" seq:u64 length:u32 crc:u32 payload[length]    little-endian, 20-byte header
crc     = CRC-32 of seq, length and payload
payload = json_length:u32 json vectors       json: op, ids, dim, columns, model, given
vectors = float32 (n, dim), row-major (upserts; empty for deletes)
```

``seq`` counts records from 1, without gaps. Records name items by external id, never by row,
so the same log replays onto any bundle generation: the built bundle, or a compacted one that
folded records up to its manifest's ``items_log.applied_seq``.

Appends are serialised across processes by an exclusive ``flock`` on the log: the writer reads
the tail to learn the last ``seq``, writes the record in one ``write`` and fsyncs before it
returns (the directory too when the file is new). What a crash can leave behind:

- a *torn tail*: the last record is shorter than its header says (or the header itself is cut).
  That write was never acknowledged (acknowledgement follows the fsync of the whole record), so
  readers stop before it and the next writer truncates it, logging a warning;
- anything else — a bad marker, a checksum mismatch, a sequence gap, an unreadable payload — is
  corruption of a record that may have been acknowledged: reading raises :class:`ItemLogError`
  naming the record's ``seq`` and byte offset, and nothing after it is applied.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from csmf.atomic import fsync_path
from csmf.errors import CsmfError

log = logging.getLogger("csmf.item_log")

MAGIC = b"csmf-item-log/1\n"
MARKER = b"REC1"
HEADER = struct.Struct("<4sQII")  # marker, seq, payload length, crc
MAX_RECORD = 1 << 30  # a length above this is a corrupt header, not a record
OPS = ("upsert", "delete")


class ItemLogError(CsmfError, ValueError):
    """The item log is corrupt or unreadable (names the record and its byte offset)."""


@dataclass
class Record:
    seq: int
    op: str  # "upsert" | "delete"
    ids: list[str]
    vectors: np.ndarray | None  # (n, dim) float32 for upserts
    columns: dict[str, list] = field(default_factory=dict)  # item-table columns of upserts
    offset: int = 0  # where the record starts in the file
    end: int = 0  # where the next one starts
    model: str | None = None  # the model version whose item tower encoded the vectors
    given: list[bool] | None = None  # per item: vector given by the writer, not encoded


def encode_payload(
    op: str,
    ids: Sequence[str],
    vectors: np.ndarray | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    model: str | None = None,
    given: Sequence[bool] | None = None,
) -> bytes:
    """One record's payload. ``model``: the model version whose item tower made the vectors;
    ``given``: per item, whether its vector was given rather than encoded from its features (a
    replay onto another model re-encodes the others)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    v = np.zeros((0, 0), np.float32) if vectors is None else np.asarray(vectors, "<f4")
    if op == "upsert" and v.shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids but {v.shape[0]} vectors")
    doc = {"op": op, "ids": list(ids), "dim": int(v.shape[1]) if v.ndim == 2 else 0}
    if columns:
        doc["columns"] = {k: list(c) for k, c in columns.items()}
    if model is not None:
        doc["model"] = model
    if given is not None:
        doc["given"] = [bool(g) for g in given]
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return struct.pack("<I", len(head)) + head + np.ascontiguousarray(v).tobytes()


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, len(payload)))) & 0xFFFFFFFF


def _decode(path: Path, seq: int, offset: int, payload: bytes) -> Record:
    where = f"item log {path}: record {seq} at byte {offset}"
    try:
        (n,) = struct.unpack_from("<I", payload)
        doc = json.loads(payload[4 : 4 + n])
        op, ids, dim = doc["op"], doc["ids"], int(doc["dim"])
        if op not in OPS or not isinstance(ids, list):
            raise ValueError(f"op {op!r}")
        raw = payload[4 + n :]
        vectors = None
        if op == "upsert":
            vectors = np.frombuffer(raw, "<f4").reshape(len(ids), dim).astype(np.float32)
        elif raw:
            raise ValueError("a delete carries vector bytes")
    except Exception as exc:  # struct/json/KeyError/reshape: a payload we cannot read
        raise ItemLogError(f"{where}: unreadable payload ({type(exc).__name__}: {exc})") from None
    rec = Record(seq, op, [str(i) for i in ids], vectors, doc.get("columns") or {}, offset)
    rec.model, rec.given = doc.get("model"), doc.get("given")
    return rec


class ItemLog:
    """One log file; ``read`` from any reader, ``append`` from any process (flock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    # -- reading ----------------------------------------------------------------------------------

    def read(self, offset: int = 0, after_seq: int = 0) -> Iterator[Record]:
        """Records from byte ``offset`` (0 or a record boundary returned earlier) whose seq is
        above ``after_seq``; stops before a torn tail; raises ItemLogError on corruption."""
        for rec in self._scan(offset, decode=True):
            if rec.seq > after_seq:
                yield rec

    def last(self, offset: int = 0, seq: int = 0) -> tuple[int, int, int | None]:
        """(end offset of the last whole record, its seq, torn-tail offset or None), scanning
        from ``offset`` (a record boundary whose preceding record had ``seq``)."""
        end, last, torn = max(offset, len(MAGIC)), seq, None
        for rec in self._scan(offset, decode=False, torn_out=(box := [])):
            end, last = rec.end, rec.seq
        if box:
            torn = box[0]
        return end, last, torn

    def _scan(self, offset: int, decode: bool, torn_out: list | None = None) -> Iterator[Record]:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below, generator
        except FileNotFoundError:
            return
        with fh:
            head = fh.read(len(MAGIC))
            if not head:
                return
            if head != MAGIC[: len(head)]:
                raise ItemLogError(
                    f"item log {self.path}: not an item log (starts with {head[:16]!r}, "
                    f"expected {MAGIC!r})"
                )
            if len(head) < len(MAGIC):  # a crash while creating the file
                if torn_out is not None:
                    torn_out.append(0)
                return
            pos = max(offset, len(MAGIC))
            fh.seek(pos)
            expect: int | None = None
            while True:
                hdr = fh.read(HEADER.size)
                if not hdr:
                    return
                if len(hdr) < HEADER.size:
                    self._torn(pos, "header", torn_out)
                    return
                marker, seq, length, crc = HEADER.unpack(hdr)
                where = f"item log {self.path}: record {seq} at byte {pos}"
                if marker != MARKER or length > MAX_RECORD:
                    raise ItemLogError(
                        f"item log {self.path}: bad record header at byte {pos} "
                        f"(marker {marker!r}, length {length}); the log is corrupt from here"
                    )
                payload = fh.read(length)
                if len(payload) < length:
                    self._torn(pos, f"record {seq}", torn_out)
                    return
                got = _crc(seq, payload)
                if got != crc:
                    raise ItemLogError(
                        f"{where}: checksum mismatch (stored {crc:08x}, computed {got:08x}); "
                        f"the record is corrupt — restore the log from a backup, or truncate it "
                        f"to {pos} bytes to drop this record and every later one"
                    )
                if expect is not None and seq != expect:
                    raise ItemLogError(f"{where}: expected record {expect} (a gap or a repeat)")
                expect = seq + 1
                end = pos + HEADER.size + length
                if decode:
                    rec = _decode(self.path, seq, pos, payload)
                else:
                    rec = Record(seq, "", [], None, {}, pos)
                rec.end = end
                yield rec
                pos = end

    def _torn(self, pos: int, what: str, torn_out: list | None) -> None:
        if torn_out is not None:
            torn_out.append(pos)

    # -- appending --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:
                fsync_path(self.path.parent)  # the new file's name survives a crash
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, payload: bytes, hint: tuple[int, int] = (0, 0)) -> Record:
        """Append one record (``encode_payload``) durably; returns it with its seq and offsets.
        ``hint`` = (offset, seq) of a known record boundary, to scan only the tail."""
        with self._locked() as fd:
            size = os.fstat(fd).st_size
            if size < len(MAGIC):  # new (or torn while being created)
                os.ftruncate(fd, 0)
                os.pwrite(fd, MAGIC, 0)
                hint, size = (0, 0), len(MAGIC)
            offset, seq = hint if hint[0] <= size else (0, 0)
            end, last, torn = self.last(offset, seq)
            if torn is not None:
                log.warning(
                    "item log %s: dropping a torn tail at byte %d (%d bytes of an unacknowledged "
                    "write cut by a crash)", self.path, torn, size - torn,
                )  # fmt: skip
                os.ftruncate(fd, torn)
                end = torn
            elif end != size:  # pragma: no cover - scanning stops only at EOF or a torn tail
                raise ItemLogError(f"item log {self.path}: {size - end} unexpected bytes at {end}")
            seq = last + 1
            record = HEADER.pack(MARKER, seq, len(payload), _crc(seq, payload)) + payload
            written = os.pwrite(fd, record, end)
            if written != len(record):
                os.ftruncate(fd, end)
                raise OSError(f"short write to {self.path}: {written} of {len(record)} bytes")
            os.fsync(fd)
        rec = _decode(self.path, seq, end, payload)
        rec.end = end + len(record)
        return rec
