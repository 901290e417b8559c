"""Attacks made visible: rejections by reason, their rates, and a rate-limited warning.

The decoder counts every dropped datagram under ``rejected_<reason>``. This
meter turns those counters into what ``$status`` shows (totals and rates per
second over the last ``window_s``) and decides when the log says so: at most
one warning per ``warn_every_s``, and only when datagrams were rejected for
a reason a healthy link does not produce (surplus repair symbols arrive
``late`` and copies arrive as ``duplicate`` on every healthy link).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

PREFIX = "rejected_"
# Late copies the kernel steered (receiver/steer.py) are as benign as the decoder's; the
# replays it steered are not.
BENIGN = frozenset({"late", "duplicate", "steered_late"})


class RejectionMeter:
    def __init__(self, *, window_s: float = 5.0, warn_every_s: float = 10.0) -> None:
        self.window_s = window_s
        self.warn_every_s = warn_every_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._warned_at: float | None = None
        self._warned_totals: dict[str, int] = {}

    def update(self, counters: Mapping[str, int], now: float) -> None:
        totals = {k[len(PREFIX) :]: int(v) for k, v in counters.items() if k.startswith(PREFIX)}
        self._samples.append((now, totals))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def totals(self) -> dict[str, int]:
        return dict(sorted(self._samples[-1][1].items())) if self._samples else {}

    def rates(self) -> dict[str, float]:
        """Rejections per second per reason, over the last ``window_s`` or so."""
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return {}
        return {
            # max(0, ...): a decoder replaced (failover) starts its counters again.
            reason: round(max(0, count - first.get(reason, 0)) / (t1 - t0), 1)
            for reason, count in sorted(last.items())
        }

    def status(self) -> dict[str, Any]:
        """The ``rejected`` object of ``$status``."""
        return {"total": self.totals(), "per_s": self.rates()}

    def warning(self, now: float) -> dict[str, Any] | None:
        """What to log now, or None (nothing new, or warned less than warn_every_s ago)."""
        if self._warned_at is not None and now - self._warned_at < self.warn_every_s:
            return None
        totals, rates = self.totals(), self.rates()
        new = {
            reason: count - self._warned_totals.get(reason, 0)
            for reason, count in totals.items()
            if reason not in BENIGN and count > self._warned_totals.get(reason, 0)
        }
        if not new:
            return None
        self._warned_at = now
        self._warned_totals = totals
        return {
            "rejected": new,
            "per_s": {reason: rates.get(reason, 0.0) for reason in new},
        }
