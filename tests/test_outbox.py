"""The transmitter's decisions: report by exception, deadbands, sliced refresh and carousel."""

from __future__ import annotations

from diode.records import DeviceInfo, Quality, Sample, TagInfo, ValueType
from transmitter.outbox import Outbox, changed

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
