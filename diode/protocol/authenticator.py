"""The block authenticator: k symbols in, an authentic block's records out, or a FrameError.

    Reed-Solomon rebuild --> signed header = the datagrams' header?
        --> Ed25519 verify --> decrypt (link secret) --> records

No byte of a record leaves before the signature covering it verified. A
block that fails is remembered by a digest of what was fed in (its header and
the k symbols used), in a bounded FIFO, so the same forged block is never
rebuilt or verified twice: resending it costs one BLAKE2b and a lookup.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass

from diode import aead, fec
from diode.errors import FrameError
from diode.keys import TrustedKey
from diode.records import Record, decode_records
from diode.wire import (
    BLOCK_HEADER_SIZE,
    FLAG_ENCRYPTED,
    BlockHeader,
    DatagramHeader,
    code_of,
    matches,
    parse_block,
    signed_message,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticBlock:
    """A block whose signature verified: every field here is the transmitter's."""

    header: BlockHeader
    records: list[Record]
    rebuilt: bool  # repair symbols were needed


class BlockAuthenticator:
    def __init__(self, counters: Counter[str], *, remember: int = 32768) -> None:
        self._counters = counters
        self._remember = remember
        self._failed: set[bytes] = set()
        self._order: deque[bytes] = deque()

    def open(
        self, key: bytes, header: DatagramHeader, symbols: dict[int, bytes], trusted: TrustedKey
    ) -> AuthenticBlock:
        digest = hashlib.blake2b(key, digest_size=16)
        for index in sorted(symbols):
            digest.update(index.to_bytes(1, "big"))
            digest.update(symbols[index])
        fingerprint = digest.digest()
        if fingerprint in self._failed:
            raise FrameError("this block already failed", reason="known_forgery")
        try:
            return self._open(header, symbols, trusted)
        except FrameError:
            self._forget_oldest()
            self._failed.add(fingerprint)
            self._order.append(fingerprint)
            raise

    def _forget_oldest(self) -> None:
        if len(self._order) >= self._remember:
            self._failed.discard(self._order.popleft())

    def _open(
        self, header: DatagramHeader, symbols: dict[int, bytes], trusted: TrustedKey
    ) -> AuthenticBlock:
        padded = fec.decode(symbols, header.k, header.n, code_of(header.generation))
        rebuilt = any(i >= header.k for i in symbols)
        block_header, signed, payload, signature = parse_block(padded[: header.block_length])
        if not matches(block_header, header):
            raise FrameError("signed header differs from the datagrams", reason="bad_block")
        if not trusted.verify(signature, signed_message(block_header.generation, signed)):
            raise FrameError("signature does not verify", reason="bad_signature")
        # From here on the block is authentic.
        body = bytes(payload)
        if trusted.psk is not None:
            if not block_header.flags & FLAG_ENCRYPTED:
                raise FrameError("plaintext block on an encrypted stream", reason="not_encrypted")
            body = aead.open_(
                trusted.psk,
                stream_id=header.stream_id,
                epoch=header.epoch,
                seq=header.seq,
                sealed=body,
                aad=bytes(signed[:BLOCK_HEADER_SIZE]),
            )
        elif block_header.flags & FLAG_ENCRYPTED:
            raise FrameError("encrypted block and no link secret", reason="no_secret")
        records = decode_records(body, block_header.record_count)
        return AuthenticBlock(header=block_header, records=records, rebuilt=rebuilt)
