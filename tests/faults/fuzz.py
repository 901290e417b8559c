"""Coverage-guided fuzzing of the receiver core (Decoder.receive) with atheris.

``python -m tests.faults.fuzz [-max_total_time=60] [-seed=N]`` (libFuzzer flags).

Structure-aware: each input picks datagrams from a pool of real ones (two
epochs, lone and full blocks, plain and encrypted) and mutates them where it
matters: header fields rewritten, bits flipped, truncated or extended, the
CRC recomputed or not, symbols swapped between blocks, sent twice or out of
order. The property: ``receive`` and ``poll`` never raise, every datagram
bumps exactly one counter of its fate, and assembly memory stays within its
bound. A crash or a broken property is a finding (libFuzzer writes the input).
"""

from __future__ import annotations

import sys
import zlib

import atheris

with atheris.instrument_imports():
    from diode import decoder as _decoder_module  # noqa: F401
    from diode.config.link import FecSettings, LinkSettings
    from diode.decoder import Decoder, DecoderSettings
    from diode.encoder import Encoder
    from diode.keys import Keyring, SigningKey, TrustedKey
    from diode.records import Heartbeat, Sample, TagInfo, ValueType
    from diode.wire import CRC_OFFSET, HEADER_SIZE

STREAM = 3
KEY = SigningKey.generate()
PSK = bytes(range(32))
LINK = LinkSettings(datagram_size=512, mtu=1500, fec=FecSettings(k=8, repair_burst=2))


def _pool() -> list[bytes]:
    out: list[bytes] = []
    for epoch, psk in ((1000, None), (2000, None), (3000, PSK)):
        enc = Encoder(link=LINK, key=KEY, stream_id=STREAM, epoch=epoch, psk=psk)
        enc.add(TagInfo(tag_id=1, name="t", device="d", value_type=ValueType.UINT64), 0.0)
        enc.flush()
        for i in range(200):
            enc.add(Sample(tag_id=1, ts_ns=i, value=i), 0.0)
        enc.add(Heartbeat(ts_ns=1, counters={"a": 1}), 0.0)
        enc.flush()
        for block in enc.take():
            out.extend(block.datagrams)
    return out


POOL = _pool()


def _recrc(d: bytearray) -> None:
    if len(d) > HEADER_SIZE:
        crc = zlib.crc32(d[HEADER_SIZE:], zlib.crc32(d[:CRC_OFFSET]))
        d[CRC_OFFSET : CRC_OFFSET + 4] = crc.to_bytes(4, "big")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    keyring = Keyring(
        [
            TrustedKey(
                stream_id=STREAM,
                public=KEY.private.public_key(),
                psk=fdp.PickValueInList([None, PSK]),
            )
        ]
    )
    dec = Decoder(keyring, DecoderSettings(max_assembly_bytes=64 * 1024))
    now = 0.0
    for _ in range(fdp.ConsumeIntInRange(1, 64)):
        op = fdp.ConsumeIntInRange(0, 7)
        base = bytearray(POOL[fdp.ConsumeIntInRange(0, len(POOL) - 1)])
        if op == 0:  # raw bytes
            d = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600)))
        elif op == 1:  # a header field rewritten, CRC made right
            at = fdp.ConsumeIntInRange(0, HEADER_SIZE - 1)
            base[at] = fdp.ConsumeInt(1) & 0xFF
            _recrc(base)
            d = base
        elif op == 2:  # a bit flipped in the symbol, CRC made right (a forged symbol)
            if len(base) > HEADER_SIZE:
                at = fdp.ConsumeIntInRange(HEADER_SIZE, len(base) - 1)
                base[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
            _recrc(base)
            d = base
        elif op == 3:  # truncated or extended
            d = base[: fdp.ConsumeIntInRange(0, len(base))] + fdp.ConsumeBytes(4)
        elif op == 4:  # time passes
            now += fdp.ConsumeIntInRange(0, 10_000) / 1000
            dec.poll(now)
            continue
        else:  # as sent (duplicates, reordering come from the choice of index)
            d = base
        before = sum(dec.counters.values())
        dec.receive(bytes(d), now)
        assert sum(dec.counters.values()) > before
        assert dec.assembly_bytes <= 64 * 1024 + 4096
    dec.poll(now + 100)
    dec.events()


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
