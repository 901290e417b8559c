"""The erasure code: any k of n symbols rebuild the block, by either decode path.

A block missing at most ``fec.FEW`` sources is rebuilt by diode/fec.py from
one ISA-L encode; more, by pyeclib's decode. Both must give the same bytes
as the block that was sent, for every pattern of loss the repair covers.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diode import fec
from diode.errors import FrameError
from tests.core_support import encode_blocks, feed, fixed_key, new_decoder, samples
from tests.test_decoder import rejected


def symbols_of(block: bytes, k: int, n: int, size: int) -> list[bytes]:
    return [bytes(s) for s in fec.encode_block(block, k, n, size)]


@given(
    k=st.integers(1, 40),
    repair=st.integers(1, 20),
    size=st.sampled_from([1, 7, 16, 33, 64, 1424]),
    data=st.data(),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_k_symbols_rebuild_the_block(
    k: int, repair: int, size: int, data: st.DataObject
) -> None:
    n = k + repair
    block = data.draw(st.binary(min_size=k * size, max_size=k * size))
    sent = symbols_of(block, k, n, size)
    lost = data.draw(st.sets(st.integers(0, n - 1), max_size=repair))
    kept = {i: s for i, s in enumerate(sent) if i not in lost}
    assert fec.decode(kept, k, n) == block


@pytest.mark.parametrize(("k", "n"), [(32, 49), (32, 56), (8, 12)])
def test_each_few_missing_sources_are_rebuilt_here_as_pyeclib_would(k: int, n: int) -> None:
    """Every single missing source, from every repair symbol, and pairs and triples
    drawn at random: the rebuild without pyeclib (never None for these shapes)
    gives what pyeclib's own decode gives."""
    size = 1424
    block = os.urandom(k * size)
    sent = symbols_of(block, k, n, size)
    draw = random.Random(20261207)
    patterns = [([j], r) for j in range(k) for r in range(k, n)]
    for count in (2, fec.FEW):
        for _ in range(20):
            missing = sorted(draw.sample(range(k), count))
            patterns.append((missing, draw.randrange(k, n - count + 1)))
    for missing, first_repair in patterns:
        kept = {i: sent[i] for i in range(k) if i not in missing}
        kept.update({r: sent[r] for r in range(first_repair, first_repair + len(missing))})
        assert fec._rebuild_few(kept, missing, k, n, size) == block, (missing, first_repair)


@pytest.mark.parametrize(("k", "n"), [(1, 2), (32, 49), (32, 56), (127, 255)])
def test_pyeclibs_coefficients_are_isa_ls_cauchy_matrix(k: int, n: int) -> None:
    """ISA-L's gf_gen_cauchy1_matrix: repair symbol i (from k) weighs source j by
    1 / (i xor j), read from pyeclib's own encode; what the rebuild relies on."""
    rows = fec._weights(k, n)
    assert rows is not None
    assert [list(row) for row in rows] == [
        [fec._gf_inv(i ^ j) for j in range(k)] for i in range(k, n)
    ]
    assert fec._is_cauchy(k, n)


def test_the_field_is_isa_ls() -> None:
    """x^8 + x^4 + x^3 + x^2 + 1: 2 generates it, and every element has its inverse."""
    assert len({fec._EXP[i] for i in range(255)}) == 255
    assert all(fec._gf_mul(a, fec._gf_inv(a)) == 1 for a in range(1, 256))
    assert fec._gf_mul(0x80, 2) == 0x1D


def test_symbols_of_unequal_sizes_are_a_frame_error_either_way() -> None:
    k, n, size = 8, 16, 16
    sent = symbols_of(os.urandom(k * size), k, n, size)
    for missing in (1, fec.FEW + 1):
        kept = {i: sent[i] for i in range(missing, missing + k)}
        kept[missing + 1] = kept[missing + 1][:10]
        with pytest.raises(FrameError):
            fec.decode(kept, k, n)


def test_fewer_than_k_symbols_are_a_frame_error() -> None:
    k, n, size = 8, 12, 16
    sent = symbols_of(os.urandom(k * size), k, n, size)
    for missing in (1, fec.FEW + 1):  # whichever path would rebuild them
        with pytest.raises(FrameError):
            fec.decode({i: sent[i] for i in range(missing, k)}, k, n)


def test_a_forgery_missing_one_source_resent_is_known_without_a_second_verify() -> None:
    """No digest of the fed symbols is taken for a cheap rebuild: what the rebuild
    gives (the signed message) is what marks the forgery."""
    real, attacker = fixed_key(1), fixed_key(2)
    object.__setattr__(attacker, "key_id", real.key_id)  # claim the real key's id
    (block,) = encode_blocks(samples(10), key=attacker)
    k = block[0][33]
    fed = [*block[1:k], block[k]]  # source 0 missing, the first repair symbol in its place
    decoder = new_decoder(real)
    feed(decoder, fed)
    feed(decoder, fed)
    assert rejected(decoder) == {"rejected_bad_signature": 1, "rejected_known_forgery": 1}
    assert decoder.counters["verifies"] == 1
