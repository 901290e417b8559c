"""Shared builders for the core tests: fixed keys, small links, one-call pipelines."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from diode.config.link import FecSettings, LinkSettings
from diode.decoder import Decoder, DecoderSettings, Delivered, Event, Gap
from diode.encoder import Encoder
from diode.keys import Keyring, SigningKey, TrustedKey
from diode.records import Record, Sample
from diode.wire import CRC_OFFSET, GENERATION, HEADER_SIZE

STREAM = 7
EPOCH = 1_764_000_000_000


def fixed_key(seed: int = 1) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def small_link(
    k: int = 8, ratio: float = 0.5, burst: int = 1, size: int = 256, group: int = 1
) -> LinkSettings:
    """Small blocks whose arithmetic a test can follow: by default every block goes alone."""
    return LinkSettings(
        datagram_size=size,
        fec=FecSettings(k=k, repair_ratio=ratio, repair_burst=burst, group=group),
    )


def keyring(*keys: SigningKey, stream: int = STREAM, psk: bytes | None = None) -> Keyring:
    return Keyring(
        [TrustedKey(stream_id=stream, public=k.private.public_key(), psk=psk) for k in keys]
    )


def samples(count: int, start: int = 0) -> list[Record]:
    return [
        Sample(tag_id=i % 50, ts_ns=1_700_000_000_000_000_000 + i, value=i * 0.5)
        for i in range(start, start + count)
    ]


def encode_blocks(
    records: Iterable[Record],
    *,
    link: LinkSettings | None = None,
    key: SigningKey | None = None,
    epoch: int = EPOCH,
    psk: bytes | None = None,
    per_block: int | None = None,
    generation: int = GENERATION,
) -> list[list[bytes]]:
    """Each block's datagrams; ``per_block`` closes a block every so many records."""
    encoder = Encoder(
        link=link or small_link(),
        key=key or fixed_key(),
        stream_id=STREAM,
        epoch=epoch,
        psk=psk,
        generation=generation,
    )
    for i, record in enumerate(records, 1):
        encoder.add(record, 0.0)
        if per_block and i % per_block == 0:
            encoder.flush()
    encoder.flush()
    # A group's datagrams are round-robin: block j of b is every b-th from j.
    return [list(u.datagrams[j :: u.blocks]) for u in encoder.take() for j in range(u.blocks)]


def new_decoder(*keys: SigningKey, psk: bytes | None = None, **settings: float) -> Decoder:
    return Decoder(
        keyring(*(keys or (fixed_key(),)), psk=psk),
        DecoderSettings(**settings),  # type: ignore[arg-type]
    )


def feed(decoder: Decoder, datagrams: Iterable[bytes], now: float = 0.0) -> list[Event]:
    for datagram in datagrams:
        decoder.receive(datagram, now)
    decoder.poll(now + 10)
    return decoder.events()


def delivered(events: Iterable[Event]) -> list[Record]:
    return [r for e in events if isinstance(e, Delivered) for r in e.records]


def gaps(events: Iterable[Event]) -> list[Gap]:
    return [e for e in events if isinstance(e, Gap)]


def with_valid_crc(datagram: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite bytes of a datagram and fix its CRC, as a deliberate forger would."""
    data = bytearray(datagram)
    data[offset : offset + len(value)] = value
    crc = zlib.crc32(bytes(data[HEADER_SIZE:]), zlib.crc32(bytes(data[:CRC_OFFSET])))
    data[CRC_OFFSET : CRC_OFFSET + 4] = crc.to_bytes(4, "big")
    return bytes(data)
