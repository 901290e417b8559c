"""The issue's fault model, simulated in the sans-I/O core: no sockets, a pinned clock.

Fault model: 5 % random datagram loss, plus a burst of 10 consecutive lost
datagrams every 2 s, at 10 MB/s of record payload. Requirement: at the
DEFAULT link settings no record is lost.

The pipeline is the transmitter's and the receiver's, stage by stage::

    records --> outbox --> Encoder (linger by simulated now) --> SendQueue (interleave)
        --> pacer (token bucket, wire bytes = datagram + 28) --> loss
        --> Decoder (now = send time + latency) --> Delivered / Gap

with the transmitter's backpressure: while the send queue holds its limit
(``[link] queue_ms`` of the link, at least ``interleave`` + 1 full blocks:
``TxLink.queue_limit``) no record is framed and records wait in the outbox,
until the pacer has sent it under its resume mark (``TxLink.queue_resume``).
The repair symbols of a block are sized for a burst landing wholly on it
(``repair_burst``), so no case here relies on the interleaving: where blocks
queue up, it only spreads a burst thinner.

Measured on the seeds below (``pytest -s`` prints them)::

    case                          blocks  datagrams  lost dgr  whole  rebuilt  lost  worst spare
    10 MB/s, steady, 1000 Mb/s      4233     237030     11898    816     3417     0    8 of 24
    10 MB/s, 100 ms cycles, 160     4379     238823     11981    949     3430     0   13 of 24
    20 samples/s (k'=1), 100 Mb/s    600      10800       694    552       48     0    6 of 17
    ~0.8 MB/s (k'=4), 100 Mb/s      4642      98166      5077   3714      928     0    5 of 17
    30 % loss, 10 MB/s, 4 s          861      46861     13997      8      845     8  (exact count)

Every run delivers every record and reports no gap; at 30 % loss the 1465
records of the 8 lost blocks are reported lost, exactly. In the poll-cycle
case the framer waits at the send queue's limit (667 datagrams at 160 Mb/s;
up to 3876 records held in the outbox, the queue at most 718). The flood uses
20 s of simulated time (10 bursts), the linger cases 30 s (15 bursts).

A 20-30 s run cannot see a rare event, so the last tests compute the long
run exactly: with the default repair_burst=12, a burst that falls wholly on
a lone block of k'=4..8 loses it with p = 2e-4, which at a burst every 2 s
is up to 8 lost blocks a day. repair_burst=16 brings that under one a year.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from diode.config.link import IPV4_UDP_OVERHEAD, FecSettings, LinkSettings
from diode.config.tx import TxLink
from diode.decoder import Decoder, Delivered, Gap
from diode.encoder import Encoder, SendQueue
from diode.keys import Keyring, TrustedKey
from diode.records import Heartbeat, Quality, Record, Sample, encode_record
from tests.core_support import EPOCH, STREAM, fixed_key

KEY = fixed_key()
TICK_S = 0.001
LATENCY_S = 0.0005
QUEUE_DATAGRAMS = 65536  # the transmitter's default queue_datagrams
TS0 = 1_764_000_000_000_000_000
SEQ = slice(24, 32)  # block sequence in the datagram header (diode/wire.py)
K_OFFSET, N_OFFSET = 33, 34


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    random_loss: float = 0.05
    burst: int = 10
    burst_every_s: float = 2.0


@dataclass(slots=True)
class Outcome:
    records_sent: int = 0
    records_delivered: int = 0
    records_reported_lost: int = 0
    gaps: list[Gap] = field(default_factory=list)
    blocks_sent: int = 0
    datagrams_sent: int = 0
    datagrams_lost: int = 0
    bursts: int = 0
    max_queue: int = 0
    queue_limit: int = 0
    max_waiting: int = 0  # records held in the outbox by the backpressure
    queue_dropped: int = 0
    worst_margin: int = 10**9  # fewest spare repair symbols left in any block
    sent_digest: str = ""
    delivered_digest: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counters
        return (
            f"blocks {self.blocks_sent}, datagrams {self.datagrams_sent}, "
            f"lost {self.datagrams_lost} ({self.bursts} bursts), "
            f"whole {c.get('blocks_whole', 0)}, rebuilt {c.get('blocks_rebuilt', 0)}, "
            f"lost blocks {c.get('blocks_lost', 0)}, worst spare {self.worst_margin}, "
            f"records sent {self.records_sent}, delivered {self.records_delivered}, "
            f"reported lost {self.records_reported_lost}, max queue {self.max_queue} "
            f"(limit {self.queue_limit}), most records held {self.max_waiting}"
        )


def simulate(
    *,
    link: LinkSettings,
    make_record: Callable[[int], Record],
    records_per_s: float,
    seconds: float,
    wire_mbps: float,
    faults: Faults,
    seed: int,
    cycle_s: float | None = None,
    closer: bool = False,
) -> Outcome:
    """Run the pipeline for ``seconds`` of simulated time; then drain it.

    Records arrive evenly, tick by tick, or with ``cycle_s`` all of a poll
    cycle's records at once (what a poller does), which fills the send queue
    with several blocks and lets the sender interleave them.

    With ``closer``, the first block (a start-up heartbeat) and one last
    heartbeat block are never lost: loss before the first or after the last
    authentic block is, by construction, invisible to a one-way receiver.
    """
    rng = random.Random(seed)
    out = Outcome()
    encoder = Encoder(link=link, key=KEY, stream_id=STREAM, epoch=EPOCH)
    tx_link = TxLink(destination="192.0.2.1", rate_mbps=wire_mbps, **link.model_dump())
    out.queue_limit = tx_link.queue_limit()
    queue = SendQueue(
        capacity=QUEUE_DATAGRAMS,
        interleave=link.interleave,
        limit=out.queue_limit,
        resume=tx_link.queue_resume(),
    )
    held = False
    waiting: deque[Record] = deque()  # the outbox
    decoder = Decoder(Keyring([TrustedKey(stream_id=STREAM, public=KEY.private.public_key())]))
    sent_hash, delivered_hash = hashlib.blake2b(), hashlib.blake2b()
    wire = link.datagram_size + IPV4_UDP_OVERHEAD
    bytes_per_tick = wire_mbps * 1e6 / 8 * TICK_S
    bucket_max = max(4 * wire, wire_mbps * 1e6 / 8 * 0.004)  # as transmitter/sender.py
    tokens = 0.0
    record_credit = 0.0
    next_burst = faults.burst_every_s / 2  # at 1 s, 3 s, 5 s...
    burst_left = 0
    lost_in: dict[int, int] = {}
    spare: dict[int, int] = {}
    protected = {0} if closer else set()

    def collect() -> None:
        for event in decoder.events():
            if isinstance(event, Delivered):
                for record in event.records:
                    if isinstance(record, Sample):
                        delivered_hash.update(encode_record(record))
                        out.records_delivered += 1
            elif isinstance(event, Gap):
                out.gaps.append(event)
                out.records_reported_lost += event.records_lost

    def ship() -> None:
        for block in encoder.take():
            assert queue.push(block) == 0, "the send queue overflowed"
            out.blocks_sent += 1
            spare[block.seq] = len(block.datagrams) - block.datagrams[0][K_OFFSET]
        out.max_queue = max(out.max_queue, len(queue))

    def frame(now: float) -> None:
        """The framer: records into blocks up to the queue's limit, then held until resume."""
        nonlocal held
        out.max_waiting = max(out.max_waiting, len(waiting))
        if held and not queue.has_room:
            return  # the open block waits too
        while waiting and not queue.full:
            encoder.add(waiting.popleft(), now)
            if encoder.blocks_ready:
                ship()
        encoder.poll(now)
        ship()
        held = queue.full

    def transmit(now: float, budget: float) -> float:
        nonlocal next_burst, burst_left
        while budget >= wire:
            datagram = queue.pop()
            if datagram is None:
                return min(budget, bucket_max)
            budget -= wire
            out.datagrams_sent += 1
            if now >= next_burst:
                next_burst += faults.burst_every_s
                burst_left = faults.burst
                out.bursts += 1
            seq = int.from_bytes(datagram[SEQ], "big")
            lost = burst_left > 0 or rng.random() < faults.random_loss
            burst_left = max(burst_left - 1, 0)
            if lost and seq not in protected:
                out.datagrams_lost += 1
                lost_in[seq] = lost_in.get(seq, 0) + 1
            else:
                decoder.receive(datagram, now + LATENCY_S)
        return budget

    if closer:
        encoder.add(Heartbeat(ts_ns=TS0), 0.0)
        encoder.flush()
    index = 0
    steps = round(seconds / TICK_S)
    cycle_steps = round(cycle_s / TICK_S) if cycle_s else 1
    for step in range(steps):
        now = step * TICK_S
        record_credit += records_per_s * TICK_S
        while step % cycle_steps == 0 and record_credit >= 1.0:
            record_credit -= 1.0
            record = make_record(index)
            index += 1
            sent_hash.update(encode_record(record))
            waiting.append(record)
        frame(now)
        tokens = transmit(now, min(tokens + bytes_per_tick, bucket_max + bytes_per_tick))
        deadline = decoder.deadline()
        if deadline is not None and deadline <= now:
            decoder.poll(now)
        collect()
    out.records_sent = index
    # Shutdown: frame what waits, room or not, flush the open block, then the
    # closing heartbeat, then drain.
    now = steps * TICK_S
    while waiting:
        encoder.add(waiting.popleft(), now)
        if encoder.blocks_ready:
            ship()
    encoder.flush()
    if closer:
        last = encoder.take()
        encoder.add(Heartbeat(ts_ns=TS0 + 1), 0.0)
        encoder.flush()
        (tail,) = encoder.take()
        protected.add(tail.seq)
        for block in [*last, tail]:
            queue.push(block)
            out.blocks_sent += 1
            spare[block.seq] = len(block.datagrams) - block.datagrams[0][K_OFFSET]
    ship()
    tokens = transmit(now, tokens + bytes_per_tick)
    while len(queue):
        now += TICK_S
        tokens = transmit(now, tokens + bytes_per_tick)
    decoder.poll(now + 60.0)
    collect()
    out.queue_dropped = queue.blocks_dropped
    out.worst_margin = min(spare[s] - lost_in.get(s, 0) for s in spare)
    out.sent_digest, out.delivered_digest = sent_hash.hexdigest(), delivered_hash.hexdigest()
    out.counters = dict(decoder.counters)
    return out


# -- records -----------------------------------------------------------------------

# The flood uses string-valued samples of ~250 bytes. The fault model acts on
# datagrams, and at a given payload rate full blocks give the same datagram
# stream whatever the record size (k' = 32 either way). Small samples (21 B,
# see diode/bench.py) would need 8 M records for 20 s at 10 MB/s, and the
# Python record codec (~3.5 us per record both ways) would make that minutes.
_TEXT = "".join(chr(0x61 + (i * 7) % 26) for i in range(400))


def big_sample(i: int) -> Record:
    return Sample(
        tag_id=i % 997,
        ts_ns=TS0 + i * 25_000,
        value=_TEXT[i % 150 : i % 150 + 230],
        quality=Quality.GOOD if i % 50 else Quality.UNCERTAIN,
        reason="" if i % 50 else "sensor drift",
    )


def small_sample(i: int) -> Record:
    value: bool | int | float = (i * 0.37) if i % 3 == 0 else (i % 2 == 0 if i % 3 == 1 else i)
    return Sample(tag_id=i % 40, ts_ns=TS0 + i * 50_000_000, value=value)


RATE_BYTES_PER_S = 10e6
FULL_BLOCK = FecSettings().k + FecSettings().repair_for(FecSettings().k)  # 56 datagrams
BIG_RECORD = len(encode_record(big_sample(0)))


def assert_no_loss(out: Outcome) -> None:
    assert out.queue_dropped == 0
    assert out.gaps == []
    assert out.records_delivered == out.records_sent
    assert out.delivered_digest == out.sent_digest
    assert out.counters.get("blocks_lost", 0) == 0


# -- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire_mbps", "cycle_s"),
    [
        # Records arrive evenly and the link is fast: each block is sent alone
        # (no interleaving) and a burst falls on one or two blocks.
        pytest.param(1000.0, None, id="steady-1000mbps"),
        # 10 MB/s of records is 137 Mb/s on the wire at the default FEC. A poll
        # cycle of 100 ms hands over ~22 blocks at once; at 160 Mb/s they take
        # 86 ms to send, 4 interleaved at a time.
        pytest.param(160.0, 0.1, id="cycles-160mbps"),
    ],
)
def test_default_settings_survive_the_fault_model_at_10_mb_per_s(
    wire_mbps: float, cycle_s: float | None
) -> None:
    out = simulate(
        link=LinkSettings(),
        make_record=big_sample,
        records_per_s=RATE_BYTES_PER_S / BIG_RECORD,
        seconds=20.0,
        wire_mbps=wire_mbps,
        faults=Faults(),
        seed=1,
        cycle_s=cycle_s,
    )
    print(f"\nflood at {wire_mbps} Mb/s, cycle {cycle_s}: {out.summary()}")
    assert out.bursts == 10
    assert out.records_sent * BIG_RECORD >= 0.99 * RATE_BYTES_PER_S * 20
    assert_no_loss(out)
    # Past its limit the queue takes only the block being framed and a lingering one.
    assert out.max_queue <= out.queue_limit + 2 * FULL_BLOCK
    if cycle_s is not None:
        assert out.max_waiting > 0, "a poll cycle's blocks filled the queue: the framer waited"


@pytest.mark.parametrize(
    ("make_record", "records_per_s", "k_block"),
    [
        # 20 samples/s: every block is closed by the linger and holds one record.
        pytest.param(small_sample, 20.0, 1, id="trickle-20-samples-per-s"),
        # ~0.8 MB/s: a block collects 6 ticks of records before the linger closes
        # it, ~4900 bytes, k'=4: the size the burst repair covers worst (below).
        pytest.param(big_sample, 4900 / 0.006 / BIG_RECORD, 4, id="linger-blocks-k4"),
    ],
)
def test_default_settings_survive_the_fault_model_with_linger_closed_blocks(
    make_record: Callable[[int], Record], records_per_s: float, k_block: int
) -> None:
    out = simulate(
        link=LinkSettings(),
        make_record=make_record,
        records_per_s=records_per_s,
        seconds=30.0,
        wire_mbps=100.0,
        faults=Faults(),
        seed=2,
    )
    print(f"\nlinger-closed blocks, {records_per_s:.0f} records/s: {out.summary()}")
    assert out.bursts == 15
    assert out.datagrams_sent / out.blocks_sent == pytest.approx(
        k_block + FecSettings().repair_for(k_block), rel=0.05
    )
    assert_no_loss(out)


@pytest.mark.parametrize("rate_mbps", [0.1, 2.0, 10.0, 100.0, 1000.0, 10_000.0])
def test_the_send_queue_limit_never_cuts_the_interleaving(rate_mbps: float) -> None:
    """At any rate the limit holds ``interleave`` + 1 full blocks: a busy link interleaves 4."""
    link = TxLink(destination="192.0.2.1", rate_mbps=rate_mbps)
    assert link.queue_limit() >= (link.interleave + 1) * FULL_BLOCK
    assert link.queue_limit() <= link.queue_datagrams - 2 * FULL_BLOCK
    carried = link.queue_ms / 1000 * rate_mbps * 1e6 / 8 / (link.datagram_size + IPV4_UDP_OVERHEAD)
    assert link.queue_limit() == max(math.ceil(carried), (link.interleave + 1) * FULL_BLOCK)


def test_heavy_loss_reports_exactly_the_records_it_lost() -> None:
    """30 % random loss (plus the bursts) exceeds the budget: every loss is counted exactly."""
    out = simulate(
        link=LinkSettings(),
        make_record=big_sample,
        records_per_s=RATE_BYTES_PER_S / BIG_RECORD,
        seconds=4.0,
        wire_mbps=200.0,
        faults=Faults(random_loss=0.30),
        seed=3,
        cycle_s=0.1,
        closer=True,
    )
    print(f"\n30 % loss: {out.summary()}")
    missing = out.records_sent - out.records_delivered
    assert out.counters["blocks_lost"] > 0
    assert missing > 0
    assert out.records_reported_lost == missing
    assert all(g.exact for g in out.gaps)
    assert out.counters["records_lost"] == missing


# -- the long run: a burst that falls wholly on one lone block ---------------------
#
# A 20-30 s run sees 10-15 bursts. In service a burst every 2 s is 15.8 M a
# year, so the rare case matters: when the link is not busy enough to
# interleave, a burst of 10 can fall wholly on one block, and that block then
# survives only if the 5 % random loss takes no more than its remaining spare.


def block_loss_given_whole_burst(fec: FecSettings, k: int, faults: Faults) -> float:
    """P(a block of k' source symbols is lost | a whole burst fell on it), exactly."""
    n = k + fec.repair_for(k)
    rest, allowed = n - faults.burst, n - k - faults.burst
    if allowed < 0:
        return 1.0
    p = faults.random_loss
    return sum(
        math.comb(rest, i) * p**i * (1 - p) ** (rest - i) for i in range(allowed + 1, rest + 1)
    )


BURSTS_PER_YEAR = 365 * 86400 / Faults().burst_every_s


def worst_blocks_lost_per_year(fec: FecSettings) -> tuple[float, int]:
    """Expected lost blocks a year if every burst fell on a lone block of the worst k'."""
    p, k = max((block_loss_given_whole_burst(fec, k, Faults()), k) for k in range(1, fec.k + 1))
    return p * BURSTS_PER_YEAR, k


def test_default_burst_repair_holds_for_a_year_of_bursts_on_lone_blocks() -> None:
    per_year, k = worst_blocks_lost_per_year(FecSettings())
    print(f"\ndefault FEC: worst k'={k}, {per_year:.0f} lost blocks a year")
    assert per_year < 1.0


def test_a_burst_repair_of_16_holds_for_a_year_of_bursts_on_lone_blocks() -> None:
    per_year, k = worst_blocks_lost_per_year(FecSettings(repair_burst=16))
    assert per_year < 1.0, (k, per_year)
    assert worst_blocks_lost_per_year(FecSettings(repair_burst=15))[0] > 1.0
