"""The issue's fault model, simulated in the sans-I/O core: no sockets, a pinned clock.

Fault model: 5 % random datagram loss, plus a burst of 10 consecutive lost
datagrams every 2 s, at 10 MB/s of record payload. Requirement: at the
DEFAULT link settings no record is lost.

The pipeline is the transmitter's and the receiver's, stage by stage::

    records --> outbox --> Encoder (linger by simulated now) --> SendQueue (interleave)
        --> pacer (token bucket, wire bytes = datagram + 28) --> loss
        --> Decoder (now = send time + latency) --> Delivered / Gap

with the transmitter's backpressure: while the send queue holds its limit
(``[link] queue_ms`` of the link, at least ``interleave`` + 1 of the largest
blocks: ``TxLink.queue_limit``) no record is framed and records wait in the
outbox, until the pacer has sent it under its resume mark
(``TxLink.queue_resume``).

A block sent alone has repair symbols for a burst landing wholly on it
(``repair_burst``); a full block travels only in a group of ``group``, sent
round-robin, and has repair for its share of a burst (``group_repair_burst``).
No case relies on the send queue's interleaving of units: it only spreads a
burst thinner.

Measured on the seeds below (``pytest -s`` prints them)::

    case                          blocks (grouped) datagrams lost dgr whole rebuilt lost spare
    10 MB/s, steady, 1000 Mb/s      4376      (0)   240614   12065   954    3422    0    10
    10 MB/s, 100 ms cycles, 160     4379   (3980)   210964   10577   991    3388    0     8
    70 MB/s, 1000 Mb/s, 6 s         9328   (9324)   457074   23057  1748    7580    0     8
    20 samples/s (k'=1), 100 Mb/s    600      (0)    10800     694   552      48    0     6
    ~0.8 MB/s (k'=4), 100 Mb/s      4642      (0)    98166    5077  3714     928    0     5
    30 % loss, 10 MB/s, 4 s          861    (780)    41401   12394     6     712  143  (exact)

Every run delivers every record and reports no gap; at 30 % loss (beyond the
budget) the 26199 records of the 143 lost blocks are reported lost, exactly.
Before groups (every full block alone at n 56) the same seeds sent 237030
datagrams in the steady case, 238823 in the poll-cycle one. Now a steady
10 MB/s fills a block in 4.5 ms, too slow for a group of 4 in the 5 ms
linger: blocks go alone at k' 31 (n' 55), +1.5 % datagrams. A poll cycle
hands over ~22 blocks at once, which go in groups at n 49: -11.7 %. At
70 MB/s 9324 of 9328 blocks go in groups. In the poll-cycle case the framer
waits at the send queue's limit (667 datagrams at 160 Mb/s; up to 3876
records held in the outbox, the queue at most 839, within
``TxLink.past_limit``). The floods use 20 s of simulated time (10 bursts),
the full-rate one 6 s (3), the linger cases 30 s (15 bursts).

A 20-30 s run cannot see a rare event, so the last tests compute the long
run exactly, over every place a burst can fall: on a lone block of each k'
(the worst, k' = 12: 0.33 lost blocks a year), on groups, across their
boundaries and on the tail of a draining queue (0.13 a year at the worst
place), plus random loss alone on full blocks filling a 1000 Mb/s link (0.53
a year with group_repair_burst = 9; 8 would lose 4): 0.85 a year in all.
(With repair_burst = 12, a burst wholly on a lone block of k' = 4..8 lost it
with p = 2e-4, up to 8 lost blocks a day; 16 brought that under one a year.)
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
from diode.encoder import EncodedBlock, Encoder, SendQueue
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
    blocks_grouped: int = 0
    datagrams_sent: int = 0
    datagrams_lost: int = 0
    bursts: int = 0
    max_queue: int = 0
    queue_limit: int = 0
    past_limit: int = 0  # what the framer may still hand over at the limit
    max_waiting: int = 0  # records held in the outbox by the backpressure
    queue_dropped: int = 0
    worst_margin: int = 10**9  # fewest spare repair symbols left in any block
    sent_digest: str = ""
    delivered_digest: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        c = self.counters
        return (
            f"blocks {self.blocks_sent} ({self.blocks_grouped} in groups), "
            f"datagrams {self.datagrams_sent}, "
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
    out.past_limit = tx_link.past_limit()
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

    def count(unit: EncodedBlock) -> None:
        out.blocks_sent += unit.blocks
        out.blocks_grouped += unit.blocks if unit.blocks > 1 else 0
        for datagram in unit.datagrams[: unit.blocks]:  # a group's first row: one of each
            spare[int.from_bytes(datagram[SEQ], "big")] = datagram[N_OFFSET] - datagram[K_OFFSET]

    def ship() -> None:
        for block in encoder.take():
            assert queue.push(block) == 0, "the send queue overflowed"
            count(block)
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
            count(block)
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


def huge_sample(i: int) -> Record:
    """A 1.3 KB string sample: a full rate flood in fewer records (the codec's cost is per record).

    Under a symbol (1424 bytes), so a block closed by size always holds k symbols:
    a record larger than that can close a block at k - 1, which then goes alone.
    """
    return Sample(tag_id=i % 997, ts_ns=TS0 + i * 1000, value=_TEXT[i % 150 : i % 150 + 240] * 5)


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
LARGEST_BLOCK = FecSettings().most_symbols()  # 55 datagrams: k' = 31, alone
BIG_RECORD = len(encode_record(big_sample(0)))


def at_the_defaults(
    make_record: Callable[[int], Record],
    records_per_s: float,
    *,
    seconds: float,
    wire_mbps: float,
    seed: int,
    cycle_s: float | None = None,
) -> Outcome:
    """The fault model at the default link settings."""
    return simulate(
        link=LinkSettings(),
        make_record=make_record,
        records_per_s=records_per_s,
        seconds=seconds,
        wire_mbps=wire_mbps,
        faults=Faults(),
        seed=seed,
        cycle_s=cycle_s,
    )


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
    out = at_the_defaults(
        big_sample,
        RATE_BYTES_PER_S / BIG_RECORD,
        seconds=20.0,
        wire_mbps=wire_mbps,
        seed=1,
        cycle_s=cycle_s,
    )
    print(f"\nflood at {wire_mbps} Mb/s, cycle {cycle_s}: {out.summary()}")
    assert out.bursts == 10
    assert out.records_sent * BIG_RECORD >= 0.99 * RATE_BYTES_PER_S * 20
    assert_no_loss(out)
    # Past its limit the queue takes only the group being framed and what lingered.
    assert out.max_queue <= out.queue_limit + out.past_limit
    if cycle_s is not None:
        assert out.max_waiting > 0, "a poll cycle's blocks filled the queue: the framer waited"


def test_default_settings_survive_the_fault_model_at_full_rate_in_groups() -> None:
    """70 MB/s of records on a 1000 Mb/s link (77 MB/s at most at n' 49): full blocks in groups."""
    rate = 70e6 / len(encode_record(huge_sample(0)))
    out = at_the_defaults(huge_sample, rate, seconds=6.0, wire_mbps=1000.0, seed=4)
    print(f"\nflood at 70 MB/s, 1000 Mb/s: {out.summary()}")
    assert out.bursts == 3
    assert out.blocks_grouped >= 0.95 * out.blocks_sent
    assert out.datagrams_sent / out.blocks_sent < 49.5
    assert_no_loss(out)


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
    out = at_the_defaults(make_record, records_per_s, seconds=30.0, wire_mbps=100.0, seed=2)
    print(f"\nlinger-closed blocks, {records_per_s:.0f} records/s: {out.summary()}")
    assert out.bursts == 15
    assert out.datagrams_sent / out.blocks_sent == pytest.approx(
        k_block + FecSettings().repair_for(k_block), rel=0.05
    )
    assert_no_loss(out)


@pytest.mark.parametrize("rate_mbps", [0.1, 2.0, 10.0, 100.0, 1000.0, 10_000.0])
def test_the_send_queue_limit_never_cuts_the_interleaving(rate_mbps: float) -> None:
    """At any rate the limit holds ``interleave`` + 1 blocks: a busy link interleaves 4."""
    link = TxLink(destination="192.0.2.1", rate_mbps=rate_mbps)
    assert link.queue_limit() >= (link.interleave + 1) * LARGEST_BLOCK
    # A group being framed (4 x 49) and the linger's blocks alone (8 x 55) fit under the ceiling.
    assert link.past_limit() == 4 * 49 + 8 * 55
    assert link.queue_limit() <= link.queue_datagrams - link.past_limit()
    carried = link.queue_ms / 1000 * rate_mbps * 1e6 / 8 / (link.datagram_size + IPV4_UDP_OVERHEAD)
    assert link.queue_limit() == max(math.ceil(carried), (link.interleave + 1) * LARGEST_BLOCK)


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


# -- the long run: where a burst can fall, computed exactly -------------------------
#
# A 20-30 s run sees 10-15 bursts. In service a burst every 2 s is 15.8 M a
# year, so the rare case matters. A burst of B consecutive lost datagrams
# costs each block it touches its *share*: all B for a block sent alone (the
# link was not busy enough to interleave), at most ceil(B / group) for a
# block of a group, whose datagrams leave round-robin. A block survives if
# the 5 % random loss takes no more than what its share left of its spare.
# Random loss alone also costs: at 1000 Mb/s the link sends 5.4e10 full blocks
# a year, so a full block's spare must hold there too (it sets
# group_repair_burst: 9, where 8 would lose about 4 blocks a year).


def block_loss_given_share(n: int, k: int, share: int, p: float = Faults().random_loss) -> float:
    """P(a block of k' source symbols and n' datagrams is lost | ``share`` of a burst on it)."""
    rest, allowed = n - share, n - k - share
    if allowed < 0:
        return 1.0
    return sum(
        math.comb(rest, i) * p**i * (1 - p) ** (rest - i) for i in range(allowed + 1, rest + 1)
    )


def block_loss_given_whole_burst(fec: FecSettings, k: int, faults: Faults) -> float:
    """P(a block of k' source symbols is lost | a whole burst fell on it), exactly."""
    return block_loss_given_share(k + fec.repair_for(k), k, faults.burst, faults.random_loss)


BURSTS_PER_YEAR = 365 * 86400 / Faults().burst_every_s
SECONDS_PER_YEAR = 365 * 86400
CAP_MBPS = 1000.0


def worst_blocks_lost_per_year(fec: FecSettings) -> tuple[float, int]:
    """Expected lost blocks a year if every burst fell on a lone block of the worst k'."""
    p, k = max(
        (block_loss_given_whole_burst(fec, k, Faults()), k) for k in range(1, fec.k_alone + 1)
    )
    return p * BURSTS_PER_YEAR, k


def on_the_wire(units: list[list[EncodedBlock]], interleave: int) -> list[tuple[int, int, int]]:
    """(seq, k', n') of each datagram in the order the SendQueue sends it.

    ``units`` is pushed in turns: each turn's units are queued, then the queue
    is popped until it holds one datagram more than the next turn's first unit
    would need (the queue draining between pushes), and the last turn drained.
    """
    queue = SendQueue(capacity=QUEUE_DATAGRAMS, interleave=interleave)
    order: list[bytes] = []
    for turn in units:
        for unit in turn:
            queue.push(unit)
        while len(queue) > 1:
            order.append(queue.pop() or b"")
        # The socket could not take the last two: they are put back, in order.
        popped = [queue.pop() or b""]
        queue.requeue_all(popped)
    while (datagram := queue.pop()) is not None:
        order.append(datagram)
    return [(int.from_bytes(d[SEQ], "big"), d[K_OFFSET], d[N_OFFSET]) for d in order]


def burst_shares(order: list[tuple[int, int, int]], burst: int) -> list[dict[int, int]]:
    """For each offset of a burst of ``burst`` datagrams: the datagrams it takes from each block."""
    shares = []
    for start in range(len(order) - burst + 1):
        share: dict[int, int] = {}
        for seq, _, _ in order[start : start + burst]:
            share[seq] = share.get(seq, 0) + 1
        shares.append(share)
    return shares


def worst_burst(order: list[tuple[int, int, int]], faults: Faults) -> float:
    """The most blocks a burst is expected to lose, over every place it can fall."""
    shape = {seq: (k, n) for seq, k, n in order}
    return max(
        sum(block_loss_given_share(shape[seq][1], shape[seq][0], s) for seq, s in share.items())
        for share in burst_shares(order, faults.burst)
    )


def random_loss_per_year(fec: FecSettings, rate_mbps: float = CAP_MBPS) -> float:
    """Blocks a year that random loss alone destroys, full blocks filling the link."""
    n = fec.k + fec.repair_for(fec.k)
    blocks_per_s = rate_mbps * 1e6 / 8 / (n * (LinkSettings().datagram_size + IPV4_UDP_OVERHEAD))
    return block_loss_given_share(n, fec.k, 0) * blocks_per_s * SECONDS_PER_YEAR


def traffic(fec: FecSettings) -> list[list[EncodedBlock]]:
    """A busy link that drains: what a wrong design would get wrong, in turns of the framer.

    Groups back to back; a heartbeat flushed between two groups (a lone block
    beside them); records that stop mid-group, so the linger sends the held
    full blocks alone at the tail, while the queue drains; and a trickle's
    small block after it, alone on an empty link.
    """
    encoder = Encoder(link=LinkSettings(fec=fec), key=KEY, stream_id=STREAM, epoch=EPOCH)
    turns: list[list[EncodedBlock]] = []
    index = 0

    def add(now: float, *, groups: int = 0, full: int = 0, records: int = 0) -> None:
        """Records until ``groups`` groups' worth of blocks are framed and ``full`` blocks held.

        Then ``records`` more. (Without groups, a group's worth of blocks goes alone.)
        """
        nonlocal index
        turn: list[EncodedBlock] = []
        while sum(u.blocks for u in turn) + encoder.full_blocks_held < groups * fec.group + full:
            encoder.add(big_sample(index), now)
            index += 1
            turn += encoder.take()
        for _ in range(records):
            encoder.add(big_sample(index), now)
            index += 1
        turns.append(turn + encoder.take())

    add(0.0, groups=2, records=3)  # two groups and the start of a third
    encoder.add(Heartbeat(ts_ns=TS0), 0.0)  # a heartbeat flushes: what is held goes alone
    encoder.flush()
    turns.append(encoder.take())
    add(0.001, groups=1, full=3, records=5)  # a group, three full blocks held, an open one
    encoder.poll(0.010)  # the linger is up: they go alone, at the tail of a draining queue
    turns.append(encoder.take())
    for _ in range(2):
        encoder.add(small_sample(index), 0.5)
        index += 1
    encoder.poll(0.6)  # a trickle's block, alone on an empty link
    turns.append(encoder.take())
    return turns


def test_a_burst_costs_a_grouped_block_its_share_wherever_it_falls() -> None:
    """At every offset, burst lengths 1..40: a grouped block gives at most ceil(B / group).

    Group boundaries, a lone block beside groups, the interleaving of units,
    datagrams put back, the tail of a draining queue: a block whose stride were
    broken would give more. Every block not in a group has the whole burst
    repair (n' = k' + ratio part + ``repair_burst``), and no block alone holds k.
    """
    fec = FecSettings()
    turns = traffic(fec)
    grouped = {u.seq + i for turn in turns for u in turn if u.blocks > 1 for i in range(u.blocks)}
    assert len(grouped) >= 3 * fec.group
    for interleave in (1, 4):
        order = on_the_wire(turns, interleave)
        shape = {seq: (k, n) for seq, k, n in order}
        assert len(shape) > len(grouped) + 4, "blocks alone at the tail and beside the groups"
        for seq, (k, n) in shape.items():
            if seq in grouped:
                assert (k, n) == (fec.k, fec.k + fec.repair_for(fec.k)) == (32, 49)
            else:
                assert k <= fec.k_alone
                assert n - k == math.ceil(k * fec.repair_ratio) + fec.repair_burst
        for burst in range(1, 41):
            for share in burst_shares(order, burst):
                for seq, lost in share.items():
                    assert seq not in grouped or lost <= -(-burst // fec.group), (burst, seq)


def test_default_fec_holds_for_a_year_of_bursts_wherever_they_fall() -> None:
    """Bursts on lone blocks of every k', on groups, their boundaries, the tail; random loss."""
    fec = FecSettings()
    lone_per_year, worst_k = worst_blocks_lost_per_year(fec)
    traffic_per_burst = max(worst_burst(on_the_wire(traffic(fec), i), Faults()) for i in (1, 4))
    random_per_year = random_loss_per_year(fec)
    per_year = max(lone_per_year, traffic_per_burst * BURSTS_PER_YEAR) + random_per_year
    print(
        f"\ndefault FEC: bursts on a lone block (worst k'={worst_k}) {lone_per_year:.2f} a year, "
        f"on the traffic's worst place {traffic_per_burst * BURSTS_PER_YEAR:.2f}, "
        f"random loss of full blocks at {CAP_MBPS:.0f} Mb/s {random_per_year:.2f}: "
        f"{per_year:.2f} lost blocks a year"
    )
    assert per_year < 1.0


def test_the_year_fails_for_a_design_that_sends_a_light_full_block_alone() -> None:
    """The checks above can fail: full blocks with the group's repair but no group."""
    light = FecSettings(group=1, repair_burst=9)  # n 49 for k 32, every block alone
    order = on_the_wire(traffic(light), 4)
    assert worst_burst(order, Faults()) * BURSTS_PER_YEAR > 1000
    # And a group's repair one symbol short loses full blocks to random loss alone.
    assert random_loss_per_year(FecSettings(group_repair_burst=8)) > 1.0


def test_a_burst_repair_of_16_holds_for_a_year_of_bursts_on_lone_blocks() -> None:
    per_year, k = worst_blocks_lost_per_year(FecSettings(repair_burst=16))
    assert per_year < 1.0, (k, per_year)
    assert worst_blocks_lost_per_year(FecSettings(repair_burst=15))[0] > 1.0
