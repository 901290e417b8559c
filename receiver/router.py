"""From authentic records to what MQTT subscribers see, per stream; no I/O here.

The router names samples with the catalogue (a sample whose tag is not known
yet waits, bounded, until its catalogue entry arrives on the carousel),
tracks each stream's link from its heartbeats, republishes every tag as
``stale`` when the link goes down (the last value, never an invented one),
and keeps the status each stream publishes: link state, heartbeat age,
the transmitter's counters, and every gap with its exact size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from diode.config.mqtt import StreamOutput
from diode.decoder import Delivered, EpochStarted, Event, Gap
from diode.records import DeviceInfo, Heartbeat, Quality, Sample, TagInfo

log = structlog.get_logger("diode.rx")

PENDING_PER_STREAM = 100_000
RECENT_GAPS = 20


class Output(Protocol):
    def publish_samples(
        self, stream: StreamOutput, items: Sequence[tuple[TagInfo, Sample]]
    ) -> None: ...

    def publish_inventory(self, stream: StreamOutput, info: DeviceInfo) -> None: ...

    def publish_status(self, stream: StreamOutput, status: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class StreamView:
    """What the receiver knows of one stream."""

    stream_id: int
    output: StreamOutput
    catalogue: dict[int, TagInfo] = field(default_factory=dict)
    last: dict[int, Sample] = field(default_factory=dict)
    pending: deque[Sample] = field(default_factory=deque)
    epoch: int | None = None
    heartbeat: Heartbeat | None = None
    heartbeat_at: float | None = None
    link_up: bool = False
    gaps: deque[dict[str, int | bool]] = field(default_factory=lambda: deque(maxlen=RECENT_GAPS))
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "records": 0,
            "samples_published": 0,
            "records_lost": 0,
            "records_lost_estimated": 0,
            "gaps": 0,
            "pending_dropped": 0,
        }
    )


class Router:
    def __init__(self, streams: dict[int, StreamOutput], output: Output) -> None:
        self.streams = {sid: StreamView(sid, out) for sid, out in streams.items()}
        self._output = output
        # Datagrams the receiver rejected, by reason, with rates (set by the shell).
        self.rejected: dict[str, Any] = {}

    def handle(self, events: Sequence[Event], now: float) -> None:
        for event in events:
            view = self.streams.get(event.stream_id)
            if view is None:  # a key in the keyring always belongs to a configured stream
                continue
            match event:
                case Delivered():
                    self._delivered(view, event, now)
                case Gap():
                    self._gap(view, event)
                case EpochStarted():
                    if event.previous is not None:
                        # Tag ids are numbered per transmitter run: a new epoch may
                        # mean another config, so nothing old may name a new sample.
                        # Samples still waiting for their name cannot be published:
                        # counted and said, never silent.
                        if view.pending:
                            view.counters["pending_dropped"] += len(view.pending)
                            log.warning(
                                "samples of an ended epoch dropped: their tags were never named",
                                stream=view.stream_id,
                                samples=len(view.pending),
                            )
                        view.catalogue.clear()
                        view.pending.clear()
                        view.last.clear()
                    view.epoch = event.epoch
                    log.info(
                        "transmitter epoch",
                        stream=view.stream_id,
                        epoch=event.epoch,
                        previous=event.previous,
                    )
                    self._publish_status(view, now)

    def _delivered(self, view: StreamView, event: Delivered, now: float) -> None:
        ready: list[tuple[TagInfo, Sample]] = []
        catalogue = view.catalogue
        view.counters["records"] += len(event.records)
        for record in event.records:
            match record:
                case Sample():
                    info = catalogue.get(record.tag_id)
                    if info is None:
                        self._hold(view, record)
                    else:
                        ready.append((info, record))
                        view.last[record.tag_id] = record
                case TagInfo():
                    known = record.tag_id in catalogue
                    catalogue[record.tag_id] = record
                    if not known and view.pending:
                        ready.extend(self._release(view, record))
                case Heartbeat():
                    view.heartbeat = record
                    view.heartbeat_at = now
                    if not view.link_up:
                        view.link_up = True
                        log.info("link up", stream=view.stream_id)
                        self._publish_status(view, now)
                case DeviceInfo():
                    self._output.publish_inventory(view.output, record)
        if ready:
            view.counters["samples_published"] += len(ready)
            self._output.publish_samples(view.output, ready)

    def _hold(self, view: StreamView, sample: Sample) -> None:
        if len(view.pending) >= PENDING_PER_STREAM:
            view.pending.popleft()
            view.counters["pending_dropped"] += 1
        view.pending.append(sample)

    def _release(self, view: StreamView, info: TagInfo) -> list[tuple[TagInfo, Sample]]:
        mine = [s for s in view.pending if s.tag_id == info.tag_id]
        if mine:
            view.pending = deque(s for s in view.pending if s.tag_id != info.tag_id)
            view.last[info.tag_id] = mine[-1]
        return [(info, s) for s in mine]

    def _gap(self, view: StreamView, gap: Gap) -> None:
        # An estimate (the tail of an ended epoch) never mixes with exact counts.
        view.counters["records_lost" if gap.exact else "records_lost_estimated"] += gap.records_lost
        view.counters["gaps"] += 1
        entry = {
            "epoch": gap.epoch,
            "first_block": gap.first_seq,
            "last_block": gap.last_seq,
            "records_lost": gap.records_lost,
            "exact": gap.exact,
        }
        view.gaps.append(entry)
        log.warning("records lost", stream=view.stream_id, **entry)

    def tick(self, now: float) -> None:
        """Link supervision: no heartbeat for ``link_timeout_s`` means the link is down."""
        for view in self.streams.values():
            if not view.link_up or view.heartbeat_at is None:
                continue
            if now - view.heartbeat_at > view.output.link_timeout_s:
                view.link_up = False
                log.warning(
                    "link down",
                    stream=view.stream_id,
                    heartbeat_age_s=round(now - view.heartbeat_at, 1),
                )
                stale = [
                    (
                        view.catalogue[tag_id],
                        Sample(
                            tag_id=tag_id,
                            ts_ns=last.ts_ns,
                            value=last.value,
                            quality=Quality.STALE,
                            reason="link down",
                        ),
                    )
                    for tag_id, last in view.last.items()
                    if tag_id in view.catalogue
                ]
                if stale:
                    self._output.publish_samples(view.output, stale)
                self._publish_status(view, now)

    def status(self, view: StreamView, now: float) -> dict[str, Any]:
        age = None if view.heartbeat_at is None else round(now - view.heartbeat_at, 3)
        return {
            "online": True,
            "link": "up" if view.link_up else "down",
            "epoch": view.epoch,
            "last_heartbeat_age_s": age,
            "tags": len(view.catalogue),
            "pending": len(view.pending),
            "counters": dict(view.counters),
            "transmitter": dict(view.heartbeat.counters) if view.heartbeat else {},
            "recent_gaps": list(view.gaps),
            "rejected": self.rejected,
        }

    def _publish_status(self, view: StreamView, now: float) -> None:
        self._output.publish_status(view.output, self.status(view, now))

    def publish_all_status(self, now: float) -> None:
        for view in self.streams.values():
            self._publish_status(view, now)
