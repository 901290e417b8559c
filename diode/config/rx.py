"""The receiver's config file (``/etc/diode/rx.toml``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from diode.config import IpAddress, Section, checked
from diode.config.files import FilesOutput
from diode.config.link import FecSettings
from diode.config.mqtt import MqttBroker, StreamOutput, _check_topic_part
from diode.config.syslog import SocSection
from diode.config.tx import LogSettings
from diode.errors import ConfigError
from diode.keys import check_secret_file, key_id, load_psk, load_public_key
from diode.linkrules import IFNAME_PATTERN

SPOOL_NAME = "mqtt-spool.sqlite3"
DEFAULT_STATE_DIR = "/var/lib/diode-rx"


class ReceiverSection(Section):
    """``[receiver]``: where the link arrives, and what the receiver keeps."""

    listen: IpAddress = Field(
        description="IP address of the one-way link's interface (required: never every interface)"
    )
    interface: str | None = Field(
        None,
        pattern=IFNAME_PATTERN,
        description="the one-way link's interface: the socket takes datagrams from it only "
        "(SO_BINDTODEVICE)",
    )
    port: int = Field(5140, ge=1, le=65535, description="UDP port the transmitters send to")
    file_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a second UDP port, for file lanes (the transmitter's file_lane.port): "
        "read only when the link port is empty, so a file never delays or drops a tag value",
    )
    rcvbuf_bytes: int = Field(
        32 * 1024 * 1024,
        ge=65536,
        le=2**31 - 1,
        description="socket receive buffer; a full buffer is the main cause of loss",
    )
    state_dir: Path = Field(
        Path(DEFAULT_STATE_DIR),
        description="everything the receiver writes: the spool and the stream positions",
        strict=False,
    )
    steer_replays: bool = Field(
        True,
        description="datagrams naming a block below the committed position go to quarantine "
        "sockets in the kernel, never read, counted as rejected_steered_late (late copies) "
        "and rejected_steered_replay (replays) (SO_REUSEPORT + a classic BPF program; Linux)",
    )
    reorder_timeout_s: float = Field(
        0.2,
        gt=0.0,
        le=10.0,
        description="how long a later block waits for a missing one; with the transmitter's "
        "repeat_after_s set, longer than that (repeat_after_s + 1)",
    )
    max_assembly_mb: float = Field(
        64.0, gt=0.0, le=4096.0, description="memory for blocks being rebuilt, at most"
    )
    verify_budget_per_s: float = Field(
        200.0,
        gt=0.0,
        le=100_000.0,
        description="signature verifies per second for blocks outside a stream's window "
        "(a new epoch, a stream not followed yet, far-ahead blocks)",
    )
    max_start_age_s: float = Field(
        10.0,
        gt=0.0,
        le=86400.0,
        description="with no saved position, an epoch older than this (plus clock_skew_s) "
        "needs a fresh heartbeat before anything of it is published",
    )
    clock_skew_s: float = Field(
        5.0, ge=0.0, le=3600.0, description="allowed difference between tx and rx wall clocks"
    )
    metrics_address: IpAddress = Field("127.0.0.1", description="Prometheus metrics address")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port; 0 = off")

    @model_validator(mode="after")
    def _pinned_to_the_link(self) -> ReceiverSection:
        if ipaddress.ip_address(self.listen).is_unspecified and self.interface is None:
            # Every interface would let any IT-side host reach the link port.
            raise ValueError(
                f"listen = {self.listen!r} takes datagrams from every interface: give the "
                "link interface's address, or set interface to pin the socket to the link"
            )
        if self.file_port is not None and self.file_port == self.port:
            raise ValueError(f"file_port = {self.file_port} is the link port: give another one")
        return self


class FailoverSection(Section):
    """``[failover]``: a pair of receivers fed the same datagrams; one publishes at a time."""

    peer_status_topic: str | None = Field(
        None,
        description="the other receiver's [mqtt] status_topic; set: this receiver is one of a "
        "pair and starts as the standby (docs/OPERATIONS.md, the hand-over rule); unset: off",
    )
    takeover_after_s: float = Field(
        3.0,
        ge=1.0,
        le=60.0,
        description="a standby takes over when it has heard nothing from the active one for "
        "this long (at once when the active one's status goes offline)",
    )

    @field_validator("peer_status_topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        return None if value is None else _check_topic_part(value, "peer_status_topic")


class StreamLink(Section):
    """``[streams.link]``: the transmitter's datagram size and FEC (copy them from its
    ``[link]``); every datagram of another shape is dropped before it costs memory
    or a Reed-Solomon decode. Without this section any shape is assembled."""

    datagram_size: int = Field(
        1472, ge=256, le=65507, description="UDP payload bytes of every datagram"
    )
    fec: FecSettings = Field(default_factory=FecSettings)


class StreamConfig(Section):
    """``[[streams]]``: one transmitter, its keys and where its values go."""

    id: int = Field(ge=0, le=2**32 - 1, description="the transmitter's stream_id")
    public_keys: list[Annotated[Path, Field(strict=False)]] = Field(
        min_length=1, description="accepted public keys (two during a rotation)"
    )
    psk_file: Path | None = Field(
        None,
        description="link secret: encrypts blocks and gates every datagram with a link tag",
        strict=False,
    )
    link: StreamLink | None = Field(None, description="the stream's link profile")
    output: StreamOutput = Field(default_factory=StreamOutput)
    files: FilesOutput | None = Field(
        None, description="a file lane: its files are written here (announced on MQTT)"
    )


class RxConfig(Section):
    """The whole receiver config."""

    receiver: ReceiverSection
    mqtt: MqttBroker = Field(default_factory=MqttBroker)
    streams: list[StreamConfig] = Field(min_length=1)
    soc: SocSection = Field(default_factory=SocSection)
    failover: FailoverSection = Field(default_factory=FailoverSection)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="before")
    @classmethod
    def _spool_follows_state_dir(cls, data: Any) -> Any:
        """Everything the receiver writes goes under its state_dir unless a path is given."""
        if not isinstance(data, dict):
            return data
        receiver, mqtt = data.get("receiver"), data.get("mqtt", {})
        if not isinstance(receiver, dict) or not isinstance(mqtt, dict) or "spool_path" in mqtt:
            return data
        state_dir = receiver.get("state_dir", DEFAULT_STATE_DIR)
        if not isinstance(state_dir, str | Path):
            return data  # the type error is reported on receiver.state_dir
        return {**data, "mqtt": {**mqtt, "spool_path": str(Path(state_dir) / SPOOL_NAME)}}

    @model_validator(mode="after")
    def _unique_streams(self) -> RxConfig:
        ids = [s.id for s in self.streams]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"stream ids must be unique: {dupes}")
        if self.failover.peer_status_topic == self.mqtt.status_topic:
            raise ValueError(
                "failover.peer_status_topic is this receiver's own mqtt.status_topic: "
                "each receiver of a pair needs its own"
            )
        return self

    @model_validator(mode="after")
    def _unique_edge_nodes(self) -> RxConfig:
        # Two edge nodes with one identity would take each other's MQTT session in turn.
        nodes = [
            (s.output.sparkplug.group_id, s.output.sparkplug.edge_node_id)
            for s in self.streams
            if s.output.payload == "sparkplug"
        ]
        dupes = sorted({"/".join(n) for n in nodes if nodes.count(n) > 1})
        if dupes:
            raise ValueError(
                f"Sparkplug streams need their own group_id/edge_node_id: {', '.join(dupes)} twice"
            )
        if nodes and self.failover.peer_status_topic is not None:
            # The edge node's session (its NBIRTH, its will) would have to move with the
            # active role; until it does, a standby pair serves JSON streams only.
            raise ValueError(
                "failover.peer_status_topic: a standby pair does not serve Sparkplug streams yet"
            )
        return self

    def resolve(self, path: Path) -> RxConfig:
        """Relative paths are relative to the config file's folder."""
        base = path.parent
        receiver = self.receiver.model_copy(update={"state_dir": base / self.receiver.state_dir})
        streams = [
            s.model_copy(
                update={
                    "public_keys": [base / k for k in s.public_keys],
                    "psk_file": base / s.psk_file if s.psk_file else None,
                    "files": s.files.model_copy(update={"directory": base / s.files.directory})
                    if s.files
                    else None,
                }
            )
            for s in self.streams
        ]
        mqtt = self.mqtt.model_copy(
            update={
                key: base / getattr(self.mqtt, key)
                for key in ("ca_file", "certfile", "keyfile", "password_file", "spool_path")
                if getattr(self.mqtt, key) is not None
            }
        )
        files = {k: base / f for k, f in self.soc.files() if f is not None}
        soc = self.soc.model_copy(update=files)
        return self.model_copy(
            update={"receiver": receiver, "streams": streams, "mqtt": mqtt, "soc": soc}
        )

    def check_files(self, path: Path) -> None:
        """What the receiver will read at start: present, private enough, and keys that parse."""
        resolved = self.resolve(path)
        for name in ("ca_file", "certfile", "keyfile", "password_file"):
            file = getattr(resolved.mqtt, name)
            if file is not None and not file.is_file():
                raise ConfigError(str(path), f"mqtt.{name}", f"no such file: {file}")
            if file is not None and name in ("keyfile", "password_file"):
                checked(path, f"mqtt.{name}", check_secret_file, file)
        for soc_key, soc_file in resolved.soc.files():
            if soc_file is not None and not soc_file.is_file():
                raise ConfigError(str(path), f"soc.{soc_key}", f"no such file: {soc_file}")
        owners: dict[bytes, tuple[str, int]] = {}
        for i, stream in enumerate(resolved.streams):
            for j, key in enumerate(stream.public_keys):
                where = f"streams[{i}].public_keys[{j}]"
                if not key.is_file():
                    raise ConfigError(str(path), where, f"no such file: {key}")
                kid = key_id(checked(path, where, load_public_key, key))
                if kid in owners:
                    first, stream_of_first = owners[kid]
                    why = (
                        "listed twice"
                        if stream_of_first == i
                        else "a key speaks for one stream only (its datagrams would be "
                        "credited to either)"
                    )
                    raise ConfigError(str(path), where, f"{key} is the same key as {first}: {why}")
                owners[kid] = (where, i)
            if stream.psk_file is not None:
                where = f"streams[{i}].psk_file"
                if not stream.psk_file.is_file():
                    raise ConfigError(str(path), where, f"no such file: {stream.psk_file}")
                checked(path, where, load_psk, stream.psk_file)
