"""Window, verify budget, failure memory, freshness on a fresh start, tail estimates."""

from __future__ import annotations

import pytest

from diode.decoder import Decoder, DecoderSettings, EpochStarted
from diode.keys import SigningKey
from diode.records import Heartbeat
from diode.replay import StreamState
from tests.core_support import (
    EPOCH,
    delivered,
    encode_blocks,
    feed,
    fixed_key,
    gaps,
    keyring,
    new_decoder,
    samples,
    with_valid_crc,
)


def liar() -> SigningKey:
    """A forger's key claiming the real key's id (ids are public)."""
    key = SigningKey.generate()
    object.__setattr__(key, "key_id", fixed_key().key_id)
    return key


def rejected(decoder: Decoder) -> dict[str, int]:
    return {k: v for k, v in decoder.counters.items() if k.startswith("rejected_")}


def following(**settings: float) -> Decoder:
    """A decoder that follows the stream (epoch EPOCH, blocks 0..1 delivered)."""
    decoder = new_decoder(**settings)
    feed(decoder, [d for b in encode_blocks(samples(20), per_block=10) for d in b])
    assert decoder.positions()[7].next_seq == 2
    return decoder


def forged_block(seq: int, epoch: int = EPOCH) -> list[bytes]:
    (block,) = encode_blocks(samples(3), key=liar(), epoch=epoch)
    return [with_valid_crc(d, 24, seq.to_bytes(8, "big")) for d in block]


def test_a_forged_block_fails_once_then_costs_a_lookup() -> None:
    decoder = new_decoder()  # nothing followed yet, big budget
    (block,) = encode_blocks(samples(3), key=liar())
    for _ in range(20):
        decoder.receive(block[0], 1.0)
    assert rejected(decoder) == {"rejected_bad_signature": 1, "rejected_known_forgery": 19}


def test_out_of_window_verifies_are_budgeted_and_in_window_ones_are_not() -> None:
    decoder = following(verify_budget_per_s=10.0)
    before = rejected(decoder)
    # Forged k = 1 blocks of a newer epoch (out of the window): 10 per second get a verify.
    newer = [
        encode_blocks(samples(3, start=i), key=liar(), epoch=EPOCH + 1)[0][0] for i in range(40)
    ]
    for datagram in newer:
        decoder.receive(datagram, 5.0)
    moved = {k: v - before.get(k, 0) for k, v in rejected(decoder).items() if v != before.get(k)}
    assert moved == {"rejected_bad_signature": 10, "rejected_verify_budget": 30}
    # The real stream, in the window, is never refused: 30 more blocks, all delivered.
    real = encode_blocks(samples(320), per_block=10)[2:]
    events = feed(decoder, [d for b in real for d in b], now=5.0)
    assert delivered(events) == samples(320)[20:]
    assert rejected(decoder)["rejected_verify_budget"] == 30


def test_only_an_authentic_epoch_change_moves_the_window() -> None:
    decoder = following()
    newer = [
        encode_blocks(samples(3, start=i), key=liar(), epoch=EPOCH + 9)[0][0] for i in range(5)
    ]
    for datagram in newer:
        decoder.receive(datagram, 1.0)
    assert decoder.positions()[7].epoch == EPOCH
    # The real stream's next block is still in the window (no budget needed).
    events = feed(decoder, encode_blocks(samples(30), per_block=10)[2], now=1.0)
    assert len(delivered(events)) == 10
    real_newer = encode_blocks(samples(10), epoch=EPOCH + 9)
    events = feed(decoder, real_newer[0], now=2.0)
    assert [e.epoch for e in events if isinstance(e, EpochStarted)] == [EPOCH + 9]


def test_a_budget_refusal_is_not_remembered_as_a_failure() -> None:
    decoder = following(verify_budget_per_s=1.0)
    newer = encode_blocks(samples(10), epoch=EPOCH + 1)[0]
    filler = encode_blocks(samples(3), key=liar(), epoch=EPOCH + 1)[0][0]
    decoder.receive(filler, 3.0)  # spends the only token
    for d in newer:
        decoder.receive(d, 3.0)  # refused: over budget
    assert rejected(decoder)["rejected_verify_budget"] >= 1
    events = feed(decoder, newer, now=5.0)  # a second later: a token, and it is real
    assert len(delivered(events)) == 10


# -- freshness on a fresh start ---------------------------------------------------------------

WALL_NOW = EPOCH / 1000 + 25.0  # the receiver's wall clock: 25 s after the epoch began


def fresh(**settings: float) -> Decoder:
    decoder = new_decoder(**settings)
    decoder.wall_offset_s = WALL_NOW  # now = 0.0 is this wall-clock second
    return decoder


def test_an_old_capture_is_not_published_by_a_fresh_receiver() -> None:
    """The issue's case: values 20-30 s old, no saved position: nothing of it is published."""
    capture = encode_blocks(samples(50), per_block=10)
    decoder = fresh(max_start_age_s=10.0, clock_skew_s=5.0)
    events = feed(decoder, [d for b in capture for d in b])
    assert delivered(events) == []
    # Every rebuild of each of the 5 blocks (surplus symbols rebuild it again) is refused.
    assert rejected(decoder)["rejected_stale"] >= 5
    assert decoder.positions() == {}
    assert decoder.counters["records_delivered"] == 0


def test_a_young_epoch_is_taken_at_once() -> None:
    decoder = fresh(max_start_age_s=30.0, clock_skew_s=5.0)
    assert len(delivered(feed(decoder, encode_blocks(samples(10))[0]))) == 10


def test_a_long_running_stream_is_taken_from_its_first_fresh_heartbeat() -> None:
    old_records = samples(20)
    live = [Heartbeat(ts_ns=int((WALL_NOW - 0.5) * 1e9), counters={}), *samples(10, start=100)]
    blocks = encode_blocks([*old_records, *live], per_block=10)  # seq 0, 1: old; 2, 3: live
    decoder = fresh(max_start_age_s=10.0, clock_skew_s=5.0)
    events = feed(decoder, [d for b in blocks for d in b])
    assert delivered(events) == live
    stale = rejected(decoder)["rejected_stale"]
    assert stale >= 2
    # A replay of the old blocks of that same epoch after the proof: behind the position.
    feed(decoder, [d for b in blocks[:2] for d in b], now=20.0)
    assert rejected(decoder)["rejected_stale"] == stale
    assert decoder.counters["records_delivered"] == len(live)


def test_a_saved_position_needs_no_freshness_proof() -> None:
    blocks = encode_blocks(samples(30), per_block=10)
    decoder = Decoder(
        keyring(fixed_key()),
        DecoderSettings(max_start_age_s=1.0, clock_skew_s=0.0),
        state={7: StreamState(epoch=EPOCH, next_seq=1, next_record=10)},
    )
    decoder.wall_offset_s = WALL_NOW + 3600
    assert delivered(feed(decoder, [d for b in blocks for d in b])) == samples(30)[10:]


# -- the tail of an ended epoch -------------------------------------------------------------------


@pytest.mark.parametrize("hint", [5, 10**9])
def test_a_tail_estimate_is_bounded_by_authentic_blocks_and_flagged(hint: int) -> None:
    decoder = following()
    # Forged partial assemblies in the old epoch's tail, with huge record hints.
    (template,) = encode_blocks(samples(30))
    for seq in range(2, 12):
        d = with_valid_crc(template[0], 24, seq.to_bytes(8, "big"))
        decoder.receive(with_valid_crc(d, 40, hint.to_bytes(4, "big")), 1.0)
    events = feed(decoder, encode_blocks(samples(10), epoch=EPOCH + 1)[0], now=2.0)
    (tail,) = [g for g in gaps(events) if g.epoch == EPOCH]
    assert not tail.exact
    fullest = 10  # the largest authentic block of the epoch held 10 records
    assert tail.records_lost <= 10 * min(hint, fullest)
    assert decoder.counters["records_lost"] == 0, "an estimate never reaches the exact count"
    assert decoder.counters["records_lost_estimated"] == tail.records_lost


# -- the waiting room --------------------------------------------------------------------------


def test_forged_blocks_ahead_of_their_turn_cost_at_most_a_few_verifies_per_real_block() -> None:
    decoder = following()
    real = encode_blocks(samples(220), per_block=10)[2:]  # blocks 2 .. 21
    # 20 forged k = 1 blocks for each of the next 20 sequence numbers, sent first.
    forged = [
        with_valid_crc(b[0], 24, seq.to_bytes(8, "big"))
        for seq in range(2, 22)
        for b in encode_blocks(samples(3, start=seq * 100), key=liar())
        for _ in range(20)
    ]
    # Distinct blocks with distinct headers (the records hint; the CRC kept valid): copies
    # with one header would count as one candidate.
    unique = [with_valid_crc(d, 40, (i + 10).to_bytes(4, "big")) for i, d in enumerate(forged)]
    for d in unique:
        decoder.receive(d, 1.0)
    failed = ("rejected_bad_signature", "rejected_bad_block")
    assert sum(decoder.counters[r] for r in failed) <= 20, "only the next block is verified now"
    events = feed(decoder, [d for b in real for d in b], now=1.01)
    assert delivered(events) == samples(220)[20:]
    counts = rejected(decoder)
    # The room keeps 2 candidates per seq: at most 2 verified per real block, the rest late.
    assert 0 < sum(counts.get(r, 0) for r in failed) <= 20 + 2 * 20
    # Seq 2 is next (its forgeries are verified at once); seqs 3 .. 21 keep 2 of 20 each.
    assert counts["rejected_waiting_full"] == 19 * 18
    # And copies of one block (the same header) are one candidate, the rest duplicates.
    before = counts.get("rejected_duplicate", 0)
    copies = [with_valid_crc(forged[0], 24, (30).to_bytes(8, "big"))] * 1
    copies += [with_valid_crc(c, 200, bytes([j])) for c in copies for j in range(5)]
    for d in copies:
        decoder.receive(d, 2.0)
    assert rejected(decoder).get("rejected_duplicate", 0) - before == len(copies) - 1


def test_a_lost_block_ahead_of_waiting_ones_is_still_declared_after_the_reorder_timeout() -> None:
    decoder = following(reorder_timeout_s=0.5)
    real = encode_blocks(samples(60), per_block=10)  # blocks 0 .. 5; 2 is lost
    for d in [d for b in real[3:] for d in b]:
        decoder.receive(d, 1.0)
    assert delivered(decoder.events()) == []
    assert decoder.deadline() == pytest.approx(1.5)
    decoder.poll(1.5)
    events = decoder.events()
    assert [(g.first_seq, g.last_seq, g.records_lost) for g in gaps(events)] == [(2, 2, 10)]
    assert delivered(events) == samples(60)[30:]


def test_a_lost_block_under_a_spray_of_forged_candidates_does_not_stall_the_stream() -> None:
    """Found by the 20 000/s flood: the real blocks after a lost one were pushed out of the
    waiting room by newer forgeries, and the overdue rounds only ever met forgeries."""
    decoder = following(reorder_timeout_s=0.2)
    real = encode_blocks(samples(200), per_block=10)  # blocks 0 .. 19; block 2 is lost
    (template,) = encode_blocks(samples(3), key=liar())
    now = 1.0
    sprayed = 0
    for block in real[3:]:
        for d in block:
            decoder.receive(d, now)
        # Then 4 unique forged candidates for every seq 3 .. 40: the real ones are pushed out.
        for seq in range(3, 41):
            for i in range(4):
                d = with_valid_crc(template[0], 24, seq.to_bytes(8, "big"))
                decoder.receive(with_valid_crc(d, 200, bytes([sprayed % 256, i])), now)
                sprayed += 1
        now += 0.05
        decoder.poll(now)
    for _ in range(40):  # the real stream goes on: blocks 20 ..
        now += 0.05
        decoder.poll(now)
    more = encode_blocks(samples(400), per_block=10)[20:30]
    for block in more:
        for d in block:
            decoder.receive(d, now)
        now += 0.05
        decoder.poll(now)
    decoder.poll(now + 1.0)
    events = decoder.events()
    assert delivered(events), "the stream must flow again after the lost block"
    assert decoder.positions()[7].next_seq >= 20
