"""The gate: the cheap checks every datagram passes before any expensive work.

In this order, each one cheaper than what it protects::

    length, magic, stream id known        a few bytes, one dict lookup
    datagram size = the stream's profile  one comparison (profile configured)
    link tag (stream with a link secret)  one keyed BLAKE2b over the datagram
    framing + CRC                         one struct unpack, one CRC
    k, n = the stream's profile           two comparisons (profile configured)
    key id known, of this stream          one dict lookup

With a link secret, a datagram that fails the link tag costs one MAC and a
counter: nothing unauthenticated reaches the assembly table. Keyed BLAKE2b
was measured against HMAC-SHA256, Poly1305, ChaCha20-Poly1305 and AES-GMAC
on this kind of machine (docs/PROTOCOL.md, "Threat model"): it is the
fastest at small datagrams, on par at 1472 bytes, and needs no nonce (GMAC
and Poly1305 break when a nonce or one-time key repeats).

Without a secret, the stream's *link profile* (what both ends' ``[link]``
settings fix: datagram size, largest k, and n for each k) drops every
datagram whose shape the transmitter cannot produce, before it can cost
assembly memory or a Reed-Solomon decode.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from diode.config.link import FecSettings
from diode.errors import FrameError
from diode.keys import Keyring, TrustedKey
from diode.wire import (
    DATAGRAM_PREFIX,
    HEADER_SIZE,
    LINK_TAG_SIZE,
    MAGIC,
    VERSION,
    VERSION_GATED,
    DatagramHeader,
    gate_key,
    parse_datagram,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """The shape of every datagram of one stream, from the transmitter's ``[link]``."""

    datagram_size: int
    n_for_k: tuple[int, ...]  # index k (1 .. the largest k) -> the only valid n

    @property
    def max_k(self) -> int:
        return len(self.n_for_k) - 1

    @classmethod
    def of(cls, datagram_size: int, fec: FecSettings) -> LinkProfile:
        """The profile a transmitter with these link settings sends (the encoder's rule)."""
        return cls(
            datagram_size=datagram_size,
            n_for_k=(0, *(k + fec.repair_for(k) for k in range(1, fec.k + 1))),
        )


@dataclass(frozen=True, slots=True)
class _Door:
    """What the gate knows of one stream."""

    key: bytes | None  # the gate key, when the stream has a link secret
    profile: LinkProfile | None


class Gate:
    """Admits a datagram (header, symbol, the key it names) or raises a FrameError."""

    def __init__(self, keyring: Keyring, profiles: Mapping[int, LinkProfile] | None = None) -> None:
        self._keyring = keyring
        secrets: dict[int, bytes | None] = {}
        for key in keyring.trusted():
            secrets.setdefault(key.stream_id, key.psk)
        profiles = profiles or {}
        self._doors = {
            stream: _Door(gate_key(psk, stream) if psk else None, profiles.get(stream))
            for stream, psk in secrets.items()
        }

    def admit(self, data: bytes) -> tuple[DatagramHeader, bytes, TrustedKey]:
        if len(data) <= HEADER_SIZE:
            raise FrameError("datagram shorter than its header", reason="short")
        magic, version, _flags, stream_id = DATAGRAM_PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise FrameError("not a diode datagram", reason="bad_magic")
        door = self._doors.get(stream_id)
        if door is None:
            raise FrameError("no such stream", reason="unknown_stream")
        profile = door.profile
        if profile is not None and len(data) != profile.datagram_size:
            raise FrameError("datagram size is not the stream's", reason="bad_shape")
        if door.key is not None:
            if version != VERSION_GATED:
                raise FrameError("no link tag on a stream with a link secret", reason="ungated")
            view = memoryview(data)
            tag = hashlib.blake2b(
                view[:-LINK_TAG_SIZE], key=door.key, digest_size=LINK_TAG_SIZE
            ).digest()
            if not hmac.compare_digest(tag, view[-LINK_TAG_SIZE:]):
                raise FrameError("link tag does not verify", reason="bad_tag")
        elif version != VERSION:
            raise FrameError(
                f"version {version} on a stream without a link secret", reason="bad_version"
            )
        header, symbol = parse_datagram(data)
        if profile is not None and (
            header.k >= len(profile.n_for_k) or header.n != profile.n_for_k[header.k]
        ):
            raise FrameError("k and n are not the stream's", reason="bad_shape")
        trusted = self._keyring.get(header.key_id)
        if trusted is None:
            raise FrameError("unknown key id", reason="unknown_key")
        if trusted.stream_id != header.stream_id:
            raise FrameError("key id of another stream", reason="wrong_stream")
        return header, symbol, trusted
