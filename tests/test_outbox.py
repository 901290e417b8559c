"""The transmitter's decisions: report by exception, deadbands, sliced refresh and carousel."""

from __future__ import annotations

import pytest

from diode.errors import DiodeError
from diode.records import (
    DeviceInfo,
    Heartbeat,
    Quality,
    Sample,
    TagInfo,
    ValueType,
    decode_records,
    encode_record,
    encode_records,
    good_sample,
    unrepresentable,
)
from transmitter.outbox import SAMPLE_COST, Outbox, changed, cost

TAGS = [
    TagInfo(tag_id=i, name=f"t{i}", device="d", value_type=ValueType.FLOAT64) for i in range(23)
]


def outbox(deadbands: dict[int, float] | None = None) -> Outbox:
    return Outbox(catalogue=lambda: TAGS, deadbands=deadbands or {}, limit=10_000)


def drain(box: Outbox) -> list[object]:
    return [box.pop() for _ in range(len(box))]


def test_deadband_quality_and_type_changes() -> None:
    a = Sample(tag_id=1, ts_ns=1, value=10.0)
    assert not changed(a, Sample(tag_id=1, ts_ns=2, value=10.4), deadband=0.5)
    assert changed(a, Sample(tag_id=1, ts_ns=2, value=10.6), deadband=0.5)
    assert changed(a, Sample(tag_id=1, ts_ns=2, value=10.0, quality=Quality.BAD), deadband=0.5)
    assert changed(a, Sample(tag_id=1, ts_ns=2, value=10), deadband=0.0)  # float -> int
    assert changed(Sample(tag_id=1, ts_ns=1, value=True), Sample(tag_id=1, ts_ns=2, value=1), 0.0)


def test_the_catalogue_entry_goes_before_the_first_sample_only() -> None:
    box = outbox()
    box.sample(Sample(tag_id=3, ts_ns=1, value=1.0))
    box.sample(Sample(tag_id=3, ts_ns=2, value=2.0))
    assert drain(box) == [
        TAGS[3],
        Sample(tag_id=3, ts_ns=1, value=1.0),
        Sample(tag_id=3, ts_ns=2, value=2.0),
    ]


def test_sliced_refresh_and_carousel_cover_every_tag_exactly_once_per_round() -> None:
    box = outbox()
    for tag in TAGS:
        box.sample(Sample(tag_id=tag.tag_id, ts_ns=1, value=0.5))
    box.device(DeviceInfo(device="d", protocol="modbus", endpoint="x"))
    drain(box)
    refreshed: list[int] = []
    for part in range(10):
        box.refresh(part, 10)
        refreshed.extend(r.tag_id for r in drain(box))  # type: ignore[attr-defined]
    assert sorted(refreshed) == [t.tag_id for t in TAGS]
    announced: list[object] = []
    for part in range(10):
        box.carousel(part, 10)
        announced.extend(drain(box))
    assert sorted(r.tag_id for r in announced if isinstance(r, TagInfo)) == [t.tag_id for t in TAGS]
    assert sum(isinstance(r, DeviceInfo) for r in announced) == 1


def test_a_full_outbox_drops_and_counts() -> None:
    box = Outbox(catalogue=lambda: TAGS, deadbands={}, limit=5)
    for i in range(10):
        box.sample(Sample(tag_id=1, ts_ns=i, value=float(i)))
    assert len(box) == 5
    assert box.counters["records_dropped"] == 6  # the catalogue entry took one place


def test_a_bound_in_bytes_drops_the_newest_and_counts_them() -> None:
    """1 KB strings: the byte bound, not the record count, stops the queue (issue 17: RSS)."""
    box = Outbox(catalogue=lambda: TAGS, deadbands={}, limit=10_000, limit_bytes=20_000)
    for i in range(100):
        box.sample(Sample(tag_id=1 + i % 20, ts_ns=i, value=str(i).rjust(1000, "x")))
    queued = [r for r in drain(box) if isinstance(r, Sample)]
    assert box.queued_bytes == 0  # what pop() takes out, it takes off the estimate
    # The catalogue entries of the first tags went first; the samples filled the rest.
    assert 0 < len(queued) <= (20_000 - 1024) // (SAMPLE_COST + 1000)
    assert [int(r.value.strip("x")) for r in queued] == list(range(len(queued)))  # type: ignore[union-attr,arg-type]
    counters = box.counters
    assert counters["samples_in"] == 100
    # Nothing silent: every sample is queued or counted as dropped.
    assert counters["samples_queued"] + counters["samples_suppressed"] == len(queued)
    assert counters["records_dropped"] >= 100 - len(queued)


def test_a_full_outbox_still_takes_the_heartbeat_that_counts_its_drops() -> None:
    box = Outbox(catalogue=lambda: TAGS, deadbands={}, limit=3)
    for i in range(10):
        box.sample(Sample(tag_id=1, ts_ns=i, value=float(i)))
    assert box.put(Heartbeat(ts_ns=11, counters=dict(box.counters)))
    beat = drain(box)[-1]
    assert isinstance(beat, Heartbeat)
    assert beat.counters["records_dropped"] == 8


def test_the_estimate_grows_with_the_value_and_returns_to_zero() -> None:
    box = outbox()
    small, text = Sample(tag_id=1, ts_ns=1, value=1.5), Sample(tag_id=2, ts_ns=1, value="y" * 500)
    assert cost(small) == SAMPLE_COST
    assert cost(text) == SAMPLE_COST + 500
    box.samples([small, text])
    assert box.queued_bytes == 2 * 1024 + cost(small) + cost(text)  # two catalogue entries
    drain(box)
    assert box.queued_bytes == 0


def test_a_batch_is_taken_as_the_same_samples_one_by_one() -> None:
    values: list[object] = [1.0, 1.0, float("nan"), "a", "\ud800", 2**70, None, 3, 3.2, True]
    batch = [Sample(tag_id=1 + i % 3, ts_ns=i, value=v) for i, v in enumerate(values)]  # type: ignore[arg-type]
    one, many = outbox({1: 0.5}), outbox({1: 0.5})
    one._now_ns = many._now_ns = lambda: 5  # the BAD samples standing for unencodable ones
    for sample in batch:
        one.sample(sample)
    many.samples(batch)
    assert drain(many) == drain(one)
    assert many.counters == one.counters
    assert many.counters["samples_unrepresentable"] == 2


def test_good_sample_is_the_dataclass_sample() -> None:
    built = good_sample(7, 123, "text")
    assert built == Sample(tag_id=7, ts_ns=123, value="text")
    assert type(built) is Sample
    assert encode_record(built) == encode_record(Sample(tag_id=7, ts_ns=123, value="text"))
    with pytest.raises(AttributeError):
        built.value = 1  # type: ignore[misc]  # still frozen


def test_ascii_text_is_fast_but_a_lone_surrogate_is_still_caught() -> None:
    assert unrepresentable(Sample(tag_id=1, ts_ns=1, value="plain")) == ""
    assert unrepresentable(Sample(tag_id=1, ts_ns=1, value="\u00e9t\u00e9")) == ""
    assert unrepresentable(Sample(tag_id=1, ts_ns=1, value="\ud800")) == "text is not valid Unicode"


# -- issue 14, item 1: the deadband against the last value sent ------------------------


def test_a_ramp_under_the_deadband_is_reported_within_one_deadband() -> None:
    """0.0, 0.1 ... 4.9 with deadband 0.5: the old outbox sent 0.0 only (each step < 0.5)."""
    box = outbox({1: 0.5})
    sent: list[float] = []
    for step in range(50):
        truth = step / 10
        box.sample(Sample(tag_id=1, ts_ns=step, value=truth))
        sent.extend(r.value for r in drain(box) if isinstance(r, Sample))  # type: ignore[misc]
        assert abs(sent[-1] - truth) <= 0.5, (step, sent[-1])
    assert len(sent) > 5


def test_nan_transitions_are_reported_and_nan_repeats_are_not() -> None:
    box = outbox({1: 0.5})
    nan, inf = float("nan"), float("inf")
    for i, v in enumerate([1.0, nan, nan, 1.0, 1.1, inf, inf, -inf, 2.0]):
        box.sample(Sample(tag_id=1, ts_ns=i, value=v))
    values = [r.value for r in drain(box) if isinstance(r, Sample)]
    assert [repr(v) for v in values] == ["1.0", "nan", "1.0", "inf", "-inf", "2.0"]


def test_an_array_is_sent_when_it_changes_nan_elements_included() -> None:
    box = outbox()
    nan = float("nan")
    for i, v in enumerate([(1.0, nan), (1.0, float("nan")), (2.0, nan), (2.0, nan)]):
        box.sample(Sample(tag_id=1, ts_ns=i, value=v))
    assert [repr(r.value) for r in drain(box) if isinstance(r, Sample)] == [
        "(1.0, nan)",
        "(2.0, nan)",
    ]


def test_a_refresh_moves_the_deadband_reference() -> None:
    box = outbox({1: 0.5})
    box.sample(Sample(tag_id=1, ts_ns=1, value=0.0))
    box.sample(Sample(tag_id=1, ts_ns=2, value=0.4))  # suppressed
    box.refresh()  # the receiver now has 0.4
    box.sample(Sample(tag_id=1, ts_ns=3, value=0.8))  # 0.4 from what it has: suppressed
    assert [r.value for r in drain(box) if isinstance(r, Sample)] == [0.0, 0.4]


# -- issue 14, item 2: a value that cannot travel costs only itself -------------------


@pytest.mark.parametrize(
    ("ts_ns", "value", "problem"),
    [
        (2**63, 1.0, "timestamp out of range"),  # year 2262..2554: the receiver would reject
        (2**64 + 5, 1.0, "timestamp out of range"),  # past 2554: msgpack raised OverflowError
        (1, 2**64, "integer out of the 64-bit range"),
        (1, -(2**63) - 1, "integer out of the 64-bit range"),
        (1, "bad \udcff surrogate", "text is not valid Unicode"),
        (1, (1.0, (2, 2**70)), "integer out of the 64-bit range"),
        (1, ((((((((((1,),),),),),),),),),), "nested deeper"),
        (1, object(), "unsupported value type object"),
    ],
)
def test_an_unrepresentable_sample_becomes_bad_and_costs_nothing_else(
    ts_ns: int, value: object, problem: str
) -> None:
    box = Outbox(catalogue=lambda: TAGS, deadbands={}, limit=100, now_ns=lambda: 777)
    box.sample(Sample(tag_id=1, ts_ns=1, value=1.5))
    box.sample(Sample(tag_id=2, ts_ns=ts_ns, value=value))  # type: ignore[arg-type]
    box.sample(Sample(tag_id=3, ts_ns=1, value=2.5))
    records = drain(box)
    # Every record of the batch encodes, and decodes back as one block would.
    payload = encode_records(records)  # type: ignore[arg-type]
    assert decode_records(payload, len(records)) == records
    samples = {r.tag_id: r for r in records if isinstance(r, Sample)}
    assert samples[1].value == 1.5
    assert samples[3].value == 2.5
    bad = samples[2]
    assert (bad.quality, bad.value, bad.ts_ns) == (Quality.BAD, None, 777)
    assert problem in bad.reason
    assert box.counters["samples_unrepresentable"] == 1


def test_the_encoder_backstop_raises_a_diode_error_never_overflow() -> None:
    """Before: msgpack's OverflowError escaped the transmitter's DiodeError handling."""
    with pytest.raises(DiodeError, match="cannot be encoded") as caught:
        encode_record(Sample(tag_id=1, ts_ns=2**64, value=1.0))
    assert caught.value.reason == "unencodable"
