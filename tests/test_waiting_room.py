"""The waiting room (diode/protocol/waiting.py) against a plain model of it: whatever is
put, taken and discarded, ``lowest`` is the lowest waiting sequence number and nothing
below a discard stays. Its heaps are skipped lazily and rebuilt; a plain ``min`` over the
window was a fifth of the receiver's CPU under a flood of forged blocks."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from diode.protocol.waiting import Candidate, WaitingRoom
from diode.wire import DatagramHeader

STREAM, EPOCH = 7, 1


def _candidate(seq: int, nonce: int) -> Candidate:
    header = DatagramHeader(flags=0, stream_id=STREAM, key_id=b"k" * 8, epoch=EPOCH, seq=seq,
                            index=0, k=1, n=1, block_length=10, records=1)  # fmt: skip
    return Candidate(key=b"%d/%d" % (seq, nonce), header=header, symbols={0: b"s"},
                     trusted=None, at=float(nonce), cost=100)  # type: ignore[arg-type]  # fmt: skip


operations = st.lists(
    st.tuples(st.sampled_from(["put", "take", "discard"]), st.integers(0, 300)), max_size=400
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_lowest_and_discard_below_match_a_plain_model(ops: list[tuple[str, int]]) -> None:
    room = WaitingRoom(Counter(), max_bytes=100 * 40)  # at most 40 wait: the furthest go
    for nonce, (op, seq) in enumerate(ops):
        if op == "put":
            room.put(STREAM, EPOCH, _candidate(seq, nonce))
        elif op == "take":
            room.take(STREAM, seq)
        else:
            room.discard_below(STREAM, seq)
            lowest = room.lowest(STREAM)
            assert lowest is None or lowest[0] >= seq
        waiting = room._streams.get(STREAM, {})  # the model: what the room holds
        expected = min(waiting, default=None)
        lowest = room.lowest(STREAM)
        assert (lowest[0] if lowest else None) == expected
        if expected is not None:
            assert lowest is not None
            assert lowest[1] == waiting[expected][0].at
        assert room.bytes == 100 * sum(len(c) for c in waiting.values())
        assert len(room._low.get(STREAM, [])) <= 2 * 40 + 65  # bounded: rebuilt when stale
