"""Do zfec and ``cryptography``'s Ed25519 release the GIL? (``python -m diode.benchmarks.gil``)

The same work in one thread and in two at once: a library that releases the
GIL during the work scales about 2 x on 2 free cores, one that holds it
1 x. zfec encodes a full default block (k 32, n 56, 1424-byte symbols);
Ed25519 signs a 45 KB block, as the transmitter does once per block. Best
of 3 timings each, wall clock; printed as JSON.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

import zfec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

K, N, SYMBOL = 32, 56, 1424
BLOCK = 45_000


def _fec(reps: int) -> None:
    sources = [os.urandom(SYMBOL) for _ in range(K)]
    encoder = zfec.Encoder(K, N)
    repair = list(range(K, N))
    for _ in range(reps):
        encoder.encode(sources, repair)


def _sign(reps: int) -> None:
    key = Ed25519PrivateKey.generate()
    block = os.urandom(BLOCK)
    for _ in range(reps):
        key.sign(block)


def _timed(work: Callable[[int], None], reps: int, threads: int) -> float:
    running = [threading.Thread(target=work, args=(reps,)) for _ in range(threads)]
    start = time.perf_counter()
    for t in running:
        t.start()
    for t in running:
        t.join()
    return time.perf_counter() - start


def gil(*, fec_reps: int = 2000, sign_reps: int = 3000) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, work, reps in (
        ("zfec_encode_k32_n56", _fec, fec_reps),
        ("ed25519_sign_45kb", _sign, sign_reps),
    ):
        one = min(_timed(work, reps, 1) for _ in range(3))
        two = min(_timed(work, reps, 2) for _ in range(3))
        out[name] = {
            "us_per_op_one_thread": round(one / reps * 1e6, 1),
            "speedup_two_threads": round(2 * one / two, 2),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(gil(), indent=2))
