"""Files over the diode, sans I/O: the file lane's records, names and chunk maps.

A file travels on a **file lane**: a stream of its own (its own stream id,
key, epoch, block and record numbers), framed by the same ``Encoder`` into
the same signed, FEC-protected blocks as tag values, so a lost chunk is an
exactly counted gap of that stream and never delays a tag value. Two record
kinds ride on it (numbered from 16 so the tag kinds can grow below)::

    FileManifest  [16, file_id, name, size, mtime_ns, sha256, chunk_size, final]
    FileChunk     [17, file_id, index, data]
    FileHoles     [18, file_id, first, count]

    file_id     u64   first 8 bytes of SHA-256("diode-file-v1" 0 name 0 size mtime_ns
                      chunk_size sha256): the same file is the same id in every
                      repetition and every transmitter run, so the receiver merges them
    name        str   relative POSIX path, 1..1024 UTF-8 bytes (checked by sanitise_name)
    size        u64   bytes, < 2**63
    mtime_ns    i64   the file's modification time, restored on the receiver
    sha256      bin   32 bytes, the whole file's SHA-256
    chunk_size  u32   1 .. 1 MiB; chunk i holds bytes [i*chunk_size, (i+1)*chunk_size)
    final       bool  False ahead of (and among) the chunks, True after the last one
    index       u32   < chunk_count(size, chunk_size)
    data        bin   exactly chunk_length(manifest, index) bytes (known once the
                      manifest is; checked by the receiver)
    first       u32   chunks [first, first + count) are zeros: they lie in a hole of
    count       u32   the sparse source file (count >= 1; the range is checked by the
                      receiver against the manifest)

A hole costs one small record instead of a block per chunk: a 2 GB sparse
disk image or backup crosses in the time its data takes. The receiver's part
file is sparse already (it is truncated to the file's size), so it only marks
those chunks present; the SHA-256 of the whole file, checked before the
rename, covers the zeros as it covers the data.

One chunk fills one block (the lane's encoder is flushed after each), so the
Gap of the lane's stream counts lost chunks exactly. The manifest goes first,
every ``MANIFEST_EVERY`` chunks (a receiver that starts mid-file learns the
file) and once more with ``final`` after the last chunk (the receiver then
knows what is missing without waiting for the expiry).

Decoding checks every field's type and range (``bad_record`` otherwise, like
every record); ``file_id`` must be the hash of the other manifest fields. The
receiver sanitises the name separately (:func:`sanitise_name`): a hostile
name is refused and counted, never a wire error, because it is authentic.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from diode.errors import DiodeError, FrameError

KIND_FILE_MANIFEST = 16
KIND_FILE_CHUNK = 17
KIND_FILE_HOLES = 18
FILE_KINDS = (KIND_FILE_MANIFEST, KIND_FILE_CHUNK, KIND_FILE_HOLES)

SHA256_SIZE = 32
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 16
MAX_CHUNK_SIZE = 1 << 20
MAX_FILE_SIZE = 2**63 - 1
# A chunk record's msgpack overhead at most: array(1) kind(1) id(9) index(5) bin32 header(5).
CHUNK_RECORD_OVERHEAD = 21
# The manifest is repeated this often among the chunks (about 2.9 MB at the default FEC).
MANIFEST_EVERY = 64

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_ID_FIELDS = struct.Struct(">QqI")


def file_id_of(*, name: str, size: int, mtime_ns: int, chunk_size: int, sha256: bytes) -> int:
    """The file's id: a hash of everything that makes it the same file."""
    digest = hashlib.sha256(
        b"diode-file-v1\0"
        + name.encode("utf-8")
        + b"\0"
        + _ID_FIELDS.pack(size, mtime_ns, chunk_size)
        + sha256
    ).digest()
    return int.from_bytes(digest[:8], "big")


_ZEROS = memoryview(bytes(1 << 20))


def hash_zeros(digest: Any, length: int) -> None:
    """Feed ``length`` zero bytes to ``digest`` (a hole of a sparse file), 1 MiB at a time."""
    while length > 0:
        digest.update(_ZEROS[: min(length, len(_ZEROS))])
        length -= len(_ZEROS)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_size_for(capacity: int) -> int:
    """The largest chunk whose record fits one block of ``capacity`` payload bytes."""
    return min(capacity - CHUNK_RECORD_OVERHEAD, MAX_CHUNK_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileManifest:
    """What a file is: its relative name, size, mtime and SHA-256, and how it is cut."""

    file_id: int
    name: str
    size: int
    mtime_ns: int
    sha256: bytes
    chunk_size: int
    final: bool = False

    @classmethod
    def of(
        cls, *, name: str, size: int, mtime_ns: int, sha256: bytes, chunk_size: int
    ) -> FileManifest:
        """A manifest with its id computed (the transmitter's way to make one)."""
        return cls(
            file_id=file_id_of(
                name=name, size=size, mtime_ns=mtime_ns, chunk_size=chunk_size, sha256=sha256
            ),
            name=name,
            size=size,
            mtime_ns=mtime_ns,
            sha256=sha256,
            chunk_size=chunk_size,
        )

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk ``index`` holds (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileChunk:
    """Bytes [index * chunk_size, ...) of the file ``file_id``."""

    file_id: int
    index: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class FileHoles:
    """Chunks [first, first + count) of the file ``file_id`` are all zeros (a hole)."""

    file_id: int
    first: int
    count: int


FileRecord = FileManifest | FileChunk | FileHoles


def file_to_list(record: FileRecord) -> list[Any]:
    if isinstance(record, FileManifest):
        return [
            KIND_FILE_MANIFEST,
            record.file_id,
            record.name,
            record.size,
            record.mtime_ns,
            record.sha256,
            record.chunk_size,
            record.final,
        ]
    if isinstance(record, FileHoles):
        return [KIND_FILE_HOLES, record.file_id, record.first, record.count]
    return [KIND_FILE_CHUNK, record.file_id, record.index, record.data]


def _bad(what: str) -> FrameError:
    return FrameError(f"file record field {what} invalid", reason="bad_record")


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(what)
    return value


def file_from_list(kind: int, rest: list[Any]) -> FileRecord:
    """Decode the fields after the kind; every type and bound checked (FrameError)."""
    if kind == KIND_FILE_MANIFEST and len(rest) == 7:
        file_id, name, size, mtime_ns, sha256, chunk_size, final = rest
        if type(name) is not str or not 0 < len(name.encode("utf-8", "surrogatepass")) <= (
            MAX_NAME_BYTES
        ):
            raise _bad("name")
        if type(sha256) is not bytes or len(sha256) != SHA256_SIZE:
            raise _bad("sha256")
        if type(final) is not bool:
            raise _bad("final")
        manifest = FileManifest(
            file_id=_int(file_id, 0, _UINT64_MAX, "file_id"),
            name=name,
            size=_int(size, 0, MAX_FILE_SIZE, "size"),
            mtime_ns=_int(mtime_ns, _INT64_MIN, _INT64_MAX, "mtime_ns"),
            sha256=sha256,
            chunk_size=_int(chunk_size, 1, MAX_CHUNK_SIZE, "chunk_size"),
            final=final,
        )
        if manifest.chunks > _UINT32_MAX + 1:
            raise _bad("size")
        try:
            expected = file_id_of(
                name=name,
                size=manifest.size,
                mtime_ns=manifest.mtime_ns,
                chunk_size=manifest.chunk_size,
                sha256=sha256,
            )
        except UnicodeEncodeError:  # a lone surrogate cannot be a file name
            raise _bad("name") from None
        if expected != manifest.file_id:
            raise _bad("file_id")
        return manifest
    if kind == KIND_FILE_CHUNK and len(rest) == 3:
        file_id, index, data = rest
        if type(data) is not bytes or not 0 < len(data) <= MAX_CHUNK_SIZE:
            raise _bad("data")
        return FileChunk(
            file_id=_int(file_id, 0, _UINT64_MAX, "file_id"),
            index=_int(index, 0, _UINT32_MAX, "index"),
            data=data,
        )
    if kind == KIND_FILE_HOLES and len(rest) == 3:
        file_id, first, count = rest
        return FileHoles(
            file_id=_int(file_id, 0, _UINT64_MAX, "file_id"),
            first=_int(first, 0, _UINT32_MAX, "first"),
            count=_int(count, 1, _UINT32_MAX + 1, "count"),
        )
    raise FrameError("file record of an unknown shape", reason="bad_record")


# -- names ----------------------------------------------------------------------


class FileNameError(DiodeError):
    """A file name the receiver refuses to write (authentic, but hostile or unusable)."""


_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
    | {f"COM{c}" for c in "¹²³"}
    | {f"LPT{c}" for c in "¹²³"}
)
# Refused anywhere in a name: path separators of other systems and what Windows
# (a likely consumer of the IT-side share) cannot store.
_FORBIDDEN = frozenset('\\:*?"<>|')
# Bidirectional overrides make a name read differently from what it is.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _refuse(name: str, why: str) -> FileNameError:
    return FileNameError(f"file name {name!r} refused: {why}", reason="bad_name")


def sanitise_name(name: str) -> PurePosixPath:
    """The relative path to write ``name`` at, or FileNameError (reason ``bad_name``).

    Refused: empty, absolute, ``.``/``..``/empty components, components starting
    with a dot (hidden files, and the receiver's own ``.diode-part`` files),
    control and bidi characters, ``\\ : * ? " < > |``, trailing dots or spaces,
    Windows device names (``CON``, ``nul.txt``, ``COM1``...), more than 16
    levels, components over 255 bytes or a name over 1024 bytes.
    """
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _refuse(name, "empty or too long")
    if name.startswith("/"):
        raise _refuse(name, "absolute")
    for char in name:
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") or char in _BIDI or char in _FORBIDDEN:
            raise _refuse(name, f"character U+{ord(char):04X}")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise _refuse(name, "too deep")
    for part in parts:
        if not part or part in (".", ".."):
            raise _refuse(name, "empty, . or .. component")
        if part.startswith("."):
            raise _refuse(name, "hidden component")
        if part.endswith((".", " ")):
            raise _refuse(name, "component ends with a dot or a space")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise _refuse(name, "component too long")
        if part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
            raise _refuse(name, "device name")
    return PurePosixPath(*parts)


# -- which chunks arrived ---------------------------------------------------------


class ChunkMap:
    """A bitmap of the chunks of one file that are on disk."""

    def __init__(self, chunks: int, bits: bytes | None = None) -> None:
        self.chunks = chunks
        size = (chunks + 7) // 8
        if bits is not None and len(bits) != size:
            raise ValueError("chunk map of the wrong size")
        self._bits = bytearray(bits) if bits is not None else bytearray(size)
        self.have = sum(bin(b).count("1") for b in self._bits)

    def __contains__(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> bool:
        """Mark ``index`` present; False if it already was."""
        if index in self:
            return False
        self._bits[index >> 3] |= 1 << (index & 7)
        self.have += 1
        return True

    @property
    def complete(self) -> bool:
        return self.have == self.chunks

    def missing(self, limit: int = 20) -> list[tuple[int, int]]:
        """The first ``limit`` runs of missing chunks, as inclusive (first, last)."""
        runs: list[tuple[int, int]] = []
        start: int | None = None
        for index in range(self.chunks):
            if index in self:
                if start is not None:
                    runs.append((start, index - 1))
                    start = None
                    if len(runs) >= limit:
                        return runs
            elif start is None:
                start = index
        if start is not None:
            runs.append((start, self.chunks - 1))
        return runs[:limit]

    def to_bytes(self) -> bytes:
        return bytes(self._bits)
