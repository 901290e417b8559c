"""The one-way UDP sender: paced on a monotonic clock, deaf by construction.

The socket never listens and is never read. Because a UDP socket that has
sent gets a local port the kernel could queue datagrams to, it is made deaf
three ways: a socket filter (classic BPF ``ret #0``) drops every incoming
datagram before it is queued, the receive half is shut down, and the buffer
is the smallest the kernel allows. Nothing here calls recv.

Pacing is a token bucket on ``time.monotonic()``: the rate counts IPv4 and
UDP headers, and a bucket of a few milliseconds absorbs the event loop's
timer granularity without bursting more than that onto the wire.

**Segmentation offload** (UDP GSO, Linux 4.18+): the datagrams the bucket
allows at once (at most 64 KiB of them, 44 at 1472 bytes) leave in one
``sendmsg`` with ``UDP_SEGMENT`` set to the datagram size; the kernel (or
the NIC) cuts them into the same datagrams ``sendto`` would have sent, for
about a fifth of the CPU per datagram. If the kernel refuses (an old kernel,
a device without checksum offload: ``EINVAL``, ``EIO``, ...) the batch goes
out one ``sendto`` at a time and the sender stays on ``sendto`` (logged once).

**Time diversity** (``[link] repeat_after_s``, off by default): every datagram
sent is kept and sent once more ``repeat_after_s`` later, through the same
bucket. New datagrams go first; a repeat uses the capacity they leave, so
repeats never delay the first copy. The repeat queue holds at most what the
link can carry in ``repeat_after_s`` (``rate_mbps`` x ``repeat_after_s``); when
repeats fall further behind than that (the link is too slow for twice the
traffic), the oldest are dropped and counted (``repeats_dropped``). The
receiver takes a repeat like any duplicate: a datagram of a block already
rebuilt is dropped (``rejected_late``), one of a block it lost completes it.
Nothing comes back from the receiver, so nothing there can slow this down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import structlog

from diode.config.link import IPV4_UDP_OVERHEAD
from diode.config.tx import TxLink
from diode.encoder import SendQueue
from diode.errors import LinkError

log = structlog.get_logger("diode.tx.sender")

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # linux/udp.h
GSO_MAX_BYTES = 65507  # one UDP send, all segments together
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
# What a kernel or device says when it cannot segment: fall back to sendto.
_GSO_REFUSED = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE}
_BPF_RET_K = 0x06
_DROP_ALL = struct.pack("HBBI", _BPF_RET_K, 0, 0, 0)  # one instruction: return 0 bytes
# A datagram's stream id: bytes 4..8 of its header (diode/wire.py).
_STREAM_ID = struct.Struct(">I")


def deaf_udp_socket(link: TxLink) -> socket.socket:
    """A non-blocking UDP socket that can send and can never receive.

    It is left unconnected on purpose: a connected UDP socket reports ICMP
    errors coming back from the far side, and nothing may come back.
    """
    family = socket.AF_INET6 if ":" in link.destination else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        program = ctypes.create_string_buffer(_DROP_ALL)
        fprog = struct.pack("HL", 1, ctypes.addressof(program))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.bind((link.source or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))  # noqa: S104
        # Linux marks the receive half shut even on an unconnected socket (and says ENOTCONN).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LinkError(
            f"cannot open the sending socket to {link.destination}:{link.port}: {exc}"
        ) from exc
    return sock


class RepeatQueue:
    """Datagrams sent once, each waiting for its second sending; bounded in bytes."""

    def __init__(self, after_s: float, max_bytes: int, counters: dict[str, int]) -> None:
        self.after_s = after_s
        self.max_bytes = max_bytes
        self._queue: deque[tuple[float, bytes]] = deque()
        self.bytes = 0
        self._counters = counters
        counters.update(repeats_sent=0, repeats_dropped=0)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, datagram: bytes, now: float) -> None:
        self._queue.append((now + self.after_s, datagram))
        self.bytes += len(datagram)
        while self.bytes > self.max_bytes:
            _, old = self._queue.popleft()
            self.bytes -= len(old)
            self._counters["repeats_dropped"] += 1

    def due(self, now: float) -> bytes | None:
        """The oldest datagram whose time has come, taken off the queue."""
        if not self._queue or self._queue[0][0] > now:
            return None
        _, datagram = self._queue.popleft()
        self.bytes -= len(datagram)
        return datagram

    def put_back(self, datagram: bytes, now: float) -> None:
        """A repeat the socket could not take: first in line again."""
        self._queue.appendleft((now, datagram))
        self.bytes += len(datagram)

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None


class PacedSender:
    """Drains a SendQueue onto the wire at ``rate_mbps``; counts what it sent and failed.

    ``on_room`` is called after each turn that leaves the queue under its
    resume mark (:attr:`SendQueue.has_room`): a framer held while it was full
    goes on.

    Datagrams leave in the order the queue hands them out: what the socket
    could not take goes back first in line, and repeats only go between them.
    A group's stride on the wire, on which its repair counts (diode/encoder.py),
    depends on it.
    """

    def __init__(
        self,
        link: TxLink,
        queue: SendQueue,
        sock: socket.socket,
        *,
        lane_port: tuple[int, int] | None = None,
        on_room: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue = queue
        self._on_room = on_room
        self._sock = sock
        self._address = (link.destination, link.port)
        # (stream id, port): that stream's datagrams (the file lane's) go to a port of
        # their own, a socket of their own on the receiver; repeats follow them there.
        self._lane_stream = _STREAM_ID.pack(lane_port[0]) if lane_port else None
        self._lane_address = (link.destination, lane_port[1]) if lane_port else self._address
        self._bytes_per_s = link.rate_mbps * 1e6 / 8
        self._wire = link.datagram_size + IPV4_UDP_OVERHEAD
        self._burst = max(self._wire * 4, self._bytes_per_s * 0.004)
        self._segments = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // link.datagram_size)
        self._gso_option = [(socket.SOL_UDP, UDP_SEGMENT, link.datagram_size.to_bytes(2, "little"))]
        self.gso = self._segments > 1
        self._wake = asyncio.Event()
        self.counters = {"datagrams_sent": 0, "bytes_sent": 0, "send_errors": 0}
        self.repeats = (
            RepeatQueue(
                link.repeat_after_s,
                int(self._bytes_per_s * link.repeat_after_s),
                self.counters,
            )
            if link.repeat_after_s > 0
            else None
        )

    def notify(self) -> None:
        """New blocks are queued."""
        self._wake.set()

    async def run(self) -> None:
        tokens = self._burst
        last = time.monotonic()
        while True:
            if not len(self._queue) and not self._repeat_due(last):
                await self._idle()
                last = time.monotonic()
                tokens = max(tokens, self._wire)
            now = time.monotonic()
            tokens = min(self._burst, tokens + (now - last) * self._bytes_per_s)
            last = now
            if tokens < self._wire:
                await asyncio.sleep((self._wire - tokens) / self._bytes_per_s)
                continue
            while tokens >= self._wire:
                sent = self._send_batch(int(tokens // self._wire)) if self.gso else 0
                if sent:
                    tokens -= sent * self._wire
                    continue
                outcome = self._send_next(now)
                if outcome == "full":
                    await asyncio.sleep(0.001)  # the socket buffer is full: let it drain
                    break
                if outcome == "none":
                    break
                tokens -= self._wire
            if self._queue.has_room:
                self._on_room()
            if len(self._queue) or self._repeat_due(now):
                await asyncio.sleep(0)  # others' turn; an empty queue waits in _idle instead

    def _repeat_due(self, now: float) -> bool:
        due = self.repeats.next_due() if self.repeats is not None else None
        return due is not None and due <= now

    async def _idle(self) -> None:
        """Wait for new blocks, or for the next repeat to fall due."""
        self._wake.clear()
        due = self.repeats.next_due() if self.repeats is not None else None
        if due is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(due - time.monotonic(), 0.0)):
                await self._wake.wait()

    def _send_next(self, now: float) -> Literal["sent", "full", "none"]:
        """One datagram: a new one first, else a repeat that is due."""
        repeats = self.repeats
        datagram = self._queue.pop()
        if datagram is not None:
            sent = self._send(datagram)
            if sent is None:
                self._queue.requeue(datagram)
                return "full"
            if sent and repeats is not None:
                repeats.add(datagram, now)
            return "sent"
        datagram = repeats.due(now) if repeats is not None else None
        if repeats is None or datagram is None:
            return "none"
        sent = self._send(datagram)
        if sent is None:
            repeats.put_back(datagram, now)
            return "full"
        if sent:
            self.counters["repeats_sent"] += 1
        return "sent"

    def _send_batch(self, allowed: int) -> int:
        """Up to ``allowed`` new datagrams in one segmented send; how many left.

        0 when fewer than two are queued (one goes by :meth:`_send_next`), when
        the socket buffer is full (they are put back), or when the kernel refused
        segmentation (they are put back, and :attr:`gso` is off from now on).
        """
        count = min(allowed, self._segments, len(self._queue))
        if count < 2:
            return 0
        batch: list[bytes] = []
        address = self._address
        while len(batch) < count:
            datagram = self._queue.pop()
            if datagram is None:
                break
            # One send goes to one port: a file-lane datagram ends a batch of tag
            # datagrams (and the reverse), and goes first in the next one.
            if batch and self._destination(datagram) != address:
                self._queue.requeue_all([datagram])
                break
            address = self._destination(datagram)
            batch.append(datagram)
        if len(batch) < 2:
            self._queue.requeue_all(batch)
            return 0
        try:
            # One buffer per datagram: the kernel gathers them, nothing is copied here.
            self._sock.sendmsg(batch, self._gso_option, 0, address)
        except BlockingIOError:
            self._queue.requeue_all(batch)
            return 0
        except OSError as exc:
            if exc.errno not in _GSO_REFUSED:
                # No route, interface down: counted like sendto's failures.
                self.counters["send_errors"] += len(batch)
                return len(batch)
            self._queue.requeue_all(batch)
            self.gso = False
            log.warning("udp segmentation refused: one datagram a call", error=str(exc))
            return 0
        self.counters["datagrams_sent"] += len(batch)
        self.counters["bytes_sent"] += sum(map(len, batch))
        if self.repeats is not None:
            now = time.monotonic()
            for datagram in batch:
                self.repeats.add(datagram, now)
        return len(batch)

    def _destination(self, datagram: bytes) -> tuple[str, int]:
        if self._lane_stream is not None and datagram[4:8] == self._lane_stream:
            return self._lane_address
        return self._address

    def _send(self, datagram: bytes) -> bool | None:
        """True: sent; False: failed and counted; None: the socket buffer is full."""
        try:
            self._sock.sendto(datagram, self._destination(datagram))
        except BlockingIOError:
            return None
        except OSError:
            # No route, interface down: count it and go on; the receiver reports the gap.
            self.counters["send_errors"] += 1
            return False
        self.counters["datagrams_sent"] += 1
        self.counters["bytes_sent"] += len(datagram)
        return True

    async def drain(self, grace_s: float) -> None:
        """Wait until the queue is empty or the grace period ends (shutdown).

        Repeats still waiting are not sent: the receiver had every datagram once.
        """
        deadline = time.monotonic() + grace_s
        while len(self._queue) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
