"""``diode bench link-steps``: the link's per-block and per-datagram steps, old against new.

Process CPU of each step the transmitter and the receiver take per full
block (k 32, n 56, 1424-byte symbols, 45 KB) or per datagram, median of 5
repetitions: the erasure code (zfec, wire generation 1; ISA-L Cauchy through
pyeclib, generation 2), Ed25519 over the whole block against over a SHA-256
digest (generation 2) and once per group of 4 (generation 3: each block's
share of the group's hashing, signature or verify, and the receiver's memory
of verified groups), and one ``sendto`` per datagram against one GSO ``sendmsg`` per 44
(to a loopback socket nobody reads, so the kernel's cost of queueing and
dropping is in both). These are the figures docs/BENCHMARKS.md §1b starts from.

Then what a rebuild costs by how many sources are missing (diode/fec.py's
own rebuild for up to ``fec.FEW``, pyeclib's decode beside it), a datagram's
CRC-32 by zlib and by ISA-L, and the whole decoder (``Decoder.receive_all``
in batches of 64, then ``poll``) per block of 44 records of a 1000-byte
string, k 32, n 49 (the link benchmark's), at 0 % and 1 % of datagrams
dropped with a fixed seed: best of 5, CPU seconds.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import statistics
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import zfec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from isal.isal_zlib import crc32
from pyeclib.ec_iface import ECDriver

from diode import fec
from diode.config.link import FecSettings, LinkSettings
from diode.decoder import Decoder, DecoderSettings
from diode.encoder import Encoder
from diode.keys import Keyring, SigningKey, TrustedKey
from diode.protocol.verified import VerifiedGroups
from diode.records import Sample
from diode.wire import (
    SIGNED_DIGEST_PREFIX,
    BlockHeader,
    Manifest,
    group_message,
    pack_manifest,
    rebuilt_group_message,
)
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


def _group_of_4(
    key: Ed25519PrivateKey, block: bytes
) -> tuple[Callable[[], object], Callable[[], object]]:
    """Generation 3's steps for a group of 4 blocks: the transmitter's (4 digests, one
    signature) and the receiver's (4 digests and rebuilt messages, one verify, 3 found
    in its memory of verified groups, which starts empty each time)."""
    header = BlockHeader(
        flags=0, k=K, n=N, stream_id=7, key_id=bytes(8), epoch=1, seq=0,
        first_record=0, record_count=44, payload_length=len(block) - 48, generation=3,
    )  # fmt: skip
    blocks = [bytes([j]) + block[1:] for j in range(4)]
    digests = [hashlib.sha256(b).digest() for b in blocks]
    manifests = [pack_manifest(i, digests) for i in range(4)]
    carried = [Manifest(blocks=4, index=i, others=m[2:]) for i, m in enumerate(manifests)]
    signature = key.sign(group_message(header, 4, b"".join(digests)))
    public = key.public_key()

    def sign() -> None:
        signed = b"".join(hashlib.sha256(b).digest() for b in blocks)
        key.sign(group_message(header, 4, signed))

    def verify() -> None:
        verified = VerifiedGroups()
        for b, manifest in zip(blocks, carried, strict=True):
            message = rebuilt_group_message(header, manifest, hashlib.sha256(b).digest())
            entry = b"".join((header.key_id, message, signature))
            if not verified.holds(7, entry):
                public.verify(signature, message)
                verified.add(7, entry)

    return sign, verify


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
    sign_group, verify_group = _group_of_4(key, block)
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
        "sign_group_of_4_per_block_us": round(_us(sign_group, repeat) / 4, 1),
        "verify_group_of_4_per_block_us": round(_us(verify_group, repeat) / 4, 1),
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
    out.update(_rebuilds(repeat))
    out.update(_decoder_per_block())
    return {"settings": {"k": K, "n": N, "symbol": SYMBOL, "repeat": repeat}, "steps": out}


def _rebuilds(repeat: int) -> dict[str, float]:
    """A block of k 32, n 49 rebuilt with 1 to 4 sources missing, each from as many
    repair symbols: by diode/fec.py (pyeclib's decode past ``fec.FEW``) and by pyeclib."""
    k, n = 32, 49
    data = os.urandom(k * SYMBOL)
    sent = [bytes(s) for s in fec.encode_block(data, k, n, SYMBOL)]
    headers = fec._fragment_headers(k, n, SYMBOL)
    cauchy = ECDriver(k=k, m=n - k, ec_type="isa_l_rs_cauchy")
    out: dict[str, float] = {}
    for missing in range(1, fec.FEW + 2):
        kept = {i: sent[i] for i in range(missing, k + missing)}
        fed = [headers[i] + kept[i] for i in sorted(kept)]
        out[f"rebuild_{missing}_missing_us"] = _us(partial(fec.decode, kept, k, n), repeat)
        out[f"pyeclib_decode_{missing}_missing_us"] = _us(partial(cauchy.decode, fed), repeat)
    datagram = os.urandom(DATAGRAM)
    view = memoryview(datagram)
    out["crc_zlib_us_per_datagram"] = _us(
        lambda: zlib.crc32(view[48:], zlib.crc32(view[:44])), repeat * 10
    )
    out["crc_isal_us_per_datagram"] = _us(lambda: crc32(view[48:], crc32(view[:44])), repeat * 10)
    return out


def _decoder_per_block(blocks: int = 400) -> dict[str, float]:
    """The decoder's CPU per block, from datagrams to records, at 0 % and 1 % loss."""
    key = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    link = LinkSettings(
        datagram_size=DATAGRAM, fec=FecSettings(k=32, repair_ratio=0.25, repair_burst=16)
    )
    encoder = Encoder(link=link, key=key, stream_id=7, epoch=1)
    for i in range(44 * blocks):
        encoder.add(
            Sample(tag_id=i % 50, ts_ns=1_700_000_000_000_000_000 + i, value="x" * 1000), 0.0
        )
    encoder.flush()
    datagrams = [d for unit in encoder.take() for d in unit.datagrams]
    keyring = Keyring([TrustedKey(stream_id=7, public=key.private.public_key())])
    out: dict[str, float] = {}
    for loss in (0.0, 0.01):
        drop = random.Random(20261207)
        kept = [d for d in datagrams if drop.random() >= loss]
        times = []
        for _ in range(5):
            decoder = Decoder(keyring, DecoderSettings())
            start = time.process_time()
            for i in range(0, len(kept), 64):
                decoder.receive_all(kept[i : i + 64], 0.0)
            decoder.poll(1.0)
            times.append(time.process_time() - start)
            if decoder.counters["records_delivered"] != 44 * blocks:
                raise RuntimeError(f"the decoder delivered {decoder.counters['records_delivered']}")
        out[f"decoder_us_per_block_{loss:.0%}_loss"] = round(min(times) / blocks * 1e6)
    return out
