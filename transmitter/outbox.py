"""What the transmitter decides to send, sans I/O: report by exception, refresh, carousel.

The pollers hand every sample to :class:`Outbox` (it is their ``SampleSink``).
A sample is queued when its value moved beyond the tag's deadband from the
last value *sent* (not the last one polled: a slow ramp under the deadband
would otherwise never be reported, each step being smaller than it) or its
quality changed; a value turning NaN, or back, is a change. A sample whose
value or timestamp cannot travel (``records.unrepresentable``: a timestamp
past 2262, an int past 64 bits, invalid Unicode) is replaced by a BAD sample
of that tag saying why, stamped now: it costs that value only, never the
transmitter nor the other records of its block. Every tag's last sample is
queued again each integrity period, and every catalogue entry and device
record each catalogue period, so a receiver that starts late converges by
itself. A tag's catalogue entry is always queued before its first sample.

The queue is bounded in records and in memory (an estimate: a fixed cost per
record plus the length of a text or bytes value, within a few percent of what
tracemalloc measures for integer samples and 1 KB strings): when the link
cannot keep up, the newest records are dropped and counted
(``records_dropped``, which the heartbeat carries); a poller is never made to
wait. A bound in records alone let 200 000 samples of 1 KB strings hold
290 MB of the transmitter. The heartbeat, which carries those counts, is
queued past the bounds.

Pollers that read many values at once hand them over in one call
(:meth:`Outbox.samples`): per sample it does what :meth:`Outbox.sample` does,
without a call and a wake-up of the framer each.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from diode.records import DeviceInfo, Quality, Record, Sample, TagInfo, unrepresentable

# Estimated bytes a queued record holds: a sample with a number or nil (the
# object, its timestamp and value, the queue's slot), plus a text's or bytes'
# length; catalogue, device and heartbeat records are few and count as 1 KiB.
SAMPLE_COST = 160
RECORD_COST = 1024


def cost(record: Record) -> int:
    """What queueing ``record`` is estimated to hold in memory, in bytes."""
    if type(record) is not Sample:
        return RECORD_COST
    value = record.value
    if type(value) is str or type(value) is bytes:
        return SAMPLE_COST + len(value)
    if type(value) is tuple:
        return SAMPLE_COST + 32 * len(value)
    return SAMPLE_COST


def changed(old: Sample, new: Sample, deadband: float) -> bool:  # noqa: PLR0911 - one per kind
    """Did a tag's value or quality change enough to be reported?

    ``old`` is the last sample sent. NaN to a number and back is a change, NaN
    to NaN is not; an infinity is a change from anything but itself.
    """
    if old.quality != new.quality or old.reason != new.reason:
        return True
    a, b = old.value, new.value
    if type(a) is not type(b):
        return True
    if type(a) is float:
        a_nan, b_nan = math.isnan(a), math.isnan(b)  # type: ignore[arg-type]  # same type
        if a_nan or b_nan:
            return a_nan != b_nan
        if a == b:
            return False  # also inf == inf, whose difference would be NaN
        return abs(b - a) > deadband if deadband > 0 else True  # type: ignore[operator]
    if type(a) is int and deadband > 0:
        return abs(b - a) > deadband  # type: ignore[operator]  # both ints
    if type(a) is tuple:  # an array: NaN elements equal themselves here too
        return a != b and repr(a) != repr(b)
    return a != b


class Outbox:
    """The pollers' sink and the sender's source: a bounded queue of records."""

    def __init__(
        self,
        *,
        catalogue: Callable[[], Iterable[TagInfo]],
        deadbands: dict[int, float],
        limit: int,
        limit_bytes: int = 1 << 62,
        on_queue: Callable[[], None] = lambda: None,
        now_ns: Callable[[], int] = time.time_ns,
        on_device: Callable[[DeviceInfo], None] | None = None,
        on_quality: Callable[[Sample | None, Sample], None] | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._deadbands = deadbands
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._bytes = 0  # the estimated cost of what is queued
        self._on_queue = on_queue
        self._now_ns = now_ns
        # Observers (the security monitor): every device record; every change of a
        # tag's quality or reason, which is rare, so the hot path pays one comparison.
        self.on_device = on_device
        self.on_quality = on_quality
        self._queue: deque[Record] = deque()
        self._last: dict[int, Sample] = {}  # the last polled, for the integrity refresh
        self._sent: dict[int, Sample] = {}  # the last queued, for the deadband
        self._announced: set[int] = set()
        self._devices: dict[str, DeviceInfo] = {}
        self.counters = {
            "samples_in": 0,
            "samples_queued": 0,
            "samples_suppressed": 0,
            "records_dropped": 0,
            "samples_unrepresentable": 0,
        }

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """The estimated memory the queued records hold (see :func:`cost`)."""
        return self._bytes

    # -- SampleSink -------------------------------------------------------------

    def sample(self, sample: Sample) -> None:
        self.samples((sample,))

    def samples(self, batch: Iterable[Sample]) -> None:
        """Take the samples of one poll, in order: :meth:`sample` for each, in one call."""
        last, sent, announced = self._last, self._sent, self._announced
        deadbands, on_quality, queue = self._deadbands, self.on_quality, self._queue
        taken = suppressed = queued = dropped = 0
        for item in batch:
            taken += 1
            sample = item
            if problem := unrepresentable(sample):
                sample = self.unrepresentable(sample, problem)
            tag_id = sample.tag_id
            previous = last.get(tag_id)
            last[tag_id] = sample
            if on_quality is not None and (
                previous is None
                or previous.quality is not sample.quality
                or previous.reason != sample.reason
            ):
                on_quality(previous, sample)
            before = sent.get(tag_id)
            if before is not None and not changed(before, sample, deadbands.get(tag_id, 0.0)):
                suppressed += 1
                continue
            if tag_id not in announced:
                self._announce(tag_id)
            size = cost(sample)
            if len(queue) >= self._limit or self._bytes + size > self._limit_bytes:
                dropped += 1
                continue
            queue.append(sample)
            self._bytes += size
            sent[tag_id] = sample
            queued += 1
        counters = self.counters
        counters["samples_in"] += taken
        counters["samples_suppressed"] += suppressed
        counters["samples_queued"] += queued
        counters["records_dropped"] += dropped
        if queued:
            self._on_queue()

    def unrepresentable(self, sample: Sample, problem: str) -> Sample:
        """The BAD sample, stamped now, that stands for one that cannot travel."""
        self.counters["samples_unrepresentable"] += 1
        return Sample(
            tag_id=sample.tag_id,
            ts_ns=self._now_ns(),
            value=None,
            quality=Quality.BAD,
            reason=f"unrepresentable: {problem}",
        )

    def tag(self, info: TagInfo) -> None:
        """A catalogue entry that changed: queued now, so the values after it are read by it.

        An OPC UA node's type is learnt after connecting; a Float published as
        the catalogue's default float64 until the next carousel would carry
        float64 noise.
        """
        self._announced.add(info.tag_id)
        self._put(info)

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
                self._sent[tag_id] = sample
                self.counters["samples_queued"] += 1

    def keep_only(self, tag_ids: set[int]) -> None:
        """Forget the tags not in ``tag_ids`` (a reload removed them): no more refreshes."""
        for table in (self._last, self._sent):
            for tag_id in [t for t in table if t not in tag_ids]:
                del table[tag_id]
        self._announced &= tag_ids

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
        """Queue a record of the transmitter's own (the heartbeat), past the bounds.

        The heartbeat carries the drop counts: a full outbox dropping it would
        keep silent about the very drops it is making. One a second cannot
        grow the queue by much, whatever the bounds.
        """
        self._queue.append(record)
        self._bytes += cost(record)
        self._on_queue()
        return True

    def pop(self) -> Record:
        """The oldest queued record (the Outbox must not be empty)."""
        record = self._queue.popleft()
        self._bytes -= cost(record)
        return record

    def _announce(self, tag_id: int) -> None:
        # Rare: carousel() runs before the pollers start, so this is a tag added later.
        for info in self._catalogue():
            if info.tag_id == tag_id:
                self._put(info)
        self._announced.add(tag_id)

    def _put(self, record: Record) -> bool:
        size = cost(record)
        if len(self._queue) >= self._limit or self._bytes + size > self._limit_bytes:
            self.counters["records_dropped"] += 1
            return False
        self._queue.append(record)
        self._bytes += size
        self._on_queue()
        return True
