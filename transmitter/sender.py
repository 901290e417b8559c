"""The one-way UDP sender: paced on a monotonic clock, deaf by construction.

The socket never listens and is never read. Because a UDP socket that has
sent gets a local port the kernel could queue datagrams to, it is made deaf
three ways: a socket filter (classic BPF ``ret #0``) drops every incoming
datagram before it is queued, the receive half is shut down, and the buffer
is the smallest the kernel allows. Nothing here calls recv.

Pacing is a token bucket on ``time.monotonic()``: the rate counts IPv4 and
UDP headers, and a bucket of a few milliseconds absorbs the event loop's
timer granularity without bursting more than that onto the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import struct
import time

from diode.config.link import IPV4_UDP_OVERHEAD
from diode.config.tx import TxLink
from diode.encoder import SendQueue
from diode.errors import LinkError

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_BPF_RET_K = 0x06
_DROP_ALL = struct.pack("HBBI", _BPF_RET_K, 0, 0, 0)  # one instruction: return 0 bytes


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


class PacedSender:
    """Drains a SendQueue onto the wire at ``rate_mbps``; counts what it sent and failed."""

    def __init__(self, link: TxLink, queue: SendQueue, sock: socket.socket) -> None:
        self._queue = queue
        self._sock = sock
        self._address = (link.destination, link.port)
        self._bytes_per_s = link.rate_mbps * 1e6 / 8
        self._wire = link.datagram_size + IPV4_UDP_OVERHEAD
        self._burst = max(self._wire * 4, self._bytes_per_s * 0.004)
        self._wake = asyncio.Event()
        self.counters = {"datagrams_sent": 0, "bytes_sent": 0, "send_errors": 0}

    def notify(self) -> None:
        """New blocks are queued."""
        self._wake.set()

    async def run(self) -> None:
        tokens = self._burst
        last = time.monotonic()
        while True:
            if not len(self._queue):
                self._wake.clear()
                await self._wake.wait()
                last = time.monotonic()
                tokens = max(tokens, self._wire)
            now = time.monotonic()
            tokens = min(self._burst, tokens + (now - last) * self._bytes_per_s)
            last = now
            if tokens < self._wire:
                await asyncio.sleep((self._wire - tokens) / self._bytes_per_s)
                continue
            while tokens >= self._wire:
                datagram = self._queue.pop()
                if datagram is None:
                    break
                if not self._send(datagram):
                    await asyncio.sleep(0.001)  # the socket buffer is full: let it drain
                    break
                tokens -= self._wire
            await asyncio.sleep(0)

    def _send(self, datagram: bytes) -> bool:
        try:
            self._sock.sendto(datagram, self._address)
        except BlockingIOError:
            self._queue.requeue(datagram)
            return False
        except OSError:
            # No route, interface down: count it and go on; the receiver reports the gap.
            self.counters["send_errors"] += 1
            return True
        self.counters["datagrams_sent"] += 1
        self.counters["bytes_sent"] += len(datagram)
        return True

    async def drain(self, grace_s: float) -> None:
        """Wait until the queue is empty or the grace period ends (shutdown)."""
        deadline = time.monotonic() + grace_s
        while len(self._queue) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
