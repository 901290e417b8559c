"""Replays stopped in the kernel: a quarantine socket beside the link socket.

A replay (an authentic datagram captured from the link and sent again) or a
late copy names a block below the stream's committed position: the drain
never needs it, the decoder rejects it. Rejecting it still costs the
receiver about 1.7 us of CPU (the kernel's peek and drop, then the gate's
screen), and 600 000 a second take a whole core. So the kernel sorts them
out before the receiver wakes::

    link port ──> SO_REUSEPORT group ── classic BPF program ──┬─> [0] link socket ──> Drain
                                                              └─> [1] quarantine (tiny buffer,
                                                                      never processed: counted)

The link socket and a *quarantine* socket bind the same address and port with
``SO_REUSEPORT``; a classic BPF program attached to the group
(``SO_ATTACH_REUSEPORT_CBPF``, which sees the UDP payload from offset 0)
returns the quarantine's index for a datagram of a known wire version (1, 3,
6: they share the header layout of diode/wire.py) whose (stream, epoch,
sequence) is below the receiver's committed position, and the link socket's
index for everything else (short datagrams, another magic, another version,
a stream with no position yet). The program is attached again when a commit
moved a position, at most every :data:`REATTACH_EVERY_S`: a stale program is
sound, positions only grow, so it steers less than it could, never too much.

The quarantine is never read for its contents: its buffer is as small as the
kernel allows, and what it takes is counted as ``rejected_steered``, its
socket's kernel drops (``/proc/net/udp``, per inode) plus what its queue holds,
drained at each supervision turn (:meth:`Steering.tally`). That count is its
own and never merged with the link socket's overflow (``kernel_drops``).

The program names sockets by their index in the group, the order they were
bound (a socket leaving moves the last one into its place). The receiver that
opens its own sockets binds the link socket first and attaches an "everything
to index 0" program before the quarantine binds, so no datagram can land in
the quarantine before the real program is there. With sockets systemd passes
(``LISTEN_FDS=2``), the order is the unit's as far as systemd binds them in
order; :meth:`Steering.tally` checks it: a datagram in the quarantine the
program would not have steered proves it wrong, and the indices are swapped
(logged as an error). What the quarantine already holds when this process
starts (a group systemd made, before any program; another process's program)
goes through the decoder like the link socket's, journaled
(``Steering.opening``), before the quarantine becomes a counter.

Where the kernel has no ``SO_REUSEPORT`` or refuses the program (not Linux, an
old kernel), there is no quarantine and the receiver reads as before (logged).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import sys
from collections.abc import Mapping

import structlog

from diode.protocol.decoder import RECENT_BLOCKS
from diode.replay import StreamState
from diode.wire import MAGIC, VERSION, VERSION_CAUCHY, VERSION_GATED
from receiver.link import adopt_passed, kernel_drops, open_link_socket, passed_sockets

log = structlog.get_logger("diode.rx")

SO_ATTACH_REUSEPORT_CBPF = 51  # Linux, include/uapi/asm-generic/socket.h
# The smallest buffer the kernel grants (it doubles and floors what is asked): a
# datagram or two, and the quarantine still takes one while it is full.
QUARANTINE_RCVBUF = 1
# A commit may move the positions every 5 ms (COMMIT_EVERY_S); a program costs a system call
# and a verifier pass to attach, and being late only steers less.
REATTACH_EVERY_S = 0.1
# What the program reads: magic at 0, version at 2, stream at 4, epoch at 16, sequence
# at 24 (diode/wire.py); all wire versions a receiver accepts share that layout.
HEADER_READ = 32
STEERED_VERSIONS = (VERSION, VERSION_CAUCHY, VERSION_GATED)
# The kernel takes at most 4 096 instructions; a stream's branch is 14, the head 12.
MAX_INSNS = 4096
MAX_STREAMS = (MAX_INSNS - 13) // 14
# The kernel also charges a program to the socket's option memory (net.core.optmem_max):
# 239 streams fit in the 128 KiB of this machine's kernel (6.18); with less, update()
# steers fewer streams (halving until the kernel takes the program) and says so.

# Classic BPF opcodes (include/uapi/linux/filter.h).
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_LD_W_LEN = 0x80
_JEQ = 0x15
_JGT = 0x25
_JGE = 0x35
_RET_K = 0x06
_INSN = struct.Struct("=HBBI")
_HEAD = struct.Struct(">HBxI8xQQ")  # magic, version, stream, epoch, sequence

Insn = tuple[int, int, int, int]


def _branch(position: StreamState, link: int, quarantine: int) -> list[Insn]:
    """Steer to the quarantine when (epoch, seq) < (position.epoch, position.next_seq):
    64-bit numbers compared as two 32-bit words each, high first."""
    words = (
        (16, position.epoch >> 32),
        (20, position.epoch & 0xFFFFFFFF),
        (24, position.next_seq >> 32),
    )
    out: list[Insn] = []
    # Each compare jumps forward to the two returns at the branch's end.
    for i, (offset, word) in enumerate(words):
        left = 3 * (len(words) - i) + 1  # instructions after this load up to "ret link"
        out += [
            (_LD_W_ABS, 0, 0, offset),
            (_JGT, left - 1, 0, word),  # above: the link
            (_JEQ, 0, left - 1, word),  # below: the quarantine
        ]
    out += [
        (_LD_W_ABS, 0, 0, 28),
        (_JGE, 0, 1, position.next_seq & 0xFFFFFFFF),
        (_RET_K, 0, 0, link),
        (_RET_K, 0, 0, quarantine),
    ]
    return out


def program(positions: Mapping[int, StreamState], link: int, quarantine: int) -> bytes:
    """The classic BPF program for these positions, as the kernel takes it (sock_filter[]).

    Streams past :data:`MAX_STREAMS` are not steered: sound, the link socket gets
    everything the program does not name (:meth:`Steering.update` names no more).
    """
    insns: list[Insn] = [
        (_LD_W_LEN, 0, 0, 0),
        (_JGE, 1, 0, HEADER_READ),  # every load below is inside the datagram
        (_RET_K, 0, 0, link),
        (_LD_H_ABS, 0, 0, 0),
        (_JEQ, 1, 0, MAGIC),
        (_RET_K, 0, 0, link),
        (_LD_B_ABS, 0, 0, 2),
        *[(_JEQ, len(STEERED_VERSIONS) - i, 0, v) for i, v in enumerate(STEERED_VERSIONS)],
        (_RET_K, 0, 0, link),
        (_LD_W_ABS, 0, 0, 4),
    ]
    for stream, position in sorted(positions.items()):
        branch = _branch(position, link, quarantine)
        if len(insns) + len(branch) + 2 > MAX_INSNS:
            break
        insns.append((_JEQ, 0, len(branch), stream))
        insns += branch
    insns.append((_RET_K, 0, 0, link))
    return b"".join(_INSN.pack(*insn) for insn in insns)


def steers(datagram: bytes | bytearray | memoryview, positions: Mapping[int, StreamState]) -> bool:
    """Would :func:`program` send this datagram to the quarantine? (The same rule in Python.)"""
    if len(datagram) < HEADER_READ:
        return False
    magic, version, stream, epoch, seq = _HEAD.unpack_from(datagram)
    position = positions.get(stream)
    return (
        magic == MAGIC
        and version in STEERED_VERSIONS
        and position is not None
        and (epoch, seq) < (position.epoch, position.next_seq)
    )


def _replay_class(datagram: bytes | bytearray, positions: Mapping[int, StreamState]) -> bool:
    """A steered datagram the decoder would count as a replay, not a late copy: an older
    epoch, or further than RECENT_BLOCKS behind (diode/protocol/decoder.py)."""
    _magic, _version, stream, epoch, seq = _HEAD.unpack_from(datagram)
    position = positions[stream]
    return bool(epoch < position.epoch or seq + RECENT_BLOCKS < position.next_seq)


def attach(sock: socket.socket, code: bytes) -> None:
    """Attach ``code`` (sock_filter[]) to the reuseport group of ``sock``."""
    insns = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog: unsigned short len, then a pointer (native alignment).
    fprog = struct.pack("@HP", len(code) // _INSN.size, ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def everything_to(index: int) -> bytes:
    """A program that sends every datagram to one socket of the group."""
    return _INSN.pack(_RET_K, 0, 0, index)


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def open_group(
    listen: str, port: int, rcvbuf: int, interface: str | None = None
) -> tuple[socket.socket, Steering | None]:
    """The link socket and, beside it, its quarantine (None where the kernel has no
    SO_REUSEPORT or takes no reuseport program: steering off, logged).

    The link socket binds first (index 0) and gets an "everything to index 0"
    program before the quarantine binds (index 1): not one datagram reaches the
    quarantine before the caller attaches the real program (:meth:`Steering.update`).
    """
    if not supported():
        log.warning("replays are not steered: no SO_REUSEPORT here", platform=sys.platform)
        return open_link_socket(listen, port, rcvbuf, interface), None
    if port:
        # A port another socket holds (a second receiver started by mistake) must refuse
        # this one, as it did before SO_REUSEPORT: sockets of one owner that set it join
        # the same group, and would share or swallow each other's datagrams silently.
        open_link_socket(listen, port, 0, interface).close()
    link = open_link_socket(listen, port, rcvbuf, interface, reuse_port=True)
    try:
        attach(link, everything_to(0))
    except OSError as exc:
        # A port shared by nothing: opened again without SO_REUSEPORT, as before.
        link.close()
        log.warning("replays are not steered: the kernel refused the program", error=str(exc))
        return open_link_socket(listen, port, rcvbuf, interface), None
    try:
        quarantine = open_link_socket(listen, link.getsockname()[1], 0, interface, reuse_port=True)
    except BaseException:
        link.close()
        raise
    return link, Steering(link, quarantine)


class Steering:
    """The quarantine of a link socket: the program kept up to date, and its count.

    ``opening``: the sockets were passed in, so the quarantine may hold what a
    group without a program (or another process's program) put there; the
    caller reads it through a journaled drain until :meth:`opened`. ``enabled``
    False: the program steers nothing (two sockets passed in, steering off in
    the config), and the quarantine, which systemd keeps in the group, gets nothing.
    """

    def __init__(
        self,
        link: socket.socket,
        quarantine: socket.socket,
        *,
        enabled: bool = True,
        opening: bool = False,
    ) -> None:
        self.link = link
        self.quarantine = quarantine
        self.enabled = enabled
        self.opening = opening
        self.link_index = 0
        self.steered = 0  # datagrams the quarantine took (drained + its kernel drops)
        self.order_swaps = 0
        # Of the datagrams drained from the quarantine (a sample: most are dropped by the
        # kernel), those the decoder would count as replays, not late copies.
        self.replays_seen = 0
        self._drops_at_start = kernel_drops(quarantine)
        self._drained = 0
        self._attached: dict[int, StreamState] | None = None
        self._seen: object = None  # the positions object last looked at
        self._attached_at = float("-inf")
        self.max_streams = MAX_STREAMS
        self._sink = bytearray(HEADER_READ)
        if not opening:
            self.shrink()  # else the caller shrinks it once its drain has read the size

    @property
    def quarantine_index(self) -> int:
        return 1 - self.link_index

    def shrink(self) -> None:
        """The quarantine's buffer as small as the kernel allows (systemd sizes both
        sockets of the unit alike): full, it drops, and its drops are its count."""
        self.quarantine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, QUARANTINE_RCVBUF)

    def opened(self) -> None:
        """What the quarantine held at the start has been read: from now on it is a counter."""
        self.opening = False

    def update(
        self, positions: Mapping[int, StreamState], now: float, *, force: bool = False
    ) -> bool:
        """Attach the program for ``positions`` if they moved, at most every
        :data:`REATTACH_EVERY_S` unless ``force``; whether it was attached."""
        if not force and (positions is self._seen or now - self._attached_at < REATTACH_EVERY_S):
            return False  # the same commit's positions, or too soon: nothing to sort out
        wanted = self._named(positions) if self.enabled else {}
        if wanted == self._attached:
            return False
        while True:
            try:
                attach(self.link, program(wanted, self.link_index, self.quarantine_index))
                break
            except OSError as exc:
                if not wanted:
                    raise
                # Too big for the socket's option memory: steer fewer streams (sound).
                self.max_streams = len(wanted) // 2
                wanted = self._named(wanted)
                log.warning(
                    "the kernel refused the steering program: fewer streams steered",
                    streams=self.max_streams,
                    error=str(exc),
                    fix="raise net.core.optmem_max (sysctl)",
                )
        self._attached, self._seen, self._attached_at = wanted, positions, now
        return True

    def _named(self, positions: Mapping[int, StreamState]) -> dict[int, StreamState]:
        """The positions the program names: the first ``max_streams`` streams by id."""
        return dict(sorted(positions.items())[: self.max_streams])

    def tally(self) -> int:
        """Drain the quarantine (checking that the program steered each datagram there)
        and count it with its kernel drops: ``rejected_steered``."""
        if self.opening:
            # Read by the decoder meanwhile; only its drops are the program's.
            self.steered = kernel_drops(self.quarantine) - self._drops_at_start
            return self.steered
        sink, attached, wrong = self._sink, self._attached or {}, 0
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        while True:
            try:
                length = self.quarantine.recv_into(sink, HEADER_READ, flags)
            except OSError:  # empty (BlockingIOError), or nothing more to take
                break
            self._drained += 1
            if not steers(sink if length >= HEADER_READ else b"", attached):
                wrong += 1
            elif _replay_class(sink, attached):
                self.replays_seen += 1
        if wrong:
            self._swap(wrong)
        self.steered = kernel_drops(self.quarantine) - self._drops_at_start + self._drained
        return self.steered

    def _swap(self, wrong: int) -> None:
        """The quarantine got datagrams the program never steers: the group's order is not
        the one the program assumes. Attach it again with the indices swapped."""
        self.link_index = self.quarantine_index
        self.order_swaps += 1
        log.error(
            "the quarantine got datagrams the program never steers there: the order of "
            "the reuseport group is not the unit's; indices swapped",
            datagrams=wrong,
            link_index=self.link_index,
            fix="the link socket's ListenDatagram= first in diode-rx.socket",
        )
        positions, self._attached, self._seen = self._attached or {}, None, None
        self.update(positions, 0.0, force=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.quarantine.close()


def link_sockets(
    listen: str, port: int, rcvbuf: int, interface: str | None, *, steer: bool
) -> tuple[socket.socket, Steering | None, bool]:
    """The link socket (passed in, else opened here), its steering if it has a quarantine,
    and whether it was passed in (receiver/link.py, where the socket comes from)."""
    passed = passed_sockets()
    if not passed:
        if not steer:
            return open_link_socket(listen, port, rcvbuf, interface), None, False
        link, steering = open_group(listen, port, rcvbuf, interface)
        return link, steering, False
    link = adopt_passed(passed[0], listen, port, rcvbuf, interface)
    if len(passed) == 1:
        if steer:
            log.warning(
                "one socket passed in (LISTEN_FDS=1): replays are not steered",
                fix="the second ListenDatagram= line of systemd/diode-rx.socket "
                "(docs/OPERATIONS.md)",
            )
        return link, None, True
    return link, Steering(link, passed[1], enabled=steer, opening=True), True
