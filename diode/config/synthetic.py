"""``[[synthetic.sources]]``: a load generator inside the transmitter, for tests and benchmarks.

It exercises the same sending path as a poller (sink, report by exception,
encoder, pacer) at a rate no real PLC on a test machine could give.
"""

from __future__ import annotations

from pydantic import Field

from diode.config import Section


class SyntheticSource(Section):
    """Tags whose values count up, each update a change, at a fixed total rate."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="device name, used in topics")
    tags: int = Field(100, ge=1, le=1_000_000, description="number of tags")
    rate_hz: float = Field(
        1000.0, gt=0.0, le=10_000_000.0, description="tag updates per second, all tags together"
    )
    batch_ms: float = Field(
        5.0, gt=0.0, le=1000.0, description="updates are generated in batches this often"
    )
    string_bytes: int = Field(
        0, ge=0, le=4096, description="0: integer values; otherwise strings of this length"
    )
