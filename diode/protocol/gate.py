"""The gate: the cheap checks every datagram passes before any expensive work.

In this order, each one cheaper than what it protects (:meth:`Gate.judge` up to the
link tag, in one call; :meth:`Gate.admit` after it)::

    length, magic, stream id known        a few bytes, one unpack, one dict lookup
    datagram size = the stream's profile  one comparison (profile configured)
    CRC (stream without a secret)         one CRC-32 (before any field is trusted)
    [the stream's position]               a replay or late copy stops here (the
                                          decoder's sequencer, passed in)
    link tag (stream with a link secret)  one HMAC-SHA256 over the datagram
    framing                               one struct unpack
    k, n = the stream's profile           two comparisons (profile configured)
    key id known, of this stream          one dict lookup

With a link secret, a datagram that fails the link tag costs one MAC and a
counter: nothing unauthenticated reaches the assembly table. HMAC-SHA256
(truncated to 16 bytes), started from copies of its keyed inner and outer
hashes, was measured against keyed BLAKE2b (the tag of versions 2 and 4),
Poly1305, ChaCha20-Poly1305, AES-CMAC and AES-GMAC on this machine
(docs/PROTOCOL.md, "Threat model"): on a CPU with SHA extensions it is the
cheapest tag that needs no nonce, 20 % under BLAKE2b at 1472 bytes (CPython's
BLAKE2b is not vectorised; OpenSSL's SHA-256 uses the SHA instructions).
GMAC is cheaper still, but breaks when a nonce repeats, and two transmitters
in failover share a secret; Poly1305 needs a one-time key per message.

Without a secret, the stream's *link profile* (what both ends' ``[link]``
settings fix: datagram size, largest k, and n for each k) drops every
datagram whose shape the transmitter cannot produce, before it can cost
assembly memory or a Reed-Solomon decode.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hmac import compare_digest
from typing import TYPE_CHECKING

from diode.config.link import FecSettings
from diode.errors import FrameError
from diode.keys import Keyring, TrustedKey
from diode.wire import (
    HEADER_SIZE,
    LINK_TAG_SIZE,
    MAGIC,
    VERSION,
    VERSION_CAUCHY,
    VERSION_GATED,
    DatagramHeader,
    crc_ok,
    gate_key,
    is_gated,
    link_tag_states,
    parse_datagram,
    symbol_of,
)

if TYPE_CHECKING:  # the type only: a Python built without OpenSSL still runs
    from _hashlib import HASH

# The versions an ungated stream takes: both wire generations (a gated one takes only 6).
_UNGATED = (VERSION, VERSION_CAUCHY)
# What the checks read of a datagram, in one unpack: magic, version, flags, stream id,
# and the block it names (epoch at 16, sequence at 24; diode/wire.py).
_FRONT = struct.Struct(">HBBI8xQQ")
# What the stream's position rules out: (stream, epoch, seq) -> the counter, or None.
Position = Callable[[int, int, int], "str | None"]


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

    # HMAC-SHA256's inner and outer hashes with the gate key absorbed, when the stream
    # has a link secret: each tag starts from copies of them (hmac.digest keys both anew,
    # two compressions and 0.9 us more at 1472 bytes).
    mac: tuple[HASH, HASH] | None
    profile: LinkProfile | None
    size: int  # the only datagram size, or 0 when any goes (no profile)


class Gate:
    """Admits a datagram (header, symbol, the key it names) or raises a FrameError."""

    def __init__(self, keyring: Keyring, profiles: Mapping[int, LinkProfile] | None = None) -> None:
        self._keyring = keyring
        secrets: dict[int, bytes | None] = {}
        for key in keyring.trusted():
            secrets.setdefault(key.stream_id, key.psk)
        profiles = profiles or {}
        self._doors = {
            stream: _Door(
                link_tag_states(gate_key(psk, stream)) if psk else None,
                profiles.get(stream),
                profiles[stream].datagram_size if stream in profiles else 0,
            )
            for stream, psk in secrets.items()
        }

    def judge(self, data: bytes | memoryview, position: Position) -> str | None:  # noqa: PLR0911 - one exit per check, cheapest first
        """Every cheap check, in one call and one unpack: None to go on, or the counter to bump.

        Length, magic, stream, size, version; then, gated, the stream's ``position``
        (what it already rules out, by fields that can only reject) before the link
        tag, the dearest check; ungated, the CRC before the position (damage on the
        way is bad_checksum, not a late block). One function for what every datagram
        of a flood pays: the four calls and three unpacks it replaces cost 0.2-0.3 us a
        forgery here (docs/RELIABILITY.md, "Floods of forged datagrams").
        """
        if len(data) <= HEADER_SIZE:
            return "rejected_short"
        magic, version, _flags, stream_id, epoch, seq = _FRONT.unpack_from(data)
        if magic != MAGIC:
            return "rejected_bad_magic"
        door = self._doors.get(stream_id)
        if door is None:
            return "rejected_unknown_stream"
        if door.size and len(data) != door.size:
            return "rejected_bad_shape"
        mac = door.mac
        if mac is None:
            if version not in _UNGATED:
                return "rejected_bad_version"
            if not crc_ok(data, version):
                return "rejected_bad_checksum"
            return position(stream_id, epoch, seq)
        if version != VERSION_GATED:
            # A retired gated version (2, 4: another tag) is a bad version, not ungated.
            return "rejected_ungated" if version in _UNGATED else "rejected_bad_version"
        # The position before the tag: a replay or a late copy costs no MAC (a forgery
        # naming a block the stream passed is counted late instead of bad_tag).
        reason = position(stream_id, epoch, seq)
        if reason is not None:
            return reason
        # HMAC-SHA256 from copies of the keyed states, over a view (no copy of the datagram).
        inner = mac[0].copy()
        inner.update(memoryview(data)[:-LINK_TAG_SIZE])
        outer = mac[1].copy()
        outer.update(inner.digest())
        if not compare_digest(outer.digest()[:LINK_TAG_SIZE], data[-LINK_TAG_SIZE:]):
            return "rejected_bad_tag"
        return None

    def admit(self, data: bytes | memoryview) -> tuple[DatagramHeader, bytes, TrustedKey]:
        """Framing, CRC, k and n, key id, of a datagram :meth:`screen` let through."""
        door = self._doors[int.from_bytes(data[4:8], "big")]
        # The screen checked the CRC of an ungated datagram; a gated one's is checked
        # here (its tag already proved it undamaged: this is the wire's rule, cheap).
        header, symbol = parse_datagram(data, check_crc=door.mac is not None)
        profile = door.profile
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

    def admit_symbol(self, data: bytes | memoryview) -> bytes:
        """:meth:`admit` for a datagram whose header, but for the symbol index, it admitted
        before (its assembly key is one an earlier symbol of the block made): what admit
        decided from those fields holds, so only the index and the CRC are left."""
        return symbol_of(data, check_crc=is_gated(data[2]))
