"""Properties of the core over generated inputs (hypothesis)."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diode.errors import DiodeError, FrameError
from diode.records import (
    Quality,
    Record,
    Sample,
    decode_records,
    encode_records,
    unrepresentable,
)
from diode.replay import StreamState, pack_states, unpack_states
from diode.wire import parse_block, parse_datagram
from tests.core_support import (
    delivered,
    encode_blocks,
    feed,
    gaps,
    new_decoder,
    small_link,
    with_valid_crc,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=20),
)
# Arrays (OPC UA arrays and matrices, LocalizedText pairs) as tuples, a few levels deep.
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=12)
sample_lists = st.lists(
    st.builds(
        Sample,
        tag_id=st.integers(0, 2**32 - 1),
        ts_ns=st.integers(-(2**63), 2**63 - 1),
        value=values,
        quality=st.sampled_from(list(Quality)),
        reason=st.text(max_size=10),
    ),
    min_size=1,
    max_size=120,
)


@given(sample_lists)
def test_records_round_trip(records: list[Record]) -> None:
    assert decode_records(encode_records(records), len(records)) == records


@given(
    st.integers(-(2**70), 2**70),
    st.recursive(
        st.one_of(
            scalars,
            st.integers(-(2**70), 2**70),
            st.text(alphabet=st.characters(codec=None), max_size=5),  # surrogates too
        ),
        lambda inner: st.lists(inner, max_size=3).map(tuple),
        max_leaves=20,
    ),
)
def test_a_sample_either_round_trips_or_says_why_it_cannot(ts_ns: int, value: object) -> None:
    sample = Sample(tag_id=1, ts_ns=ts_ns, value=value)  # type: ignore[arg-type]
    problem = unrepresentable(sample)
    if problem:
        with contextlib.suppress(DiodeError):  # may still encode; the receiver would refuse it
            decode_records(encode_records([sample]), 1)
            raise AssertionError(f"{problem}, yet it round-trips")
        return
    assert decode_records(encode_records([sample]), 1) == [sample]


@given(sample_lists, st.integers(2, 12), st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_any_loss_within_the_repair_budget_rebuilds_exactly(
    records: list[Record], k: int, data: st.DataObject
) -> None:
    blocks = encode_blocks(records, link=small_link(k=k, ratio=0.5, burst=2))
    kept: list[bytes] = []
    for block in blocks:
        k_block, n = block[0][33], block[0][34]
        lose = data.draw(st.sets(st.integers(0, n - 1), max_size=n - k_block))
        kept.extend(d for i, d in enumerate(block) if i not in lose)
    kept = data.draw(st.permutations(kept))
    events = feed(new_decoder(), kept)
    assert delivered(events) == records
    assert gaps(events) == []


@given(st.binary(max_size=1600))
@settings(max_examples=500)
def test_any_bytes_give_a_frame_error_or_a_header(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        parse_datagram(data)
    with contextlib.suppress(FrameError):
        parse_block(data)
    with contextlib.suppress(FrameError):
        decode_records(data, 3)


@given(st.binary(max_size=200))
def test_any_state_file_gives_states_or_a_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        unpack_states(data)


@given(st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**63), max_size=5))
def test_state_file_round_trips(raw: dict[int, int]) -> None:
    states = {s: StreamState(epoch=v, next_seq=v // 2, next_record=v // 3) for s, v in raw.items()}
    assert unpack_states(pack_states(states)) == states


_REAL = encode_blocks([Sample(tag_id=i, ts_ns=i, value=i) for i in range(60)])[0]


@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_REAL) - 1), st.integers(0, 255), st.binary(min_size=1, max_size=8)
        ),
        max_size=40,
    )
)
@settings(max_examples=300)
def test_the_decoder_never_raises_and_never_delivers_forged_content(
    edits: list[tuple[int, int, bytes]],
) -> None:
    """Structure-aware mutation: real datagrams with bytes rewritten and the CRC fixed."""
    decoder = new_decoder(max_assembly_bytes=50_000)
    for which, offset, value in edits:
        decoder.receive(with_valid_crc(_REAL[which], offset, value), 0.0)
        assert decoder.assembly_bytes <= 50_000
    decoder.poll(100.0)
    for record in delivered(decoder.events()):
        # Anything delivered must be one of the genuine records, untouched.
        assert isinstance(record, Sample)
        assert record == Sample(tag_id=record.tag_id, ts_ns=record.tag_id, value=record.tag_id)
