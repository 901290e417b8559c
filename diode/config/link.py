"""Settings of the one-way link that both ends must agree on, and their checks."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from diode.config import Section

IPV4_UDP_OVERHEAD = 28  # 20-byte IPv4 header + 8-byte UDP header
MAX_SYMBOLS = 255  # zfec allows n <= 256; one byte on the wire holds n <= 255


class FecSettings(Section):
    """Reed-Solomon repair added to each block.

    A block of k' source symbols (k' < ``k``) gets
    ``ceil(k' * repair_ratio) + repair_burst`` repair symbols: the ratio covers
    random loss in proportion to the block, the fixed part covers a burst of
    consecutive datagrams landing wholly on it, which hurts a small block as
    much as a large one.

    With ``group`` >= 2, a full block (k' = ``k``) is only ever sent in a group
    of ``group`` full blocks framed together, whose datagrams leave strictly
    round-robin: a burst of B consecutive datagrams costs each of them at most
    ceil(B / ``group``), so it gets ``ceil(k * repair_ratio) + group_repair_burst``
    repair symbols. A block sent alone never holds ``k`` symbols (the encoder
    closes it at ``k`` - 1), so n is still a function of k' alone: the
    receiver's link profile (one n for each k') holds both kinds.
    """

    k: int = Field(32, ge=1, le=128, description="source symbols in a full block")
    repair_ratio: float = Field(
        0.25, ge=0.0, le=4.0, description="repair symbols per source symbol (random loss)"
    )
    repair_burst: int = Field(
        16, ge=0, le=127, description="extra repair symbols per block sent alone (bursts)"
    )
    group: int = Field(
        4,
        ge=1,
        le=16,
        description="full blocks framed together and sent round-robin, so a burst is spread "
        "over all of them; a block sent alone holds at most k - 1 symbols; 1 = no groups",
    )
    group_repair_burst: int = Field(
        9,
        ge=0,
        le=127,
        description="extra repair symbols per full block of a group: its share of a burst "
        "(ceil(burst / group)) plus what keeps random loss within budget at full rate",
    )

    @property
    def grouped(self) -> bool:
        """Whether full blocks go in groups (and only there)."""
        return self.group > 1

    @property
    def k_alone(self) -> int:
        """The most source symbols of a block sent alone."""
        return self.k - 1 if self.grouped else self.k

    def repair_for(self, k: int) -> int:
        ratio_part = math.ceil(k * self.repair_ratio - 1e-9)
        if self.grouped and k == self.k:
            return ratio_part + self.group_repair_burst
        return ratio_part + self.repair_burst

    def most_symbols(self) -> int:
        """The largest n of any block."""
        return max(k + self.repair_for(k) for k in range(1, self.k + 1))

    @model_validator(mode="after")
    def _fits_on_the_wire(self) -> FecSettings:
        if self.grouped and self.k < 2:
            raise ValueError(f"group={self.group} needs k >= 2: a block sent alone holds k - 1")
        n = self.most_symbols()
        if n > MAX_SYMBOLS:
            raise ValueError(
                f"k={self.k} with repair_ratio={self.repair_ratio}, "
                f"repair_burst={self.repair_burst} and "
                f"group_repair_burst={self.group_repair_burst} gives n={n} symbols per block; "
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
