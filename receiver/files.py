"""The receiver's file lanes: authentic chunks into verified files, announced on MQTT.

The pipeline, stage by stage::

    Decoder (authentic,   --Delivered-->  FileReceiver.handle       worker thread
     in order, gaps)       (manifest,      (sanitise the name, write  --> (SHA-256 of the part,
                            chunks)         each chunk at its offset     fsync, mtime, atomic
                                            of a sparse part file;       rename, no overwrite)
                                            in-order chunks to the
                                            worker's running SHA-256)
                                                                               |
                                    MQTT {prefix}/{site}/$files  <--  announce (JSON) + counters

Nothing is written before the decoder verified the block's signature, so a
forged manifest or chunk never reaches this module. A file is assembled in
``.diode-part-<file id>`` inside its target folder (same file system, so the
rename is atomic), with a chunk map beside it (``.map``) so a restarted
receiver continues where it stopped. Chunks that arrive in order (a lane
without loss) go on to the SHA-256 of the file as they are written, in one
worker thread (hashlib lets go of the GIL: the event loop only hands the
bytes over); at the first chunk out of order the running hash stops there.
When every chunk is there, the same worker hashes what the running hash has
not covered, reading it back from the part (a 2 GB file does not stall the
telemetry, and a whole lane without loss has nothing left to read), and only
a matching SHA-256 is renamed into place with its mtime; an existing file is
never replaced unless ``overwrite``. After the transmitter's final manifest,
a file still missing chunks is announced ``incomplete`` with the missing
runs, and kept for a repetition; after ``expire_s`` without news it is
announced ``expired`` and removed. Disk full, permissions and the like are
announced ``error`` and counted: they never stop the receiver.

Results announced: ``ok``, ``incomplete``, ``expired``, ``exists``,
``refused`` (hostile name, too large), ``error`` (an OS error),
``bad_sha256``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from diode.config.files import FilesOutput
from diode.decoder import Delivered, Event
from diode.errors import DiodeError, FrameError
from diode.files import (
    ChunkMap,
    FileChunk,
    FileHoles,
    FileManifest,
    FileNameError,
    hash_zeros,
    sanitise_name,
)
from diode.records import decode_records, encode_records

log = structlog.get_logger("diode.rx.files")

PART_PREFIX = ".diode-part-"
PART_NAME = re.compile(r"^\.diode-part-([0-9a-f]{16})$")
MAP_EVERY = 64  # chunks between two saves of the chunk map
FINISHED_MEMORY = 4096  # file ids whose fate is known: their repetitions are ignored
HASH_READ = 1 << 20
# Chunk bytes handed to the hashing worker and not hashed yet, at most: a worker that falls
# behind (a slow host) stops the running hashes, and the rest is read back at the end.
HASH_BACKLOG = 64 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

Announce = Callable[[int, dict[str, Any]], None]


@dataclass(slots=True)
class _Incoming:
    stream_id: int
    manifest: FileManifest
    target: Path
    part: Path
    fd: int
    chunks: ChunkMap
    started: float
    last_seen: float
    unsaved: int = 0
    verifying: bool = False
    reported_have: int = -1  # chunks present when "incomplete" was last announced
    # The SHA-256 of chunks [0, hashed), updated in the worker thread only; a resumed
    # file starts at 0 with its chunks already there, so it is all read back at the end.
    digest: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0


@dataclass(slots=True)
class _Lane:
    stream_id: int
    output: FilesOutput
    incoming: dict[int, _Incoming] = field(default_factory=dict)
    finished: OrderedDict[int, str] = field(default_factory=OrderedDict)


def _map_path(part: Path) -> Path:
    return part.with_name(part.name + ".map")


class FileReceiver:
    """Every file lane of the receiver. ``handle`` and ``tick`` are called from the event loop."""

    def __init__(self, lanes: dict[int, FilesOutput], announce: Announce) -> None:
        self.lanes = {sid: _Lane(sid, out) for sid, out in lanes.items()}
        self._announce = announce
        self.counters: dict[str, int] = {
            "files_ok": 0,
            "files_incomplete": 0,
            "files_expired": 0,
            "files_exists": 0,
            "files_refused": 0,
            "files_error": 0,
            "files_bad_sha256": 0,
            "file_bytes_written": 0,
            "file_chunks_written": 0,
            "file_chunks_holes": 0,
            "file_chunks_duplicate": 0,
            "file_chunks_orphaned": 0,
            "file_chunks_bad": 0,
            "file_repeats_ignored": 0,
            "files_resumed": 0,
        }
        self._verifying: set[asyncio.Future[str]] = set()
        # One worker, so its jobs run in order: a file's running hash, then its check.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diode-rx-files")
        # Bytes handed to the worker to hash, and bytes it hashed: each has one writer
        # (the event loop, the worker), so their difference is the backlog, exactly.
        self._to_hash = 0
        self._hashed_bytes = 0

    # -- start and stop -----------------------------------------------------------------

    def resume(self, now: float) -> None:
        """Pick up the part files a previous run left (restart mid-file); drop unusable ones."""
        for lane in self.lanes.values():
            root = lane.output.directory
            with contextlib.suppress(OSError):
                root.mkdir(parents=True, exist_ok=True)
            for folder, _dirs, names in os.walk(root):
                for name in names:
                    match = PART_NAME.match(name)
                    if match:
                        self._resume_one(lane, Path(folder) / name, int(match[1], 16), now)

    def _resume_one(self, lane: _Lane, part: Path, file_id: int, now: float) -> None:
        try:
            manifest, chunks, target = _read_map(lane, part, file_id)
            fd = os.open(part, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except (OSError, ValueError, DiodeError) as exc:
            log.warning("unusable part file removed", part=str(part), error=str(exc))
            for path in (part, _map_path(part)):
                with contextlib.suppress(OSError):
                    path.unlink()
            return
        lane.incoming[file_id] = _Incoming(
            stream_id=lane.stream_id,
            manifest=manifest,
            target=target,
            part=part,
            fd=fd,
            chunks=chunks,
            started=now,
            last_seen=now,
        )
        self.counters["files_resumed"] += 1
        log.info("file resumed", name=manifest.name, have=chunks.have, chunks=chunks.chunks)

    def close(self) -> None:
        """Save every chunk map and close the part files (shutdown)."""
        self._worker.shutdown(wait=True)
        for lane in self.lanes.values():
            for inc in lane.incoming.values():
                self._save_map(inc)
                with contextlib.suppress(OSError):
                    os.close(inc.fd)
            lane.incoming.clear()

    # -- events ---------------------------------------------------------------------------

    def handle(self, events: Sequence[Event], now: float) -> None:
        for event in events:
            if not isinstance(event, Delivered):
                continue
            lane = self.lanes.get(event.stream_id)
            if lane is None:
                continue
            for record in event.records:
                if isinstance(record, FileChunk):
                    self._chunk(lane, record, now)
                elif isinstance(record, FileManifest):
                    self._manifest(lane, record, now)
                elif isinstance(record, FileHoles):
                    self._holes(lane, record, now)

    def tick(self, now: float) -> None:
        """Expire files that have had no news for ``expire_s``."""
        for lane in self.lanes.values():
            limit = now - lane.output.expire_s
            for inc in [i for i in lane.incoming.values() if i.last_seen <= limit]:
                if inc.verifying:
                    continue
                self._give_up(lane, inc, "expired", now)

    # -- manifests ----------------------------------------------------------------------

    def _remember(self, lane: _Lane, file_id: int, result: str) -> None:
        lane.finished[file_id] = result
        lane.finished.move_to_end(file_id)
        while len(lane.finished) > FINISHED_MEMORY:
            lane.finished.popitem(last=False)

    def _manifest(self, lane: _Lane, manifest: FileManifest, now: float) -> None:
        inc = lane.incoming.get(manifest.file_id)
        if inc is not None:
            inc.last_seen = now
            # Once per round: a final manifest repeated with the heartbeats (or a round
            # that brought nothing new) does not announce the same state again.
            if (
                manifest.final
                and not inc.chunks.complete
                and not inc.verifying
                and inc.chunks.have != inc.reported_have
            ):
                inc.reported_have = inc.chunks.have
                self._save_map(inc)
                self._report(inc, "incomplete", now, missing=inc.chunks.missing())
        elif manifest.file_id not in lane.finished:
            self._start(lane, manifest, now)
        elif lane.finished[manifest.file_id] == "error":
            # An OS error is tried again in the next round (the disk may have room by
            # then), not at every manifest of this one.
            if manifest.final:
                lane.finished[manifest.file_id] = "retry"
        elif lane.finished[manifest.file_id] == "retry":
            if not manifest.final:  # a new round begins (a final is the old one's echo)
                del lane.finished[manifest.file_id]
                self._start(lane, manifest, now)
        elif not manifest.final:  # (a final one closes the round that just finished it)
            self.counters["file_repeats_ignored"] += 1

    def _start(self, lane: _Lane, manifest: FileManifest, now: float) -> None:
        """A new file: refuse it, or open its part file."""
        base = {"name": manifest.name, "size": manifest.size, "sha256": manifest.sha256.hex()}
        root = lane.output.directory
        try:
            target = root / sanitise_name(manifest.name)
        except FileNameError as exc:
            log.warning("file refused", reason=exc.reason, name=repr(manifest.name))
            self._finish_early(lane, manifest, "refused", base | {"reason": "bad_name"})
            return
        refusal = None
        if manifest.size > lane.output.max_file_mb * 1e6:
            refusal = ("refused", base | {"reason": "too_large"})
        elif target.exists() and not lane.output.overwrite:
            refusal = ("exists", base)
        if refusal is not None:
            self._finish_early(lane, manifest, *refusal)
            return
        part = target.parent / f"{PART_PREFIX}{manifest.file_id:016x}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A sub-folder that is a symbolic link could lead out of the target folder.
            inside = target.parent.resolve().is_relative_to(root.resolve())
            fd = -1 if not inside else os.open(part, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o640)
        except OSError as exc:
            self._os_error(lane, manifest, exc, base)
            return
        if fd < 0:
            self._finish_early(lane, manifest, "refused", base | {"reason": "symlink"})
            return
        inc = _Incoming(
            stream_id=lane.stream_id,
            manifest=manifest,
            target=target,
            part=part,
            fd=fd,
            chunks=ChunkMap(manifest.chunks),
            started=now,
            last_seen=now,
        )
        lane.incoming[manifest.file_id] = inc
        try:
            os.ftruncate(fd, manifest.size)  # sparse: no disk used until chunks are written
            self._save_map(inc, strict=True)
        except OSError as exc:
            self._fail(lane, inc, exc)
            return
        if inc.chunks.complete:  # an empty file
            self._verify(lane, inc)

    def _finish_early(
        self, lane: _Lane, manifest: FileManifest, result: str, fields: dict[str, Any]
    ) -> None:
        self._remember(lane, manifest.file_id, result)
        self.counters[f"files_{result}"] += 1
        self._announce(lane.stream_id, fields | {"result": result, "duration_s": 0.0})

    def _os_error(
        self, lane: _Lane, manifest: FileManifest, exc: OSError, fields: dict[str, Any]
    ) -> None:
        self._remember(lane, manifest.file_id, "error")
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        log.warning("file not written", name=manifest.name, error=code, detail=str(exc))
        self.counters["files_error"] += 1
        self._announce(
            lane.stream_id, fields | {"result": "error", "error": code, "duration_s": 0.0}
        )

    # -- chunks ---------------------------------------------------------------------

    def _chunk(self, lane: _Lane, chunk: FileChunk, now: float) -> None:
        inc = lane.incoming.get(chunk.file_id)
        if inc is None:
            if chunk.file_id in lane.finished:
                return  # a repetition of a file whose fate is known
            self.counters["file_chunks_orphaned"] += 1  # its manifest was lost or not yet seen
            return
        inc.last_seen = now
        if inc.verifying:
            return
        manifest = inc.manifest
        if chunk.index >= manifest.chunks or len(chunk.data) != manifest.chunk_length(chunk.index):
            self.counters["file_chunks_bad"] += 1  # authentic, but not of this manifest's shape
            return
        if chunk.index in inc.chunks:
            self.counters["file_chunks_duplicate"] += 1
            return
        try:
            written = _write_all(inc.fd, chunk.data, chunk.index * manifest.chunk_size)
        except OSError as exc:
            self._fail(lane, inc, exc)
            return
        inc.chunks.add(chunk.index)
        inc.unsaved += 1
        self.counters["file_chunks_written"] += 1
        self.counters["file_bytes_written"] += written
        if chunk.index == inc.hashed:
            self._hash_on(inc, chunk.data, 1)
        if inc.chunks.complete:
            self._verify(lane, inc)
        elif inc.unsaved >= MAP_EVERY:
            self._save_map(inc)

    def _holes(self, lane: _Lane, holes: FileHoles, now: float) -> None:
        """Chunks that are zeros: already so in the sparse part file, so only marked present."""
        inc = lane.incoming.get(holes.file_id)
        if inc is None or inc.verifying:
            if inc is None and holes.file_id not in lane.finished:
                self.counters["file_chunks_orphaned"] += holes.count
            return
        inc.last_seen = now
        if holes.first + holes.count > inc.manifest.chunks:
            self.counters["file_chunks_bad"] += holes.count
            return
        chunks = inc.chunks
        added = sum(chunks.add(i) for i in range(holes.first, holes.first + holes.count))
        if holes.first == inc.hashed:
            end = min(inc.manifest.size, (holes.first + holes.count) * inc.manifest.chunk_size)
            self._hash_on(inc, end - holes.first * inc.manifest.chunk_size, holes.count)
        self.counters["file_chunks_holes"] += added
        inc.unsaved += added
        if chunks.complete:
            self._verify(lane, inc)
        elif inc.unsaved >= MAP_EVERY:
            self._save_map(inc)

    def _hash_on(self, inc: _Incoming, data: bytes | int, chunks: int) -> None:
        """The running hash goes on over the next ``chunks`` chunks (``data``, or that many
        zero bytes of a hole), in the worker; unless the worker is too far behind."""
        size = data if isinstance(data, int) else len(data)
        if isinstance(data, bytes) and self._to_hash - self._hashed_bytes + size > HASH_BACKLOG:
            return  # stopped here: the check at the end reads the rest back
        try:
            self._worker.submit(self._hash_job, inc.digest, data)
        except RuntimeError:
            return  # closed (shutdown): nothing is verified any more
        if isinstance(data, bytes):
            self._to_hash += size
        inc.hashed += chunks

    def _hash_job(self, digest: Any, data: bytes | int) -> None:
        """(In the worker thread.)"""
        if isinstance(data, int):
            hash_zeros(digest, data)
        else:
            digest.update(data)
            self._hashed_bytes += len(data)

    def _save_map(self, inc: _Incoming, *, strict: bool = False) -> None:
        """The manifest and the chunk map beside the part, for a restarted receiver."""
        manifest = encode_records([inc.manifest])
        data = len(manifest).to_bytes(4, "big") + manifest + inc.chunks.to_bytes()
        path = _map_path(inc.part)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
            inc.unsaved = 0
        except OSError:
            if strict:
                raise
            # Losing the map costs only a restart's resume; the file itself goes on.

    def _fail(self, lane: _Lane, inc: _Incoming, exc: OSError) -> None:
        self._drop(lane, inc)
        manifest = inc.manifest
        self._os_error(
            lane,
            manifest,
            exc,
            {"name": manifest.name, "size": manifest.size, "sha256": manifest.sha256.hex()},
        )

    def _drop(self, lane: _Lane, inc: _Incoming) -> None:
        lane.incoming.pop(inc.manifest.file_id, None)
        with contextlib.suppress(OSError):
            os.close(inc.fd)
        for path in (inc.part, _map_path(inc.part)):
            with contextlib.suppress(OSError):
                path.unlink()

    def _give_up(self, lane: _Lane, inc: _Incoming, result: str, now: float) -> None:
        self._drop(lane, inc)
        self._report(inc, result, now, missing=inc.chunks.missing())

    def _report(
        self,
        inc: _Incoming,
        result: str,
        now: float,
        *,
        missing: list[tuple[int, int]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        manifest = inc.manifest
        self.counters[f"files_{result}"] += 1
        fields: dict[str, Any] = {
            "name": manifest.name,
            "size": manifest.size,
            "sha256": manifest.sha256.hex(),
            "duration_s": round(now - inc.started, 3),
            "result": result,
        }
        if missing is not None and result != "ok":
            chunks = inc.chunks
            fields |= {
                "chunks": chunks.chunks,
                "chunks_missing": chunks.chunks - chunks.have,
                "bytes_missing": sum(
                    manifest.chunk_length(i)
                    for first, last in chunks.missing(limit=chunks.chunks or 1)
                    for i in range(first, last + 1)
                ),
                "missing_chunks": [list(run) for run in missing],
            }
        fields |= extra or {}
        said = {k: v for k, v in fields.items() if k != "missing_chunks"}
        if result == "ok":
            log.info("file received", **said)
        else:
            log.warning("file not received", **said)
        self._announce(inc.stream_id, fields)

    # -- the end of a file ------------------------------------------------------------------

    def _verify(self, lane: _Lane, inc: _Incoming) -> None:
        """Hash, fsync and rename in a worker thread: a large file never stalls the link."""
        inc.verifying = True
        overwrite = lane.output.overwrite
        check = functools.partial(
            _verify_and_place,
            inc.fd,
            inc.part,
            inc.target,
            inc.manifest,
            overwrite=overwrite,
            digest=inc.digest,
            offset=min(inc.hashed * inc.manifest.chunk_size, inc.manifest.size),
        )
        # The same worker as the running hash: every update queued before runs first.
        future = asyncio.get_running_loop().run_in_executor(self._worker, check)
        self._verifying.add(future)

        def done(f: asyncio.Future[str]) -> None:
            self._verifying.discard(future)
            now = time.monotonic()
            try:
                result = f.result()
            except OSError as exc:
                self._fail(lane, inc, exc)
                return
            self._drop(lane, inc)
            self._remember(lane, inc.manifest.file_id, result)
            self._report(inc, result, now)

        future.add_done_callback(done)

    async def wait_idle(self) -> None:
        """Wait for the files being verified (tests, shutdown)."""
        while self._verifying:
            await asyncio.gather(*self._verifying, return_exceptions=True)


def _write_all(fd: int, data: bytes, offset: int) -> int:
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(errno.ENOSPC, "short write")
    return written


def _read_map(lane: _Lane, part: Path, file_id: int) -> tuple[FileManifest, ChunkMap, Path]:
    """What a previous run saved beside ``part``: its manifest, chunk map and target."""
    saved = _map_path(part).read_bytes()
    manifest_len = int.from_bytes(saved[:4], "big")
    manifest = decode_records(saved[4 : 4 + manifest_len], 1)[0]
    if not isinstance(manifest, FileManifest) or manifest.file_id != file_id:
        raise FrameError("not this part's manifest", reason="bad_record")
    chunks = ChunkMap(manifest.chunks, saved[4 + manifest_len :])
    target = lane.output.directory / sanitise_name(manifest.name)
    if target.parent != part.parent:
        raise FrameError("part in the wrong folder", reason="bad_record")
    return manifest, chunks, target


def _verify_and_place(
    fd: int,
    part: Path,
    target: Path,
    manifest: FileManifest,
    *,
    overwrite: bool,
    digest: Any,
    offset: int,
) -> str:
    """``ok``, ``bad_sha256`` or ``exists``; an OSError is the caller's to report.

    ``digest`` holds the SHA-256 of the part's first ``offset`` bytes (the running
    hash); the rest is read back from the part.
    """
    while offset < manifest.size:
        data = os.pread(fd, min(HASH_READ, manifest.size - offset), offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
    if digest.digest() != manifest.sha256:
        return "bad_sha256"
    os.fsync(fd)
    os.utime(part, ns=(manifest.mtime_ns, manifest.mtime_ns))
    if overwrite:
        os.replace(part, target)
    else:
        # link() never replaces: an existing file (even one that appeared meanwhile) stays.
        try:
            os.link(part, target)
        except FileExistsError:
            return "exists"
        os.unlink(part)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return "ok"
