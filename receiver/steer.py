"""Replays stopped in the kernel: two quarantine sockets beside the link socket.

A replay (an authentic datagram captured from the link and sent again) or a
late copy (a surplus repair symbol, a time-diversity repeat) names a block below
the stream's committed position: the drain never needs it, the decoder rejects
it. Rejecting it still costs the receiver about 1.7 us of CPU (the kernel's peek
and drop, then the gate's screen), and 600 000 a second take a whole core. So
the kernel sorts them out before the receiver wakes::

    link port ──> SO_REUSEPORT group ── classic BPF program ──┬─> [0] link socket ──> Drain
                                                              ├─> [1] late copies ┐ tiny buffers,
                                                              └─> [2] replays     ┘ only counted

The link socket and two *quarantine* sockets bind the same address and port
with ``SO_REUSEPORT``; a classic BPF program attached to the group
(``SO_ATTACH_REUSEPORT_CBPF``, which sees the UDP payload from offset 0) reads a
datagram of a known wire version (1, 3, 6: they share the header layout of
diode/wire.py) and compares its (stream, epoch, sequence) with the receiver's
committed position, as the decoder would (diode/protocol/sequencer.py): at most
``RECENT_BLOCKS`` behind in the same epoch goes to the late copies' quarantine,
further behind or an older epoch to the replays'. Everything else goes to the
link socket (short datagrams, another magic, another version, a stream with no
position yet, anything at or past the position). The program is attached again
when a commit moved a position, at most every :data:`REATTACH_EVERY_S`: a stale
program is sound, committed positions only grow (and the program keeps each
stream's furthest one, also while a new epoch has none yet), so it steers less
than it could, never too much; a new epoch is attached at once, or the old epoch's replays would be
counted late copies of the position the stale program still holds. The two
classes have two sockets so that each count is exact: late copies come with
every healthy link, a replay is an attack the SOC must hear of
(receiver/soc.py), however few and however mixed with late copies.

The quarantines are never read for their contents: their buffers are as small
as the kernel allows, and what each takes is counted (``rejected_steered_late``,
``rejected_steered_replay``): its socket's kernel drops (``/proc/net/udp``, per
inode) plus what its queue holds, drained at each supervision turn
(:meth:`Steering.tally`). Those counts are their own and never merged with the
link socket's overflow (``kernel_drops``).

The program names sockets by their index in the group, the order they were
bound (a socket leaving moves the last one into its place). The receiver that
opens its own sockets binds the link socket first and attaches an "everything
to index 0" program before the quarantines bind, so no datagram can land in a
quarantine before the real program is there. With sockets systemd passes
(``LISTEN_FDS=3``: the link, late copies, replays), the order is the unit's as
far as systemd binds them in order; :meth:`Steering.tally` checks it: a
datagram in a quarantine the program would not have sent there proves it wrong,
and the indices are swapped (logged as an error). Two sockets passed in (a unit
from before the late copies had their own) steer replays only. What the
quarantines already hold when this process starts (a group systemd made, before
any program; another process's program) goes through the decoder like the link
socket's, journaled (``Steering.opening``), before the quarantines become
counters.

Where the kernel has no ``SO_REUSEPORT`` or refuses the program (not Linux, an
old kernel), there are no quarantines and the receiver reads as before (logged).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import sys
from collections.abc import Mapping, Sequence

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
# What one supervision turn (0.5 s) drains of a quarantine at most: under a flood the queue
# refills as fast as it is read; what is left is drained (or dropped, and counted) later.
DRAIN_PER_TURN = 256
# A commit may move the positions every 5 ms (COMMIT_EVERY_S); a program costs a system call
# and a verifier pass to attach, and being late only steers less.
REATTACH_EVERY_S = 0.1
# What the program reads: magic at 0, version at 2, stream at 4, epoch at 16, sequence
# at 24 (diode/wire.py); all wire versions a receiver accepts share that layout.
HEADER_READ = 32
STEERED_VERSIONS = (VERSION, VERSION_CAUCHY, VERSION_GATED)
# The kernel takes at most 4 096 instructions; a stream's branch is 20, the head 12 and
# the last return 1.
MAX_INSNS = 4096
BRANCH_INSNS = 20
MAX_STREAMS = (MAX_INSNS - 13) // BRANCH_INSNS
# The kernel also charges a program to the socket's option memory (net.core.optmem_max):
# with too little, update() steers fewer streams (halving until the kernel takes the
# program) and says so.

# The classes the program sorts datagrams into, and the role of the socket each goes to.
LINK, LATE, REPLAY = "link", "late", "replay"
# A group's sockets in the order they bind (systemd: the order of the ListenDatagram=
# lines): two sockets have no late quarantine, and late copies reach the link socket.
ROLES = {2: (LINK, REPLAY), 3: (LINK, LATE, REPLAY)}

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


def classify(datagram: bytes | bytearray | memoryview, positions: Mapping[int, StreamState]) -> str:
    """The class :func:`program` gives a datagram (the same rule in Python): LINK for
    anything at or past the stream's position (or that the program does not read),
    LATE for a block of the position's epoch at most RECENT_BLOCKS behind it, REPLAY
    for an older epoch or further behind, as the decoder counts them
    (diode/protocol/sequencer.py, ``screen``)."""
    if len(datagram) < HEADER_READ:
        return LINK
    magic, version, stream, epoch, seq = _HEAD.unpack_from(datagram)
    position = positions.get(stream)
    if magic != MAGIC or version not in STEERED_VERSIONS or position is None:
        return LINK
    if (epoch, seq) >= (position.epoch, position.next_seq):
        return LINK
    if epoch == position.epoch and seq >= position.next_seq - RECENT_BLOCKS:
        return LATE
    return REPLAY


class _Assembler:
    """Classic BPF with forward jumps to labels, resolved when the program is packed."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.insns)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def op(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.insns.append((code, jt, jf, k))

    def compare64(self, offset: int, value: int, above: str, below: str, equal: str) -> None:
        """Jump by the 64-bit big-endian number at ``offset`` against ``value``; ``equal``
        takes the low words' ``>=`` (equal or above), ``below`` the rest."""
        self.op(_LD_W_ABS, offset)
        self.op(_JGT, value >> 32, above, 0)
        self.op(_JEQ, value >> 32, 0, below)
        self.op(_LD_W_ABS, offset + 4)
        self.op(_JGE, value & 0xFFFFFFFF, equal, below)

    def pack(self) -> bytes:
        out = []
        for at, (code, jt, jf, k) in enumerate(self.insns):
            jumps = [self.labels[j] - at - 1 if isinstance(j, str) else j for j in (jt, jf)]
            assert all(0 <= j <= 255 for j in jumps), (at, jumps)  # forward, within a u8
            out.append(_INSN.pack(code, jumps[0], jumps[1], k))
        return b"".join(out)


def _branch(asm: _Assembler, name: str, position: StreamState, index: Mapping[str, int]) -> None:
    """One stream's rule (its datagram's stream id matched): the return for its class."""
    link, late, replay = f"{name}.link", f"{name}.late", f"{name}.replay"
    below, floor = f"{name}.below", max(0, position.next_seq - RECENT_BLOCKS)
    # (epoch, seq) against (position.epoch, position.next_seq): an older epoch is a replay.
    asm.op(_LD_W_ABS, 16)
    asm.op(_JGT, position.epoch >> 32, link, 0)
    asm.op(_JEQ, position.epoch >> 32, 0, replay)
    asm.op(_LD_W_ABS, 20)
    asm.op(_JGT, position.epoch & 0xFFFFFFFF, link, 0)
    asm.op(_JEQ, position.epoch & 0xFFFFFFFF, 0, replay)
    asm.compare64(24, position.next_seq, above=link, below=below, equal=link)
    # Below the position in its epoch: late down to the floor, a replay under it.
    asm.label(below)
    asm.compare64(24, floor, above=late, below=replay, equal=late)
    for label, role in ((link, LINK), (late, LATE), (replay, REPLAY)):
        asm.label(label)
        asm.op(_RET_K, index.get(role, index[LINK]))


def program(positions: Mapping[int, StreamState], index: Mapping[str, int]) -> bytes:
    """The classic BPF program for these positions, as the kernel takes it (sock_filter[]).

    ``index``: the group index of each role's socket; a class without a socket (LATE
    when the group has no late quarantine) goes to the link socket. Streams past
    :data:`MAX_STREAMS` are not steered: sound, the link socket gets everything the
    program does not name (:meth:`Steering.update` names no more).
    """
    asm, link = _Assembler(), index[LINK]
    asm.op(_LD_W_LEN, 0)
    asm.op(_JGE, HEADER_READ, 1, 0)  # every load below is inside the datagram
    asm.op(_RET_K, link)
    asm.op(_LD_H_ABS, 0)
    asm.op(_JEQ, MAGIC, 1, 0)
    asm.op(_RET_K, link)
    asm.op(_LD_B_ABS, 2)
    for i, version in enumerate(STEERED_VERSIONS):
        asm.op(_JEQ, version, len(STEERED_VERSIONS) - i, 0)
    asm.op(_RET_K, link)
    asm.op(_LD_W_ABS, 4)
    for stream, position in sorted(positions.items()):
        if len(asm) + BRANCH_INSNS + 2 > MAX_INSNS:
            break
        asm.op(_JEQ, stream, 0, f"{stream}.next")
        _branch(asm, str(stream), position, index)
        asm.label(f"{stream}.next")
    asm.op(_RET_K, link)
    return asm.pack()


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
    """The link socket and, beside it, its two quarantines (None where the kernel has no
    SO_REUSEPORT or takes no reuseport program: steering off, logged).

    The link socket binds first (index 0) and gets an "everything to index 0"
    program before the quarantines bind (indices 1 and 2): not one datagram reaches
    a quarantine before the caller attaches the real program (:meth:`Steering.update`).
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
    quarantines: list[socket.socket] = []
    try:
        for _ in ROLES[3][1:]:
            bound = link.getsockname()[1]
            quarantines.append(open_link_socket(listen, bound, 0, interface, reuse_port=True))
    except BaseException:
        for sock in (link, *quarantines):
            sock.close()
        raise
    return link, Steering(link, quarantines)


class Steering:
    """The quarantines of a link socket: the program kept up to date, and their counts.

    ``quarantines``: the late copies' then the replays' (the group's sockets after
    the link socket, in their order), or the replays' alone (late copies then reach
    the link socket, as without steering). ``opening``: the sockets were passed in,
    so a quarantine may hold what a group without a program (or another process's
    program) put there; the caller reads them through journaled drains until
    :meth:`opened`. ``enabled`` False: the program steers nothing (sockets passed
    in, steering off in the config), and the quarantines, which systemd keeps in
    the group, get nothing.
    """

    def __init__(
        self,
        link: socket.socket,
        quarantines: Sequence[socket.socket],
        *,
        enabled: bool = True,
        opening: bool = False,
    ) -> None:
        roles = ROLES[1 + len(quarantines)]
        self.link = link
        self.quarantines = dict(zip(roles[1:], quarantines, strict=True))
        self.enabled = enabled
        self.opening = opening
        # The group index of each role's socket: the bind order, until tally() proves
        # another (_swap).
        self.index = {role: i for i, role in enumerate(roles)}
        # Datagrams each quarantine took (drained + its kernel drops): rejected_steered_*.
        self.steered = dict.fromkeys(self.quarantines, 0)
        self.order_swaps = 0
        self._drops_at_start = {role: kernel_drops(q) for role, q in self.quarantines.items()}
        self._drained = dict.fromkeys(self.quarantines, 0)
        self._attached: dict[int, StreamState] | None = None
        # Each stream's furthest committed position yet: what the program names, so that
        # a stream's threshold never falls back (a new epoch has no position until its
        # first block is delivered) and a datagram's class only falls (_drain).
        self._known: dict[int, StreamState] = {}
        self._ever_named: set[int] = set()  # the streams any program attached has named
        self._ended: set[int] = set()  # streams whose epoch ended, waiting for the next one
        self._seen: object = None  # the positions object last looked at
        self._attached_at = float("-inf")
        self.max_streams = MAX_STREAMS
        self._sink = bytearray(HEADER_READ)
        if not opening:
            self.shrink()  # else the caller shrinks them once its drains have read the size

    def counters(self) -> dict[str, int]:
        """The rejection counters: late copies and replays, each its quarantine's (a group
        without a late quarantine has its late copies counted by the decoder)."""
        return {f"rejected_steered_{role}": count for role, count in self.steered.items()}

    def shrink(self) -> None:
        """The quarantines' buffers as small as the kernel allows (systemd sizes every
        socket of the unit alike): full, a quarantine drops, and its drops are its count."""
        for quarantine in self.quarantines.values():
            quarantine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, QUARANTINE_RCVBUF)

    def opened(self) -> None:
        """What the quarantines held at the start has been read: from now on they count."""
        self.opening = False

    def update(
        self, positions: Mapping[int, StreamState], now: float, *, force: bool = False
    ) -> bool:
        """Attach the program for ``positions`` if they moved, at most every
        :data:`REATTACH_EVERY_S` unless ``force`` or a stream's epoch changed; whether
        it was attached.

        A new epoch is attached at once: until then the program would count the
        old epoch's replays (a capture played back after the transmitter restarted)
        as late copies of the position it still holds.
        """
        if not force:
            if positions is self._seen:
                return False  # the same commit's positions
            if now - self._attached_at < REATTACH_EVERY_S and not self._new_epoch(positions):
                return False  # too soon, and being late only steers less
        self._remember(positions)
        wanted = self._named(self._known) if self.enabled else {}
        if wanted == self._attached:
            return False
        while True:
            try:
                attach(self.link, program(wanted, self.index))
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
        self._ever_named.update(wanted)
        return True

    def _remember(self, positions: Mapping[int, StreamState]) -> None:
        """Each stream's furthest position into ``_known``. A stream the positions no longer
        name has had its epoch ended by the decoder (a transmitter restarted; its new
        epoch has no position until its first block is delivered): the whole old epoch
        is behind it, replays as the decoder counts them, so its threshold becomes the
        start of the next epoch, once (any new epoch is at or above it)."""
        known, ended = self._known, self._ended
        for stream, position in positions.items():
            old = known.get(stream)
            if old is None or (position.epoch, position.next_seq) > (old.epoch, old.next_seq):
                known[stream] = position
            ended.discard(stream)
        for stream in known.keys() - positions.keys() - ended:
            known[stream] = StreamState(epoch=known[stream].epoch + 1, next_seq=0, next_record=0)
            ended.add(stream)

    def _new_epoch(self, positions: Mapping[int, StreamState]) -> bool:
        """A named stream in another epoch, or whose epoch has just ended: attached at once."""
        for stream, old in (self._attached or {}).items():
            position = positions.get(stream)
            if position is None:
                if stream not in self._ended:
                    return True
            elif position.epoch != old.epoch:
                return True
        return False

    def _named(self, positions: Mapping[int, StreamState]) -> dict[int, StreamState]:
        """The positions the program names: the first ``max_streams`` streams by id."""
        return dict(sorted(positions.items())[: self.max_streams])

    def tally(self) -> dict[str, int]:
        """Drain the quarantines (checking that the program sent each datagram there) and
        count each with its kernel drops: ``rejected_steered_late``, ``_replay``."""
        if self.opening:
            # Read by the decoder meanwhile; only their drops are the program's.
            for role, quarantine in self.quarantines.items():
                drops = kernel_drops(quarantine) - self._drops_at_start[role]
                self.steered[role] = max(self.steered[role], drops)
            return self.steered
        wrong = {role: self._drain(role) for role in self.quarantines}
        misplaced = next((role for role, seen in wrong.items() if LINK in seen), None)
        if misplaced is not None:
            self._swap(misplaced, LINK)
        elif LATE in wrong.get(REPLAY, ()):
            self._swap(REPLAY, LATE)
        return self.steered

    def _drain(self, role: str) -> set[str]:
        """Empty one quarantine (at most :data:`DRAIN_PER_TURN`: the rest are its kernel
        drops); the classes of what it held that prove the group's order wrong.

        A named stream's position only grows (``_known``), so a datagram's class
        only falls (link, then late, then replay) between its steering and now: a
        datagram of the link's class in any quarantine, or of the late copies' in
        the replays', was not steered there by this program's order (a late
        quarantine's replay was late when steered). A stream the program no longer
        names (fewer streams fit, ``_named``) proves nothing: its datagram may have
        been steered by an earlier program that named it. One no program ever named
        does: every program sent its datagrams to the link socket.
        """
        quarantine, sink, attached = self.quarantines[role], self._sink, self._attached or {}
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        wrong: set[str] = set()
        for _ in range(DRAIN_PER_TURN):
            try:
                length = quarantine.recv_into(sink, HEADER_READ, flags)
            except OSError:  # empty (BlockingIOError), or nothing more to take
                break
            self._drained[role] += 1
            datagram = sink if length >= HEADER_READ else b""
            kind = classify(datagram, attached)
            if kind not in self.quarantines:
                kind = LINK  # a class without a quarantine goes to the link socket
            if kind == role or (role == LATE and kind == REPLAY):
                continue
            if kind == LINK and self._named_before(datagram, attached):
                continue
            wrong.add(kind)
        drops = kernel_drops(quarantine) - self._drops_at_start[role]
        # Never backwards, should /proc/net/udp fail to name the socket once.
        self.steered[role] = max(self.steered[role], drops + self._drained[role])
        return wrong

    def _named_before(
        self, datagram: bytes | bytearray | memoryview, attached: Mapping[int, StreamState]
    ) -> bool:
        """A datagram the program reads, of a stream an earlier program named and this
        one does not."""
        if len(datagram) < HEADER_READ:
            return False
        magic, version, stream, _epoch, _seq = _HEAD.unpack_from(datagram)
        return (
            magic == MAGIC
            and version in STEERED_VERSIONS
            and stream not in attached
            and stream in self._ever_named
        )

    def _swap(self, role: str, other: str) -> None:
        """A quarantine got datagrams the program sends to ``other``'s index: the group's
        order is not the one the program assumes. Attach it again with the two swapped,
        then empty the quarantines of what the old order put there."""
        self.index[role], self.index[other] = self.index[other], self.index[role]
        self.order_swaps += 1
        log.error(
            "a quarantine got datagrams the program never steers there: the order of "
            "the reuseport group is not the unit's; indices swapped",
            quarantine=role,
            index=self.index,
            fix="the ListenDatagram= lines of diode-rx.socket in the order the unit gives",
        )
        positions, self._attached, self._seen = self._attached or {}, None, None
        self.update(positions, 0.0, force=True)
        for quarantine in self.quarantines:
            self._drain(quarantine)

    def close(self) -> None:
        for quarantine in self.quarantines.values():
            with contextlib.suppress(OSError):
                quarantine.close()


def link_sockets(
    listen: str, port: int, rcvbuf: int, interface: str | None, *, steer: bool
) -> tuple[socket.socket, Steering | None, bool]:
    """The link socket (passed in, else opened here), its steering if it has quarantines,
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
                fix="the ListenDatagram= lines of systemd/diode-rx.socket (docs/OPERATIONS.md)",
            )
        return link, None, True
    if len(passed) == 2 and steer:
        log.warning(
            "two sockets passed in (LISTEN_FDS=2): replays are steered, late copies are "
            "read and rejected by the receiver",
            fix="the third ListenDatagram= line of systemd/diode-rx.socket (docs/OPERATIONS.md)",
        )
    return link, Steering(link, passed[1:], enabled=steer, opening=True), True
