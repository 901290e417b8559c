"""Erasure coding of blocks: any k of n symbols rebuild a block, in one of two codes.

``Code.CAUCHY`` (wire versions 3 and 4, what a transmitter sends): Cauchy
Reed-Solomon over GF(2^8) from Intel's ISA-L, through pyeclib
(``isa_l_rs_cauchy``; the manylinux wheel bundles ISA-L and liberasurecode).
It is MDS for every k and n the wire allows (ISA-L's Vandermonde variant,
``isa_l_rs_vand``, is not beyond 4 parities) and encodes a full k=32, n=56
block of 1424-byte symbols about 15 x faster than zfec (see
docs/BENCHMARKS.md). pyeclib frames each fragment with an 80-byte header
that depends only on k, n, the symbol size and the fragment's index: it is
cut off before sending and rebuilt from an encode of zeros for decoding, so
the wire carries only the symbols.

``Code.RIZZO`` (wire versions 1 and 2, still accepted from older
transmitters): zfec's Rizzo Vandermonde code. Both codes are systematic: the
first k symbols are the block itself, so a block whose k sources all
arrive is rebuilt by joining them, with no decode at all.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from functools import lru_cache

import zfec
from pyeclib.ec_iface import ECDriver

from diode.errors import FrameError

# What pyeclib puts in front of every fragment (liberasurecode's fragment header).
_FRAGMENT_HEADER = 80


class Code(enum.Enum):
    RIZZO = "zfec"
    CAUCHY = "isa_l_rs_cauchy"


@lru_cache(maxsize=512)
def _rizzo_encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@lru_cache(maxsize=512)
def _rizzo_decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


@lru_cache(maxsize=512)
def _cauchy(k: int, n: int) -> ECDriver:
    return ECDriver(k=k, m=n - k, ec_type=Code.CAUCHY.value)


@lru_cache(maxsize=512)
def _fragment_headers(k: int, n: int, size: int) -> tuple[bytes, ...]:
    """The header pyeclib expects on each fragment index, for k symbols of ``size`` bytes."""
    return tuple(f[:_FRAGMENT_HEADER] for f in _cauchy(k, n).encode(bytes(k * size)))


def split(block: bytes, k: int, size: int) -> tuple[bytes, ...]:
    """The k source symbols of a block, zero-padded to k * size bytes."""
    padded = block.ljust(k * size, b"\0")
    return tuple(padded[i * size : (i + 1) * size] for i in range(k))


def encode(sources: tuple[bytes, ...], n: int, code: Code = Code.CAUCHY) -> list[bytes]:
    """All n symbols: the k sources followed by n - k repair symbols."""
    k = len(sources)
    if n == k:
        return list(sources)
    if code is Code.RIZZO:
        repair = _rizzo_encoder(k, n).encode(sources, tuple(range(k, n)))
        return [*sources, *repair]
    fragments = _cauchy(k, n).encode(b"".join(sources))
    return [*sources, *(f[_FRAGMENT_HEADER:] for f in fragments[k:])]


def encode_block(
    block: bytes, k: int, n: int, size: int, code: Code = Code.CAUCHY
) -> list[bytes | memoryview]:
    """``encode(split(block, k, size), n, code)`` for a block already padded to k * size bytes.

    The same symbols, without copying them: the sources are views of the
    block, ISA-L encodes the block as it is, and the repair symbols are views
    past pyeclib's fragment headers (a 45 KB block was copied four times
    before it reached the datagrams).
    """
    if len(block) != k * size:
        raise ValueError(f"a block of {len(block)} bytes is not {k} symbols of {size}")
    if code is not Code.CAUCHY:
        return list(encode(split(block, k, size), n, code))
    view = memoryview(block)
    sources = [view[i * size : (i + 1) * size] for i in range(k)]
    if n == k:
        return sources  # type: ignore[return-value]  # list is invariant; views are fine
    fragments = _cauchy(k, n).encode(block)
    return [*sources, *(memoryview(f)[_FRAGMENT_HEADER:] for f in fragments[k:])]


def decode(symbols: Mapping[int, bytes], k: int, n: int, code: Code = Code.CAUCHY) -> bytes:
    """Rebuild the padded block from any k symbols (index -> bytes)."""
    if all(i in symbols for i in range(k)):
        return b"".join(symbols[i] for i in range(k))
    use = sorted(symbols)[:k]
    if code is Code.RIZZO:
        parts = _rizzo_decoder(k, n).decode(tuple(symbols[i] for i in use), tuple(use))
        return b"".join(parts)
    size = len(symbols[use[0]])
    headers = _fragment_headers(k, n, size)
    try:
        return bytes(_cauchy(k, n).decode([headers[i] + symbols[i] for i in use]))
    except Exception as exc:  # pyeclib's errors share no useful base class
        raise FrameError(f"erasure decode failed: {exc}", reason="malformed") from exc
