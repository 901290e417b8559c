"""Benchmarks of the sans-I/O core (``diode bench codec``).

Not part of the protocol path: this module reads the clock (CPU time with
``time.process_time``, wall time with ``time.perf_counter``), which the core
itself never does. It opens no socket and imports no asyncio.

``codec`` measures the two halves of the protocol at the default
:class:`LinkSettings` (1472-byte datagrams, k=32, repair 25 % + 16):

- encode: Sample records through :class:`Encoder` (msgpack, block framing,
  one Ed25519 signature and one Reed-Solomon encode per block);
- decode: the same datagrams, thinned by seeded random loss, through
  :class:`Decoder` (CRC, assembly, Reed-Solomon rebuild, signature check,
  record decoding, ordering and gap accounting).

The samples are what a PLC poller produces: a few thousand tags of float64,
integer and bool values, mostly GOOD, some BAD with a reason, 20-30 bytes
each once encoded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from diode.config.link import LinkSettings
from diode.decoder import Decoder, Delivered, Gap
from diode.encoder import Encoder
from diode.keys import Keyring, SigningKey, TrustedKey
from diode.records import Heartbeat, Quality, Record, Sample, encode_record

STREAM = 1
EPOCH = 1_764_000_000_000
TS_START_NS = 1_764_000_000_000_000_000
POOL = 20_000
# The decoder is given a simulated clock: datagrams arrive at this wire rate.
WIRE_BPS = 1e9
POLL_EVERY = 256
SEED = 20_240_601


def sample_pool(count: int = POOL, *, seed: int = SEED) -> list[Record]:
    """Realistic poller output: 40 % float64, 30 % integers, 30 % bools, 2 % BAD."""
    rng = random.Random(seed)  # reproducible test data, not a secret
    pool: list[Record] = []
    for i in range(count):
        tag = rng.randrange(5000)
        kind = tag % 10
        value: bool | int | float
        if kind < 4:
            value = rng.uniform(-1000.0, 1000.0)
        elif kind < 7:
            value = rng.randrange(-(2**31), 2**31) if kind == 6 else rng.randrange(65536)
        else:
            value = rng.random() < 0.5
        bad = rng.random() < 0.02
        pool.append(
            Sample(
                tag_id=tag,
                ts_ns=TS_START_NS + i * 1_000_000 + rng.randrange(1000),
                value=value,
                quality=Quality.BAD if bad else Quality.GOOD,
                reason="comm timeout" if bad else "",
            )
        )
    return pool


def _key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 2) if seconds > 0 else 0.0


def _us(seconds: float, count: int) -> float:
    return round(seconds / count * 1e6, 2) if count else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Encoded:
    datagrams: list[bytes]
    closer: tuple[bytes, ...]
    records: int
    record_bytes: int
    report: dict[str, object]


def _encode(link: LinkSettings, key: SigningKey, pool: list[Record], seconds: float) -> _Encoded:
    sizes = [len(encode_record(r)) for r in pool]
    encoder = Encoder(link=link, key=key, stream_id=STREAM, epoch=EPOCH)
    datagrams: list[bytes] = []
    records = record_bytes = blocks = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    # Check the budget once per 1000 records: reading the clock is not free.
    while records == 0 or time.process_time() - cpu0 < seconds:
        start = records % len(pool)
        for i in range(start, min(start + 1000, len(pool))):
            encoder.add(pool[i], 0.0)
            record_bytes += sizes[i]
            records += 1
        for block in encoder.take():
            datagrams.extend(block.datagrams)
            blocks += 1
    encoder.flush()
    for block in encoder.take():
        datagrams.extend(block.datagrams)
        blocks += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # One more block after the measured ones, which the decode passes never
    # lose: a stream's last blocks can only be counted as lost once something
    # authentic follows them (in service, the next heartbeat).
    encoder.add(Heartbeat(ts_ns=TS_START_NS), 0.0)
    encoder.flush()
    (closer,) = encoder.take()
    return _Encoded(
        datagrams=datagrams,
        closer=closer.datagrams,
        records=records,
        record_bytes=record_bytes,
        report={
            "records": records,
            "record_bytes": record_bytes,
            "record_bytes_avg": round(record_bytes / records, 1),
            "blocks": blocks,
            "datagrams": len(datagrams),
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "mb_per_s_cpu": _rate(record_bytes, cpu),
            "mb_per_s_wall": _rate(record_bytes, wall),
            "us_per_datagram_cpu": _us(cpu, len(datagrams)),
            "us_per_record_cpu": _us(cpu, records),
        },
    )


class _Tally:
    """What the decoder's events say about the measured records."""

    def __init__(self) -> None:
        self.delivered = 0
        self.reported_lost = 0
        self.gaps = 0
        self.inexact = 0

    def add(self, decoder: Decoder) -> None:
        for event in decoder.events():
            if isinstance(event, Delivered):
                self.delivered += sum(isinstance(r, Sample) for r in event.records)
            elif isinstance(event, Gap):
                self.reported_lost += event.records_lost
                self.gaps += 1
                self.inexact += not event.exact


def _decode(link: LinkSettings, key: SigningKey, run: _Encoded, loss: float) -> dict[str, object]:
    rng = random.Random(f"{SEED}-{loss}")  # a reproducible loss pattern
    kept = [d for d in run.datagrams if rng.random() >= loss]
    decoder = Decoder(Keyring([TrustedKey(stream_id=STREAM, public=key.private.public_key())]))
    # A simulated clock: datagrams arrive back to back at WIRE_BPS.
    tick = link.datagram_size * 8 / WIRE_BPS
    tally = _Tally()
    now = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i, datagram in enumerate(kept):
        now = i * tick
        decoder.receive(datagram, now)
        if i % POLL_EVERY == 0:
            deadline = decoder.deadline()
            if deadline is not None and deadline <= now:
                decoder.poll(now)
            tally.add(decoder)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for datagram in run.closer:
        decoder.receive(datagram, now)
    decoder.poll(now + 60.0)
    tally.add(decoder)
    # Throughput counts the payload of the records delivered, not of those sent.
    delivered_bytes = round(run.record_bytes * tally.delivered / run.records)
    counters = decoder.counters
    return {
        "loss": loss,
        "datagrams_sent": len(run.datagrams),
        "datagrams_received": len(kept),
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "mb_per_s_cpu": _rate(delivered_bytes, cpu),
        "mb_per_s_wall": _rate(delivered_bytes, wall),
        "us_per_datagram_cpu": _us(cpu, len(kept)),
        "records_sent": run.records,
        "records_delivered": tally.delivered,
        "records_missing": run.records - tally.delivered,
        "records_reported_lost": tally.reported_lost,
        "gaps": tally.gaps,
        "gaps_inexact": tally.inexact,
        "blocks_whole": counters["blocks_whole"],
        "blocks_rebuilt": counters["blocks_rebuilt"],
        "blocks_lost": counters["blocks_lost"],
    }


def codec(
    *, seconds: float = 2.0, losses: Sequence[float] = (0.0, 0.05, 0.20)
) -> dict[str, object]:
    """Encode for about ``seconds`` of CPU, then decode that output at each loss rate.

    Every decode pass replays the whole encoded run, so the total time is
    about ``seconds * (1 + len(losses) * decode cost / encode cost)``. The
    result is JSON-able: settings, the encode figures, one entry per loss rate.
    """
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    link = LinkSettings()
    key = _key()
    run = _encode(link, key, sample_pool(), seconds)
    fec = link.fec
    return {
        "settings": {
            "datagram_size": link.datagram_size,
            "k": fec.k,
            "repair_ratio": fec.repair_ratio,
            "repair_burst": fec.repair_burst,
            "n_full_block": fec.k + fec.repair_for(fec.k),
            "record": "Sample (40% float64, 30% int, 30% bool, 2% BAD with a reason)",
            "loss_model": "independent random datagram loss, seeded",
        },
        "encode": run.report,
        "decode": [_decode(link, key, run, loss) for loss in losses],
    }
