"""The write-ahead item log: every item write (upsert or delete) as one checksummed record,
appended and fsynced before the write is applied or acknowledged (docs/design.md#item-writes).

```
file    = MAGIC record* | MAGIC2 base:u64 crc:u32 record*
MAGIC   = b"csmf-item-log/1\\n"                                 16 bytes (records from seq 1)
MAGIC2  = b"csmf-item-log/2\\n"                                 16 bytes, then 12: a truncated log
record  = b"REC1" seq:u64 length:u32 crc:u32 payload[length]    little-endian, 20-byte header
crc     = CRC-32 of seq, length and payload
payload = json_length:u32 json vectors       json: op, ids, dim, columns, model, given
vectors = float32 (n, dim), row-major (upserts; empty for deletes)
```

``seq`` counts records from 1 (from ``base + 1`` in a truncated log), without gaps. Records name items by external id, never by row,
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

**Truncation** (:meth:`ItemLog.truncate`): once a compacted bundle that folded the records up to
``S`` is what every reader serves, the log is rewritten without them: under the append lock, the
records after ``S`` are copied byte for byte (a record's checksum covers its seq, not its offset)
behind a ``MAGIC2`` header carrying ``base = S`` into a temporary file, which is fsynced and
renamed over the log (then the folder is fsynced). A crash before the rename leaves the old log
(a superset) and a stray temporary file; after it, the new one: either is a valid log holding
every record the compacted bundle lacks. Positions are per file: a reader whose offset belongs
to another inode rescans by seq; an appender that waited for the lock on the replaced inode sees
the name point elsewhere and retries on the new file; a reader that needs a record at or below
``base`` gets an :class:`ItemLogError` saying the records were folded into a compacted bundle.
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

from csmf.atomic import atomic_write, fsync_path
from csmf.errors import CsmfError

log = logging.getLogger("csmf.item_log")

MAGIC = b"csmf-item-log/1\n"
MAGIC2 = b"csmf-item-log/2\n"
BASE = struct.Struct("<QI")  # after MAGIC2: base seq, CRC-32 of the base
MARKER = b"REC1"
HEADER = struct.Struct("<4sQII")  # marker, seq, payload length, crc
CHUNK = 1 << 20  # bytes copied at a time by a truncation
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
    ino: int = 0  # the file (inode) the offsets belong to: a truncation makes a new one
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
        return self.position()[1]

    def position(self) -> tuple[int, int]:
        """(inode, size) of the file now at the path; (0, 0) when there is none."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0, 0
        return st.st_ino, st.st_size

    def base(self) -> int:
        """The seq the file's records follow: 0, or the last record truncated away."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return 0
        with fh:
            head = self._header(fh)
        return 0 if head is None else head[0]

    # -- reading ----------------------------------------------------------------------------------

    def read(self, offset: int = 0, after_seq: int = 0, ino: int = 0) -> Iterator[Record]:
        """Records from byte ``offset`` (0 or a record boundary returned earlier, in the file
        ``ino`` when given: another file is rescanned) whose seq is above ``after_seq``; stops
        before a torn tail; raises ItemLogError on corruption, and when the records after
        ``after_seq`` were truncated away (folded into a compacted bundle)."""
        for rec in self._scan(offset, decode=True, ino=ino, after_seq=after_seq):
            if rec.seq > after_seq:
                yield rec

    def last(self, offset: int = 0, seq: int = 0, ino: int = 0) -> tuple[int, int, int | None]:
        """(end offset of the last whole record, its seq, torn-tail offset or None), scanning
        from ``offset`` (a record boundary whose preceding record had ``seq``)."""
        meta: dict[str, int] = {}
        end = last = None
        for rec in self._scan(offset, decode=False, meta=meta, ino=ino):
            end, last = rec.end, rec.seq
        if end is None:  # no whole record after the start
            end = meta.get("start", max(offset, len(MAGIC)))
            last = meta.get("base", seq) if meta.get("rescan", 1) else seq
        return end, last, meta.get("torn")

    def _header(self, fh) -> tuple[int, int] | None:
        """(base, header length) of an open log; None when it is empty or was torn while being
        created (a crash: no record was ever acknowledged)."""
        head = fh.read(len(MAGIC))
        if head == MAGIC:
            return 0, len(MAGIC)
        if head == MAGIC2:
            raw = fh.read(BASE.size)
            base, crc = BASE.unpack(raw) if len(raw) == BASE.size else (0, None)
            if crc != zlib.crc32(struct.pack("<Q", base)):
                raise ItemLogError(
                    f"item log {self.path}: the header of a truncated log is corrupt "
                    f"({len(raw)} of {BASE.size} bytes after the magic, base {base})"
                )
            return base, len(MAGIC2) + BASE.size
        if head == MAGIC[: len(head)]:
            return None
        raise ItemLogError(
            f"item log {self.path}: not an item log (starts with {head[:16]!r}, "
            f"expected {MAGIC!r} or {MAGIC2!r})"
        )

    def _scan(
        self,
        offset: int,
        decode: bool,
        meta: dict[str, int] | None = None,
        ino: int = 0,
        after_seq: int | None = None,
    ) -> Iterator[Record]:
        meta = {} if meta is None else meta
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below, generator
        except FileNotFoundError:
            return
        with fh:
            head = self._header(fh)
            if head is None:
                if fh.tell():  # a crash while creating the file
                    meta["torn"] = 0
                return
            base, hlen = head
            meta["base"], this = base, os.fstat(fh.fileno()).st_ino
            if after_seq is not None and after_seq < base:
                raise ItemLogError(
                    f"item log {self.path} starts after record {base}: records "
                    f"{after_seq + 1}..{base} were folded into a compacted bundle and truncated "
                    f"from the log, but this bundle holds only the records up to {after_seq}; "
                    f"serve the compacted bundle (its manifest's items_log.applied_seq >= {base}); "
                    f"a bundle rebuilt from source tables lacks those items: move the log aside"
                )
            rescan = offset <= hlen or (ino != 0 and ino != this)  # offsets are per file
            pos = hlen if rescan else offset
            meta["start"], meta["rescan"] = pos, int(rescan)
            fh.seek(pos)
            expect: int | None = base + 1 if rescan else None
            while True:
                hdr = fh.read(HEADER.size)
                if not hdr:
                    return
                if len(hdr) < HEADER.size:
                    meta["torn"] = pos
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
                    meta["torn"] = pos
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
                rec.end, rec.ino = end, this
                yield rec
                pos = end

    # -- appending --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """An exclusive flock on the file now at the path: a lock taken on a file that a
        truncation replaced meanwhile is dropped and taken again on the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        try:
            if created:
                fsync_path(self.path.parent)  # the new file's name survives a crash
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, payload: bytes, hint: tuple[int, ...] = (0, 0, 0)) -> Record:
        """Append one record (``encode_payload``) durably; returns it with its seq and offsets.
        ``hint`` = (offset, seq[, inode]) of a known record boundary, to scan only the tail."""
        with self._locked() as fd:
            size = os.fstat(fd).st_size
            if size < len(MAGIC):  # new (or torn while being created)
                os.ftruncate(fd, 0)
                os.pwrite(fd, MAGIC, 0)
                hint, size = (0, 0), len(MAGIC)
            offset, seq, ino = (*hint, 0)[:3]
            if offset > size:
                offset, seq = 0, 0
            end, last, torn = self.last(offset, seq, ino)
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
            this = os.fstat(fd).st_ino
        rec = _decode(self.path, seq, end, payload)
        rec.end, rec.ino = end + len(record), this
        return rec

    # -- truncating -------------------------------------------------------------------------------

    def truncate(self, upto: int) -> dict[str, int] | None:
        """Drop the records up to seq ``upto`` — folded into a compacted bundle that every
        reader serves — keeping the later ones byte for byte behind a header with base
        ``upto``. Atomic (temp file, fsync, rename, fsync the folder) and under the append
        lock. Returns what it dropped; None when the log already starts after ``upto``."""
        with self._locked() as fd:
            meta: dict[str, int] = {}
            cut = end = size = os.fstat(fd).st_size
            last = None
            for rec in self._scan(0, decode=False, meta=meta):
                if rec.seq > upto and cut == size:
                    cut = rec.offset
                end, last = rec.end, rec.seq
            base = meta.get("base", 0)
            last = base if last is None else last
            if upto <= base:
                return None
            if upto > last:
                raise ItemLogError(
                    f"item log {self.path}: cannot drop the records up to {upto}, the log ends "
                    f"at record {last} (a bundle compacted from another log?)"
                )
            if "torn" in meta:
                end = meta["torn"]  # an unacknowledged tail: not carried over
            cut = min(cut, end)
            for stray in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stray.unlink(missing_ok=True)  # left by a truncation a crash interrupted

            def write(fh) -> None:
                fh.write(MAGIC2 + BASE.pack(upto, zlib.crc32(struct.pack("<Q", upto))))
                for pos in range(cut, end, CHUNK):
                    fh.write(os.pread(fd, min(CHUNK, end - pos), pos))

            atomic_write(self.path, write)
        after = len(MAGIC2) + BASE.size + end - cut
        log.info(
            "item log %s: dropped records %d..%d (%d bytes), %d bytes left",
            self.path, base + 1, upto, size - after, after,
        )  # fmt: skip
        return {"base": upto, "records_dropped": upto - base, "bytes_before": size,
                "bytes_after": after}  # fmt: skip
