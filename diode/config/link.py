"""Settings of the one-way link that both ends must agree on, and their checks."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from diode.config import Section

IPV4_UDP_OVERHEAD = 28  # 20-byte IPv4 header + 8-byte UDP header
MAX_SYMBOLS = 255  # zfec allows n <= 256; one byte on the wire holds n <= 255


class FecSettings(Section):
    """Reed-Solomon repair added to each block.

    A block of k' source symbols (k' <= ``k``) gets
    ``ceil(k' * repair_ratio) + repair_burst`` repair symbols: the ratio covers
    random loss in proportion to the block, the fixed part covers a burst of
    consecutive datagrams, which hurts a small block as much as a large one.
    """

    k: int = Field(32, ge=1, le=128, description="source symbols in a full block")
    repair_ratio: float = Field(
        0.25, ge=0.0, le=4.0, description="repair symbols per source symbol (random loss)"
    )
    repair_burst: int = Field(
        16, ge=0, le=127, description="extra repair symbols per block (bursts)"
    )

    def repair_for(self, k: int) -> int:
        return math.ceil(k * self.repair_ratio - 1e-9) + self.repair_burst

    @model_validator(mode="after")
    def _fits_on_the_wire(self) -> FecSettings:
        n = self.k + self.repair_for(self.k)
        if n > MAX_SYMBOLS:
            raise ValueError(
                f"k={self.k} with repair_ratio={self.repair_ratio} and "
                f"repair_burst={self.repair_burst} gives n={n} symbols per block; "
                f"at most {MAX_SYMBOLS} are possible"
            )
        return self


class LinkSettings(Section):
    """The datagram size, the path MTU, the block linger and the FEC."""

    datagram_size: int = Field(
        1472, ge=256, le=65507, description="UDP payload bytes of every datagram"
    )
    mtu: int = Field(1500, ge=576, le=65535, description="path MTU of the one-way link")
    linger_ms: float = Field(
        5.0, gt=0.0, le=1000.0, description="longest a record waits for its block to fill"
    )
    interleave: int = Field(
        4, ge=1, le=64, description="blocks whose datagrams the sender interleaves"
    )
    fec: FecSettings = Field(default_factory=FecSettings)

    @model_validator(mode="after")
    def _no_fragmentation(self) -> LinkSettings:
        if self.datagram_size + IPV4_UDP_OVERHEAD > self.mtu:
            raise ValueError(
                f"datagram_size {self.datagram_size} + {IPV4_UDP_OVERHEAD} bytes of IPv4/UDP "
                f"headers exceeds mtu {self.mtu}: datagrams would be fragmented; "
                f"use datagram_size <= {self.mtu - IPV4_UDP_OVERHEAD}"
            )
        return self
