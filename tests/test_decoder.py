"""The receive path, attack by attack: each bad datagram bumps exactly its counter."""

from __future__ import annotations

import random
import zlib

import pytest

from diode.decoder import Decoder, Delivered, EpochStarted
from diode.keys import Keyring, SigningKey, TrustedKey
from diode.replay import pack_states, unpack_states
from diode.wire import CRC_OFFSET, HEADER_SIZE, gate_key, link_tag
from tests.core_support import (
    EPOCH,
    STREAM,
    delivered,
    encode_blocks,
    feed,
    fixed_key,
    gaps,
    keyring,
    new_decoder,
    samples,
    small_link,
    with_valid_crc,
)


def rejected(decoder: Decoder) -> dict[str, int]:
    return {k: v for k, v in decoder.counters.items() if k.startswith("rejected_")}


def test_clean_stream_delivers_every_record_in_order() -> None:
    records = samples(300)
    decoder = new_decoder()
    events = feed(decoder, [d for b in encode_blocks(records, per_block=40) for d in b])
    assert delivered(events) == records
    seqs = [e.seq for e in events if isinstance(e, Delivered)]
    assert seqs == sorted(seqs) == list(range(len(seqs)))
    assert decoder.counters["records_delivered"] == 300


def test_forged_key_publishes_nothing_and_counts_unknown_key() -> None:
    forged = encode_blocks(samples(10), key=fixed_key(9))
    decoder = new_decoder()
    events = feed(decoder, [d for b in forged for d in b])
    assert delivered(events) == []
    assert rejected(decoder) == {"rejected_unknown_key": sum(map(len, forged))}


def test_valid_key_id_with_a_bad_signature_is_rejected() -> None:
    """An attacker who knows a key id (it is public) but not the private key."""
    real = fixed_key(1)
    attacker = fixed_key(2)
    object.__setattr__(attacker, "key_id", real.key_id)  # claim the real key's id
    (block,) = encode_blocks(samples(10), key=attacker)
    decoder = new_decoder(real)
    k = block[0][33]
    events = feed(decoder, block)
    assert delivered(events) == []
    # Every k symbols make one rebuild attempt: the first fails verification, and
    # the next, the same signed bytes and signature rebuilt from other symbols, is
    # known by its fingerprint before a second verify.
    attempts = len(block) // k
    assert attempts == 2
    assert rejected(decoder) == {"rejected_bad_signature": 1, "rejected_known_forgery": 1}
    assert decoder.counters["symbols"] == len(block)


def test_key_of_another_stream_is_rejected() -> None:
    key, other = fixed_key(1), fixed_key(2)
    decoder = Decoder(
        Keyring(
            [
                TrustedKey(stream_id=8, public=key.private.public_key()),
                TrustedKey(stream_id=STREAM, public=other.private.public_key()),
            ]
        )
    )
    (block,) = encode_blocks(samples(5), key=key)  # stream 7, signed by stream 8's key
    assert delivered(feed(decoder, block)) == []
    assert rejected(decoder) == {"rejected_wrong_stream": len(block)}


def test_a_stream_nobody_configured_is_rejected_at_the_gate() -> None:
    decoder = Decoder(keyring(fixed_key(), stream=8))
    (block,) = encode_blocks(samples(5))
    assert delivered(feed(decoder, block)) == []
    assert rejected(decoder) == {"rejected_unknown_stream": len(block)}


def test_bit_flips_are_caught_by_the_crc_and_the_block_still_rebuilds() -> None:
    (block,) = encode_blocks(samples(20))
    flipped = [bytearray(d) for d in block]
    for d in flipped[:2]:  # within the repair budget
        d[150] ^= 0x04
    decoder = new_decoder()
    events = feed(decoder, [bytes(d) for d in flipped])
    assert delivered(events) == samples(20)
    counts = rejected(decoder)
    assert counts.pop("rejected_bad_checksum") == 2
    assert set(counts) <= {"rejected_late"}  # surplus symbols after the rebuild


def resealed(datagram: bytes, offset: int, value: bytes, psk: bytes | None, *, crc: bool) -> bytes:
    """A datagram changed by someone who holds the link secret: a valid link tag (on a
    gated stream), and a valid CRC when ``crc``."""
    data = bytearray(datagram)
    data[offset : offset + len(value)] = value
    end = len(data) - (16 if psk else 0)
    if crc:
        checksum = zlib.crc32(data[HEADER_SIZE:end], zlib.crc32(data[:CRC_OFFSET]))
        data[CRC_OFFSET:HEADER_SIZE] = checksum.to_bytes(4, "big")
    if psk:
        data[end:] = link_tag(gate_key(psk, STREAM), data[:end])
    return bytes(data)


@pytest.mark.parametrize("psk", [None, bytes(range(32))])
def test_a_symbol_of_a_block_under_way_gets_the_checks_its_header_leaves(
    psk: bytes | None,
) -> None:
    """A datagram joining an assembly is checked for what its key does not fix: an index
    out of range, a CRC that does not match (gated: the link tag holds, the CRC fails)."""
    (block,) = encode_blocks(samples(60), psk=psk)
    k, n = block[0][33], block[0][34]
    assert k > 3, "the bad datagrams must join the block, not start or end it"
    bad_index = resealed(block[1], 32, bytes([n]), psk, crc=True)
    bad_crc = resealed(block[2], 100, bytes([block[2][100] ^ 1]), psk, crc=False)
    decoder = new_decoder(psk=psk)
    events = feed(decoder, [block[0], bad_index, bad_crc, *block[1:]])
    assert delivered(events) == samples(60)
    assert rejected(decoder) == {
        "rejected_malformed": 1,
        "rejected_bad_checksum": 1,
        "rejected_late": len(block) - k,
    }


def test_truncated_datagrams_are_counted() -> None:
    (block,) = encode_blocks(samples(20))
    decoder = new_decoder()
    feed(decoder, [block[0][:30], block[1][:200]])
    assert rejected(decoder) == {"rejected_short": 1, "rejected_bad_checksum": 1}


def test_duplicates_and_reordering_deliver_each_record_once() -> None:
    blocks = encode_blocks(samples(400), per_block=50)
    datagrams = [d for b in blocks for d in b]
    dupes = datagrams + datagrams[::3]
    random.Random(4).shuffle(dupes)
    decoder = new_decoder()
    events = feed(decoder, dupes)
    assert delivered(events) == samples(400)
    counts = rejected(decoder)
    assert set(counts) <= {"rejected_late", "rejected_duplicate"}
    assert sum(counts.values()) + decoder.counters["symbols"] == len(dupes)


def test_replay_in_the_same_run_is_rejected() -> None:
    blocks = encode_blocks(samples(200), per_block=50)
    datagrams = [d for b in blocks for d in b]
    decoder = new_decoder()
    assert delivered(feed(decoder, datagrams)) == samples(200)
    assert delivered(feed(decoder, datagrams, now=100.0)) == []
    assert decoder.counters["symbols"] == sum(b[0][33] for b in blocks)


def test_replay_after_a_receiver_restart_is_rejected_with_the_saved_position() -> None:
    blocks = encode_blocks(samples(200), per_block=50)
    first = new_decoder()
    assert len(delivered(feed(first, [d for b in blocks[:2] for d in b]))) == 100
    saved = pack_states(first.positions())
    second = Decoder(keyring(fixed_key()), state=unpack_states(saved))
    # The capture of the first two blocks replayed, then the live blocks 2 and 3.
    events = feed(second, [d for b in blocks for d in b])
    assert delivered(events) == samples(200)[100:]
    assert gaps(events) == []


def test_receiver_restart_reports_exactly_the_records_it_missed() -> None:
    blocks = encode_blocks(samples(200), per_block=50)
    first = new_decoder()
    feed(first, [d for b in blocks[:1] for d in b])
    second = Decoder(keyring(fixed_key()), state=unpack_states(pack_states(first.positions())))
    events = feed(second, [d for b in blocks[3:] for d in b])
    (gap,) = gaps(events)
    assert (gap.first_seq, gap.last_seq, gap.records_lost, gap.exact) == (1, 2, 100, True)
    assert delivered(events) == samples(200)[150:]


def test_old_epoch_is_rejected_after_a_transmitter_restart() -> None:
    old = encode_blocks(samples(50), epoch=EPOCH)
    new = encode_blocks(samples(50, start=1000), epoch=EPOCH + 5000)
    decoder = new_decoder()
    events = feed(decoder, [d for b in old + new for d in b])
    assert delivered(events) == samples(50) + samples(50, start=1000)
    started = [e for e in events if isinstance(e, EpochStarted)]
    assert [(e.epoch, e.previous) for e in started] == [(EPOCH, None), (EPOCH + 5000, EPOCH)]
    replay = [d for b in old for d in b]
    assert delivered(feed(decoder, replay, now=50.0)) == []
    assert rejected(decoder)["rejected_replay"] == len(replay)


def test_loss_beyond_the_repair_budget_is_reported_exactly() -> None:
    link = small_link(k=4, ratio=0.0, burst=1)
    blocks = encode_blocks(samples(300), link=link, per_block=30)
    kept = [d for i, b in enumerate(blocks) for d in (b[:1] if i in (3, 4, 7) else b)]
    decoder = new_decoder()
    events = feed(decoder, kept)
    assert [(g.first_seq, g.last_seq, g.records_lost) for g in gaps(events)] == [
        (3, 4, 60),
        (7, 7, 30),
    ]
    assert len(delivered(events)) == 300 - 90
    assert decoder.counters["records_lost"] == 90


def test_a_lost_block_waits_for_the_reorder_timeout_then_is_declared() -> None:
    blocks = encode_blocks(samples(90), per_block=30)
    decoder = new_decoder(reorder_timeout_s=0.5)
    for d in blocks[0] + blocks[2]:
        decoder.receive(d, 1.0)
    assert len(delivered(decoder.events())) == 30
    decoder.poll(1.4)
    assert gaps(decoder.events()) == []
    assert decoder.deadline() == pytest.approx(1.5)
    decoder.poll(1.5)
    events = decoder.events()
    assert [(g.first_seq, g.records_lost) for g in gaps(events)] == [(1, 30)]
    assert len(delivered(events)) == 30


def test_the_surplus_of_a_block_that_waited_its_turn_leaves_the_table() -> None:
    """Block 2 is complete before block 1 (loss made block 1 need its repair symbols): it
    waits its turn, and its symbols after the k-th gather in an assembly of their own.
    Once block 2 is authenticated that assembly goes with it; left to its 5 s timeout,
    such leftovers filled the table at line rate, and a full table evicts every new
    block's first symbol (1 000 Mb/s: 50 000 evictions a second, 4 blocks in 5 lost)."""
    first, second, third = encode_blocks(samples(90), per_block=30)
    k = second[0][33]
    assert len(third) > k + 1  # repair symbols to spare
    decoder = new_decoder()
    for datagram in first + second[: k - 1] + third:  # block 2's surplus included
        decoder.receive(datagram, 1.0)
    assert delivered(decoder.events()) == samples(30)  # block 2 waits for block 1
    waiting = decoder.assembly_bytes
    assert waiting > 0
    decoder.receive(second[k - 1], 1.0)  # block 1's k-th symbol: both are authenticated
    assert delivered(decoder.events()) == samples(60, start=30)
    assert decoder.assembly_bytes == 0  # no leftover of block 2 waits for its timeout
    for datagram in second[k:]:  # what is still on its way is late, not a new assembly
        decoder.receive(datagram, 1.0)
    assert decoder.assembly_bytes == 0


def test_a_full_table_drops_the_assemblies_of_blocks_declared_lost_first() -> None:
    """An overrun receiver's kernel drops a burst: blocks lose more symbols than their
    repair covers, and their assemblies can never complete. Once the stream's position
    has passed those blocks (declared lost), their assemblies go first when the table is
    full; evicted oldest first behind the single-symbol ones, they kept it full, and every
    new block's first symbol was evicted: the stream after the burst was lost too."""
    blocks = encode_blocks(samples(300), per_block=30)
    k = blocks[0][0][33]
    decoder = new_decoder(reorder_timeout_s=0.1)
    for block in blocks[1:6]:  # the burst: each of these blocks keeps k - 1 symbols
        blocks[0] += block[: k - 1]
    for datagram in blocks[0] + blocks[6][:k]:
        decoder.receive(datagram, 1.0)
    lost = decoder._table.bytes  # block 6 waits its turn, outside the table
    decoder.poll(2.0)  # block 1's reorder timeout: blocks 1-5 declared lost
    events = decoder.events()
    assert [(g.first_seq, g.last_seq) for g in gaps(events)] == [(1, 5)]
    assert len(delivered(events)) == 60  # blocks 0 and 6
    # The bound holds exactly what the lost blocks left: a new block has room only if
    # their assemblies go (dropped by the poll now; at the bound before that).
    decoder._table.max_bytes = lost
    for datagram in [d for b in blocks[7:] for d in b]:
        decoder.receive(datagram, 2.0)
    decoder.poll(20.0)
    assert delivered(decoder.events()) == samples(300)[210:]  # every block after the burst
    assert decoder.counters["assemblies_passed"] >= 1  # as many as room was needed for
    assert decoder.counters["assemblies_evicted"] == 0


def test_blocks_declared_lost_leave_nothing_in_the_table() -> None:
    """Once a reorder timeout declares blocks lost, their assemblies can never complete:
    they go at once, counted, instead of waiting out the assembly timeout (5 s). An
    overrun receiver at the 1000 Mb/s cap with 1 % loss kept 350 of them, 8 MB, a third
    of its table, and the heap they churned through stayed with the process."""
    blocks = encode_blocks(samples(210), per_block=30)
    k = blocks[0][0][33]
    decoder = new_decoder(reorder_timeout_s=0.1)
    for block in blocks[1:6]:  # each keeps k - 1 symbols (and probation: 1 symbol)
        blocks[0] += block[: k - 1] if block is not blocks[5] else block[:1]
    for datagram in blocks[0] + blocks[6]:
        decoder.receive(datagram, 1.0)
    assert decoder.assembly_bytes > 0
    decoder.poll(1.5)  # before the assembly timeout (5 s): blocks 1-5 declared lost
    events = decoder.events()
    assert [(g.first_seq, g.last_seq) for g in gaps(events)] == [(1, 5)]
    assert decoder.assembly_bytes == 0
    assert decoder.counters["assemblies_passed"] == 5
    assert decoder.counters["assemblies_expired"] == decoder.counters["assemblies_evicted"] == 0


def test_the_waiting_room_hands_on_a_bounded_number_of_blocks_per_call() -> None:
    """When the block everything waits behind is declared lost (or comes late), every
    block behind it has its turn at once: an overrun receiver at the cap handed on 350
    in one call, and held their records and messages together (31 MB). Now each call
    hands on at most ``served_per_call``; deadline() says the rest is due, and the next
    calls deliver it, in order, nothing lost."""
    blocks = encode_blocks(samples(600), per_block=30)  # 20 blocks
    for late in (False, True):
        decoder = new_decoder(reorder_timeout_s=0.1, served_per_call=4)
        for block in blocks[:1] + blocks[2:]:  # block 1 missing: blocks 2-19 wait for it
            for datagram in block:
                decoder.receive(datagram, 1.0)
        assert len(delivered(decoder.events())) == 30  # block 0
        if late:
            for datagram in blocks[1]:
                decoder.receive(datagram, 1.05)  # its turn: 1 verified, then 4 handed on
            first = delivered(decoder.events())
            assert first == samples(600)[30:180]
        else:
            decoder.poll(1.2)  # block 1 declared lost, 4 handed on
            events = decoder.events()
            assert [(g.first_seq, g.last_seq) for g in gaps(events)] == [(1, 1)]
            first = delivered(events)
            assert first == samples(600)[60:180]
        rest = []
        now = 1.2
        while (due := decoder.deadline()) is not None and due <= now:
            decoder.poll(now)
            got = delivered(decoder.events())
            assert 0 < len(got) <= 4 * 30
            rest += got
        assert first + rest == samples(600)[60 - 30 * late :]
        assert decoder.counters["blocks_lost"] == (0 if late else 1)
        assert decoder.counters["rejected_waiting_full"] == 0


def test_encrypted_stream_round_trips_and_rejects_plaintext_and_wrong_secret() -> None:
    psk = bytes(range(32))
    records = samples(60)
    (sealed,) = encode_blocks(records, psk=psk)
    assert b"tag" not in b"".join(sealed)
    assert delivered(feed(new_decoder(psk=psk), sealed)) == records

    # A wrong secret fails the link tag of every datagram, before any other work.
    wrong = new_decoder(psk=bytes(32))
    assert delivered(feed(wrong, sealed)) == []
    assert rejected(wrong) == {"rejected_bad_tag": len(sealed)}

    # Ungated (version 1) datagrams on a stream with a secret never pass the gate.
    plain = new_decoder(psk=psk)
    (unsealed,) = encode_blocks(records)
    assert delivered(feed(plain, unsealed)) == []
    assert rejected(plain) == {"rejected_ungated": len(unsealed)}


def test_a_flood_of_forged_symbols_stays_within_the_memory_bound() -> None:
    """Forged datagrams that pass the CRC (an attacker can compute one) with a real key id."""
    real = fixed_key()
    attacker = SigningKey.generate()
    object.__setattr__(attacker, "key_id", real.key_id)
    bound = 200_000
    decoder = new_decoder(real, max_assembly_bytes=bound)
    rng = random.Random(7)
    (forged,) = encode_blocks(samples(40), key=attacker)  # k > 1: it waits for more
    live = encode_blocks(samples(400), per_block=40)
    for i, block in enumerate(live):
        for datagram in block:
            decoder.receive(datagram, 0.0)
            for _ in range(20):  # 20 forged single symbols per real one, random blocks
                seq = rng.randrange(2**40).to_bytes(8, "big")
                decoder.receive(with_valid_crc(rng.choice(forged), 24, seq), 0.0)
            assert decoder.assembly_bytes <= bound
        assert decoder.counters["blocks_delivered"] >= i  # the real stream keeps flowing
    decoder.poll(10.0)
    assert delivered(decoder.events()) == samples(400)
    assert decoder.counters["assemblies_evicted"] > 0


def test_losing_the_first_blocks_of_a_new_epoch_is_an_exact_gap() -> None:
    old = encode_blocks(samples(100), per_block=50, epoch=EPOCH)
    new = encode_blocks(samples(150, start=500), per_block=50, epoch=EPOCH + 1)
    decoder = new_decoder()
    events = feed(decoder, [d for b in old + new[1:] for d in b])
    assert delivered(events) == samples(100) + samples(100, start=550)
    (gap,) = gaps(events)
    assert (gap.epoch, gap.first_seq, gap.last_seq, gap.records_lost) == (EPOCH + 1, 0, 0, 50)


def test_a_full_send_queue_drops_the_oldest_waiting_blocks_whole() -> None:
    from diode.encoder import EncodedBlock, SendQueue

    def block(seq: int, datagrams: int) -> EncodedBlock:
        return EncodedBlock(seq=seq, records=10 * seq, datagrams=(bytes([seq]),) * datagrams)

    queue = SendQueue(capacity=10, interleave=1)
    assert queue.push(block(1, 4)) == 0
    assert queue.pop() == b"\x01"  # block 1 is being sent: it stays whole
    assert queue.push(block(2, 3)) == 0
    assert queue.push(block(3, 3)) == 0
    assert queue.push(block(4, 5)) == 2  # 2 and 3 make room for the newest
    assert (queue.blocks_dropped, queue.records_dropped) == (2, 50)
    assert len(queue) == 8
    sent = [queue.pop() for _ in range(8)]
    assert sent == [b"\x01"] * 3 + [b"\x04"] * 5
    assert queue.push(block(5, 11)) == 1  # can never fit: dropped itself
    assert (queue.blocks_dropped, queue.records_dropped) == (3, 100)
