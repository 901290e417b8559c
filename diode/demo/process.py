"""The demo plant's physics: a tank, its pump, a parts counter, a furnace; no I/O, no clock.

Both simulated controllers read the same :class:`Process`, so the values they
serve agree with each other (the flow on the OPC UA server follows the pump on
the Modbus PLC). Time is passed in: :meth:`Process.advance` integrates up to
``now``, and a seeded RNG makes the noise of one run repeatable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

LEVEL_LOW_M = 1.0  # the pump starts below this level...
LEVEL_HIGH_M = 3.0  # ...and stops above this one
FILL_M_PER_S = 0.35  # net rise while the pump runs
DRAIN_M_PER_S = 0.2  # fall while it is stopped
PARTS_PER_S = 10.0
TEMP_MEAN_C = 60.0
TEMP_SWING_C = 8.0
TEMP_PERIOD_S = 20.0
TEMP_NOISE_C = 0.3
FLOW_M3H = 12.5


@dataclass(slots=True, kw_only=True)
class Process:
    """The state of the simulated plant at ``t`` seconds of its own life."""

    seed: int = 1
    level_m: float = 2.6
    pump_on: bool = True
    parts: int = 0
    t: float = 0.0
    _origin: float | None = None
    _parts_f: float = 0.0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def advance(self, now: float) -> None:
        """Integrate the tank and the counter from the last call up to ``now`` (monotonic s)."""
        if self._origin is None:
            self._origin = now
        t = now - self._origin
        dt = t - self.t
        if dt <= 0.0:
            return
        self.t = t
        rate = FILL_M_PER_S if self.pump_on else -DRAIN_M_PER_S
        self.level_m = min(max(self.level_m + rate * dt, 0.0), 5.0)
        # Hysteresis: the pump toggles at the two thresholds, never in between.
        if self.pump_on and self.level_m >= LEVEL_HIGH_M:
            self.pump_on = False
        elif not self.pump_on and self.level_m <= LEVEL_LOW_M:
            self.pump_on = True
        self._parts_f += PARTS_PER_S * dt
        whole = int(self._parts_f)
        self._parts_f -= whole
        self.parts = (self.parts + whole) % 2**32  # a uint32 counter wraps, as a PLC's does

    def temperature_c(self) -> float:
        """A noisy sine: the furnace follows its programme, the sensor adds noise."""
        wave = TEMP_SWING_C * math.sin(2.0 * math.pi * self.t / TEMP_PERIOD_S)
        return round(TEMP_MEAN_C + wave + self._rng.gauss(0.0, TEMP_NOISE_C), 2)

    def flow_m3h(self) -> float:
        """Flow at the pump outlet: nominal with a little noise while it runs, zero when not."""
        if not self.pump_on:
            return 0.0
        return round(FLOW_M3H + self._rng.gauss(0.0, 0.2), 2)
