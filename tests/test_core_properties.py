"""Properties of the core over generated inputs (hypothesis)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diode.errors import DiodeError, FrameError
from diode.records import (
    DeviceInfo,
    Heartbeat,
    Quality,
    Record,
    Sample,
    TagInfo,
    ValueType,
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


# -- the receiver's one-pass decode (diode/records.py, decode_records) ---------------------


@given(sample_lists)
def test_decoded_samples_are_the_samples_init_builds(records: list[Record]) -> None:
    """The hot path fills a new Sample's slots directly: the object must be the one
    ``Sample(...)`` builds: equal, same hash and repr, still frozen."""
    for got, sent in zip(
        decode_records(encode_records(records), len(records)), records, strict=True
    ):
        assert isinstance(got, Sample)
        assert isinstance(sent, Sample)
        built = Sample(
            tag_id=sent.tag_id,
            ts_ns=sent.ts_ns,
            value=sent.value,
            quality=sent.quality,
            reason=sent.reason,
        )
        assert got == built
        assert hash(got) == hash(built)
        assert repr(got) == repr(built)
        assert type(got.quality) is Quality
        assert dataclasses.replace(got, reason="x") == dataclasses.replace(built, reason="x")
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.value = 0  # type: ignore[misc]  # what the test checks: frozen


def test_a_block_of_mixed_records_decodes_in_order() -> None:
    records: list[Record] = [
        TagInfo(tag_id=1, name="t", device="d", value_type=ValueType.FLOAT32),
        Sample(tag_id=1, ts_ns=5, value=1.5),
        Heartbeat(ts_ns=7, counters={"a": 1}),
        Sample(tag_id=1, ts_ns=6, value=(1, (2, 3)), quality=Quality.BAD, reason="r"),
        DeviceInfo(device="d", protocol="modbus", endpoint="x", identity={"k": "v"}),
    ]
    assert decode_records(encode_records(records), len(records)) == records


@pytest.mark.parametrize(
    ("payload", "count"),
    [
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)] * 3), 2),  # more than announced
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)] * 3), 4),  # fewer
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)]) + b"\x00", 1),  # trailing bytes
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)]), 2**32 - 1),  # a huge count
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)]), 2**32),  # past a u32
        (encode_records([Sample(tag_id=1, ts_ns=1, value=1)]), -1),
        (b"\x96\x00\x01\x02\x03\x04", 1),  # a sample array cut short
        (b"\x96\x00\xff\x01\x00\x01\xa0", 1),  # a sample with a negative tag id
        (b"\x93\x09\x01\x02", 1),  # an unknown kind
    ],
)
def test_a_block_that_does_not_hold_its_count_is_a_frame_error(payload: bytes, count: int) -> None:
    with pytest.raises(FrameError):
        decode_records(payload, count)
