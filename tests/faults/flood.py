"""A flood sender for scenario 7, run as its own process: random datagrams, as fast as it can.

``python -m tests.faults.flood PORT SECONDS KEY_ID_HEX STREAM EPOCH SEED``: half
pure random bytes, half well-formed datagrams with a valid CRC, the real
stream, key id and epoch, and random far-ahead block numbers: those pass
every check a datagram can be given before authentication and cost the
receiver assembly memory, the worst a forger without the key can do.
Prints the number sent.
"""

from __future__ import annotations

import random
import socket
import sys
import time

from diode.wire import DatagramHeader, pack_datagram


def main(argv: list[str]) -> int:
    port, seconds, key_hex, stream, epoch, seed = argv
    rng = random.Random(int(seed))
    key_id = bytes.fromhex(key_hex)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    target = ("127.0.0.1", int(port))
    # A pool made up front: building datagrams is slower than sending them.
    pool = [rng.randbytes(rng.randrange(1, 1500)) for _ in range(500)]
    for _ in range(1500):
        k = rng.randrange(1, 33)
        n = k + rng.randrange(1, 25)
        header = DatagramHeader(
            flags=0,
            stream_id=int(stream),
            key_id=key_id,
            epoch=int(epoch),
            seq=rng.randrange(2**20, 2**40),
            index=rng.randrange(n),
            k=k,
            n=n,
            block_length=rng.randrange(113, k * 1424 + 1),
            records=rng.randrange(1000),
        )
        pool.append(pack_datagram(header, rng.randbytes(1424)))
    sent = 0
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        for datagram in pool:
            try:
                sock.sendto(datagram, target)
                sent += 1
            except OSError:
                pass
    print(sent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
