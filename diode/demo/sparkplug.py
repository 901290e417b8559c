"""The demo's view of a Sparkplug edge node: births and data turned into per-tag values.

``diode demo --payload sparkplug`` has the receiver publish Sparkplug B; the
live view shows tags, so this reads NBIRTH/DBIRTH/DDATA/DDEATH as a host
would (aliases from the births) and hands the view one JSON-like value per
tag, under the same names the JSON payload would use.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from receiver.sparkplug_payload import decode, value_of

QUALITY = {192: "good", 64: "uncertain", 0: "bad", 500: "stale"}


class SparkplugReader:
    """Per-tag values from one group's Sparkplug messages, keyed ``{root}/{device}/{tag}``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._aliases: dict[int, tuple[str, str, int]] = {}  # alias -> device, name, datatype
        self.births = 0
        self.deaths = 0

    def take(self, topic: str, raw: bytes) -> list[tuple[str, dict[str, Any]]]:
        parts = topic.split("/")
        if len(parts) != 5 or parts[2] not in ("DBIRTH", "DDATA", "DDEATH"):
            return []
        kind, device = parts[2], parts[4]
        try:
            payload = decode(raw)
        except Exception:  # protobuf's DecodeError: a foreign message on the topic
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        if kind == "DDEATH":
            self.deaths += 1
            return out
        for metric in payload.metrics:
            if kind == "DBIRTH":
                self._aliases[metric.alias] = (device, metric.name, metric.datatype)
            known = self._aliases.get(metric.alias)
            if known is None or metric.is_historical:
                continue
            quality = 192
            props = metric.properties
            if "Quality" in props.keys:
                quality = props.values[list(props.keys).index("Quality")].int_value
            ts = dt.datetime.fromtimestamp(metric.timestamp / 1000, dt.UTC)
            out.append(
                (
                    f"{self.root}/{known[0]}/{known[1]}",
                    {
                        "value": value_of(metric, known[2]),
                        "quality": QUALITY.get(quality, str(quality)),
                        "ts": ts.isoformat().replace("+00:00", "Z"),
                    },
                )
            )
        if kind == "DBIRTH":
            self.births += 1
        return out
