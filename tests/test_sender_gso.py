"""The paced sender's segmentation offload: the same datagrams on the wire, or sendto when refused.

Real sockets on loopback: a receiving UDP socket counts what arrives. With
GSO the kernel must cut each batch back into the datagrams the queue held,
each its own datagram of the configured size, in queue order; when the
kernel refuses segmentation the sender falls back to one ``sendto`` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from diode.config.tx import TxLink
from diode.encoder import EncodedBlock, SendQueue
from transmitter.sender import PacedSender, deaf_udp_socket

SIZE = 1472
SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _blocks(count: int, per_block: int) -> list[EncodedBlock]:
    return [
        EncodedBlock(
            seq=seq,
            records=1,
            datagrams=tuple(
                seq.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(SIZE - 8)
                for i in range(per_block)
            ),
        )
        for seq in range(count)
    ]


async def _send_all(*, refuse_gso: bool) -> tuple[list[bytes], list[bytes], PacedSender]:
    rx = _receiver()
    link = TxLink(destination="127.0.0.1", port=rx.getsockname()[1], rate_mbps=200.0)
    queue = SendQueue(capacity=100_000, interleave=1)
    blocks = _blocks(20, 56)
    for block in blocks:
        queue.push(block)
    tx = deaf_udp_socket(link)
    if refuse_gso:
        # A socket without UDP checksums: the kernel refuses to segment (EINVAL).
        tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sender = PacedSender(link, queue, tx)
    got: list[bytes] = []
    task = asyncio.create_task(sender.run())
    try:
        expected = sum(len(b.datagrams) for b in blocks)
        for _ in range(2000):
            await asyncio.sleep(0.005)
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append(rx.recv(65536))
            if len(got) >= expected:
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        tx.close()
        rx.close()
    return got, [d for b in blocks for d in b.datagrams], sender


async def test_segmented_sends_arrive_as_the_queued_datagrams_in_order() -> None:
    got, sent, sender = await _send_all(refuse_gso=False)
    assert sender.gso, "loopback segments UDP"
    assert got == sent
    assert sender.counters["datagrams_sent"] == len(sent)
    assert sender.counters["bytes_sent"] == len(sent) * SIZE


async def test_a_kernel_that_refuses_segmentation_gets_one_sendto_each() -> None:
    got, sent, sender = await _send_all(refuse_gso=True)
    assert not sender.gso, "the refusal switched segmentation off"
    assert got == sent, "nothing lost or reordered by the refused batch"
    assert sender.counters == {
        "datagrams_sent": len(sent),
        "bytes_sent": len(sent) * SIZE,
        "send_errors": 0,
    }
