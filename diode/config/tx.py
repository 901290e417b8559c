"""The transmitter's config file (``/etc/diode/tx.toml``)."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, model_validator

from diode.config import IpAddress, Section, checked
from diode.config.files import FileLane, FilesWatch
from diode.config.link import IPV4_UDP_OVERHEAD, LinkSettings
from diode.config.modbus import ModbusSection
from diode.config.opcua import OpcuaServer
from diode.config.synthetic import SyntheticSource
from diode.config.syslog import SyslogSection
from diode.errors import ConfigError
from diode.keys import check_secret_file, load_psk, load_signing_key


class TxLink(LinkSettings):
    """``[link]``: where and how fast datagrams go, plus the framing both ends share."""

    destination: IpAddress = Field(description="receiver's IP address on the one-way link")
    port: int = Field(5140, ge=1, le=65535, description="receiver's UDP port")
    source: IpAddress | None = Field(None, description="local IP address to send from (optional)")
    rate_mbps: float = Field(
        100.0, gt=0.0, le=100_000.0, description="pacing rate on the wire, a little under line rate"
    )
    queue_ms: float = Field(
        50.0,
        gt=0.0,
        le=10_000.0,
        description="the send queue holds what the link carries in this long at rate_mbps (and "
        "at least interleave + 1 of the largest blocks); past it the framer waits and records "
        "wait in the outbox ([transmitter] queue_records, queue_mb), which drops the newest and "
        "counts them",
    )
    queue_datagrams: int = Field(
        65536,
        ge=64,
        le=10_000_000,
        description="datagrams the send queue holds at most, whatever queue_ms says; past it the "
        "oldest blocks not yet started are dropped and counted (blocks_dropped)",
    )
    repeat_after_s: float = Field(
        0.0,
        ge=0.0,
        # The receiver waits for a missing block at most reorder_timeout_s <= 10 s: a
        # repeat later than that could never fill a hole.
        le=9.0,
        description="time diversity: every datagram is sent again this much later, paced with "
        "the rest (twice the bandwidth); an outage of the receiver or the link shorter than this "
        "loses nothing if the receiver's reorder_timeout_s is longer; 0 = off",
    )

    def queue_limit(self) -> int:
        """Datagrams the send queue takes before the framer waits (backpressure).

        What the link carries in ``queue_ms`` at ``rate_mbps``, but never fewer
        than ``interleave`` + 1 of the largest blocks, so that a busy link always
        has the blocks it interleaves; :meth:`past_limit` under ``queue_datagrams``,
        so that what goes in past the limit never makes the queue drop.
        """
        wire_bytes = self.datagram_size + IPV4_UDP_OVERHEAD
        carried = math.ceil(self.queue_ms / 1000 * self.rate_mbps * 1e6 / 8 / wire_bytes)
        wanted = max(carried, (self.interleave + 1) * self.fec.most_symbols())
        return max(min(wanted, self.queue_datagrams - self.past_limit()), 1)

    def past_limit(self) -> int:
        """Datagrams the queue may take past its limit: what the framer had in hand.

        The group being framed when the limit was reached (or the block, without
        groups), and what the linger then sends alone: the full blocks held for
        the next group and the open one, re-cut into blocks of k - 1 symbols (at
        most two for each, when every record is just over half a block).
        """
        fec = self.fec
        largest = fec.most_symbols()
        if not fec.grouped:
            return 2 * largest
        return fec.group * (fec.k + fec.repair_for(fec.k)) + 2 * fec.group * largest

    def queue_s(self) -> float:
        """How long the link takes to send the queue at :meth:`queue_limit`.

        The framer is never held longer (the pacer empties the queue at
        ``rate_mbps`` and wakes it below :meth:`queue_resume`): what the log lane
        is owed while it waits, its share of that time, must fit its bucket.
        """
        wire_bits = (self.datagram_size + IPV4_UDP_OVERHEAD) * 8
        return self.queue_limit() * wire_bits / (self.rate_mbps * 1e6)

    def queue_resume(self) -> int:
        """Datagrams under which a framer held at :meth:`queue_limit` goes on.

        Half the limit, but never under ``interleave`` + 1 of the largest blocks: woken once
        per half a queue, the framer refills it in one go, where waking it for
        each block the pacer sent cost a wake-up, a future and a timer per block
        (1 700 a second at 1000 Mb/s).
        """
        limit = self.queue_limit()
        return min(max(limit // 2, (self.interleave + 1) * self.fec.most_symbols()), limit)


class TransmitterSection(Section):
    """``[transmitter]``: identity, keys, state and the periodic re-sends."""

    stream_id: int = Field(ge=0, le=2**32 - 1, description="this transmitter's stream id")
    private_key: Path = Field(description="Ed25519 private key (diode keygen)", strict=False)
    psk_file: Path | None = Field(
        None, description="link secret for encryption (optional)", strict=False
    )
    state_dir: Path = Field(
        Path("/var/lib/diode-tx"), description="where the epoch is kept", strict=False
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0.0, le=60.0, description="a heartbeat with the counters goes this often"
    )
    catalogue_period_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="every tag's catalogue entry is re-sent this often"
    )
    integrity_period_s: float = Field(
        10.0, gt=0.0, le=86400.0, description="every tag's value is re-sent this often"
    )
    queue_records: int = Field(
        200_000, ge=100, le=10_000_000, description="records waiting for a block, at most"
    )
    queue_mb: int = Field(
        32,
        ge=1,
        le=100_000,
        description="memory the records waiting for a block may hold (estimated), at most",
    )


class OpcuaSection(Section):
    """``[opcua]``: the servers to read."""

    servers: list[OpcuaServer] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> OpcuaSection:
        names = [s.name for s in self.servers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"server names must be unique: {', '.join(dupes)} used twice")
        return self


class SyntheticSection(Section):
    """``[synthetic]``: load generators, for tests and benchmarks only."""

    sources: list[SyntheticSource] = Field(default_factory=list)


class LogSettings(Section):
    """``[log]``: structlog output on stderr (the journal under systemd)."""

    level: str = Field("info", pattern="^(debug|info|warning|error)$", description="least level")
    format: str = Field(
        "auto",
        pattern="^(auto|json|console)$",
        description="json lines, readable console, or auto (console on a terminal)",
    )


class TxConfig(Section):
    """The whole transmitter config."""

    transmitter: TransmitterSection
    link: TxLink
    modbus: ModbusSection = Field(default_factory=ModbusSection)
    opcua: OpcuaSection = Field(default_factory=OpcuaSection)
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    syslog: SyslogSection = Field(default_factory=SyslogSection)
    file_lane: FileLane | None = None
    files: list[FilesWatch] = Field(default_factory=list)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _syslog_not_on_the_link(self) -> TxConfig:
        # Property 1: nothing may listen on the link. A syslog listener on the link's
        # own source address would be one, whatever its port.
        for listener in self.syslog.listeners:
            if listener.address == self.link.source:
                raise ValueError(
                    f"syslog listener {listener.address} is the link's source address: "
                    "syslog may only be received on OT addresses"
                )
        return self

    @model_validator(mode="after")
    def _files_need_a_lane(self) -> TxConfig:
        if self.files and self.file_lane is None:
            raise ValueError("[[files]] needs a [file_lane] (its stream id and key)")
        if self.file_lane is not None and self.file_lane.stream_id == self.transmitter.stream_id:
            raise ValueError("file_lane.stream_id must differ from transmitter.stream_id")
        folders = [str(f.directory) for f in self.files]
        dupes = sorted({d for d in folders if folders.count(d) > 1})
        if dupes:
            raise ValueError(f"each [[files]] directory may be watched once: {dupes}")
        return self

    @model_validator(mode="after")
    def _devices_unique_across_protocols(self) -> TxConfig:
        names = [
            *(d.name for d in self.modbus.devices),
            *(s.name for s in self.opcua.servers),
            *(s.name for s in self.synthetic.sources),
        ]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique across all sources: {dupes}")
        return self

    def resolve(self, path: Path) -> TxConfig:
        """Relative paths are relative to the config file's folder."""
        base = path.parent
        section = self.transmitter
        updates = {
            "private_key": base / section.private_key,
            "psk_file": base / section.psk_file if section.psk_file else None,
            "state_dir": base / section.state_dir,
        }
        servers = [
            server.model_copy(
                update={
                    key: base / getattr(server, key)
                    for key in (
                        "certificate",
                        "private_key",
                        "server_certificate",
                        "trust_list",
                        "password_file",
                    )
                    if getattr(server, key) is not None
                }
                | ({"cert_dir": base / server.cert_dir} if server.cert_dir else {})
            )
            for server in self.opcua.servers
        ]
        syslog = self.syslog.model_copy(
            update={k: base / f for k, f in self.syslog.files() if f is not None}
        )
        lane = self.file_lane
        return self.model_copy(
            update={
                "transmitter": section.model_copy(update=updates),
                "opcua": self.opcua.model_copy(update={"servers": servers}),
                "syslog": syslog,
                "file_lane": lane.model_copy(update={"private_key": base / lane.private_key})
                if lane
                else None,
                "files": [
                    f.model_copy(update={"directory": base / f.directory}) for f in self.files
                ],
            }
        )

    def check_files(self, path: Path) -> None:
        """What the transmitter will read at start: present, private enough, and keys that parse."""
        resolved = self.resolve(path)
        section = resolved.transmitter
        files: list[tuple[str, Path | None]] = [
            ("transmitter.private_key", section.private_key),
            ("transmitter.psk_file", section.psk_file),
        ]
        files.extend((f"syslog.{key}", f) for key, f in resolved.syslog.files())
        if resolved.file_lane is not None:
            files.append(("file_lane.private_key", resolved.file_lane.private_key))
        for i, server in enumerate(resolved.opcua.servers):
            files.extend((f"opcua.servers[{i}].{key}", f) for key, f in server.missing_files())
        for key, file in files:
            if file is not None and not file.is_file():
                raise ConfigError(str(path), key, f"no such file: {file}")
        tx_key = checked(path, "transmitter.private_key", load_signing_key, section.private_key)
        if resolved.file_lane is not None:
            lane_key = checked(
                path, "file_lane.private_key", load_signing_key, resolved.file_lane.private_key
            )
            if lane_key.key_id == tx_key.key_id:
                raise ConfigError(
                    str(path),
                    "file_lane.private_key",
                    "the file lane needs a key of its own (a key speaks for one stream): "
                    "diode keygen DIR --name files",
                )
        if section.psk_file is not None:
            checked(path, "transmitter.psk_file", load_psk, section.psk_file)
        for i, server in enumerate(resolved.opcua.servers):
            for key, secret in server.secret_files():
                checked(path, f"opcua.servers[{i}].{key}", check_secret_file, secret)
