"""What the transmitter decides to send, sans I/O: report by exception, refresh, carousel.

The pollers hand every sample to :class:`Outbox` (it is their ``SampleSink``).
A sample is queued when its value moved beyond the tag's deadband or its
quality changed; every tag's last sample is queued again each integrity
period, and every catalogue entry and device record each catalogue period,
so a receiver that starts late converges by itself. A tag's catalogue entry
is always queued before its first sample.

The queue is bounded: when the link cannot keep up, the newest records are
dropped and counted (the heartbeat carries the counts); a poller is never
made to wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from diode.records import DeviceInfo, Record, Sample, TagInfo


def changed(old: Sample, new: Sample, deadband: float) -> bool:
    """Did a tag's value or quality change enough to be reported?"""
    if old.quality != new.quality or old.reason != new.reason:
        return True
    a, b = old.value, new.value
    numeric = (int, float)
    if (
        isinstance(a, numeric)
        and isinstance(b, numeric)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        if deadband > 0:
            return abs(b - a) > deadband
        return a != b or type(a) is not type(b)
    return a != b or type(a) is not type(b)


class Outbox:
    """The pollers' sink and the sender's source: a bounded queue of records."""

    def __init__(
        self,
        *,
        catalogue: Callable[[], Iterable[TagInfo]],
        deadbands: dict[int, float],
        limit: int,
        on_queue: Callable[[], None] = lambda: None,
        on_device: Callable[[DeviceInfo], None] | None = None,
        on_quality: Callable[[Sample | None, Sample], None] | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._deadbands = deadbands
        self._limit = limit
        self._on_queue = on_queue
        # Observers (the security monitor): every device record; every change of a
        # tag's quality or reason, which is rare, so the hot path pays one comparison.
        self.on_device = on_device
        self.on_quality = on_quality
        self._queue: deque[Record] = deque()
        self._last: dict[int, Sample] = {}
        self._announced: set[int] = set()
        self._devices: dict[str, DeviceInfo] = {}
        self.counters = {
            "samples_in": 0,
            "samples_queued": 0,
            "samples_suppressed": 0,
            "records_dropped": 0,
        }

    def __len__(self) -> int:
        return len(self._queue)

    # -- SampleSink -------------------------------------------------------------

    def sample(self, sample: Sample) -> None:
        self.counters["samples_in"] += 1
        last = self._last.get(sample.tag_id)
        self._last[sample.tag_id] = sample
        if self.on_quality is not None and (
            last is None or last.quality is not sample.quality or last.reason != sample.reason
        ):
            self.on_quality(last, sample)
        if last is not None and not changed(last, sample, self._deadbands.get(sample.tag_id, 0.0)):
            self.counters["samples_suppressed"] += 1
            return
        if sample.tag_id not in self._announced:
            self._announce(sample.tag_id)
        if self._put(sample):
            self.counters["samples_queued"] += 1

    def device(self, info: DeviceInfo) -> None:
        if self.on_device is not None:
            self.on_device(info)
        self._devices[info.device] = info
        self._put(info)

    # -- the periodic re-sends -------------------------------------------------------

    def refresh(self, part: int = 0, parts: int = 1) -> None:
        """Integrity: the last sample again, changed or not, of the tags in slice ``part``.

        Called with each of ``parts`` slices in turn over one integrity period,
        so a plant of many tags is refreshed as a steady trickle, not a burst
        that would delay live values behind it.
        """
        for tag_id, sample in self._last.items():
            if tag_id % parts == part and self._put(sample):
                self.counters["samples_queued"] += 1

    def carousel(self, part: int = 0, parts: int = 1) -> None:
        """Catalogue: the entries of the tags in slice ``part``, and (slice 0) every device."""
        for info in self._catalogue():
            if info.tag_id % parts == part:
                self._announced.add(info.tag_id)
                self._put(info)
        if part == 0:
            for device in self._devices.values():
                self._put(device)

    def put(self, record: Record) -> bool:
        """Queue a record of the transmitter's own (heartbeat)."""
        return self._put(record)

    def pop(self) -> Record:
        """The oldest queued record (the Outbox must not be empty)."""
        return self._queue.popleft()

    def _announce(self, tag_id: int) -> None:
        # Rare: carousel() runs before the pollers start, so this is a tag added later.
        for info in self._catalogue():
            if info.tag_id == tag_id:
                self._put(info)
        self._announced.add(tag_id)

    def _put(self, record: Record) -> bool:
        if len(self._queue) >= self._limit:
            self.counters["records_dropped"] += 1
            return False
        self._queue.append(record)
        self._on_queue()
        return True
