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

A Cauchy block missing a few sources (at most ``FEW``: 1 % of datagrams lost
leaves one missing in 23 % of full blocks, two or more in 4 %) is rebuilt
here rather than by pyeclib, whose decode inverts a k x k matrix every time
(about 170 us for k 32 whether one source or seventeen are missing). The
code is linear: encode the block with the missing sources set to zero, and
each repair symbol that arrived differs from the one re-encoded by exactly
the missing sources' share, ``sum(C[r][j] * d[j])``. With e missing, e such
differences and the inverse of an e x e piece of the Cauchy matrix give the
sources back: one ISA-L encode and e * e table lookups per byte (bytes.translate).
The coefficients C are read from pyeclib itself (an encode of unit sources)
and checked to be ISA-L's Cauchy matrix, and this module's field is checked
once against an encode of a test pattern; if anything disagrees, the decode
stays pyeclib's.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from functools import lru_cache
from itertools import repeat

import zfec
from pyeclib.ec_iface import ECDriver

from diode.errors import FrameError

# What pyeclib puts in front of every fragment (liberasurecode's fragment header).
_FRAGMENT_HEADER = 80

# The most missing sources a Cauchy decode rebuilds without pyeclib: at 4 the
# e * e translations cost about what pyeclib's inversion does.
FEW = 3

# GF(2^8) as ISA-L builds it (polynomial x^8 + x^4 + x^3 + x^2 + 1), by logarithms.
_GF_POLY = 0x11D
_EXP = bytearray(512)
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i] = _EXP[_i + 255] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= _GF_POLY
del _i, _x


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


def _gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _gf_inv(a: int) -> int:
    return _EXP[255 - _LOG[a]]


@lru_cache(maxsize=256)
def _times(c: int) -> bytes:
    """The translation table that multiplies every byte by ``c``."""
    return bytes(_gf_mul(c, x) for x in range(256))


def _weights(k: int, n: int) -> tuple[bytes, ...] | None:
    """C[r][i], the weight of source i in repair symbol k + r, as pyeclib encodes (its
    encode of unit sources: one byte a source, at its own offset); None if it fails."""
    size = -(-k // 16) * 16  # 16-byte aligned
    units = bytearray(k * size)
    for i in range(k):
        units[i * size + i] = 1
    try:
        repair = [f[_FRAGMENT_HEADER:] for f in _cauchy(k, n).encode(bytes(units))[k:]]
    except Exception:  # pyeclib's errors share no useful base class
        return None
    return tuple(bytes(r[:k]) for r in repair)


@lru_cache(maxsize=1)
def _field_agrees() -> bool:
    """Does pyeclib multiply as this module does? Once a process: a pattern encoded by
    pyeclib against the same sums computed here (k 4, n 8)."""
    k, n, size = 4, 8, 16
    rows = _weights(k, n)
    pattern = bytes((7 * i + 13 * b + 1) % 256 for i in range(k) for b in range(size))
    try:
        repair = [f[_FRAGMENT_HEADER:] for f in _cauchy(k, n).encode(pattern)[k:]]
    except Exception:  # pyeclib's errors share no useful base class
        return False
    if rows is None:
        return False
    for row, got in zip(rows, repair, strict=True):
        for b in range(size):
            want = 0
            for i in range(k):
                want ^= _gf_mul(row[i], pattern[i * size + b])
            if got[b] != want:
                return False
    return True


@lru_cache(maxsize=4096)
def _is_cauchy(k: int, n: int) -> bool:
    """Is pyeclib's (k, n) code ISA-L's Cauchy matrix (``gf_gen_cauchy1_matrix``: repair
    symbol i weighs source j by 1 / (i xor j), whatever n is, so every code with the same
    k shares its first rows), in this module's field? If not, pyeclib decodes.

    A miss costs one encode of k x 16-byte sources and k * (n - k) lookups (140 us at
    k 31, n 48); only a bool is kept. The gate admits only the link profile's shapes,
    so a forger cycling through them pays that once per shape."""
    rows = _weights(k, n)
    if rows is None or not _field_agrees():
        return False
    return all(row[j] == _gf_inv(i ^ j) for i, row in enumerate(rows, start=k) for j in range(k))


def _invert(matrix: list[list[int]]) -> list[list[int]] | None:
    """The inverse of a small square matrix over GF(2^8), by Gauss-Jordan; None if singular."""
    e = len(matrix)
    work = [[*row, *(int(i == j) for j in range(e))] for i, row in enumerate(matrix)]
    for col in range(e):
        pivot = next((r for r in range(col, e) if work[r][col]), None)
        if pivot is None:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        scale = _gf_inv(work[col][col])
        work[col] = [_gf_mul(scale, v) for v in work[col]]
        for r in range(e):
            if r != col and (factor := work[r][col]):
                work[r] = [v ^ _gf_mul(factor, p) for v, p in zip(work[r], work[col], strict=True)]
    return [row[e:] for row in work]


def _rebuild_few(
    symbols: Mapping[int, bytes], missing: list[int], k: int, n: int, size: int
) -> bytes | None:
    """The padded block, its ``missing`` sources rebuilt from as many repair symbols
    (see the module's docstring); None where pyeclib must decode instead."""
    if not _is_cauchy(k, n):
        return None
    repairs = [r for r in sorted(symbols) if r >= k][: len(missing)]
    if len(repairs) < len(missing):
        return None  # fewer than k symbols: pyeclib's decode says so (a FrameError)
    if len(missing) == 1:  # the common case, without the elimination's lists
        inverse: list[list[int]] | None = [[repairs[0] ^ missing[0]]]  # 1 / (1 / (i xor j))
    else:
        inverse = _invert([[_gf_inv(r ^ j) for j in missing] for r in repairs])
    if inverse is None:  # never for a Cauchy matrix; pyeclib would say why
        return None
    # Where the repair symbols used are among the first FEW, only those are encoded
    # again: a code with fewer repair symbols has the same first rows (both checked to be
    # ISA-L's Cauchy matrix), and costs less (16 against 28 us at k 32, n 49). Never more
    # codes than that: each is an ISA-L instance, and a forger picks which repairs come.
    m = repairs[-1] - k + 1
    code = _cauchy(k, k + m) if m <= FEW and _is_cauchy(k, k + m) else _cauchy(k, n)
    zeros = repeat(bytes(size), k)
    fragments = code.encode(b"".join(map(symbols.get, range(k), zeros)))
    differences = []
    for r in repairs:
        again = memoryview(fragments[r])[_FRAGMENT_HEADER:]
        if len(again) != size:
            return None  # pyeclib laid the block out otherwise: its decode knows how
        sent = int.from_bytes(symbols[r], "little")
        differences.append((sent ^ int.from_bytes(again, "little")).to_bytes(size, "little"))
    whole = dict(symbols)
    for j, weights in zip(missing, inverse, strict=True):
        source = 0
        for weight, difference in zip(weights, differences, strict=True):
            if weight:
                source ^= int.from_bytes(difference.translate(_times(weight)), "little")
        whole[j] = source.to_bytes(size, "little")
    return b"".join(map(whole.__getitem__, range(k)))


def decode_is_cheap(symbols: Mapping[int, bytes], k: int, code: Code = Code.CAUCHY) -> bool:
    """Whether :func:`decode` joins or rebuilds a few sources, without pyeclib's inversion."""
    missing = sum(1 for i in range(k) if i not in symbols)
    return missing == 0 or (code is Code.CAUCHY and missing <= FEW)


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
    missing = [i for i in range(k) if i not in symbols]
    if not missing:
        return b"".join(map(symbols.__getitem__, range(k)))
    use = sorted(symbols)[:k]
    if code is Code.RIZZO:
        parts = _rizzo_decoder(k, n).decode(tuple(symbols[i] for i in use), tuple(use))
        return b"".join(parts)
    size = len(symbols[use[0]])
    if len(missing) <= FEW and set(map(len, symbols.values())) == {size}:
        padded = _rebuild_few(symbols, missing, k, n, size)
        if padded is not None:
            return padded
    headers = _fragment_headers(k, n, size)
    try:
        return bytes(_cauchy(k, n).decode([headers[i] + symbols[i] for i in use]))
    except Exception as exc:  # pyeclib's errors share no useful base class
        raise FrameError(f"erasure decode failed: {exc}", reason="malformed") from exc
