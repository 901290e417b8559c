"""A synthetic poller: tags that count up at a fixed total rate (tests, benchmarks).

Tag ``i`` of source ``S`` takes the values 1, 2, 3, ... in order, so a
subscriber can check that every update arrived exactly once and in order.
Updates go round-robin over the tags in batches every ``batch_ms``, on a
monotonic schedule that does not drift.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from diode.config.synthetic import SyntheticSource
from diode.records import Sample, TagInfo, ValueType, good_sample
from transmitter.sink import SampleSink


class SyntheticPoller:
    def __init__(
        self,
        source: SyntheticSource,
        *,
        tag_id: Callable[[str, str], int],
        sink: SampleSink,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.source = source
        self.sink = sink
        self.now_ns = now_ns
        kind = ValueType.STRING if source.string_bytes else ValueType.UINT64
        self._ids = [tag_id(source.name, f"t{i}") for i in range(source.tags)]
        self.catalogue = [
            TagInfo(
                tag_id=ident,
                name=f"t{i}",
                device=source.name,
                value_type=kind,
                source=f"synthetic://{source.name}/t{i}",
            )
            for i, ident in enumerate(self._ids)
        ]
        self.deadbands: dict[int, float] = {}
        self._values = [0] * source.tags
        self._next = 0
        self.counters = {"generated": 0}

    def generate(self, n: int) -> None:
        """Hand ``n`` updates to the sink now, in one call (a poll's worth of samples)."""
        ts = self.now_ns()
        tags, values, ids = self.source.tags, self._values, self._ids
        width = self.source.string_bytes
        batch: list[Sample] = []
        append = batch.append
        i = self._next
        for _ in range(n):
            count = values[i] = values[i] + 1
            append(good_sample(ids[i], ts, str(count).rjust(width, "x") if width else count))
            i += 1
            if i == tags:
                i = 0
        self._next = i
        self.sink.samples(batch)
        self.counters["generated"] += n

    async def run(self) -> None:
        """Generate until cancelled: a timer callback every ``batch_ms``, no task wake-up.

        The load generator runs inside the transmitter and its CPU is counted
        with it: a coroutine sleeping between batches cost a task step, a future
        and its callback per wake-up (2 000 a second in ``diode bench tags`` at
        10 000 updates/s); a timer handle is the whole cost here. An error in a
        batch ends ``run`` with it, as it did from the coroutine.
        """
        loop = asyncio.get_running_loop()
        period = self.source.batch_ms / 1000
        per_s = self.source.rate_hz
        start = time.monotonic()
        done = 0
        ended: asyncio.Future[None] = loop.create_future()
        timer: asyncio.TimerHandle

        def tick() -> None:
            nonlocal done, timer
            try:
                due = int((time.monotonic() - start) * per_s) - done
                if due > 0:
                    self.generate(due)
                    done += due
            except Exception as exc:  # handed to the awaiting task as it is
                ended.set_exception(exc)
                return
            timer = loop.call_later(period, tick)

        timer = loop.call_later(period, tick)
        try:
            await ended
        finally:
            timer.cancel()
