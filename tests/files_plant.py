"""The test plant with a file lane: a watched OT folder and an IT target folder.

PLC --> Transmitter (tag stream 11, file lane 12) --> Relay (faults) --> Receiver
    --> mosquitto --> Subscriber; files: tmp/ot-files --> tmp/it-files
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diode.config import validate
from diode.config.rx import RxConfig
from diode.config.tx import TxConfig
from diode.keys import SigningKey, load_signing_key, write_keypair
from tests.e2e import STREAM, Plant

LANE = 12


@dataclass
class FilePlant(Plant):
    files_overrides: dict[str, Any] = field(default_factory=dict)
    lane_overrides: dict[str, Any] = field(default_factory=dict)
    target_overrides: dict[str, Any] = field(default_factory=dict)
    # Non-zero: the lane's datagrams go straight to this port of the receiver (its
    # file_port), past the relay, which then carries tag datagrams only.
    file_port: int = 0

    @property
    def ot(self) -> Path:
        return self.tmp / "ot-files"

    @property
    def it(self) -> Path:
        return self.tmp / "it-files"

    def keys(self) -> Path:
        keydir = super().keys()
        if not (keydir / "files.key").exists():
            write_keypair(keydir, "files")
        return keydir

    def lane_key(self) -> SigningKey:
        return load_signing_key(self.keys() / "files.key")

    def tx_config(self) -> TxConfig:
        data = super().tx_config().model_dump(mode="json", exclude_defaults=True)
        data["file_lane"] = {
            "stream_id": LANE,
            "private_key": str(self.keys() / "files.key"),
            # 20 Mb/s at the plant's 200: the in-process relay shares one event loop with
            # both daemons and reads one datagram per turn of it; faster, on a host at a
            # load of 10+, its socket (or the receiver's) overflows and the test would
            # measure the host.
            "share": 0.1,
            **({"port": self.file_port} if self.file_port else {}),
            **self.lane_overrides,
        }
        data["files"] = [
            {
                "directory": str(self.ot),
                "complete_when": "renamed",
                "poll_s": 0.2,
                **self.files_overrides,
            }
        ]
        return validate(TxConfig, data, "tx.toml")

    def rx_config(self) -> RxConfig:
        data = super().rx_config().model_dump(mode="json", exclude_defaults=True)
        if self.file_port:
            data["receiver"]["file_port"] = self.file_port
        data["streams"].append(
            {
                "id": LANE,
                "public_keys": [str(self.keys() / "files.pub")],
                "output": {"prefix": "diode", "site": "test"},
                "files": {"directory": str(self.it), **self.target_overrides},
            }
        )
        return validate(RxConfig, data, "rx.toml")


def drop_file(folder: Path, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    """Write ``name`` the way a careful writer does: a hidden temporary, then a rename."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    tmp.replace(path)
    return path


__all__ = ["LANE", "STREAM", "FilePlant", "drop_file"]
