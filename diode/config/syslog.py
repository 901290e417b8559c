"""``[syslog]`` (transmitter: syslog in from OT) and ``[soc]`` (receiver: out to the SOC)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from diode.config import IpAddress, Section


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"expected an address or network (10.0.0.0/24), got {value!r}") from None
    return value


IpNetwork = Annotated[str, AfterValidator(_network)]


class SyslogListener(Section):
    """``[[syslog.listeners]]``: one socket on an OT address where devices send syslog."""

    address: IpAddress = Field(
        description="an OT-side address of this host; never the link's, never 0.0.0.0"
    )
    port: int = Field(514, ge=1, le=65535, description="port (514 UDP/TCP, 6514 TLS)")
    protocol: Literal["udp", "tcp", "tls"] = Field("udp", description="transport")

    @model_validator(mode="after")
    def _specific(self) -> SyslogListener:
        if ipaddress.ip_address(self.address).is_unspecified:
            # A wildcard bind would also listen on the link's interface.
            raise ValueError("address must be a specific OT address, not a wildcard")
        return self


class SyslogSection(Section):
    """``[syslog]``: syslog from OT devices, and diode's own security events, over the link."""

    listeners: list[SyslogListener] = Field(default_factory=list)
    allow: list[IpNetwork] = Field(
        default_factory=list,
        description="sources allowed to send (addresses or networks); others are counted, dropped",
    )
    rate_per_source: float = Field(
        500.0, gt=0.0, le=1e6, description="messages per second one source may send, sustained"
    )
    burst_per_source: float = Field(
        2000.0, ge=1.0, le=1e7, description="messages one source may send at once"
    )
    link_share: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="fraction of link.rate_mbps the log lane takes at most, and gets even while "
        "telemetry exceeds the link; telemetry has the rest",
    )
    queue_messages: int = Field(
        100_000, ge=100, le=10_000_000, description="messages waiting for the link, at most"
    )
    max_connections: int = Field(
        256, ge=1, le=65536, description="TCP/TLS connections at once, all listeners"
    )
    certfile: Path | None = Field(None, description="TLS listener certificate (PEM)", strict=False)
    keyfile: Path | None = Field(None, description="TLS listener private key (PEM)", strict=False)
    client_ca_file: Path | None = Field(
        None, description="when set, TLS clients must present a certificate it signed", strict=False
    )
    security_events: bool = Field(
        True, description="send diode's own security events (device identity, reloads ...)"
    )
    exception_burst: int = Field(
        20, ge=1, le=1_000_000, description="Modbus exceptions in 10 s that raise an event"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SyslogSection:
        if self.listeners and not self.allow:
            raise ValueError("allow must list the sources when listeners are configured")
        if any(lst.protocol == "tls" for lst in self.listeners) and not (
            self.certfile and self.keyfile
        ):
            raise ValueError("a tls listener needs certfile and keyfile")
        return self

    def files(self) -> list[tuple[str, Path | None]]:
        return [(k, getattr(self, k)) for k in ("certfile", "keyfile", "client_ca_file")]


class SocSection(Section):
    """``[soc]``: where the receiver forwards syslog and security events (IT side)."""

    collector_host: IpAddress | None = Field(
        None, description="syslog collector (RFC 5424 over TCP, octet counting); none = off"
    )
    collector_port: int = Field(6514, ge=1, le=65535, description="collector port")
    tls: bool = Field(False, description="TLS to the collector")
    ca_file: Path | None = Field(None, description="CA that signed the collector", strict=False)
    certfile: Path | None = Field(None, description="client certificate (PEM)", strict=False)
    keyfile: Path | None = Field(None, description="client private key (PEM)", strict=False)
    server_name: str | None = Field(None, description="name the collector's certificate has")
    mqtt_events: bool = Field(True, description="publish ECS JSON on {prefix}/{site}/$events")
    mqtt_syslog: bool = Field(
        True,
        description="devices' syslog on $events too (false: security events only; "
        "the collector still gets every message)",
    )
    spool_max_messages: int = Field(
        1_000_000, ge=100, le=100_000_000, description="messages kept while the collector is away"
    )
    reconnect_s: float = Field(
        2.0, gt=0.0, le=300.0, description="wait before reconnecting to the collector"
    )
    rejected_report_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="forged/replayed/malformed datagrams: report period"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SocSection:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self

    def files(self) -> list[tuple[str, Path | None]]:
        return [(k, getattr(self, k)) for k in ("ca_file", "certfile", "keyfile")]
