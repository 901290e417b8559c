"""The receiver's MQTT output: the broker (``[mqtt]``) and each stream's mapping (``output``).

Topic parts come from config and from the transmitter's catalogue. Config parts
are checked here (no MQTT wildcard, no empty level); catalogue parts (device and
tag names) are made safe when the topic is built (see ``receiver/payload.py``).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from diode.config import Section, key_error
from diode.config.sparkplug import SparkplugSettings

TEMPLATE_FIELDS = frozenset({"prefix", "site", "area", "device", "tag"})
UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108 with the NUL)


def _check_topic_part(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if any(c in value for c in "+#\0"):
        raise ValueError(f"{what} must not contain the MQTT wildcards + or # (got {value!r})")
    if value.startswith(("/", "$")) or value.endswith("/") or "//" in value:
        raise ValueError(f"{what} must not start with / or $, end with / or have empty levels")
    return value


class MqttBroker(Section):
    """``[mqtt]``: the broker the receiver publishes to, and the spool for when it is away."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker TCP port (8883 for TLS)")
    socket: Path | None = Field(
        None,
        description="the broker's Unix domain socket (mosquitto: listener 0 PATH), an absolute "
        "path, instead of host and port, for a broker on this host; no TLS; its permissions "
        "decide who connects (docs/OPERATIONS.md)",
        strict=False,
    )
    client_id: str = Field(
        "diode-rx", min_length=1, max_length=128, description="MQTT client identifier"
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT version; 3.1.1 for older plant brokers (no content type, no expiry)",
    )
    tls: bool = Field(False, description="connect with TLS")
    ca_file: Path | None = Field(
        None, description="CA bundle to verify the broker; system CAs if unset", strict=False
    )
    certfile: Path | None = Field(None, description="client certificate (mutual TLS)", strict=False)
    keyfile: Path | None = Field(None, description="client private key (mutual TLS)", strict=False)
    username: str | None = Field(None, min_length=1, description="MQTT user name")
    password_file: Path | None = Field(
        None, description="file holding the MQTT password (never the password itself)", strict=False
    )
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive interval")
    connect_timeout_s: float = Field(
        10.0, gt=0.0, le=300.0, description="longest wait for CONNACK before retrying"
    )
    reconnect_initial_s: float = Field(
        0.5, gt=0.0, le=60.0, description="first wait before reconnecting; doubles each failure"
    )
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="longest reconnect wait")
    max_inflight: int = Field(
        1000,
        ge=1,
        le=65535,
        description="messages written but not yet acknowledged, at most "
        "(lowered to the broker's Receive Maximum when it announces one, "
        "and to 65279 so packet ids never run out)",
    )
    spool_path: Path = Field(
        Path("/var/lib/diode-rx/mqtt-spool.sqlite3"),
        description="SQLite file holding every message until the broker has it, "
        "and the stream positions; default: mqtt-spool.sqlite3 in receiver.state_dir",
        strict=False,
    )
    spool_max_records: int = Field(
        1_000_000,
        ge=1,
        le=1_000_000_000,
        description="messages the spool holds; when full the oldest are dropped and counted",
    )
    status_topic: str = Field(
        "diode/$receiver/status",
        description="retained receiver status; the last will sets it to offline",
    )
    status_interval_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="how often the receiver status is republished"
    )

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        return _check_topic_part(value, "status_topic")

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        # Relative to what? The daemon's working folder is not the config's: refuse.
        if not value.is_absolute():
            raise ValueError(f"socket must be an absolute path (got {str(value)!r})")
        # sockaddr_un holds 108 bytes with the terminating NUL (unix(7)).
        if len(os.fsencode(value)) > UNIX_PATH_MAX:
            raise ValueError(f"socket path is longer than {UNIX_PATH_MAX} bytes (unix(7))")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttBroker:
        if self.socket is not None:
            given = sorted(self.model_fields_set & {"host", "port"})
            if given:
                raise key_error(
                    "socket",
                    f"socket excludes {' and '.join(given)}: the broker is one or the other",
                )
            if self.tls:
                # TLS authenticates a peer across a network; a socket file's peer is
                # whoever may write it, which its permissions already decide.
                raise key_error(
                    "socket", "socket and tls = true exclude each other: no TLS over a Unix socket"
                )
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if not self.tls and (self.ca_file or self.certfile):
            raise ValueError("ca_file, certfile and keyfile need tls = true")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        return self

    @property
    def address(self) -> str:
        """The broker as logs name it: ``unix:/run/mosquitto/mosquitto.sock`` or ``host:port``."""
        return f"unix:{self.socket}" if self.socket is not None else f"{self.host}:{self.port}"


class StreamOutput(Section):
    """A stream's ``output``: where and how its values are published."""

    prefix: str = Field("diode", description="first topic level(s)")
    site: str = Field("site", description="site name, the level after the prefix")
    topic_template: str = Field(
        "{prefix}/{site}/{area}/{device}/{tag}",
        description="per-tag topic; fields {prefix} {site} {area} {device} {tag}; "
        "an empty {area} and its slash are left out (the ISA-95 layout in the examples below); "
        "the tag's metadata is retained on it + /$meta",
    )
    areas: dict[str, str] = Field(
        default_factory=dict,
        description="ISA-95 levels between the site and a device, by catalogue device name "
        '(e.g. plc1 = "packaging/line2"); the {area} of the topics',
    )
    default_area: str = Field(
        "", description="the {area} of a device not in areas; empty leaves the level out"
    )
    qos: Literal[0, 1] = Field(1, description="QoS of value messages (0 or 1)")
    retain: bool = Field(True, description="retain value messages (last value per topic)")
    message_expiry_s: int | None = Field(
        None, ge=1, le=2**32 - 1, description="MQTT 5 message expiry of value messages"
    )
    payload: Literal["per_tag", "batched", "sparkplug"] = Field(
        "per_tag",
        description="one JSON message per sample, one per device per block, or Sparkplug B 3.0 "
        "(an edge node, see output.sparkplug)",
    )
    sparkplug: SparkplugSettings = Field(default_factory=SparkplugSettings)
    link_timeout_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="no heartbeat for this long: link down, values stale"
    )

    @field_validator("prefix", "site")
    @classmethod
    def _part(cls, value: str) -> str:
        return _check_topic_part(value, "prefix and site")

    @field_validator("areas")
    @classmethod
    def _areas(cls, value: dict[str, str]) -> dict[str, str]:
        for device, area in value.items():
            _check_topic_part(area, f"areas.{device}")
        return value

    @field_validator("default_area")
    @classmethod
    def _default_area(cls, value: str) -> str:
        return value and _check_topic_part(value, "default_area")

    @field_validator("site")
    @classmethod
    def _one_level(cls, value: str) -> str:
        # Consumers subscribe by depth (prefix/site/+/+); a slash would add a level.
        if "/" in value:
            raise ValueError(f"site is one topic level: no / (got {value!r})")
        return value

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"topic_template is not a valid template: {exc}") from None
        unknown = names - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"topic_template has unknown fields {sorted(unknown)}; "
                f"known: {sorted(TEMPLATE_FIELDS)}"
            )
        if "tag" not in names:
            raise ValueError("topic_template must contain {tag}: each tag needs its own topic")
        sample = value.format(prefix="p", site="s", area="a", device="d", tag="t")
        _check_topic_part(sample, "topic_template")
        return value
