"""Forged datagrams, every one unique, made fast enough to flood a receiver.

Each kind is what an attacker without the transmitter's private key (and,
on a gated link, without the link secret) can send to anyone's UDP port:

- ``random``: random bytes of random length.
- ``k1``: valid-looking k = 1 blocks of the stream's shape, the real key id,
  the live epoch and sequence numbers in the stream's current window, and a
  canonical Ed25519 signature made by another key; each differs in its
  payload, so each forces a full signature verify where nothing else stops it.
- ``ahead``: the same in a newer epoch, outside the window: a claimed
  transmitter restart, which only a verify can refute.
- ``repair``: blocks of the largest k whose symbols are all repair symbols:
  each block forces a Reed-Solomon decode (and a verify) where nothing else
  stops it.
- ``tiny``: 49-byte datagrams (k = n = 255, 1-byte symbols), each opening a
  new assembly: the cheapest way to spend a receiver's memory.
- ``replay``: authentic datagrams captured from the link, sent again.

``python -m tests.faults.forgeries`` measures what each kind costs
``Decoder.receive`` (process CPU time per datagram, one core) with and
without a link secret; docs/PROTOCOL.md quotes its output.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from diode import fec
from diode.config.link import FecSettings
from diode.keys import SigningKey
from diode.wire import (
    BLOCK_HEADER_SIZE,
    BLOCK_OVERHEAD,
    CRC_OFFSET,
    HEADER_SIZE,
    LINK_TAG_SIZE,
    BlockHeader,
    DatagramHeader,
    gate_key,
    link_tag_states,
    pack_block_datagrams,
    pack_block_header,
    pack_datagram,
    symbol_size,
)

if TYPE_CHECKING:
    from diode.decoder import Decoder

KINDS = ("random", "k1", "ahead", "repair", "tiny", "replay")


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What a forger knows (all public, or guessable): the stream, key id, epoch, position."""

    stream_id: int
    key_id: bytes
    epoch: int
    seq: int  # about where the stream is now
    datagram_size: int = 1472
    fec: FecSettings = field(default_factory=FecSettings)
    gated: bool = False  # the stream has a link secret (the forger does not know it)
    window: int = 2000  # forged sequence numbers fall in [seq, seq + window)


def _signature() -> bytes:
    """A canonical Ed25519 signature by a key nobody trusts."""
    return SigningKey.generate().sign(b"forged")


def _block(target: Target, seq: int, k: int, rng: random.Random, sig: bytes) -> bytes:
    symbol = symbol_size(target.datagram_size, gated=target.gated)
    # Any length a real block of k symbols can have (k is the fewest that hold it).
    payload_length = rng.randint(
        max(1, (k - 1) * symbol - BLOCK_OVERHEAD + 1), k * symbol - BLOCK_OVERHEAD
    )
    header = BlockHeader(
        flags=1 if target.gated else 0,
        k=k,
        n=k + target.fec.repair_for(k),
        stream_id=target.stream_id,
        key_id=target.key_id,
        epoch=target.epoch,
        seq=seq,
        first_record=seq * 5,
        record_count=5,
        payload_length=payload_length,
    )
    return pack_block_header(header) + rng.randbytes(payload_length) + sig


def _datagrams(target: Target, block: bytes, k: int, indices: Sequence[int]) -> list[bytes]:
    symbol = symbol_size(target.datagram_size, gated=target.gated)
    n = k + target.fec.repair_for(k)
    sources = fec.split(block, k, symbol)
    symbols = list(sources) if max(indices) < k else fec.encode(sources, n)
    seq = int.from_bytes(block[24:32], "big")
    header = DatagramHeader(
        flags=block[1],
        stream_id=target.stream_id,
        key_id=target.key_id,
        epoch=target.epoch,
        seq=seq,
        index=0,
        k=k,
        n=n,
        block_length=len(block),
        records=5,
    )
    # A forger has no link secret: a wrong gate key makes a tag that fails.
    wrong = gate_key(bytes(32), target.stream_id) if target.gated else None
    every = pack_block_datagrams(header, symbols[: max(indices) + 1], wrong)
    return [every[i] for i in indices]


def k1(target: Target, rng: random.Random) -> Iterator[bytes]:
    """One template block, then per datagram: a new seq (in the datagram header and in
    the signed block header alike, so it passes ``matches``), a counter in the payload
    (every datagram unique), a fresh CRC and, gated, a tag the receiver cannot verify.
    About 3 us a datagram: one process can then send well past 20 000 a second."""
    sig = _signature()
    (template,) = _datagrams(target, _block(target, target.seq, 1, rng, sig), 1, [0])
    end = len(template) - (LINK_TAG_SIZE if target.gated else 0)
    data = bytearray(template[:end])
    view = memoryview(data)
    block_seq = HEADER_SIZE + 24  # the signed block header starts the symbol
    counter = HEADER_SIZE + BLOCK_HEADER_SIZE  # first payload bytes
    for n in itertools.count():
        seq = (target.seq + rng.randrange(target.window)).to_bytes(8, "big")
        data[24:32] = seq
        data[block_seq : block_seq + 8] = seq
        data[counter : counter + 8] = n.to_bytes(8, "big")
        crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[:CRC_OFFSET]))
        data[CRC_OFFSET : CRC_OFFSET + 4] = crc.to_bytes(4, "big")
        yield bytes(data) + (rng.randbytes(LINK_TAG_SIZE) if target.gated else b"")


def ahead(target: Target, rng: random.Random) -> Iterator[bytes]:
    """``k1`` blocks outside the window: in a newer epoch (a transmitter restart, claimed)."""
    later = replace(target, epoch=target.epoch + 1 + rng.randrange(10**6))
    yield from k1(later, rng)


def repair(target: Target, rng: random.Random) -> Iterator[bytes]:
    """Blocks of the largest k whose repair symbols alone can rebuild them."""
    k = max(k for k in range(1, target.fec.k + 1) if target.fec.repair_for(k) >= k)
    sig = _signature()
    while True:
        seq = target.seq + rng.randrange(target.window)
        yield from _datagrams(target, _block(target, seq, k, rng, sig), k, range(k, 2 * k))


def tiny(target: Target, rng: random.Random) -> Iterator[bytes]:
    for seq in itertools.count(rng.randrange(2**40)):
        header = DatagramHeader(
            flags=0,
            stream_id=target.stream_id,
            key_id=target.key_id,
            epoch=target.epoch,
            seq=seq,
            index=rng.randrange(255),
            k=255,
            n=255,
            block_length=255,
            records=1000,
        )
        yield pack_datagram(header, rng.randbytes(1))


def random_bytes(_target: Target, rng: random.Random) -> Iterator[bytes]:
    while True:
        yield rng.randbytes(rng.randrange(1, 1500))


def replay(capture: Sequence[bytes]) -> Callable[[Target, random.Random], Iterator[bytes]]:
    def make(_target: Target, _rng: random.Random) -> Iterator[bytes]:
        return itertools.cycle(capture)

    return make


MAKERS: dict[str, Callable[[Target, random.Random], Iterator[bytes]]] = {
    "control": random_bytes,  # aimed elsewhere by the flood sender: the busy-machine baseline
    "random": random_bytes,
    "k1": k1,
    "ahead": ahead,
    "repair": repair,
    "tiny": tiny,
}


# -- what each kind costs Decoder.receive -------------------------------------------------


def _following(gated: bool) -> tuple[Decoder, list[bytes], Target]:
    """A decoder that follows a live stream (2 000 blocks delivered), its capture, and
    what a forger knows of it."""
    from diode.config.link import LinkSettings
    from diode.decoder import Decoder, LinkProfile
    from diode.encoder import Encoder
    from diode.keys import Keyring, TrustedKey
    from diode.records import Sample

    key = SigningKey.generate()
    psk = bytes(range(32)) if gated else None
    link = LinkSettings()
    encoder = Encoder(link=link, key=key, stream_id=7, epoch=1_700_000_000_000, psk=psk)
    decoder = Decoder(
        Keyring([TrustedKey(stream_id=7, public=key.private.public_key(), psk=psk)]),
        profiles={7: LinkProfile.of(link.datagram_size, link.fec)},
    )
    capture: list[bytes] = []
    for i in range(2000):
        encoder.add(Sample(tag_id=i % 50, ts_ns=i, value=i), 0.0)
        encoder.flush()
        for block in encoder.take():
            capture.extend(block.datagrams)
    for datagram in capture:
        decoder.receive(datagram, 0.0)
    decoder.poll(1.0)
    decoder.events()
    target = Target(stream_id=7, key_id=key.key_id, epoch=1_700_000_000_000, seq=2000, gated=gated)
    return decoder, capture, target


def _forged(kind: str, capture: list[bytes], target: Target, count: int) -> list[bytes]:
    maker = replay(capture) if kind == "replay" else MAKERS[kind]
    return list(itertools.islice(maker(target, random.Random(1)), count))


def _cost(gated: bool, kind: str, count: int) -> tuple[float, dict[str, int]]:
    decoder, capture, target = _following(gated)
    forged = _forged(kind, capture, target, count)
    before = dict(decoder.counters)
    start = time.process_time()
    for i, datagram in enumerate(forged):
        decoder.receive(datagram, 1.0 + i * 1e-5)  # 100 000 datagrams/s
    spent = time.process_time() - start
    moved = {k: v - before.get(k, 0) for k, v in decoder.counters.items() if v != before.get(k, 0)}
    return spent / count * 1e6, moved


def _drain_cost(gated: bool, kind: str, count: int, *, batched: bool) -> float:
    """Microseconds per forged datagram for the journaled drain and the decoder together,
    the datagrams queued in a real socket first (the receiver's read loop without the
    event loop): batched reads (recvmmsg) or one recv a datagram."""
    import socket

    from receiver.link import Drain, open_link_socket

    decoder, capture, target = _following(gated)
    positions = decoder.positions()
    sink = open_link_socket("127.0.0.1", 0, 64 * 1024 * 1024)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.connect(sink.getsockname())
    drain = Drain(sink, {7}, journal=True, counters=decoder.counters)
    if not batched:
        drain._batch = None
    costs, now = [], 1.0

    def judge(datagrams: list[bytes]) -> list[bool]:
        return decoder.receive_all(datagrams, now)

    try:
        forged = _forged(kind, capture, target, count)
        for start in range(0, count, 2000):
            for datagram in forged[start : start + 2000]:
                source.send(datagram)
            begin = time.process_time()
            while drain.feed(1024, now, judge, positions):
                drain.release(positions, now)
            costs.append((time.process_time() - begin) / 2000 * 1e6)
            now += 0.05
    finally:
        sink.close()
        source.close()
    return statistics.median(costs)  # the machine is shared: the median of 10 rounds


def _mac_candidates(key: bytes, data: bytes) -> dict[str, Callable[[], object]]:
    import hashlib
    import hmac

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import cmac, poly1305
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    gcm, chacha = AESGCM(key), ChaCha20Poly1305(key)
    keyed = hashlib.blake2b(key=key, digest_size=16)
    inner, outer = link_tag_states(key)
    body = memoryview(data)[:-16]

    def blake() -> bool:
        tag = hashlib.blake2b(data[:-16], key=key, digest_size=16).digest()
        return hmac.compare_digest(tag, data[-16:])

    def blake_copy() -> bool:  # diode/protocol/gate.py before the switch
        tag = keyed.copy()
        tag.update(body)
        return hmac.compare_digest(tag.digest(), data[-16:])

    def sha256_states() -> bool:  # diode/protocol/gate.py: HMAC from its keyed states
        tag = inner.copy()
        tag.update(body)
        last = outer.copy()
        last.update(tag.digest())
        return hmac.compare_digest(last.digest()[:16], data[-16:])

    def aead(cipher: AESGCM | ChaCha20Poly1305) -> bool:
        try:
            cipher.decrypt(data[:12], data[-16:], data[:-16])
        except InvalidTag:
            return False
        return True

    def cmac_tag() -> bytes:
        c = cmac.CMAC(algorithms.AES(key))
        c.update(data)
        return c.finalize()

    return {
        "keyed BLAKE2b-128": blake,
        "BLAKE2b-128, keyed copy": blake_copy,
        "HMAC-SHA256-128, states": sha256_states,
        "AES-GMAC": lambda: aead(gcm),
        "ChaCha20-Poly1305": lambda: aead(chacha),
        "HMAC-SHA256 (compute)": lambda: hmac.digest(key, data, "sha256"),
        "Poly1305 (compute)": lambda: poly1305.Poly1305.generate_tag(key, data),
        "AES-CMAC (compute)": cmac_tag,
    }


def macs() -> None:
    """What each candidate MAC of the gate costs on the path a forgery takes (it fails)."""
    import os
    import timeit

    key = os.urandom(32)
    print(f"load average {os.getloadavg()[0]:.2f}")
    for size in (64, 1472):
        for name, fn in _mac_candidates(key, os.urandom(size)).items():
            us = min(timeit.repeat(fn, number=20_000, repeat=5)) / 20_000 * 1e6
            print(f"{size:5d} B  {name:26s} {us:6.2f} us")


def main() -> None:
    import os
    import sys

    if "--macs" in sys.argv:
        macs()
        return
    if "--drain" in sys.argv:
        print(f"load average {os.getloadavg()[0]:.2f}")
        for gated in (True, False):
            for kind in KINDS:
                each = _drain_cost(gated, kind, 20_000, batched=False)
                batch = _drain_cost(gated, kind, 20_000, batched=True)
                secret = "link secret" if gated else "no secret  "
                print(f"{secret}  {kind:7s}  recv each {each:6.2f}  recvmmsg {batch:6.2f} us")
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    for gated in (True, False):
        for kind in KINDS:
            us, moved = _cost(gated, kind, 20_000)
            secret = "link secret" if gated else "no secret  "
            print(f"{secret}  {kind:7s}  {us:7.2f} us/datagram  {moved}")


if __name__ == "__main__":
    main()
