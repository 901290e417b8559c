"""The assembly table: its memory count is what the heap really holds, and the bound holds."""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import tracemalloc

import pytest

from diode.decoder import Decoder, DecoderSettings
from diode.wire import DatagramHeader, pack_datagram
from tests.core_support import EPOCH, STREAM, delivered, encode_blocks, feed, fixed_key, keyring
from tests.core_support import samples as make_samples


def _forged(count: int, *, symbol: int, k: int, n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    key_id = fixed_key().key_id
    length = max(113, (k - 1) * symbol + 1)
    return [
        pack_datagram(
            DatagramHeader(
                flags=0,
                stream_id=STREAM,
                key_id=key_id,
                epoch=EPOCH,
                seq=rng.randrange(2**40),
                index=rng.randrange(n),
                k=k,
                n=n,
                block_length=length,
                records=5,
            ),
            rng.randbytes(symbol),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize(("symbol", "k", "n"), [(1, 255, 255), (208, 8, 13), (1424, 32, 56)])
def test_the_count_covers_what_the_heap_holds(symbol: int, k: int, n: int) -> None:
    decoder = Decoder(keyring(fixed_key()), DecoderSettings(max_assembly_bytes=10**10))
    datagrams = _forged(5000, symbol=symbol, k=k, n=n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for datagram in datagrams:
        decoder.receive(datagram, 0.0)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert decoder.counters["symbols"] == 5000
    assert held <= decoder.assembly_bytes, "the bound would undercount the heap"
    assert decoder.assembly_bytes <= 1.6 * held, "so far over that the bound means little"


def test_the_oldest_single_symbol_assemblies_go_first() -> None:
    bound = 100_000
    decoder = Decoder(keyring(fixed_key()), DecoderSettings(max_assembly_bytes=bound))
    for datagram in _forged(5000, symbol=1, k=255, n=255):
        decoder.receive(datagram, 0.0)
        assert decoder.assembly_bytes <= bound
    assert decoder.counters["assemblies_evicted"] > 4000
    # The real stream still rebuilds: its assemblies hold two symbols and more.
    records = make_samples(200)
    blocks = encode_blocks(records, per_block=20)
    assert delivered(feed(decoder, [d for b in blocks for d in b])) == records


FLOOD = """
import random, resource, sys
from diode.decoder import Decoder, DecoderSettings
from diode.wire import DatagramHeader, pack_datagram
from tests.core_support import EPOCH, STREAM, fixed_key, keyring

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

bound = int(sys.argv[1])
count = int(sys.argv[2])
decoder = Decoder(keyring(fixed_key()), DecoderSettings(max_assembly_bytes=bound))
rng = random.Random(3)
key_id = fixed_key().key_id
start = hwm_kb()
for seq in range(count):
    header = DatagramHeader(flags=0, stream_id=STREAM, key_id=key_id, epoch=EPOCH, seq=seq,
        index=rng.randrange(255), k=255, n=255, block_length=255, records=1000)
    decoder.receive(pack_datagram(header, rng.randbytes(1)), 0.0)
print(start, hwm_kb(), decoder.assembly_bytes, decoder.counters["assemblies_evicted"])
"""


def test_vmhwm_stays_within_the_bound_under_a_flood_of_unique_tiny_datagrams() -> None:
    """The issue's figure: 200 000 unique 49-byte datagrams once held 159 MB against 0.2 MB."""
    bound = 16 * 1024 * 1024
    done = subprocess.run(
        [sys.executable, "-c", FLOOD, str(bound), "200000"],
        capture_output=True,
        text=True,
        check=True,
    )
    start_kb, peak_kb, counted, evicted = map(int, done.stdout.split())
    assert counted <= bound
    assert evicted > 0, "the flood must reach the bound, or it proves nothing"
    grown_kb = peak_kb - start_kb
    assert grown_kb <= bound // 1024 + 16 * 1024, f"VmHWM grew {grown_kb} kB"
