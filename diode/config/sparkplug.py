"""A stream's ``output.sparkplug``: the receiver as a Sparkplug B 3.0 edge node.

Used when the stream's ``payload = "sparkplug"``. Sparkplug ids become topic
levels (``spBv1.0/{group_id}/DDATA/{edge_node_id}/{device}``), so 3.0's rule
applies: valid UTF-8 without ``/``, ``+`` or ``#``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from diode.config import Section


def _sparkplug_id(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} must not contain /, +, # or NUL (got {value!r})")
    return value


class SparkplugSettings(Section):
    """``output.sparkplug``: the edge node a Sparkplug stream publishes as (one device per PLC)."""

    group_id: str = Field("diode", description="Sparkplug group id (the topic level after spBv1.0)")
    edge_node_id: str = Field(
        "diode-rx", description="Sparkplug edge node id; unique per broker and group"
    )
    primary_host_id: str | None = Field(
        None,
        description="wait for spBv1.0/STATE/<id> online before NBIRTH; when it goes offline, "
        "NDEATH and a new session that waits for it; values meanwhile follow the births "
        "as historical",
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client id of the edge node's own connection "
        "(default: [mqtt] client_id + '-spb-' + edge_node_id)",
    )
    history_max_samples: int = Field(
        1_000_000,
        ge=1,
        le=100_000_000,
        description="values held while the broker or the primary host is away, sent "
        "afterwards as historical; when full the oldest are dropped and counted",
    )

    @field_validator("group_id", "edge_node_id", "primary_host_id")
    @classmethod
    def _ids(cls, value: str | None) -> str | None:
        return None if value is None else _sparkplug_id(value, "Sparkplug ids")
