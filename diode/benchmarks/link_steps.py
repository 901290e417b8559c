"""``diode bench link-steps``: the link's per-block and per-datagram steps, old against new.

Process CPU of each step the transmitter and the receiver take per full
block (k 32, n 56, 1424-byte symbols, 45 KB) or per datagram, median of 5
repetitions: the erasure code (zfec, wire generation 1; ISA-L Cauchy through
pyeclib, generation 2), Ed25519 over the whole block against over a SHA-256
digest, and one ``sendto`` per datagram against one GSO ``sendmsg`` per 44
(to a loopback socket nobody reads, so the kernel's cost of queueing and
dropping is in both). These are the figures docs/BENCHMARKS.md §1b starts from.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import zfec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyeclib.ec_iface import ECDriver

from diode.wire import SIGNED_DIGEST_PREFIX
from transmitter.sender import UDP_SEGMENT

K, N, SYMBOL, DATAGRAM = 32, 56, 1424, 1472


def _us(step: Callable[[], object], repeat: int) -> float:
    """Median over 5 of the process CPU of one call, in microseconds."""
    step()
    times = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeat):
            step()
        times.append((time.process_time() - start) / repeat * 1e6)
    return round(statistics.median(times), 1)


def link_steps(repeat: int = 300) -> dict[str, Any]:
    data = os.urandom(K * SYMBOL)
    sources = tuple(data[i * SYMBOL : (i + 1) * SYMBOL] for i in range(K))
    rizzo, unrizzo = zfec.Encoder(K, N), zfec.Decoder(K, N)
    symbols = [*sources, *rizzo.encode(sources, tuple(range(K, N)))]
    use = list(range(8, 8 + K))  # 8 sources missing
    cauchy = ECDriver(k=K, m=N - K, ec_type="isa_l_rs_cauchy")
    fragments = cauchy.encode(data)
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    block = data[:45_456]
    whole = key.sign(block)

    def digest() -> bytes:
        return SIGNED_DIGEST_PREFIX + hashlib.sha256(block).digest()

    signed_digest = key.sign(digest())
    out = {
        "zfec_encode_us": _us(lambda: rizzo.encode(sources, tuple(range(K, N))), repeat),
        "cauchy_encode_us": _us(lambda: cauchy.encode(data), repeat),
        "zfec_decode_8_missing_us": _us(
            lambda: unrizzo.decode(tuple(symbols[i] for i in use), tuple(use)), repeat
        ),
        "cauchy_decode_8_missing_us": _us(lambda: cauchy.decode(fragments[8 : 8 + K]), repeat),
        "sign_block_us": _us(lambda: key.sign(block), repeat),
        "sign_digest_us": _us(lambda: key.sign(digest()), repeat),
        "verify_block_us": _us(lambda: public.verify(whole, block), repeat),
        "verify_digest_us": _us(lambda: public.verify(signed_digest, digest()), repeat),
    }
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sink.bind(("127.0.0.1", 0))
        to = sink.getsockname()
        one, batch = bytes(DATAGRAM), bytes(DATAGRAM * 44)
        option = [(socket.SOL_UDP, UDP_SEGMENT, DATAGRAM.to_bytes(2, "little"))]
        out["sendto_us_per_datagram"] = _us(lambda: sender.sendto(one, to), repeat * 10)
        per_call = _us(lambda: sender.sendmsg([batch], option, 0, to), repeat)
        out["gso_us_per_datagram"] = round(per_call / 44, 2)
    finally:
        sink.close()
        sender.close()
    return {"settings": {"k": K, "n": N, "symbol": SYMBOL, "repeat": repeat}, "steps": out}
