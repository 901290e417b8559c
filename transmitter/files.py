"""The transmitter's file lane: watched OT folders, streamed through the diode.

The pipeline, stage by stage, with the queue between each pair::

    Watcher per [[files]]  --ready paths-->  FileLane.run          LaneQueue
    (inotify via watchfiles,  (FIFO, one     (hash, manifest,  --> (tag values' SendQueue
     else a scan every         entry per      chunks read from      first; the file lane's
     poll_s; "unchanged" or    path)          disk one at a time,    blocks behind them)
     "renamed" rule)                          signed + FEC in a          |
                                              thread, admitted at        v
                                              share x rate)          PacedSender --> UDP

A file is never held whole in memory: it is hashed in 1 MiB reads, then read
one chunk (one block, about 45 KB) at a time. The lane is a stream of its
own (``[file_lane] stream_id`` and key), so its blocks carry their own
numbers: a lost chunk is an exact gap of that stream, and a file block never
holds a tag value back at the receiver. The pacer always takes tag datagrams
first (``LaneQueue``); the lane admits its blocks at ``share`` of the
link's ``rate_mbps``, at most at its own ``rate_mbps`` (``LanePacer``: the
receiver can never ask it to slow down, so the lane must not outrun what the
receiver host drains), and holds at most ``queue_blocks`` of them queued, so a tag
value waits behind at most one datagram however large the file.

After a file is sent (``repeat`` times) it is kept, moved to ``sent/`` or
deleted. A kept file is not sent again while its size and mtime stay the same
(in memory: a restarted transmitter sends the folder's files again, and the
receiver does not overwrite them). A transmitter restarted mid-file sends the
file again from the start; the file id is the same, so the receiver merges.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from diode.config.files import RECEIVER_FILE_MBPS, FilesWatch
from diode.config.files import FileLane as FileLaneConfig
from diode.config.link import IPV4_UDP_OVERHEAD
from diode.config.tx import TxLink
from diode.encoder import EncodedBlock, Encoder, SendQueue
from diode.files import (
    MANIFEST_EVERY,
    FileChunk,
    FileHoles,
    FileManifest,
    chunk_size_for,
    hash_zeros,
)
from diode.keys import SigningKey
from diode.records import Heartbeat, Record

log = structlog.get_logger("diode.tx.files")

HASH_READ = 1 << 20
SENT_DIR = "sent"
RETRY_S = 5.0
FINAL_REPEATS = 3  # heartbeats that carry the last final manifest again
# A file goes round the carousel at most this often: a carousel of a few small files
# does not keep the lane (and both daemons' CPU) busy sending them back to back.
CAROUSEL_GAP_S = 10.0


class LaneQueue(SendQueue):
    """The tag values' SendQueue, with the file lane's queue served only when it is empty.

    The pacer sees one queue: tag datagrams always go first, so a file flowing
    adds at most one datagram's time to a tag value's latency. The file lane's
    own rate (its share) is enforced where its blocks are admitted.
    """

    def __init__(
        self,
        *,
        capacity: int,
        interleave: int,
        file_capacity: int,
        limit: int | None = None,
        resume: int | None = None,
    ) -> None:
        super().__init__(capacity=capacity, interleave=interleave, limit=limit, resume=resume)
        # Not interleaved: file blocks complete in sequence order, so at a slow lane a
        # small block (a heartbeat) never completes before a large one sent with it.
        # A chunk's block has 24 repair symbols of its own against a burst.
        self.files = SendQueue(capacity=file_capacity, interleave=1)

    def __len__(self) -> int:
        return super().__len__() + len(self.files)

    def pop(self) -> bytes | None:
        datagram = super().pop()
        return datagram if datagram is not None else self.files.pop()

    def clear(self) -> int:
        return super().clear() + self.files.clear()


class LanePacer:
    """The file lane's rate, sans I/O: when the next block may be queued, given ``now``.

    The rate counts whole datagrams with their IPv4 and UDP headers, as the
    link's pacer does. A late wake-up (a busy host oversleeps) is made up for,
    up to ``credit_blocks`` blocks' worth: the lane's rate is a rate, not a
    sleep after every block. So over any window of T seconds the lane queues
    at most ``bytes_per_s`` x T plus ``credit_blocks`` + 1 blocks.
    """

    def __init__(self, *, bytes_per_s: float, wire: int, credit_blocks: int) -> None:
        self.bytes_per_s = bytes_per_s
        self.wire = wire
        self.credit_blocks = credit_blocks
        self._next_at = float("-inf")

    def interval(self, datagrams: int) -> float:
        """A block's time at the lane's rate."""
        return datagrams * self.wire / self.bytes_per_s

    def delay(self, now: float) -> float:
        """How long until the next block may go (0: now)."""
        return max(self._next_at - now, 0.0)

    def admit(self, now: float, datagrams: int) -> None:
        """A block of ``datagrams`` was queued at ``now``."""
        interval = self.interval(datagrams)
        self._next_at = max(self._next_at, now - self.credit_blocks * interval) + interval


def rate_warning(lane: FileLaneConfig, link_rate_mbps: float) -> dict[str, Any] | None:
    """What to say at start when the lane's rate passes what one receiver core drained here.

    A one-way link cannot tell the transmitter that the receiver falls behind:
    its file socket overflows, chunks are lost beyond the FEC and every file
    ends ``incomplete``. So the operator who raised the ceiling hears it once.
    """
    mbps = lane.wire_mbps(link_rate_mbps)
    if mbps <= RECEIVER_FILE_MBPS:
        return None
    return {
        "wire_mbps": mbps,
        "receiver_core_mbps": RECEIVER_FILE_MBPS,
        "fix": "keep [file_lane] rate_mbps within what `diode bench files` shows the receiver "
        "host drains; watch diode_rx_file_kernel_drops_total there",
    }


@dataclass(slots=True, kw_only=True)
class _OnCarousel:
    """A file sent whole, sent again while its carousel window lasts."""

    watch: FilesWatch
    path: Path
    manifest: FileManifest
    until: float  # monotonic: when it leaves the carousel
    last_sent: float
    resume_at: int = 0  # the chunk a round cut short by a new file goes on from


@dataclass(frozen=True, slots=True)
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time the file was first seen with this size and mtime


class Watcher:
    """Finds the finished files of one watched folder (inotify when available, else polling)."""

    def __init__(self, watch: FilesWatch, ready: Callable[[FilesWatch, Path], None]) -> None:
        self.watch = watch
        self._ready = ready
        self._seen: dict[Path, _Seen] = {}
        self._sent: dict[Path, tuple[int, int]] = {}
        self._busy: set[Path] = set()
        self._wake = asyncio.Event()
        self.inotify = False

    def done(self, path: Path, size: int, mtime_ns: int, *, kept: bool) -> None:
        """The lane finished with ``path``: forget it, or remember it if it was kept."""
        self._busy.discard(path)
        self._seen.pop(path, None)
        if kept:
            self._sent[path] = (size, mtime_ns)

    def retry(self, path: Path) -> None:
        """The lane could not send ``path`` now (changing, unreadable): look at it again later."""
        self._busy.discard(path)
        try:
            st = path.stat()
        except OSError:
            self._seen.pop(path, None)
            return
        # Not before RETRY_S more (plus the quiet time), so an unreadable file does not spin.
        self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, time.monotonic() + RETRY_S)

    def _candidates(self) -> list[Path]:
        watch = self.watch
        root = watch.directory
        found: list[Path] = []
        try:
            if watch.recursive:
                walker = os.walk(root)
                for folder, dirs, names in walker:
                    dirs[:] = [d for d in dirs if not d.startswith(".") and d != SENT_DIR]
                    found.extend(Path(folder) / n for n in names)
            else:
                found = [p for p in root.iterdir() if p.name != SENT_DIR]
        except OSError as exc:
            log.warning("cannot list a watched folder", directory=str(root), error=str(exc))
            return []
        return [
            p
            for p in found
            if not p.name.startswith(".") and fnmatch.fnmatchcase(p.name, watch.pattern)
        ]

    def scan(self, now: float) -> float | None:
        """Hand over the files that are complete; returns when to look again (or None)."""
        watch = self.watch
        present: set[Path] = set()
        soonest: float | None = None
        for path in self._candidates():
            try:
                st = path.stat(follow_symlinks=False)
            except OSError:
                continue
            if not _is_regular(st.st_mode):
                continue
            present.add(path)
            if path in self._busy or self._sent.get(path) == (st.st_size, st.st_mtime_ns):
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                seen = _Seen(st.st_size, st.st_mtime_ns, now)
                self._seen[path] = seen
            wait = 0.0 if watch.complete_when == "renamed" else watch.unchanged_s
            if now - seen.since >= wait:
                self._busy.add(path)
                self._ready(watch, path)
            else:
                at = seen.since + wait
                soonest = at if soonest is None else min(soonest, at)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for gone in set(self._sent) - present:
            del self._sent[gone]
        return soonest

    async def _inotify(self) -> None:
        try:
            import watchfiles  # noqa: PLC0415  (optional at run time: polling works without)
        except ImportError:
            return
        try:
            async for _changes in watchfiles.awatch(
                self.watch.directory,
                recursive=self.watch.recursive,
                debounce=50,
                step=20,
                force_polling=False,
                ignore_permission_denied=True,
            ):
                self._wake.set()
        except (OSError, RuntimeError) as exc:
            log.warning(
                "inotify unavailable: polling", directory=str(self.watch.directory), error=str(exc)
            )
            self.inotify = False

    async def run(self) -> None:
        self.watch.directory.mkdir(parents=True, exist_ok=True)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._inotify())
            self.inotify = True
            while True:
                again = self.scan(time.monotonic())
                # inotify wakes us on a change; the poll period still bounds the wait,
                # so a kernel without inotify (or a missed event) only costs latency.
                timeout = self.watch.poll_s
                if again is not None:
                    timeout = min(timeout, max(again - time.monotonic(), 0.0) + 0.01)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


class FileLane:
    """Streams ready files onto the file lane at its rate (its share, at most rate_mbps)."""

    def __init__(
        self,
        lane: FileLaneConfig,
        watches: list[FilesWatch],
        *,
        link: TxLink,
        key: SigningKey,
        epoch: int,
        queue: SendQueue,
        notify: Callable[[], None],
        psk: bytes | None = None,
    ) -> None:
        self.lane = lane
        if lane.fec is not None:
            link = link.model_copy(update={"fec": lane.fec})
        self.encoder = Encoder(link=link, key=key, stream_id=lane.stream_id, epoch=epoch, psk=psk)
        self.chunk_size = chunk_size_for(self.encoder.capacity)
        # Chunks are signed and FEC'd in worker threads (Ed25519 releases the GIL; ISA-L's
        # encode through pyeclib does not, but costs a tenth of zfec's), heartbeats on the
        # event loop: one encoder, so one lock.
        self._encoding = threading.Lock()
        self._queue = queue
        self._notify = notify
        self.pacer = LanePacer(
            bytes_per_s=lane.wire_mbps(link.rate_mbps) * 1e6 / 8,
            wire=link.datagram_size + IPV4_UDP_OVERHEAD,
            credit_blocks=lane.queue_blocks,
        )
        warning = rate_warning(lane, link.rate_mbps)
        if warning is None:
            log.info("file lane", wire_mbps=lane.wire_mbps(link.rate_mbps))
        else:
            log.warning("the file lane may outrun the receiver", **warning)
        self.watchers = [Watcher(w, self._enqueue) for w in watches]
        self._by_watch = {id(w.watch): w for w in self.watchers}
        self._jobs: deque[tuple[FilesWatch, Path]] = deque()
        self._carousel: deque[_OnCarousel] = deque()
        self._final: FileManifest | None = None
        self._final_repeats = 0
        self._sending = False  # a file is on its way: its final manifest is not repeated
        self._heartbeat_due = False
        self._in_chunks = False
        self._job_ready = asyncio.Event()
        self.counters = {
            "files_sent": 0,
            "files_failed": 0,
            "files_changed": 0,
            "file_bytes_sent": 0,
            "file_chunks_sent": 0,
            "file_chunks_holes": 0,
            "file_blocks": 0,
            "files_carousel_rounds": 0,
            "files_carousel": 0,
        }

    # -- jobs ---------------------------------------------------------------------

    def _enqueue(self, watch: FilesWatch, path: Path) -> None:
        self._jobs.append((watch, path))
        self._job_ready.set()

    def send_now(self, watch: FilesWatch, path: Path) -> None:
        """Queue one file at once (tests, and what the watchers call)."""
        self._enqueue(watch, path)

    # -- framing and admission -------------------------------------------------------

    def _encode(self, record: Record) -> list[EncodedBlock]:
        """Sign and FEC one record as its own block (runs in a worker thread)."""
        with self._encoding:
            self.encoder.add(record, time.monotonic())
            self.encoder.flush()
            return self.encoder.take()

    def _read_and_encode(
        self,
        fd: int,
        manifest: FileManifest,
        item: tuple[int, int],
        digest: hashlib._Hash | None,
    ) -> list[EncodedBlock]:
        """One chunk read and encoded, or a run of chunks in a hole as one FileHoles."""
        index, holes = item
        if holes:
            if digest is not None:
                end = min(manifest.size, (index + holes) * manifest.chunk_size)
                hash_zeros(digest, end - index * manifest.chunk_size)
            return self._encode(FileHoles(file_id=manifest.file_id, first=index, count=holes))
        length = manifest.chunk_length(index)
        data = os.pread(fd, length, index * manifest.chunk_size)
        if len(data) != length:
            raise OSError(f"short read at chunk {index}: the file shrank")
        if digest is not None:
            digest.update(data)
        return self._encode(FileChunk(file_id=manifest.file_id, index=index, data=data))

    async def _admit(self, blocks: list[EncodedBlock]) -> None:
        """Queue blocks for the pacer at the lane's rate, never more than queue_blocks at once."""
        pacer = self.pacer
        for block in blocks:
            size = len(block.datagrams)
            limit = self.lane.queue_blocks * size
            while True:
                now = time.monotonic()
                wait = pacer.delay(now)
                if wait <= 0 and len(self._queue) + size <= max(limit, size):
                    break
                # Tag values took the link, or the lane's rate is used up: wait a while.
                await asyncio.sleep(max(wait, pacer.interval(size) / 4, 0.0005))
            pacer.admit(time.monotonic(), size)
            self._queue.push(block)
            self.counters["file_blocks"] += 1
            self._notify()

    async def _send_record(self, record: Record) -> None:
        await self._admit(await asyncio.to_thread(self._encode, record))

    def heartbeat(self) -> None:
        """The lane's own heartbeat: the receiver sees the lane up, and its tail losses early.

        The last file's final manifest rides along with the next few heartbeats:
        if the one after its last chunk was lost (a lost tail is invisible until
        something follows), the receiver still learns that the round ended and
        reports what is missing, instead of waiting for the expiry.
        """
        if self._in_chunks:
            # In line with the chunks (see _send_chunks): a heartbeat pushed past blocks
            # still waiting for admission could make the receiver give them up as late.
            self._heartbeat_due = True
            return
        records: list[Record] = [Heartbeat(ts_ns=time.time_ns(), counters=dict(self.counters))]
        if self._final is not None and self._final_repeats > 0 and not self._sending:
            records.append(self._final)
            self._final_repeats -= 1
        with self._encoding:
            now = time.monotonic()
            for record in records:
                self.encoder.add(record, now)
            self.encoder.flush()
            blocks = self.encoder.take()
        for block in blocks:
            self._queue.push(block)
        self._notify()

    # -- one file -----------------------------------------------------------------------

    async def send_file(self, watch: FilesWatch, path: Path) -> FileManifest | None:
        """Send ``path`` ``repeat`` times; its manifest if it went out unchanged."""
        name = path.relative_to(watch.directory).as_posix()
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            log.warning("cannot open a file to send", path=str(path), error=str(exc))
            self.counters["files_failed"] += 1
            return None
        try:
            before = os.fstat(fd)
            sha = await asyncio.to_thread(_hash_fd, fd)
            manifest = FileManifest.of(
                name=name,
                size=before.st_size,
                mtime_ns=before.st_mtime_ns,
                sha256=sha,
                chunk_size=self.chunk_size,
            )
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                self.counters["files_changed"] += 1
                return None
            started = time.monotonic()
            if self._final is not None and self._final_repeats > 0:
                # The previous file's end once more (its heartbeat repeats are skipped
                # while files follow each other).
                await self._send_record(self._final)
                self._final_repeats = 0
            for round_ in range(watch.repeat):
                digest = hashlib.sha256()
                await self._round(fd, manifest, digest=digest)
                if digest.digest() != manifest.sha256:
                    # Written to while being sent: the receiver's SHA-256 check refuses
                    # what it got; the file is sent again once it is quiet.
                    log.warning("file changed while being sent", path=str(path), round=round_)
                    self.counters["files_changed"] += 1
                    return None
            log.info(
                "file sent",
                name=name,
                size=manifest.size,
                repeat=watch.repeat,
                duration_s=round(time.monotonic() - started, 3),
            )
        except OSError as exc:
            log.warning("cannot read a file to send", path=str(path), error=str(exc))
            self.counters["files_failed"] += 1
            return None
        else:
            self.counters["files_sent"] += 1
            return manifest
        finally:
            os.close(fd)

    async def _round(
        self,
        fd: int,
        manifest: FileManifest,
        *,
        digest: Any = None,
        start: int = 0,
        stop_if: Callable[[], bool] | None = None,
    ) -> int:
        """The manifest, the chunks from ``start``, the final manifest; where it stopped."""
        await self._send_record(manifest)
        stopped = await self._send_chunks(fd, manifest, digest, start=start, stop_if=stop_if)
        final = FileManifest(
            file_id=manifest.file_id,
            name=manifest.name,
            size=manifest.size,
            mtime_ns=manifest.mtime_ns,
            sha256=manifest.sha256,
            chunk_size=manifest.chunk_size,
            final=True,
        )
        await self._send_record(final)
        self._final, self._final_repeats = final, FINAL_REPEATS
        return stopped

    async def _send_chunks(
        self,
        fd: int,
        manifest: FileManifest,
        digest: Any,
        *,
        start: int = 0,
        stop_if: Callable[[], bool] | None = None,
    ) -> int:
        """Every chunk in order; the next one is read and encoded while this one waits.

        Blocks are admitted in the order their sequence numbers were given: a
        manifest or heartbeat due is encoded after the chunk in hand and before
        the next chunk's encoding starts. A block overtaken by a later one for
        longer than the receiver's reorder timeout is declared lost there (at a
        slow lane, one block takes longer than that to send).

        ``stop_if`` is asked after each chunk (the carousel gives way to a new file);
        returns the index of the chunk that would have been next.
        """

        items = await asyncio.to_thread(_plan, fd, manifest, start)

        def encode(item: tuple[int, int]) -> asyncio.Future[list[EncodedBlock]]:
            return asyncio.ensure_future(
                asyncio.to_thread(self._read_and_encode, fd, manifest, item, digest)
            )

        ahead = encode(items[0]) if items else None
        self._in_chunks = True
        try:
            for n, (index, holes) in enumerate(items):
                assert ahead is not None
                blocks = await ahead
                ahead = None
                after = index + max(holes, 1)  # the chunk that comes next
                extra: list[Record] = []
                if (n + 1) % MANIFEST_EVERY == 0 and after < manifest.chunks:
                    extra.append(manifest)
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    extra.append(Heartbeat(ts_ns=time.time_ns(), counters=dict(self.counters)))
                for record in extra:
                    blocks += await asyncio.to_thread(self._encode, record)
                if n + 1 < len(items):
                    ahead = encode(items[n + 1])
                await self._admit(blocks)
                if holes:
                    self.counters["file_chunks_holes"] += holes
                else:
                    self.counters["file_chunks_sent"] += 1
                    self.counters["file_bytes_sent"] += manifest.chunk_length(index)
                if stop_if is not None and after < manifest.chunks and stop_if():
                    return after
            return manifest.chunks
        finally:
            self._in_chunks = False
            if ahead is not None:
                # Not cancelled: the worker thread must finish its read before fd is closed.
                with contextlib.suppress(Exception):
                    await ahead
            if self._heartbeat_due:
                self._heartbeat_due = False
                self.heartbeat()

    def _after_send(self, watch: FilesWatch, path: Path) -> None:
        try:
            if watch.after_send == "delete":
                path.unlink()
            elif watch.after_send == "move":
                target = watch.directory / SENT_DIR / path.relative_to(watch.directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    target = target.with_name(f"{target.name}.{time.time_ns()}")
                path.replace(target)
        except OSError as exc:
            log.warning(
                "after-send action failed", path=str(path), action=watch.after_send, error=str(exc)
            )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for watcher in self.watchers:
                group.create_task(watcher.run())
            while True:
                # New files first; the carousel only when none waits (see _carousel_round).
                if self._jobs:
                    await self._send_new(*self._jobs.popleft())
                    continue
                entry, wake_at = self._carousel_next(time.monotonic())
                if entry is not None:
                    await self._carousel_round(entry)
                    continue
                self._job_ready.clear()
                timeout = None if wake_at is None else max(wake_at - time.monotonic(), 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._job_ready.wait(), timeout)

    async def _send_new(self, watch: FilesWatch, path: Path) -> None:
        owner = self._by_watch.get(id(watch))
        try:
            st = os.stat(path)
        except OSError:
            if owner:
                owner.retry(path)
            return
        self._sending = True
        try:
            manifest = await self.send_file(watch, path)
        finally:
            self._sending = False
        if manifest is None:
            if owner:
                owner.retry(path)
            return
        if watch.carousel_s > 0:
            # Kept where it is while on the carousel; after_send when it leaves.
            now = time.monotonic()
            self._carousel.append(
                _OnCarousel(
                    watch=watch,
                    path=path,
                    manifest=manifest,
                    until=now + watch.carousel_s,
                    last_sent=now,
                )
            )
            self.counters["files_carousel"] = len(self._carousel)
            if owner:
                owner.done(path, st.st_size, st.st_mtime_ns, kept=True)
            return
        self._after_send(watch, path)
        if owner:
            owner.done(path, st.st_size, st.st_mtime_ns, kept=watch.after_send == "keep")

    # -- the carousel -----------------------------------------------------------------

    def _carousel_next(self, now: float) -> tuple[_OnCarousel | None, float | None]:
        """The carousel file due now (or None), and when to look again.

        Files whose window is over leave it (their after_send happens then). A
        round cut short by a new file goes on first; otherwise the file sent
        longest ago, if that was at least CAROUSEL_GAP_S ago.
        """
        for entry in [e for e in self._carousel if e.until <= now]:
            self._leave_carousel(entry)
        if not self._carousel:
            return None, None
        for entry in self._carousel:
            if entry.resume_at:
                return entry, None
        oldest = min(self._carousel, key=lambda e: e.last_sent)
        due = oldest.last_sent + CAROUSEL_GAP_S
        if due <= now:
            return oldest, None
        return None, min(due, *(e.until for e in self._carousel))

    def _off_carousel(self, entry: _OnCarousel) -> None:
        self._carousel.remove(entry)
        self.counters["files_carousel"] = len(self._carousel)

    def _leave_carousel(self, entry: _OnCarousel) -> None:
        """Its window is over: off the carousel, and after_send now."""
        self._off_carousel(entry)
        if entry.watch.after_send != "keep":
            self._after_send(entry.watch, entry.path)

    async def _carousel_round(self, entry: _OnCarousel) -> None:
        """One more round of a carousel file, cut short when a new file waits.

        The file must still be the one that was sent (size and mtime): a changed
        file leaves the carousel, and its watcher sends it as a new one.
        """
        manifest = entry.manifest
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            self._off_carousel(entry)
            return
        try:
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (manifest.size, manifest.mtime_ns):
                self._off_carousel(entry)
                return
            stopped = await self._round(
                fd, manifest, start=entry.resume_at, stop_if=lambda: bool(self._jobs)
            )
        except OSError as exc:
            log.warning("carousel: cannot read a file", path=str(entry.path), error=str(exc))
            self._off_carousel(entry)
            return
        finally:
            os.close(fd)
        entry.resume_at = stopped if stopped < manifest.chunks else 0
        if not entry.resume_at:
            entry.last_sent = time.monotonic()
            self.counters["files_carousel_rounds"] += 1


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of ``fd`` that hold data; the rest are holes.

    SEEK_DATA and SEEK_HOLE (Linux 3.1+, ext4, xfs, btrfs, tmpfs); a file system
    without them reports the whole file as data.
    """
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(0, size)]
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, seek_data)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset: a hole to the end
                    break
                raise
            end = min(os.lseek(fd, start, seek_hole), size)
            extents.append((start, end))
            offset = end
    except OSError:
        return [(0, size)]
    return extents


def _plan(fd: int, manifest: FileManifest, start: int) -> list[tuple[int, int]]:
    """What a round sends from chunk ``start``: (index, 0) for a chunk with data, and
    (first, count) for a run of chunks that lie wholly in holes of the file."""
    extents = _data_extents(fd, manifest.size)
    size, chunk = manifest.size, manifest.chunk_size
    items: list[tuple[int, int]] = []
    j = 0
    for index in range(start, manifest.chunks):
        low, high = index * chunk, min((index + 1) * chunk, size)
        while j < len(extents) and extents[j][1] <= low:
            j += 1
        if j < len(extents) and extents[j][0] < high:
            items.append((index, 0))
        elif items and items[-1][1] and items[-1][0] + items[-1][1] == index:
            items[-1] = (items[-1][0], items[-1][1] + 1)
        else:
            items.append((index, 1))
    return items


def _hash_fd(fd: int) -> bytes:
    digest = hashlib.sha256()
    offset = 0
    while True:
        data = os.pread(fd, HASH_READ, offset)
        if not data:
            return digest.digest()
        digest.update(data)
        offset += len(data)


def place_file(
    source: Path, watch: FilesWatch, name: str | None = None, *, replace: bool = False
) -> Path:
    """Put a copy of ``source`` into ``watch``'s folder the way the watcher expects a finished file.

    The copy is streamed (never whole in memory) into a hidden temporary name in
    the watched folder, which the watcher ignores, with the source's mtime, then
    fsynced and renamed into place: the file appears complete under either
    ``complete_when`` rule. This is what ``diode send-file`` does; the running
    transmitter sends the file from there like any other.
    """
    final = watch.directory / (name or source.name)
    if final.parent != watch.directory and not watch.recursive:
        raise ValueError(f"{final} is in a sub-folder of a folder watched without recursive")
    if final.name.startswith(".") or not fnmatch.fnmatchcase(final.name, watch.pattern):
        raise ValueError(
            f"{final.name!r} does not match the folder's pattern {watch.pattern!r} "
            "(or is hidden): the transmitter would never send it"
        )
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists (waiting to be sent, or kept after sending)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.diode-send")
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            while data := src.read(HASH_READ):
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        st = source.stat()
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        tmp.replace(final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return final
