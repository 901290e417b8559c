"""``diode demo --files``: files dropped into a watched OT folder, checked on the IT side.

Every few seconds the demo writes a file into the transmitter's watched folder
the way a careful writer does (a hidden temporary, then a rename): a batch
report (CSV, about 100 KB) or a camera still (1 MB of noise), each with a
name that has spaces or non-ASCII letters. The file lane runs at half the
link rate beside the tag values, each file is sent twice (a repetition covers
a loss beyond the FEC budget), and the receiver writes them to the IT folder.
The figures count what was dropped, sent, received ``ok`` and found byte for
byte identical to the original.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

FILE_EVERY_S = 2.0
LANE_ID = 2


class DemoFiles:
    def __init__(self, workdir: Path, seed: int = 1) -> None:
        self.ot = workdir / "ot-files"
        self.it = workdir / "it-files"
        self.ot.mkdir(parents=True, exist_ok=True)
        self._rng = random.Random(seed)
        self._originals: dict[str, str] = {}  # name -> SHA-256 of what was dropped
        self._identical: set[str] = set()

    def tx_sections(self, keys: Path) -> dict[str, Any]:
        return {
            "file_lane": {
                "stream_id": LANE_ID,
                "private_key": str(keys / "files.key"),
                "share": 0.5,
            },
            "files": [{"directory": str(self.ot), "complete_when": "renamed", "repeat": 2}],
        }

    def rx_stream(self, keys: Path, psk: Path, prefix: str, site: str) -> dict[str, Any]:
        """The lane's stream; ``psk``: the link secret, the transmitter's for both streams."""
        return {
            "id": LANE_ID,
            "public_keys": [str(keys / "files.pub")],
            "psk_file": str(psk),
            "output": {"prefix": prefix, "site": site},
            "files": {"directory": str(self.it), "expire_s": 60.0},
        }

    def drop(self) -> Path:
        number = len(self._originals) + 1
        if number % 2:
            name = f"batch report {number:03d}.csv"
            lines = [
                f"{i};{self._rng.uniform(20, 80):.3f};{self._rng.randint(0, 9999)}"
                for i in range(4000)
            ]
            data = ("step;temperature °C;count\n" + "\n".join(lines) + "\n").encode()
        else:
            name = f"caméra {number:03d}.raw"
            data = self._rng.randbytes(1_000_000)
        tmp = self.ot / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.ot / name)
        self._originals[name] = hashlib.sha256(data).hexdigest()
        return self.ot / name

    async def drop_every(self, period_s: float, ready: asyncio.Event) -> None:
        ready.set()
        while True:
            self.drop()
            await asyncio.sleep(period_s)

    def figures(self, tx: dict[str, int], rx: dict[str, int]) -> dict[str, int]:
        for name, sha in self._originals.items():
            if name in self._identical:
                continue
            path = self.it / name
            if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
                self._identical.add(name)
        return {
            "dropped": len(self._originals),
            "sent": tx.get("files_sent", 0),
            "ok": rx.get("files_ok", 0),
            "identical": len(self._identical),
            "incomplete": rx.get("files_incomplete", 0),
            "lost_chunks_records": rx.get("records_lost", 0),
        }
