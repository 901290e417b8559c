"""Full blocks framed in groups, sent round-robin; the rest alone, with the whole burst repair.

The encoder and the send queue, sans I/O, with the real decoder (and the
receiver's link profile) at the other end. The fault model's figures for these
settings are in tests/test_fault_model.py.
"""

from __future__ import annotations

import pytest

from diode.config.link import FecSettings, LinkSettings
from diode.decoder import Decoder, Delivered, Gap, LinkProfile
from diode.encoder import EncodedBlock, Encoder, SendQueue
from diode.errors import DiodeError
from diode.records import Record, Sample
from tests.core_support import EPOCH, STREAM, fixed_key, keyring
from transmitter.files import LaneQueue

KEY = fixed_key()
SEQ = slice(24, 32)  # block sequence in the datagram header (diode/wire.py)
K_OFFSET, N_OFFSET = 33, 34
FEC = FecSettings()
N_GROUPED = FEC.k + FEC.repair_for(FEC.k)


def sample(i: int, size: int = 1000) -> Record:
    return Sample(tag_id=i % 100, ts_ns=1_764_000_000_000_000_000 + i, value="v" * size)


def encoder(fec: FecSettings = FEC) -> Encoder:
    return Encoder(link=LinkSettings(fec=fec), key=KEY, stream_id=STREAM, epoch=EPOCH)


def fill(enc: Encoder, full_blocks: int, now: float = 0.0, start: int = 0) -> int:
    """Add records until ``full_blocks`` blocks have filled; returns the next record index."""
    i = start
    closed = 0
    while closed < full_blocks:
        before = enc.room
        enc.add(sample(i), now)
        i += 1
        if enc.room > before:  # a new block was opened: the previous one filled
            closed += 1
    return i


def shape(datagram: bytes) -> tuple[int, int, int]:
    return int.from_bytes(datagram[SEQ], "big"), datagram[K_OFFSET], datagram[N_OFFSET]


def decoder(fec: FecSettings = FEC) -> Decoder:
    profile = LinkProfile.of(LinkSettings().datagram_size, fec)
    return Decoder(keyring(KEY), profiles={STREAM: profile})


def delivered(dec: Decoder, datagrams: list[bytes]) -> tuple[int, int]:
    """(records delivered, records reported lost) once ``datagrams`` went in."""
    for datagram in datagrams:
        dec.receive(datagram, 0.0)
    dec.poll(60.0)
    events = dec.events()
    return (
        sum(len(e.records) for e in events if isinstance(e, Delivered)),
        sum(e.records_lost for e in events if isinstance(e, Gap)),
    )


def test_four_full_blocks_go_as_one_group_in_round_robin() -> None:
    enc = encoder()
    fill(enc, 4)
    (group,) = enc.take()
    assert group.blocks == 4
    assert len(group.datagrams) == 4 * N_GROUPED == 4 * 49
    shapes = [shape(d) for d in group.datagrams]
    assert {(k, n) for _, k, n in shapes} == {(32, 49)}
    # Datagram i of blocks 0, 1, 2, 3, then i + 1: the stride of every block is 4.
    assert [seq for seq, _, _ in shapes] == [0, 1, 2, 3] * N_GROUPED
    assert enc.pending_records == 1  # the record that did not fit opens the next block


def test_full_blocks_wait_for_their_group_within_the_linger() -> None:
    enc = encoder()
    end = fill(enc, 3)
    assert enc.full_blocks_held == 3
    assert not enc.blocks_ready
    assert enc.deadline() == pytest.approx(0.005)
    enc.poll(0.004)
    assert not enc.blocks_ready
    fill(enc, 1, now=0.004, start=end)
    assert [u.blocks for u in enc.take()] == [4]  # the fourth completed it in time


def test_the_linger_sends_held_full_blocks_alone_with_the_whole_burst_repair() -> None:
    enc = encoder()
    end = fill(enc, 3)
    enc.poll(0.005)
    units = enc.take()
    assert enc.pending_records == 0
    assert all(u.blocks == 1 for u in units)
    shapes = [shape(u.datagrams[0]) for u in units]
    # Three full blocks and an open record, cut at k - 1 = 31 symbols: never k alone.
    assert [k for _, k, _ in shapes] == [31, 31, 31, 3]
    assert all(n == k + FEC.repair_for(k) for _, k, n in shapes)
    assert all(n - k >= FEC.repair_burst for _, k, n in shapes)
    assert [s for s, _, _ in shapes] == [0, 1, 2, 3]
    assert delivered(decoder(), [d for u in units for d in u.datagrams]) == (end, 0)


def test_a_block_closed_short_of_k_goes_alone_after_the_held_ones() -> None:
    """A record of more than a symbol can close a block at k - 1: nothing is reordered."""
    enc = encoder()
    end = fill(enc, 2)
    assert enc.full_blocks_held == 2
    enc.add(sample(end, size=41_000), 0.0)  # fills the open block to 30 symbols...
    enc.add(sample(end + 1, size=4_000), 0.0)  # ...and this one does not fit
    units = enc.take()
    assert all(u.blocks == 1 for u in units)
    assert sum(u.records for u in units) == end + 1
    assert [shape(u.datagrams[0])[0] for u in units] == list(range(len(units)))
    assert max(shape(u.datagrams[0])[1] for u in units) <= FEC.k_alone


def test_a_record_must_fit_a_block_alone() -> None:
    enc = encoder()
    too_large = enc.capacity + 1
    # One symbol more in a group's block, less its manifest's 3 digests of the others.
    assert enc.room - enc.capacity == 1424 - 3 * 32
    with pytest.raises(DiodeError) as caught:
        enc.add(Sample(tag_id=1, ts_ns=1, value=b"x" * too_large), 0.0)
    assert caught.value.reason == "record_too_large"


def test_without_groups_a_full_block_goes_alone_with_k_symbols() -> None:
    fec = FecSettings(group=1)
    enc = encoder(fec)
    fill(enc, 1)
    (block,) = enc.take()
    assert block.blocks == 1
    assert shape(block.datagrams[0])[1:] == (32, 56)


def test_a_burst_of_group_times_spare_is_repaired_and_one_more_is_not() -> None:
    """A group gives each block a quarter of a burst: 4 x 17 consecutive lost is within budget."""
    spare = N_GROUPED - FEC.k  # 17
    for burst, lost_blocks in ((4 * spare, 0), (4 * spare + 1, 1)):
        enc = encoder()
        end = fill(enc, 4)
        enc.flush()
        datagrams = [d for u in enc.take() for d in u.datagrams]
        start = 4 * 5 + 2  # not on a row boundary: blocks 2 and 3 lose first
        kept = datagrams[:start] + datagrams[start + burst :]
        records_per_block = (end - 1) // 4
        assert delivered(decoder(), kept) == (
            end - lost_blocks * records_per_block,
            lost_blocks * records_per_block,
        )


def test_the_send_queue_never_narrows_a_group_stride() -> None:
    """Groups beside lone blocks, interleaved, put back: two datagrams of a grouped block
    are always at least 4 apart."""
    enc = encoder()
    units: list[EncodedBlock] = []
    i = 0
    for _ in range(3):
        i = fill(enc, 5, start=i)  # a group and one held full block
        enc.flush()  # the held one goes alone, cut in two
        units += enc.take()
    assert [u.blocks for u in units].count(4) == 3
    grouped = {u.seq + j for u in units if u.blocks > 1 for j in range(u.blocks)}
    for interleave in (1, 2, 4, 8):
        queue = SendQueue(capacity=100_000, interleave=interleave)
        for unit in units[:3]:
            queue.push(unit)
        order: list[bytes] = []
        rest = units[3:]
        pops = 0
        while (datagram := queue.pop()) is not None:
            pops += 1
            if pops % 37 == 0:  # the socket was full: put back, it goes next
                queue.requeue_all([datagram])
                continue
            order.append(datagram)
            if rest and pops % 50 == 0:
                queue.push(rest.pop(0))
        assert sorted(order) == sorted(d for u in units for d in u.datagrams)
        last: dict[int, int] = {}
        for position, datagram in enumerate(order):
            seq = shape(datagram)[0]
            if seq in grouped and seq in last:
                assert position - last[seq] >= 4, (interleave, seq, position)
            last[seq] = position


def test_the_send_queue_drops_a_whole_group_and_counts_its_blocks() -> None:
    enc = encoder()
    fill(enc, 4)
    (group,) = enc.take()
    queue = SendQueue(capacity=len(group.datagrams) + 10, interleave=4)
    assert queue.push(group) == 0
    assert queue.push(EncodedBlock(seq=4, records=1, datagrams=(b"x",) * 20)) == 4
    assert (queue.blocks_dropped, queue.records_dropped) == (4, group.records)


@pytest.mark.parametrize(
    "fec",
    [FEC, FecSettings(group=1), FecSettings(k=8, repair_ratio=0.5, repair_burst=3, group=2)],
)
def test_the_receivers_link_profile_takes_every_shape_the_encoder_sends(fec: FecSettings) -> None:
    """One n for each k still: a receiver with [streams.link] needs no change."""
    profile = LinkProfile.of(LinkSettings().datagram_size, fec)
    enc = encoder(fec)
    i = fill(enc, 2 * fec.group + 1)
    for size in (10, 3000, 9000):
        enc.add(sample(i, size), 0.0)
        i += 1
        enc.flush()
    shapes = {shape(d)[1:] for u in enc.take() for d in u.datagrams}
    assert len(shapes) > 2
    assert all(n == profile.n_for_k[k] for k, n in shapes)


def test_the_file_lane_never_comes_between_a_groups_datagrams_closer_than_its_stride() -> None:
    """The file port's queue shares the pacer (transmitter/files.py): it only fills gaps."""
    enc = encoder()
    fill(enc, 8)
    groups = enc.take()
    queue = LaneQueue(capacity=100_000, interleave=4, file_capacity=10_000)
    queue.files.push(EncodedBlock(seq=0, records=1, datagrams=tuple(b"f%d" % i for i in range(30))))
    queue.push(groups[0])
    order: list[bytes] = []
    while (datagram := queue.pop()) is not None:
        order.append(datagram)
        if len(order) == 100:
            queue.push(groups[1])  # a group framed while files wait
    assert len(order) == 30 + 8 * N_GROUPED
    last: dict[int, int] = {}
    for position, datagram in enumerate(order):
        if datagram.startswith(b"f"):
            continue
        seq = shape(datagram)[0]
        if seq in last:
            assert position - last[seq] >= 4
        last[seq] = position
