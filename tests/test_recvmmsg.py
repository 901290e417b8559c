"""Batched reads (receiver/recvmmsg.py): what the journaled drain relies on in the kernel.

The drain peeks a batch with one recvmmsg(MSG_PEEK) under SO_PEEK_OFF and takes
a run of datagrams off the head of the queue with one recvmmsg(MSG_TRUNC). That
is only right if the peek offset moves datagram by datagram inside one call, by
each datagram's whole length (a datagram longer than its slot included), and
moves back by the whole length of each datagram taken off the head.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from receiver.link import SO_PEEK_OFF, open_link_socket
from receiver.recvmmsg import BatchReader, batch_reader

pytestmark = pytest.mark.skipif(
    batch_reader(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) is None,
    reason="no recvmmsg in this C library (the drain reads one datagram a call)",
)


@pytest.fixture
def link() -> Iterator[Link]:
    sink = open_link_socket("127.0.0.1", 0, 1024 * 1024)
    sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.connect(sink.getsockname())
    yield sink, source
    sink.close()
    source.close()


Link = tuple[socket.socket, socket.socket]
Reader = BatchReader


def _queued(link: Link, queued: int, **reader: int) -> tuple[socket.socket, list[bytes], Reader]:
    """``queued`` datagrams of distinct lengths queued; the socket, them, and a reader."""
    sink, source = link
    sent = [bytes([i]) * (100 + i) for i in range(queued)]
    for datagram in sent:
        source.send(datagram)
    return sink, sent, BatchReader(sink, **reader)


def test_one_peek_call_walks_the_queue_datagram_by_datagram(link: Link) -> None:
    sink, sent, reader = _queued(link, 10, count=4)
    assert reader.read(3, peek=True) == sent[:3]
    assert reader.read(8, peek=True) == sent[3:7]  # at most count a call
    assert reader.read(8, peek=True) == sent[7:]
    assert reader.read(8, peek=True) == []  # the queue is empty beyond the offset
    # Peeked, not taken: a reader from the head sees them all.
    sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    assert reader.read(4, peek=True) + reader.read(4, peek=True) + reader.read(4, peek=True) == sent


def test_taking_the_head_off_moves_the_peek_offset_back_by_whole_datagrams(link: Link) -> None:
    sink, sent, reader = _queued(link, 6, count=8)
    assert reader.read(4, peek=True) == sent[:4]
    assert reader.discard(3) == 3  # one call, MSG_TRUNC into 1-byte buffers
    # The offset still points past the 4th: the next peek is the 5th, not a repeat.
    assert reader.read(8, peek=True) == sent[4:]
    sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    assert reader.read(8, peek=True) == sent[3:]
    assert reader.discard(8) == 3  # as many as there were
    assert reader.discard(8) == 0


def test_a_datagram_longer_than_its_slot_moves_the_offset_by_its_whole_length(link: Link) -> None:
    sink, sent, reader = _queued(link, 3, count=4, slot=64)
    assert reader.read(4, peek=True) == [d[:64] for d in sent]
    assert reader.discard(1) == 1
    assert reader.read(4, peek=True) == []
    sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    assert reader.read(4, peek=True) == [d[:64] for d in sent[1:]]


def test_reading_without_peek_takes_them(link: Link) -> None:
    sink, sent, reader = _queued(link, 5, count=4)
    assert reader.read(4, peek=False) + reader.read(4, peek=False) == sent
    sink.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    assert reader.read(4, peek=True) == []
