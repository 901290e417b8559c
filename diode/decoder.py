"""The receiver's decoder; it lives in :mod:`diode.protocol` (one module per job).

Kept so ``from diode.decoder import Decoder, Delivered, Gap, ...`` works.
"""

from diode.protocol.decoder import (
    RECENT_BLOCKS,
    Decoder,
    DecoderSettings,
    Delivered,
    EpochStarted,
    Event,
    Gap,
    LinkProfile,
)

__all__ = [
    "RECENT_BLOCKS",
    "Decoder",
    "DecoderSettings",
    "Delivered",
    "EpochStarted",
    "Event",
    "Gap",
    "LinkProfile",
]
