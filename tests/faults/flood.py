"""A flood sender, run as its own process: one kind of forgery, every datagram unique.

``python -m tests.faults.flood KIND PORT SECONDS TARGET_JSON CAPTURE SEED RATE``
sends datagrams of KIND (see tests/faults/forgeries.py) to 127.0.0.1:PORT for
SECONDS, at most RATE a second (0: as fast as this one process can), made as
it goes so that no datagram repeats. ``replay`` replays the authentic
datagrams in the file CAPTURE (4-byte length before each); ``control`` sends
random datagrams to the discard port instead (the machine as busy as in a
flood, the receiver untouched). TARGET_JSON is what the forger knows: stream,
key id (hex), epoch, the stream's position, its datagram size and FEC, and
whether the link is gated. Prints the number sent.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from pathlib import Path

from diode.config.link import FecSettings
from tests.faults.forgeries import MAKERS, Target, replay


def read_capture(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        out.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return out


def write_capture(path: Path, datagrams: list[bytes]) -> None:
    path.write_bytes(b"".join(len(d).to_bytes(4, "big") + d for d in datagrams))


def main(argv: list[str]) -> int:
    kind, port, seconds, target_json, capture, seed, rate = argv
    spec = json.loads(target_json)
    target = Target(
        stream_id=spec["stream_id"],
        key_id=bytes.fromhex(spec["key_id"]),
        epoch=spec["epoch"],
        seq=spec["seq"],
        datagram_size=spec["datagram_size"],
        fec=FecSettings(**spec["fec"]),
        gated=spec["gated"],
        window=spec.get("window", 2000),
    )
    # "control": the same sending work aimed at a port nobody listens on, so the
    # machine is as busy as in a flood but the receiver gets nothing.
    maker = replay(read_capture(Path(capture))) if kind == "replay" else MAKERS[kind]
    datagrams = maker(target, random.Random(int(seed)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    address = ("127.0.0.1", 9 if kind == "control" else int(port))
    per_s = float(rate)
    sent = 0
    start = time.monotonic()
    end = start + float(seconds)
    now = start
    while now < end:
        for _ in range(64):
            try:
                sock.sendto(next(datagrams), address)
                sent += 1
            except OSError:
                pass
        now = time.monotonic()
        if per_s:
            ahead = sent / per_s - (now - start)
            if ahead > 0:
                time.sleep(ahead)
                now = time.monotonic()
    print(sent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
