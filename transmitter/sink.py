"""What pollers hand their results to: non-blocking, never raising."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from diode.records import DeviceInfo, Sample, TagInfo


class SampleSink(Protocol):
    def sample(self, sample: Sample) -> None:
        """Take one sample; must not block or raise (the sender counts what it drops)."""

    def samples(self, batch: Iterable[Sample]) -> None:
        """Take the samples of one poll, in order, as :meth:`sample` would one by one."""

    def device(self, info: DeviceInfo) -> None:
        """Take a device's inventory record."""

    def tag(self, info: TagInfo) -> None:
        """Take a catalogue entry that changed (a type learnt from the server): sent at once."""
