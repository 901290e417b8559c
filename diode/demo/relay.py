"""A lossy stand-in for the one-way wire: a UDP relay with seeded faults.

Datagrams from the transmitter arrive on ``port`` and go on to the receiver,
some of them lost (at random and in bursts), duplicated, reordered or
bit-flipped, decided by a seeded RNG so that a run can be replayed. The demo
uses it to show FEC at work (``--loss``); the fault suite uses all of it, and
``capture=True`` keeps every datagram for replay attacks. (The netem qdisc is
not available on every machine; a userspace relay is.)
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class Faults:
    loss: float = 0.0
    burst_every_s: float = 0.0  # a burst of burst_len consecutive datagrams lost this often
    burst_len: int = 0
    duplicate: float = 0.0
    reorder: float = 0.0  # held back and sent after the next one
    corrupt: float = 0.0  # one random bit flipped
    seed: int = 1


@dataclass(slots=True)
class RelayStats:
    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    bursts: int = 0
    send_errors: int = 0


class Relay(asyncio.DatagramProtocol):
    def __init__(
        self, target: tuple[str, int], faults: Faults | None = None, *, capture: bool = False
    ) -> None:
        self.target = target
        self.faults = faults or Faults()
        if not 0.0 <= self.faults.loss <= 1.0:
            raise ValueError(f"loss must be between 0 and 1, got {self.faults.loss}")
        self._capturing = capture
        self.rng = random.Random(self.faults.seed)
        self.stats = RelayStats()
        self.capture: list[bytes] = []
        self.port = 0
        self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._held: bytes | None = None
        self._burst_left = 0
        self._next_burst = 0.0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        self.port = sock.getsockname()[1]
        self._next_burst = loop.time() + self.faults.burst_every_s

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._out.close()

    def send(self, datagram: bytes) -> None:
        """Inject a datagram towards the receiver (replays, forgeries, garbage)."""
        self._out.sendto(datagram, self.target)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        f, rng, stats = self.faults, self.rng, self.stats
        stats.received += 1
        if self._capturing:
            self.capture.append(data)
        if f.burst_every_s and asyncio.get_running_loop().time() >= self._next_burst:
            self._next_burst += f.burst_every_s
            self._burst_left = f.burst_len
            stats.bursts += 1
        if self._burst_left:
            self._burst_left -= 1
            stats.dropped += 1
            return
        if rng.random() < f.loss:
            stats.dropped += 1
            return
        if rng.random() < f.corrupt:
            flipped = bytearray(data)
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            data = bytes(flipped)
            stats.corrupted += 1
        copies = 2 if rng.random() < f.duplicate else 1
        stats.duplicated += copies - 1
        if self._held is None and rng.random() < f.reorder:
            self._held = data
            stats.reordered += 1
            return
        for _ in range(copies):
            self._forward(data)
        if self._held is not None:
            held, self._held = self._held, None
            self._forward(held)

    def _forward(self, data: bytes) -> None:
        try:
            self._out.sendto(data, self.target)
            self.stats.forwarded += 1
        except OSError:
            self.stats.send_errors += 1
