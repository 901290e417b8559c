"""The block authenticator: k symbols in, an authentic block's records out, or a FrameError.

    Reed-Solomon rebuild --> signed header = the datagrams' header?
        --> digest of the signed bytes [--> the group, this digest in its slot]
        --> Ed25519 verify (or: this group verified already) --> decrypt --> records

No byte of a record leaves before the signature covering it verified. A
block that fails is remembered, in a bounded FIFO, so the same forged block
is never verified twice, nor rebuilt twice:

- by a fingerprint of what the signature check is about, taken before the
  verify: a BLAKE2b of the assembly key, the signed message (generation 2:
  the SHA-256 digest the check computes anyway, 25 us at 45 KB) and the
  signature, about 200 bytes. When the k source symbols are there (no
  decode: the common case) this is all: the bookkeeping no longer hashes the
  whole block (a BLAKE2b of 45 KB, 49 us here), and a resent forgery costs
  a join of its symbols, one SHA-256 and a lookup.
- when more than a few source symbols are missing (``fec.FEW``), also by a
  digest of what was fed in (the assembly key and the k symbols used),
  checked before the decode: a forgery of repair symbols, resent, costs one
  BLAKE2b and a lookup, never a second pyeclib decode (175 us at k 32). With
  a few sources missing the rebuild (39 us for one at k 32) costs less than
  that digest (62 us at 45 KB), so it is not taken: a resent forgery then
  costs the rebuild, one SHA-256 and a lookup.

Generation 3 (one signature per group): a signature that fails is
remembered by the key id, the rebuilt group message and the signature, not
by the assembly key: every block that rebuilds a forged group refused once
(whatever its sequence number) is a known forgery, so a forged group costs
one verify, ever. A block whose signature verified but whose records fail
is remembered as a block, as before: the group's other blocks still go. A
group that verified is remembered too (``VerifiedGroups``): its other
blocks, each rebuilding the same message from its own digest, skip the
verify.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass

from diode import aead, fec
from diode.errors import FrameError
from diode.keys import TrustedKey
from diode.protocol.verified import VerifiedGroups
from diode.records import Record, decode_records
from diode.wire import (
    FLAG_ENCRYPTED,
    BlockHeader,
    DatagramHeader,
    ParsedBlock,
    code_of,
    matches,
    parse_block,
    rebuilt_group_message,
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
        self._remember_at_most = remember
        self._failed: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._verified = VerifiedGroups()

    def open(
        self, key: bytes, header: DatagramHeader, symbols: dict[int, bytes], trusted: TrustedKey
    ) -> AuthenticBlock:
        """The authentic block these symbols (of the assembly ``key``) make, or a FrameError."""
        # Only a decode dearer than the digest of what it is fed is worth skipping: a
        # block missing a few sources is rebuilt for less than that digest costs
        # (diode/fec.py), and what it fails on is remembered after the decode.
        cheap = fec.decode_is_cheap(symbols, header.k, code_of(header.generation))
        fed = None if cheap else _fed_fingerprint(key, symbols)
        if fed in self._failed:
            raise FrameError("this block already failed", reason="known_forgery")
        try:
            return self._open(key, header, symbols, trusted)
        except FrameError:
            self._remember(fed)
            raise

    def _open(
        self, key: bytes, header: DatagramHeader, symbols: dict[int, bytes], trusted: TrustedKey
    ) -> AuthenticBlock:
        padded = fec.decode(symbols, header.k, header.n, code_of(header.generation))
        # A failure before the fingerprint is not remembered (without a decode, the
        # join and the unpack cost less than a fingerprint would).
        block = parse_block(memoryview(padded)[: header.block_length])
        block_header, signature = block.header, block.signature
        if not matches(block_header, header):
            raise FrameError("signed header differs from the datagrams", reason="bad_block")
        digest = hashlib.sha256(block.signed).digest()
        if block.manifest is None:
            message = signed_message(block_header.generation, block.signed, digest)
        else:
            message = rebuilt_group_message(block_header, block.manifest, digest)
        # What failed: this block (its assembly key, the message, the signature), or, for
        # a signature over a group, the group whichever of its blocks carries it.
        failed_block = _fingerprint(key, message, signature)
        failed_signature = (
            failed_block
            if block.manifest is None
            else _fingerprint(block_header.key_id, message, signature)
        )
        if failed_block in self._failed or failed_signature in self._failed:
            raise FrameError("this block already failed", reason="known_forgery")
        try:
            self._authenticate(block, message, trusted)
        except FrameError:
            self._remember(failed_signature)
            raise
        try:
            # An authentic block whose records fail (a codec this receiver lacks, a
            # secret that differs) fails alone: its group's other blocks may not.
            records = _records(block, trusted)
        except FrameError:
            self._remember(failed_block)
            raise
        return AuthenticBlock(
            header=block_header, records=records, rebuilt=_rebuilt(header, symbols)
        )

    def _authenticate(self, block: ParsedBlock, message: bytes, trusted: TrustedKey) -> None:
        """Verify the block's signature, once per group: a group verified already (the same
        key, message and signature) is authentic without a verify."""
        stream_id = block.header.stream_id
        entry = b"".join((block.header.key_id, message, block.signature))
        if block.manifest is not None and self._verified.holds(stream_id, entry):
            self._counters["verifies_saved"] += 1
            return
        self._counters["verifies"] += 1
        if not trusted.verify(block.signature, message):
            raise FrameError("signature does not verify", reason="bad_signature")
        if block.manifest is not None and block.manifest.blocks > 1:
            self._verified.add(stream_id, entry)

    def _remember(self, fingerprint: bytes | None) -> None:
        if fingerprint is None or fingerprint in self._failed:
            return
        if len(self._order) >= self._remember_at_most:
            self._failed.discard(self._order.popleft())
        self._failed.add(fingerprint)
        self._order.append(fingerprint)


def _rebuilt(header: DatagramHeader, symbols: dict[int, bytes]) -> bool:
    """Whether repair symbols are among the k (a decode is needed)."""
    return max(symbols) >= header.k


def _fingerprint(about: bytes, message: bytes, signature: memoryview) -> bytes:
    return hashlib.blake2b(about + message + signature, digest_size=16).digest()


def _fed_fingerprint(key: bytes, symbols: dict[int, bytes]) -> bytes:
    """A digest of what a decode is fed: the assembly key, each symbol used and its index."""
    digest = hashlib.blake2b(key, digest_size=16)
    for index in sorted(symbols):
        digest.update(index.to_bytes(1, "big"))
        digest.update(symbols[index])
    return digest.digest()


def _records(block: ParsedBlock, trusted: TrustedKey) -> list[Record]:
    """The records of a block whose signature verified: its payload, decrypted when the
    stream has a secret."""
    block_header = block.header
    payload: bytes | memoryview = block.payload
    if trusted.psk is not None:
        if not block_header.flags & FLAG_ENCRYPTED:
            raise FrameError("plaintext block on an encrypted stream", reason="not_encrypted")
        payload = aead.open_(
            trusted.psk,
            stream_id=block_header.stream_id,
            epoch=block_header.epoch,
            seq=block_header.seq,
            sealed=bytes(payload),
            aad=bytes(block.signed[: len(block.signed) - len(block.payload)]),
        )
    elif block_header.flags & FLAG_ENCRYPTED:
        raise FrameError("encrypted block and no link secret", reason="no_secret")
    return decode_records(payload, block_header.record_count)
