"""The demo's stand-in for a lossy one-way wire: a UDP relay that drops a share of datagrams.

Datagrams from the transmitter arrive on :attr:`LossyRelay.port` and go on to
the receiver, except a share ``loss`` of them, chosen by a seeded RNG so that
one run can be replayed. The counts it keeps are shown next to the
receiver's, so what the wire lost and what FEC rebuilt can be compared.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass


@dataclass(slots=True)
class RelayCounts:
    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    send_errors: int = 0


class LossyRelay(asyncio.DatagramProtocol):
    """Forward datagrams from a loopback port to ``target``, dropping a seeded share."""

    def __init__(self, target: tuple[str, int], *, loss: float = 0.0, seed: int = 1) -> None:
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be between 0 and 1, got {loss}")
        self.target = target
        self.loss = loss
        self.counts = RelayCounts()
        self.port = 0
        self._rng = random.Random(seed)
        self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.port = sock.getsockname()[1]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._out.close()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        counts = self.counts
        counts.received += 1
        if self._rng.random() < self.loss:
            counts.dropped += 1
            return
        try:
            self._out.sendto(data, self.target)
        except OSError:
            counts.send_errors += 1
            return
        counts.forwarded += 1
