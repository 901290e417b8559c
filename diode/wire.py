"""The wire format: one datagram layout and one block layout, nothing else.

Every datagram of a stream has the same size (default 1472 bytes of UDP
payload) and carries one FEC symbol of one block::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------------------------------+---------------+---------------+
    |          magic 0xD10D         | version 1,3,6 |     flags     |   0
    +-------------------------------+---------------+---------------+
    |                           stream id                           |   4
    +---------------------------------------------------------------+
    |                       key id (8 bytes)                        |   8
    +---------------------------------------------------------------+
    |                epoch (8 bytes, ms, per stream)                |  16
    +---------------------------------------------------------------+
    |              block sequence (8 bytes, per epoch)              |  24
    +---------------+---------------+---------------+---------------+
    | symbol index  |       k       |       n       |  reserved = 0 |  32
    +---------------+---------------+---------------+---------------+
    |              block length (bytes before padding)              |  36
    +---------------------------------------------------------------+
    |                 records in the block (a hint)                 |  40
    +---------------------------------------------------------------+
    |          CRC-32 of bytes 0..43 and of the symbol              |  44
    +---------------------------------------------------------------+
    |              symbol (datagram size - 48 bytes,                |  48
    |                 or - 64 bytes in version 6)                   |
    +---------------------------------------------------------------+
    | version 6 only: link tag, HMAC-SHA256 of every byte before    | size - 16
    | it under the stream's gate key, its first 16 bytes            |
    +---------------------------------------------------------------+

Odd versions are ungated (no link secret); version 6 is gated, sent by a
transmitter with a link secret: its last 16 bytes are a MAC (the *link
tag*) under a gate key derived from the link secret, checked before anything
else (see ``diode.protocol.gate``). A receiver accepts on a stream exactly
the gating its config implies: a stream with a secret takes only version 6,
a stream without one only 1 and 3, so a forger cannot skip the gate by
sending the other kind. Versions 2 and 4 were gated with a keyed BLAKE2b-128
tag (retired 2026-12: HMAC-SHA256 costs a receiver 20 % less on a CPU with
SHA extensions, docs/PROTOCOL.md "Threat model"); a receiver refuses them as
a bad version, so both ends of a gated link upgrade together.

Three *generations* of the wire differ in the erasure code and in what the
signature covers; a transmitter sends generation 3, a receiver accepts all:

    generation 1: version 1, zfec's Rizzo code, Ed25519 over the block
    generation 2: versions 3 and 6, ISA-L Cauchy Reed-Solomon (``diode.fec``),
                  Ed25519 over "diode block v2" + SHA-256 of the signed bytes
    generation 3: versions 3 and 6 (the datagrams of generation 2), each block
                  ending with a group manifest; one Ed25519 signature over
                  "diode group v3" + SHA-256 of the group serves every block
                  of a group (below)

A link tag is generation 2 and 3 only. Generations 2 and 3 share the
datagram layer (code, CRC, tag) and differ in the block only: the gate and
the decode are the same for both. The signed block header carries its
generation (byte 0), so a block is rebuilt and checked only as the
generation its datagrams and its signature both say.

Nothing in a version 1 header is trusted: the CRC only sorts out datagrams
damaged on the way before they can spoil a Reed-Solomon decode. Trust comes
from the block, which the k source symbols carry (zero-padded to k symbols)::

    +---------------+---------------+---------------+---------------+
    | generation    |     flags     |       k       |       n       |   0
    +---------------+---------------+---------------+---------------+
    |                           stream id                           |   4
    |                       key id (8 bytes)                        |   8
    |                        epoch (8 bytes)                        |  16
    |                    block sequence (8 bytes)                   |  24
    |            first record (8 bytes, index in the epoch)         |  32
    |                         record count                          |  40
    |                         payload length                        |  44
    +---------------------------------------------------------------+
    |  payload: records (msgpack), or their AEAD ciphertext + tag   |  48
    +---------------+---------------+-------------------------------+
    | G (1..4)      | i (0..G-1)    |  generation 3 only: the group |  48+length
    +---------------+---------------+  manifest                     |
    |   SHA-256 of the signed bytes of the group's other G - 1      |
    |   blocks, 32 bytes each, in slot order, slot i left out       |
    +---------------------------------------------------------------+
    |   Ed25519 signature of bytes 0 .. 48+length (generation 1),   |
    |   of "diode block v2" + their SHA-256 (generation 2), or of   |
    |   "diode group v3" + SHA-256 of the group (generation 3)      |
    +---------------------------------------------------------------+

In generation 3 the *signed bytes* of a block are still its header and
payload; the *group* a signature covers is the 22-byte group header
(generation, stream id, key id, epoch, G) and the G digests of its blocks'
signed bytes, in slot order. The receiver hashes a block's signed bytes,
puts that digest in slot i of the manifest it carries, and verifies the
signature over the group so rebuilt: a block whose bytes, slot, G or
neighbours' digests differ from what was signed rebuilds another group and
fails. The group's other blocks carry the same signature over the same
group, so a receiver that verified it once (``diode.protocol.verified``)
takes them with a SHA-256 each. A block sent alone is a group of 1.

The signed header repeats every datagram field that matters, so the receiver
checks the datagram headers it used against what the transmitter signed.
``first record`` numbers records across blocks: the gap between two
authentic blocks tells exactly how many records were lost in between.

All integers are big-endian and unsigned. There is exactly one valid
encoding of each datagram: reserved bits and bytes are zero, padding is zero.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isal.isal_zlib import crc32  # zlib's CRC-32, by ISA-L: 0.30 against 0.85 us a datagram

from diode import fec
from diode.errors import FrameError

if TYPE_CHECKING:  # the type only: a Python built without OpenSSL still runs
    from _hashlib import HASH

MAGIC = 0xD10D
VERSION = 1  # generation 1, ungated
VERSION_CAUCHY = 3  # generation 2, ungated
VERSION_GATED = 6  # generation 2, the datagram ends with an HMAC-SHA256-128 link tag
# 2 and 4 ended with a keyed BLAKE2b-128 tag (generation 1 and 2): refused, a bad version.
GENERATION = 3  # what a transmitter sends
GENERATIONS = (1, 2, 3)  # what a receiver accepts
LINK_TAG_SIZE = 16
# Generation 2 signs a digest: Ed25519 over 45 KB hashes it twice with SHA-512,
# one SHA-256 pass and a 46-byte message cost less than half (docs/BENCHMARKS.md).
SIGNED_DIGEST_PREFIX = b"diode block v2"
# Generation 3 signs a group of blocks at once: another label, the same length.
GROUP_PREFIX = b"diode group v3"
assert len(GROUP_PREFIX) == len(SIGNED_DIGEST_PREFIX)
# The most blocks one signature covers: a group's manifest then costs each block at
# most 98 bytes, less than the smallest symbol (so a full block still holds more
# than a block sent alone); a larger FEC group is signed block by block.
MAX_GROUP = 4
DIGEST_SIZE = 32
MANIFEST_HEAD = struct.Struct(">BB")  # G, i
# What binds a group's digests to one stream, key and epoch: generation, stream id,
# key id, epoch, G.
GROUP_HEADER = struct.Struct(">BI8sQB")

# Datagram header: magic, version, flags, stream, key id, epoch, seq,
# symbol index, k, n, reserved, block length, records, crc.
DATAGRAM_HEADER = struct.Struct(">HBBI8sQQBBBBIII")
HEADER_SIZE = DATAGRAM_HEADER.size
INDEX_OFFSET = 32  # the symbol index, then k, then n
K_OFFSET = 33
N_OFFSET = 34
CRC_OFFSET = 44
assert HEADER_SIZE == 48, "the layout above is the contract"

# Block header: version, flags, k, n, stream, key id, epoch, seq, first record,
# record count, payload length.
BLOCK_HEADER = struct.Struct(">BBBBI8sQQQII")
BLOCK_HEADER_SIZE = BLOCK_HEADER.size
assert BLOCK_HEADER_SIZE == 48
SIGNATURE_SIZE = 64
AEAD_TAG_SIZE = 16
BLOCK_OVERHEAD = BLOCK_HEADER_SIZE + SIGNATURE_SIZE

FLAG_ENCRYPTED = 0x01
KNOWN_FLAGS = FLAG_ENCRYPTED

KEY_ID_SIZE = 8
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DatagramHeader:
    """The unauthenticated header of one datagram."""

    flags: int
    stream_id: int
    key_id: bytes
    epoch: int
    seq: int
    index: int
    k: int
    n: int
    block_length: int
    records: int
    # The datagram layer's generation: 1 (zfec) or 2 (Cauchy: generation 2 and 3 blocks).
    generation: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockHeader:
    """The signed header at the start of every block."""

    flags: int
    k: int
    n: int
    stream_id: int
    key_id: bytes
    epoch: int
    seq: int
    first_record: int
    record_count: int
    payload_length: int
    generation: int = GENERATION


# The first bytes of every datagram: enough to find the stream's gate.
DATAGRAM_PREFIX = struct.Struct(">HBBI")


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A generation 3 block's place in its group: G, its slot, its neighbours' digests."""

    blocks: int  # G
    index: int  # i, this block's slot
    others: bytes  # the other G - 1 digests, in slot order


def datagram_generation(generation: int) -> int:
    """The datagram layer a block generation travels in: 1 (zfec), or 2 (Cauchy) for 2 and 3."""
    return 1 if generation == 1 else 2


def datagram_version(generation: int, *, gated: bool) -> int:
    """The version byte of a datagram: 1 for generation 1, 3 (or 6, gated) for 2 and 3."""
    if gated:
        if generation == 1:
            raise ValueError("a link tag is sent in generations 2 and 3 only")
        return VERSION_GATED
    return VERSION if generation == 1 else VERSION_CAUCHY


def is_gated(version: int) -> bool:
    return version == VERSION_GATED


def code_of(generation: int) -> fec.Code:
    """The erasure code of a wire generation."""
    return fec.Code.RIZZO if generation == 1 else fec.Code.CAUCHY


def signed_message(
    generation: int, signed: bytes | memoryview, digest: bytes | None = None
) -> bytes:
    """What a generation 1 or 2 block's Ed25519 signature is over: the signed bytes, or
    their digest (``digest``, when the caller has it already)."""
    if generation == 1:
        return bytes(signed)
    return SIGNED_DIGEST_PREFIX + (digest or hashlib.sha256(signed).digest())


def manifest_size(generation: int, blocks: int) -> int:
    """The bytes a block's manifest takes in a group of ``blocks`` (none before generation 3)."""
    return MANIFEST_HEAD.size + DIGEST_SIZE * (blocks - 1) if generation >= 3 else 0


def pack_manifest(index: int, digests: Sequence[bytes]) -> bytes:
    """The manifest of the block in slot ``index`` of the group whose digests these are."""
    others = [d for slot, d in enumerate(digests) if slot != index]
    return b"".join((MANIFEST_HEAD.pack(len(digests), index), *others))


def group_message(header: BlockHeader, blocks: int, digests: bytes) -> bytes:
    """What a generation 3 signature is over: the label, then SHA-256 of the group header
    (taken from a block's own signed header) and the G digests in slot order."""
    group = GROUP_HEADER.pack(
        header.generation, header.stream_id, header.key_id, header.epoch, blocks
    )
    return GROUP_PREFIX + hashlib.sha256(group + digests).digest()


def rebuilt_group_message(header: BlockHeader, manifest: Manifest, digest: bytes) -> bytes:
    """:func:`group_message` as a receiver rebuilds it: the block's own ``digest`` (of its
    signed bytes, computed here) put in its slot between the others it carries."""
    cut = DIGEST_SIZE * manifest.index
    others = manifest.others
    return group_message(header, manifest.blocks, others[:cut] + digest + others[cut:])


def symbol_size(datagram_size: int, *, gated: bool = False) -> int:
    return datagram_size - HEADER_SIZE - (LINK_TAG_SIZE if gated else 0)


def link_tag(gate_key: bytes, data: bytes | memoryview) -> bytes:
    """The MAC a gated datagram ends with: HMAC-SHA256 of everything before it, truncated
    to 16 bytes (RFC 2104; truncation as RFC 4868 allows)."""
    return hmac.digest(gate_key, data, "sha256")[:LINK_TAG_SIZE]


HMAC_BLOCK = 64  # SHA-256's block, HMAC's key size


def link_tag_states(gate_key: bytes) -> tuple[HASH, HASH]:
    """HMAC-SHA256's inner and outer hashes with the gate key already absorbed (RFC 2104:
    the key, hashed first when longer than the 64-byte block, zero-padded to it, xor 0x36
    and 0x5C). A tag started from copies of them is :func:`link_tag`'s, without hashing
    the key twice per datagram."""
    key = hashlib.sha256(gate_key).digest() if len(gate_key) > HMAC_BLOCK else gate_key
    block = key.ljust(HMAC_BLOCK, b"\0")
    return (
        hashlib.sha256(bytes(b ^ 0x36 for b in block)),
        hashlib.sha256(bytes(b ^ 0x5C for b in block)),
    )


def gate_key(psk: bytes, stream_id: int) -> bytes:
    """The key of a stream's link tags, derived from its link secret (domain-separated;
    the label names the tag's algorithm: v2 keyed BLAKE2b, v3 HMAC-SHA256)."""
    return hashlib.blake2b(
        stream_id.to_bytes(4, "big"), key=psk, digest_size=32, person=b"diode-gate-v3"
    ).digest()


def pack_datagram(header: DatagramHeader, symbol: bytes, gate: bytes | None = None) -> bytes:
    """Header, then the symbol, with the CRC over both; with a gate key, the link tag after."""
    head = DATAGRAM_HEADER.pack(
        MAGIC,
        datagram_version(header.generation, gated=gate is not None),
        header.flags,
        header.stream_id,
        header.key_id,
        header.epoch,
        header.seq,
        header.index,
        header.k,
        header.n,
        0,
        header.block_length,
        header.records,
        0,
    )
    crc = crc32(symbol, crc32(memoryview(head)[:CRC_OFFSET]))
    datagram = b"".join((head[:CRC_OFFSET], crc.to_bytes(4, "big"), symbol))
    return datagram if gate is None else datagram + link_tag(gate, datagram)


# The same layout split at the symbol index: what is fixed for a block, what is not.
_DATAGRAM_FIXED = struct.Struct(">HBBI8sQQ")
_DATAGRAM_VARYING = struct.Struct(">BBBBII")
assert _DATAGRAM_FIXED.size + _DATAGRAM_VARYING.size == CRC_OFFSET


def pack_block_datagrams(
    header: DatagramHeader, symbols: Sequence[bytes | memoryview], gate: bytes | None = None
) -> list[bytes]:
    """The datagrams of one block: ``header`` with index 0, 1, ... in front of each symbol.

    Byte for byte what :func:`pack_datagram` gives for each index (the golden
    vectors check both), with the block's fixed header bytes packed and
    CRC-summed once instead of once per datagram.
    """
    version = datagram_version(header.generation, gated=gate is not None)
    fixed = _DATAGRAM_FIXED.pack(
        MAGIC, version, header.flags, header.stream_id, header.key_id, header.epoch, header.seq
    )
    fixed_crc = crc32(fixed)
    varying = _DATAGRAM_VARYING.pack
    k, n, length, records = header.k, header.n, header.block_length, header.records
    out = []
    for index, symbol in enumerate(symbols):
        tail = varying(index, k, n, 0, length, records)
        crc = crc32(symbol, crc32(tail, fixed_crc))
        datagram = b"".join((fixed, tail, crc.to_bytes(4, "big"), symbol))
        out.append(datagram if gate is None else datagram + link_tag(gate, datagram))
    return out


_CRC = struct.Struct(f">{CRC_OFFSET}xI")


def crc_ok(data: bytes | memoryview, version: int) -> bool:
    """Does the CRC field match (bytes 0..43, then the symbol, without a link tag)?"""
    view = memoryview(data)
    symbol = view[HEADER_SIZE:-LINK_TAG_SIZE] if version == VERSION_GATED else view[HEADER_SIZE:]
    crc: int = _CRC.unpack_from(view)[0]
    return crc32(symbol, crc32(view[:CRC_OFFSET])) == crc


def parse_datagram(
    data: bytes | memoryview, *, check_crc: bool = True
) -> tuple[DatagramHeader, bytes]:
    """Check a datagram's framing and CRC; any defect is a FrameError naming its counter.

    A gated datagram's link tag is not checked here (the gate does that,
    first): it is only cut off the symbol.
    """
    if len(data) <= HEADER_SIZE:
        raise FrameError("datagram shorter than its header", reason="short")
    (
        magic,
        version,
        flags,
        stream_id,
        key_id,
        epoch,
        seq,
        index,
        k,
        n,
        reserved,
        block_length,
        records,
        crc,
    ) = DATAGRAM_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("not a diode datagram", reason="bad_magic")
    view = memoryview(data)
    if version in (VERSION, VERSION_CAUCHY):
        symbol = view[HEADER_SIZE:]
    elif is_gated(version) and len(data) > HEADER_SIZE + LINK_TAG_SIZE:
        symbol = view[HEADER_SIZE:-LINK_TAG_SIZE]
    else:
        raise FrameError(f"unsupported version {version}", reason="bad_version")
    if check_crc and crc32(symbol, crc32(view[:CRC_OFFSET])) != crc:
        raise FrameError("CRC mismatch", reason="bad_checksum")
    if (
        flags & ~KNOWN_FLAGS
        or reserved
        or not 1 <= k <= n
        or index >= n
        or not BLOCK_OVERHEAD < block_length <= k * len(symbol)
        # One valid encoding: k is the fewest symbols that hold the block.
        or block_length <= (k - 1) * len(symbol)
    ):
        raise FrameError("inconsistent datagram header", reason="malformed")
    header = DatagramHeader(
        flags=flags,
        stream_id=stream_id,
        key_id=key_id,
        epoch=epoch,
        seq=seq,
        index=index,
        k=k,
        n=n,
        block_length=block_length,
        records=records,
        generation=1 if version == VERSION else 2,
    )
    return header, bytes(symbol)


def symbol_of(data: bytes | memoryview, *, check_crc: bool) -> bytes:
    """The symbol of a datagram whose header, but for the symbol index, is one that
    :func:`parse_datagram` took: the index and the CRC are all there is left to check
    (``check_crc`` False when the CRC was checked already)."""
    view = memoryview(data)
    version = view[2]
    if check_crc and not crc_ok(view, version):
        raise FrameError("CRC mismatch", reason="bad_checksum")
    symbol = view[HEADER_SIZE:-LINK_TAG_SIZE] if is_gated(version) else view[HEADER_SIZE:]
    if view[INDEX_OFFSET] >= view[N_OFFSET]:
        raise FrameError("inconsistent datagram header", reason="malformed")
    return bytes(symbol)


def pack_block_header(header: BlockHeader) -> bytes:
    return BLOCK_HEADER.pack(
        header.generation,
        header.flags,
        header.k,
        header.n,
        header.stream_id,
        header.key_id,
        header.epoch,
        header.seq,
        header.first_record,
        header.record_count,
        header.payload_length,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedBlock:
    """A rebuilt block cut into its parts (nothing checked but lengths)."""

    header: BlockHeader
    signed: memoryview  # the header and the payload
    payload: memoryview
    manifest: Manifest | None  # generation 3 only
    signature: memoryview


def parse_block(block: bytes | memoryview) -> ParsedBlock:
    """Split a rebuilt block into its parts, checking every length (one valid encoding)."""
    if len(block) < BLOCK_OVERHEAD:
        raise FrameError("block shorter than its header and signature", reason="malformed")
    (
        version,
        flags,
        k,
        n,
        stream_id,
        key_id,
        epoch,
        seq,
        first_record,
        record_count,
        payload_length,
    ) = BLOCK_HEADER.unpack_from(block)
    if version not in GENERATIONS:
        raise FrameError("block of an unknown generation", reason="malformed")
    view = memoryview(block)
    signed_end = BLOCK_HEADER_SIZE + payload_length
    manifest = None
    if version == 3 and len(block) >= BLOCK_OVERHEAD + payload_length + MANIFEST_HEAD.size:
        blocks, index = MANIFEST_HEAD.unpack_from(block, signed_end)
        if not index < blocks <= MAX_GROUP:
            raise FrameError("a manifest's G or slot is out of range", reason="malformed")
        others_at = signed_end + MANIFEST_HEAD.size
        manifest = Manifest(
            blocks=blocks,
            index=index,
            others=bytes(view[others_at : others_at + DIGEST_SIZE * (blocks - 1)]),
        )
    elif version == 3:
        raise FrameError("block length does not match its header", reason="malformed")
    extra = manifest_size(version, 0 if manifest is None else manifest.blocks)
    if len(block) != BLOCK_OVERHEAD + payload_length + extra:
        raise FrameError("block length does not match its header", reason="malformed")
    header = BlockHeader(
        flags=flags,
        k=k,
        n=n,
        stream_id=stream_id,
        key_id=key_id,
        epoch=epoch,
        seq=seq,
        first_record=first_record,
        record_count=record_count,
        payload_length=payload_length,
        generation=version,
    )
    return ParsedBlock(
        header=header,
        signed=view[:signed_end],
        payload=view[BLOCK_HEADER_SIZE:signed_end],
        manifest=manifest,
        signature=view[signed_end + extra :],
    )


def matches(block: BlockHeader, datagram: DatagramHeader) -> bool:
    """Does a datagram header say what the signed block header says?"""
    return (
        datagram_generation(block.generation) == datagram.generation
        and block.flags == datagram.flags
        and block.k == datagram.k
        and block.n == datagram.n
        and block.stream_id == datagram.stream_id
        and block.key_id == datagram.key_id
        and block.epoch == datagram.epoch
        and block.seq == datagram.seq
        and block.record_count == datagram.records
    )
