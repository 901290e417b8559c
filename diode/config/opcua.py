"""OPC UA sources: one :class:`OpcuaServer` per server, one :class:`OpcuaNode` per tag.

Example (TOML)::

    [[opcua.servers]]
    name = "line1"
    endpoint = "opc.tcp://10.0.0.5:4840"
    security_policy = "Basic256Sha256"
    security_mode = "SignAndEncrypt"
    username = "diode"
    password_file = "/etc/diode/line1.password"

    [[opcua.servers.nodes]]
    name = "tank.level"
    node_id = "ns=2;s=Tank.Level"
    deadband_type = "absolute"
    deadband_value = 0.5
    unit = "m"

Passwords are only ever read from a file (``password_file``), never written in
the config itself: config files get copied into tickets, backups and version
control, while a 0600 secret file can be provisioned and rotated on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from diode.config import Section
from diode.records import ValueType

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ENDPOINT_PATTERN = r"^opc\.tcp://[^\s/:]+(:[0-9]{1,5})?(/\S*)?$"

# OPC UA Part 6 5.3.1.10 string form: optional namespace (index or URI), then one
# of the four identifier kinds. Checked here without asyncua so the core stays
# free of the protocol stack.
_NODE_ID = re.compile(
    r"^((ns=[0-9]{1,5}|nsu=[^;]+);)?(i=[0-9]{1,10}|s=.+|g=[0-9A-Fa-f-]{36}|b=.+)$"
)


class OpcuaNode(Section):
    """One variable read from an OPC UA server: one tag on the wire."""

    name: str = Field(pattern=NAME_PATTERN, description="tag name, unique within the server")
    node_id: str = Field(description='the variable\'s NodeId, e.g. "ns=2;s=Tank.Level"')
    mode: Literal["subscribe", "poll"] = Field(
        "subscribe", description="subscribe (report by exception) or poll (periodic read)"
    )
    poll_interval_s: float = Field(
        1.0, ge=0.05, le=86400.0, description="poll mode: seconds between reads"
    )
    sampling_interval_ms: float | None = Field(
        None, ge=0.0, le=3_600_000.0, description="subscribe mode: server sampling; server default"
    )
    queue_size: int | None = Field(
        None, ge=1, le=10_000, description="subscribe mode: server-side queue; server default"
    )
    deadband_type: Literal["none", "absolute", "percent"] = Field(
        "none", description="subscribe mode: server-side DataChangeFilter deadband"
    )
    deadband_value: float = Field(
        0.0, ge=0.0, description="the server-side deadband (units, or percent of EURange)"
    )
    unit: str = Field("", max_length=64, description="engineering unit, for the catalogue")
    description: str = Field("", max_length=512, description="free text, for the catalogue")
    type: ValueType | None = Field(
        None,
        strict=False,
        description="value type (of each element, for an array node); inferred from the "
        "node's DataType if unset; see Value types below",
    )
    deadband: float = Field(
        0.0, ge=0.0, description="sender-side absolute deadband applied by the transmitter"
    )

    @model_validator(mode="after")
    def _consistent(self) -> OpcuaNode:
        if not _NODE_ID.match(self.node_id):
            raise ValueError(
                f"node_id {self.node_id!r} is not a NodeId string "
                '(expected e.g. "ns=2;s=Tank.Level" or "i=2258")'
            )
        if self.mode == "poll" and (
            self.deadband_type != "none"
            or self.sampling_interval_ms is not None
            or self.queue_size is not None
        ):
            raise ValueError(
                "deadband_type, sampling_interval_ms and queue_size apply to mode = "
                '"subscribe" only; a polled node is read every poll_interval_s'
            )
        if self.deadband_type == "none" and self.deadband_value != 0.0:
            raise ValueError('deadband_value is set but deadband_type is "none"')
        if self.deadband_type == "percent" and self.deadband_value > 100.0:
            raise ValueError("a percent deadband_value must be between 0 and 100")
        return self


class OpcuaServer(Section):
    """One OPC UA server (one session) and the nodes read from it."""

    name: str = Field(pattern=NAME_PATTERN, description="device name, unique in the config")
    endpoint: str = Field(
        pattern=ENDPOINT_PATTERN, description='endpoint URL, "opc.tcp://host:port[/path]"'
    )
    security_policy: Literal["None", "Basic256Sha256"] = Field(
        "None", description="secure channel policy"
    )
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = Field(
        "None", description='"None" with policy "None", else "Sign" or "SignAndEncrypt"'
    )
    certificate: Path | None = Field(
        None, strict=False, description="client certificate (DER or PEM); generated if unset"
    )
    private_key: Path | None = Field(
        None, strict=False, description="the client certificate's private key (PEM or DER)"
    )
    cert_dir: Path | None = Field(
        None,
        strict=False,
        description="where the generated client certificate is kept; the state dir if unset",
    )
    server_certificate: Path | None = Field(
        None,
        strict=False,
        description="pin the server: only this certificate is accepted (DER or PEM)",
    )
    trust_list: Path | None = Field(
        None,
        strict=False,
        description="folder (or file) of trusted server or CA certificates (DER or PEM); "
        "the server's certificate must be one of them or be signed by one",
    )
    username: str | None = Field(None, min_length=1, max_length=256, description="user name")
    password_file: Path | None = Field(
        None, strict=False, description="file holding the password (first line); never inline"
    )
    allow_password_without_encryption: bool = Field(
        False,
        description='send the password with security_mode "None", where anyone on the OT '
        "network can read it (refused unless true)",
    )
    timeout_s: float = Field(5.0, gt=0.0, le=120.0, description="per-request timeout")
    reconnect_initial_s: float = Field(
        1.0, ge=0.1, le=600.0, description="first wait before reconnecting"
    )
    reconnect_max_s: float = Field(
        60.0, ge=0.1, le=3600.0, description="longest wait between reconnect attempts"
    )
    reconnect_jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="each wait is scaled by a random 1 +/- jitter"
    )
    watchdog_s: float = Field(
        30.0,
        ge=0.5,
        le=3600.0,
        description="a subscription silent this long (no data, no keepalive) is rebuilt",
    )
    sampling_interval_ms: float = Field(
        500.0, ge=0.0, le=3_600_000.0, description="default sampling interval of nodes"
    )
    queue_size: int = Field(10, ge=1, le=10_000, description="default server-side queue size")
    publishing_interval_ms: float = Field(
        1000.0, gt=0.0, le=3_600_000.0, description="subscription publishing interval"
    )
    nodes: list[OpcuaNode] = Field(min_length=1, description="the variables read")

    @model_validator(mode="after")
    def _consistent(self) -> OpcuaServer:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                f"security_mode {self.security_mode!r} does not fit security_policy "
                f'{self.security_policy!r}: use "None" with "None", and "Sign" or '
                '"SignAndEncrypt" with "Basic256Sha256"'
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key must be given together")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file must be given together")
        if (
            self.username is not None
            and self.security_mode == "None"
            and not self.allow_password_without_encryption
        ):
            raise ValueError(
                'a password with security_mode "None" crosses the OT network in clear: use '
                '"SignAndEncrypt", or set allow_password_without_encryption = true'
            )
        if self.secure and self.server_certificate is None and self.trust_list is None:
            # Without either, the certificate the endpoint offers is trusted blindly:
            # anyone answering at the endpoint's address would get the session.
            raise ValueError(
                "a secure session needs the server's certificate checked: set "
                "server_certificate (pin it) or trust_list (trusted server or CA certificates)"
            )
        if not self.secure and (self.server_certificate or self.trust_list):
            raise ValueError(
                'server_certificate and trust_list need a security_policy other than "None"'
            )
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be at least reconnect_initial_s")
        if self.watchdog_s * 1000.0 < 2 * self.publishing_interval_ms:
            raise ValueError(
                "watchdog_s must cover at least two publishing intervals "
                f"({2 * self.publishing_interval_ms / 1000.0:g} s), or it fires on a healthy link"
            )
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} is used twice")
            seen.add(node.name)
        return self

    @property
    def secure(self) -> bool:
        return self.security_policy != "None"

    def sampling_ms(self, node: OpcuaNode) -> float:
        """The node's sampling interval, or the server-wide default."""
        if node.sampling_interval_ms is not None:
            return node.sampling_interval_ms
        return self.sampling_interval_ms

    def queue_for(self, node: OpcuaNode) -> int:
        """The node's queue size, or the server-wide default."""
        return node.queue_size if node.queue_size is not None else self.queue_size

    def missing_files(self) -> list[tuple[str, Path]]:
        """``(key, path)`` of each configured file that does not exist, for a load-time check."""
        found = []
        for key in ("certificate", "private_key", "server_certificate", "password_file"):
            path: Path | None = getattr(self, key)
            if path is not None and not path.is_file():
                found.append((key, path))
        if self.trust_list is not None and not self.trust_list.exists():
            found.append(("trust_list", self.trust_list))
        return found

    def secret_files(self) -> list[tuple[str, Path]]:
        """``(key, path)`` of each configured file only its owner may read."""
        return [
            (key, path)
            for key in ("private_key", "password_file")
            if (path := getattr(self, key)) is not None
        ]
