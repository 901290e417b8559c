"""Batched datagram reads: recvmmsg(2) through ctypes, one system call for many datagrams.

Python's socket module has no recvmmsg (the one PyPI wrapper, pysockmmsg
0.0.2 of 2021, is unmaintained), so this is a small wrapper over libc with
everything preallocated once: ``count`` slots of ``slot`` bytes in one
reusable buffer, their ``iovec`` and ``mmsghdr`` arrays, and a second set of
1-byte iovecs for taking datagrams off the queue unread (``MSG_TRUNC``).

Measured on this machine (2026-12-06 22:57 UTC, load 0.85, ``tools/benchrun
python -m receiver.recvmmsg``, 1 024 queued 1472-byte datagrams): a peek and a
drop per datagram 2.02 us, one recvmmsg peek and one recvmmsg drop per 64
datagrams 1.90 us; a plain recv 1.19 us against recvmmsg 1.28. The system call
is not what costs here (about 1.6 us a call, 64 datagrams a call): the kernel's
work per datagram is, and recvmmsg does not change it. What batching saves
is in the Python around it, one call and one loop turn per batch instead of
two per datagram: the drain and the decoder over 20 000 queued forgeries,
``python -m tests.faults.forgeries --drain``, cost 1.2-2.3 us less per cheap
rejection (docs/RELIABILITY.md, "Floods of forged datagrams").

Peeking under ``SO_PEEK_OFF`` advances the offset datagram by datagram inside
one call (each datagram goes through the kernel's udp_recvmsg as a recv would;
tests/test_recvmmsg.py checks it), by the whole datagram's length because
``MSG_TRUNC`` is passed with the peek: a datagram longer than its slot would
otherwise move the offset by the bytes copied only. A datagram is taken off
the queue with ``MSG_TRUNC`` for the same reason (the offset goes back by its
whole length).

Where libc has no recvmmsg (not Linux), :func:`batch_reader` returns None
and the drain reads one datagram per call, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import socket
import sys
from typing import Any

# Plain ints: the socket module's flags are IntFlag members, and each | of them costs a
# call into the enum module (seen in a profile of the receiver under a flood).
MSG_PEEK = int(socket.MSG_PEEK)
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_PEEK = MSG_DONTWAIT | MSG_PEEK | MSG_TRUNC
_TAKE = MSG_DONTWAIT
_DISCARD = MSG_DONTWAIT | MSG_TRUNC
# The largest UDP payload (IPv6: 65 535 - 8): no datagram is ever truncated in a slot.
SLOT_BYTES = 65536
BATCH = 64


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def _libc_recvmmsg() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.POINTER(_Mmsghdr),
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    function.restype = ctypes.c_int
    return function


_RECVMMSG = _libc_recvmmsg()


class BatchReader:
    """Reads (or peeks, or discards) up to ``count`` datagrams of one socket per call."""

    def __init__(self, sock: socket.socket, count: int = BATCH, slot: int = SLOT_BYTES) -> None:
        if _RECVMMSG is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        self._call = _RECVMMSG
        self._fd = sock.fileno()
        self.count = count
        self.slot = slot
        # An anonymous mapping, not a bytearray: only the pages datagrams were written to
        # become resident (a bytearray is zero-filled, all 4 MB of it).
        self._buffer = mmap.mmap(-1, count * slot)
        self._view = memoryview(self._buffer)
        self._starts = range(0, count * slot, slot)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._buffer))
        self._iovecs = (_Iovec * count)(*(_Iovec(base + i * slot, slot) for i in range(count)))
        self._messages = (_Mmsghdr * count)()
        self._sink = ctypes.create_string_buffer(1)
        sink = ctypes.addressof(self._sink)
        self._sink_iovecs = (_Iovec * count)(*(_Iovec(sink, 1) for _ in range(count)))
        self._discards = (_Mmsghdr * count)()
        for i in range(count):
            self._messages[i].msg_hdr.msg_iov = ctypes.pointer(self._iovecs[i])
            self._messages[i].msg_hdr.msg_iovlen = 1
            self._discards[i].msg_hdr.msg_iov = ctypes.pointer(self._sink_iovecs[i])
            self._discards[i].msg_hdr.msg_iovlen = 1
        # Each message's msg_len, read as one strided slice of unsigned ints (no ctypes
        # attribute access per datagram).
        stride = ctypes.sizeof(_Mmsghdr)
        width = ctypes.sizeof(ctypes.c_uint)
        offset = _Mmsghdr.msg_len.offset
        if stride % width or offset % width:
            raise OSError(errno.EINVAL, "unexpected mmsghdr layout")
        raw = memoryview((ctypes.c_char * (stride * count)).from_buffer(self._messages))
        self._lengths = raw.cast("B").cast("I")[offset // width :: stride // width]

    def read(self, most: int, *, peek: bool) -> list[bytes]:
        """Up to ``most`` (at most ``count``) datagrams, in queue order; [] when none is
        queued. Peeking leaves them in the queue (``SO_PEEK_OFF`` walks past them)."""
        return [view.tobytes() for view in self.views(most, peek=peek)]

    def views(self, most: int, *, peek: bool) -> list[memoryview]:
        """:meth:`read` without copying: each datagram a view of this reader's buffer, good
        only until its next call (what outlives it must be copied). A flood's datagrams,
        judged and dropped at once, are then never copied out of the buffer."""
        flags = _PEEK if peek else _TAKE
        got = self._call(self._fd, self._messages, min(most, self.count), flags, None)
        if got <= 0:
            self._raise_unless_empty(got)
            return []
        view, slot = self._view, self.slot
        return [
            view[start : start + min(length, slot)]
            for start, length in zip(self._starts, self._lengths[:got], strict=False)
        ]

    def discard(self, most: int) -> int:
        """Take up to ``most`` datagrams off the head of the queue unread; how many were."""
        got: int = self._call(self._fd, self._discards, min(most, self.count), _DISCARD, None)
        if got < 0:
            self._raise_unless_empty(got)
            return 0
        return got

    @staticmethod
    def _raise_unless_empty(got: int) -> None:
        if got < 0:
            code = ctypes.get_errno()
            if code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise OSError(code, os.strerror(code))


def batch_reader(sock: socket.socket, count: int = BATCH) -> BatchReader | None:
    """A batch reader for ``sock``, or None where recvmmsg is not available."""
    if _RECVMMSG is None:
        return None
    return BatchReader(sock, count)


# --- the measurement behind the choice ------------------------------------------------------


def _bench(rounds: int = 40, queued: int = 1024, size: int = 1472) -> dict[str, float]:
    """Microseconds per datagram, each way of reading a queue of ``queued`` datagrams."""
    import time  # noqa: PLC0415 - the benchmark only

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    sink.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEEK_OFF", 42), 0)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.connect(sink.getsockname())
    payload = os.urandom(size)
    reader = BatchReader(sink)
    drop = bytearray(1)

    def per_datagram_journal() -> None:  # the drain before: a peek, then a drop, each
        while True:
            try:
                sink.recv(65535, MSG_PEEK)
            except BlockingIOError:
                return
            sink.recv_into(drop, 1, MSG_TRUNC)

    def per_datagram_plain() -> None:
        while True:
            try:
                sink.recv(65535)
            except BlockingIOError:
                return

    def batched_journal() -> None:  # one peek of up to 64, then one drop of as many
        while batch := reader.read(BATCH, peek=True):
            reader.discard(len(batch))

    def batched_plain() -> None:
        while reader.read(BATCH, peek=False):
            pass

    ways = {
        "recv(MSG_PEEK) + recv_into(MSG_TRUNC), each": per_datagram_journal,
        "recvmmsg(MSG_PEEK) + recvmmsg(MSG_TRUNC), 64 a call": batched_journal,
        "recv, each": per_datagram_plain,
        "recvmmsg, 64 a call": batched_plain,
    }
    spent = dict.fromkeys(ways, 0.0)
    for _ in range(rounds):
        for name, way in ways.items():
            for _ in range(queued):
                source.send(payload)
            start = time.perf_counter()
            way()
            spent[name] += time.perf_counter() - start
    sink.close()
    source.close()
    return {name: s / (rounds * queued) * 1e6 for name, s in spent.items()}


if __name__ == "__main__":
    for name, us in _bench().items():
        print(f"{name:55s} {us:6.2f} us/datagram")
