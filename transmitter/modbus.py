"""The Modbus TCP poller: one device, its units and tags, polled on a steady beat.

::

    ModbusDevice --plan_device--> [ReadRequest...]     (once, at start)

    at start, then every poll_interval_s on the device's own phase
    (monotonic ticks; missed ticks are skipped, not caught up):
        links (max_in_flight TCP connections, each one request at a time)
            --read--> registers/bits --modbus_codec--> Sample --> SampleSink.sample
        on a fresh connection: 43/14 Device Identification --> SampleSink.device

What the field taught (FIELD.md) and how it is handled here:

- One dead unit must not stall the others: a request that times out marks its
  unit dead *for this cycle*, so the unit's other requests are answered BAD
  "timeout" at once instead of each waiting out its own timeout.
- No reconnect storms and no 100% CPU (pymodbus #1635, #1794): pymodbus's own
  reconnect and "close after N timeouts" are switched off; a lost connection is
  closed and reopened by us after an exponential backoff with jitter and a cap,
  while every cycle still reports each tag BAD "disconnected", so the receiver
  always sees an honest quality.
- Every sample's ts_ns is taken when its read completed.
- The device's state is logged when it changes, not per cycle: a device that
  stops answering (``modbus.device_down``, cause ``disconnected`` or
  ``timeout`` with the units that timed out) and its recovery
  (``modbus.device_up``, with how long it was down). A flapping device is
  logged at most once per ``STATE_LOG_INTERVAL_S``; the changes in between are
  counted in the next line (``changes_unlogged``), and the state it settles in
  is always logged.
- Devices do not all fire at the same instant: after the first poll (at once,
  so values come quickly after a start) each device keeps its own phase within
  the interval, from a hash of its name (stable across restarts). Polled
  together, 400 devices queued each second's requests into one burst and 2.5 %
  of their cycles overran at 0.44 of a core; spread, none did
  (docs/BENCHMARKS.md section 5). It spreads the load on shared gateways and
  networks too.
- Some devices refuse a read that spans unused addresses (exception 2, or 3).
  Such a read is split (``modbus_plan.split``) into reads of the tags'
  addresses only, read at once, in the same cycle, so no value is lost or BAD
  for it; the split replaces the read for the rest of the run, is counted
  (``splits``) and logged once per device.

Cost per request (docs/BENCHMARKS.md section 5): register answers are decoded
by our own response classes, which keep the answer's bytes (one
``struct.unpack_from`` for the register list instead of one per register, and
no text rendering of every answer for a debug line that is never written),
and each tag is read from those bytes by a reader prepared once at start
(``modbus_codec.reader``). pymodbus times a request out by itself; our guard
against it not doing so is one watchdog per cycle, not a timer per request
(an ``asyncio.timeout`` per request was 9 % of the transmitter's CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from diode.config.modbus import ModbusDevice, ModbusTag, Table
from diode.records import DeviceInfo, Quality, Sample, TagInfo
from transmitter.modbus_codec import CodecError, Decoded, Reader, reader, scaled
from transmitter.modbus_plan import ReadRequest, plan_device, split
from transmitter.sink import SampleSink

# Modbus Application Protocol v1.1b3, section 7: exception codes.
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
# A gateway saying its target does not answer is a dead unit, like a timeout.
_UNIT_GONE = (10, 11)
# What devices answer to a read that spans addresses they do not have.
_REFUSED_SPAN = (2, 3)
# Device Identification basic and regular objects (section 6.21).
IDENTITY_NAMES = {
    0: "vendor_name",
    1: "product_code",
    2: "revision",
    3: "vendor_url",
    4: "product_name",
    5: "model_name",
    6: "user_application_name",
}
STATE_LOG_INTERVAL_S = 10.0
OK = "ok"
_NEVER_CLOSE = 2**31  # pymodbus closes a connection after N unanswered requests: not its call

log = structlog.get_logger(__name__)


class _KeepsBytes(ModbusPDU):
    """A register answer that keeps its register bytes, for the tag readers.

    pymodbus's own classes unpack the answer one register at a time, and its
    decoder renders every answer as text (``str(pdu)``, registers and all) for
    a debug line, whether debug logging is on or not: together 12 % of the
    transmitter's CPU at ~96-register reads. Registered per client, so nothing
    changes for other pymodbus users in the process.
    """

    payload: bytes = b""

    def decode(self, data: bytes) -> None:
        size = data[0]
        if size >= len(data):
            raise ModbusIOException(
                f"byte_count {size} > length of packet {len(data)}",
                function_code=self.function_code,
            )
        self.payload = bytes(data[1 : 1 + size])
        self.registers = list(struct.unpack_from(f">{size // 2}H", data, 1))

    def __str__(self) -> str:
        return (
            f"{type(self).__name__}(dev_id={self.dev_id}, "
            f"transaction_id={self.transaction_id}, registers={len(self.payload) // 2})"
        )


class _HoldingAnswer(_KeepsBytes, ReadHoldingRegistersResponse):
    """Function 3's answer, bytes kept."""


class _InputAnswer(_KeepsBytes, ReadInputRegistersResponse):
    """Function 4's answer, bytes kept."""


def _register_bytes(answer: ModbusPDU) -> bytes:
    if isinstance(answer, _KeepsBytes):
        return answer.payload
    registers: list[int] = list(answer.registers)
    return struct.pack(f">{len(registers)}H", *registers)


def _scaling(read: Reader, scale: float, offset: float) -> Reader:
    def read_scaled(data: bytes, at: int) -> Decoded:
        return scaled(read(data, at), scale, offset)

    return read_scaled


def phase_of(name: str) -> float:
    """Where in the poll interval a device's ticks fall, 0 <= phase < 1: stable, spread."""
    return zlib.crc32(name.encode()) / 2**32


def exception_reason(code: int) -> str:
    """``exception 2 (illegal data address)``."""
    return f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"


class _Outcome(enum.Enum):
    ANSWERED = "answered"
    TIMEOUT = "timeout"
    LOST = "lost"


class _Link:
    """One TCP connection to the device, with our own reconnect backoff."""

    def __init__(self, device: ModbusDevice, counters: dict[str, int]) -> None:
        self.device = device
        self.counters = counters
        self.client: AsyncModbusTcpClient | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.ever_connected = False
        self.fresh = False  # connected since the identity was last read
        # The request in flight, for the watchdog: since when, and who waits for it.
        self.asked_at: float | None = None
        self.waiter: asyncio.Task[Any] | None = None
        self.stuck = False  # the watchdog cancelled the waiter

    def _backoff(self) -> None:
        device = self.device
        delay = min(device.backoff_max_s, device.backoff_initial_s * 2.0 ** min(self.failures, 30))
        # Jitter spreads the reconnects of many transmitters after a plant network blip.
        delay *= random.uniform(0.5, 1.0)
        self.failures += 1
        self.retry_at = time.monotonic() + delay

    def drop(self) -> None:
        """Close a connection that failed; the next attempt waits out the backoff."""
        if self.client is not None:
            self.client.close()
            self.client = None
            self._backoff()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def ensure(self) -> bool:
        """Connected now? Tries to connect when the backoff allows; never raises."""
        if self.client is not None:
            if self.client.connected:
                return True
            self.drop()  # lost between two cycles
        if time.monotonic() < self.retry_at:
            return False
        device = self.device
        client = AsyncModbusTcpClient(
            device.host,
            port=device.port,
            timeout=device.timeout_s,
            retries=0,  # we retry, per request, and count it
            reconnect_delay=0,  # and we reconnect, with jitter and a cap
            name=f"modbus:{device.name}",
        )
        client.set_max_no_responses(_NEVER_CLOSE)
        client.register(_HoldingAnswer)
        client.register(_InputAnswer)
        connected = False
        with contextlib.suppress(TimeoutError, OSError, ModbusException):
            async with asyncio.timeout(device.timeout_s + 1.0):
                connected = await client.connect()
        if not connected:
            client.close()
            self._backoff()
            return False
        if self.ever_connected:
            self.counters["reconnects"] += 1
        self.ever_connected = True
        self.failures = 0
        self.fresh = True
        self.client = client
        return True


class ModbusPoller:
    """Polls one Modbus TCP device until cancelled; hands samples to ``sink``."""

    def __init__(
        self,
        device: ModbusDevice,
        *,
        tag_id: Callable[[str, str], int],
        sink: SampleSink,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.device = device
        self.sink = sink
        self.now_ns = now_ns
        self.counters: dict[str, int] = {
            "requests": 0,
            "errors": 0,
            "timeouts": 0,
            "reconnects": 0,
            "cycles": 0,
            "overruns": 0,
            "silent_reconnects": 0,
            "splits": 0,
        }
        self.plan: list[ReadRequest] = plan_device(device)
        self.catalogue: list[TagInfo] = []
        self.deadbands: dict[int, float] = {}
        self._ids: dict[str, int] = {}
        self._readers: dict[str, Reader] = {}  # register tags only
        for unit in device.units:
            for tag in unit.tags:
                ident = tag_id(device.name, tag.name)
                self._ids[tag.name] = ident
                if not tag.table.is_bits:
                    read = reader(
                        tag.type,
                        tag.order,
                        bit=tag.bit,
                        length=tag.length,
                        byte=tag.byte,
                        encoding=tag.encoding,
                    )
                    if tag.scale != 1.0 or tag.offset != 0.0:
                        read = _scaling(read, tag.scale, tag.offset)
                    self._readers[tag.name] = read
                self.deadbands[ident] = tag.deadband
                self.catalogue.append(
                    TagInfo(
                        tag_id=ident,
                        name=tag.name,
                        device=device.name,
                        value_type=tag.type,
                        unit=tag.unit,
                        source=self._source(unit.id, tag),
                        description=tag.description,
                    )
                )
        self._links = [_Link(device, self.counters) for _ in range(device.max_in_flight)]
        # The state last logged (cause, units), when, and the changes not logged since.
        self._state: tuple[str, tuple[int, ...]] = (OK, ())
        self._state_since = time.monotonic()
        self._state_logged_at = float("-inf")
        self._changes_unlogged = 0
        self._seen_state: tuple[str, tuple[int, ...]] = (OK, ())

    @property
    def endpoint(self) -> str:
        return f"{self.device.host}:{self.device.port}"

    def _source(self, unit: int, tag: ModbusTag) -> str:
        # The address as configured (in the device's address_base), as the user wrote it.
        where = f"modbus://{self.endpoint}/{unit}/{tag.table}/{tag.address}"
        return where if tag.bit is None else f"{where}.{tag.bit}"

    # --- the beat -------------------------------------------------------------------

    async def run(self) -> None:
        """Poll every ``poll_interval_s`` until cancelled; connections are closed on exit."""
        interval = self.device.poll_interval_s
        start = time.monotonic()
        # The second poll: the first tick on this device's phase at least half an
        # interval after the first, which is now.
        next_tick = start + phase_of(self.device.name) * interval
        while next_tick - start < interval / 2:
            next_tick += interval
        try:
            while True:
                await self.poll_once()
                now = time.monotonic()
                if now > next_tick:
                    # Overran: skip the missed ticks rather than firing them back to back.
                    missed = int((now - next_tick) // interval) + 1
                    self.counters["overruns"] += missed
                    next_tick += missed * interval
                await asyncio.sleep(next_tick - now)
                next_tick += interval
        finally:
            for link in self._links:
                link.close()

    async def poll_once(self) -> None:
        """One cycle: every tag of the device gets exactly one sample."""
        self.counters["cycles"] += 1
        links = [link for link in self._links if await link.ensure()]
        if not links:
            self._bad(self.plan, "disconnected")
            self._report("disconnected", ())
            return
        watchdog = asyncio.create_task(self._watchdog(links))
        try:
            dead = await self._cycle(links)
        finally:
            watchdog.cancel()
        if all(link.client is None for link in links):
            self._report("disconnected", ())
        elif dead:
            self._report("timeout", tuple(sorted(dead)))
        else:
            self._report(OK, ())

    def _report(self, cause: str, units: tuple[int, ...]) -> None:
        """Log the device's state when it changes, at most once per STATE_LOG_INTERVAL_S."""
        state = (cause, units)
        if state != self._seen_state:
            self._seen_state = state
            self._changes_unlogged += 1
        if state == self._state:
            return
        now = time.monotonic()
        if now - self._state_logged_at < STATE_LOG_INTERVAL_S:
            return  # logged when the interval is over, if the state still differs then
        unlogged = self._changes_unlogged - 1
        fields: dict[str, Any] = {"device": self.device.name, "endpoint": self.endpoint}
        if unlogged:
            fields["changes_unlogged"] = unlogged
        if cause == OK:
            log.info(
                "modbus.device_up",
                down_s=round(now - self._state_since, 1),
                **fields,
            )
        else:
            log.warning(
                "modbus.device_down",
                cause=cause,
                units=list(units),
                timeout_s=self.device.timeout_s,
                **fields,
            )
        if (cause == OK) != (self._state[0] == OK):
            self._state_since = now
        self._state = state
        self._state_logged_at = now
        self._changes_unlogged = 0

    async def _watchdog(self, links: list[_Link]) -> None:
        """Cut a request that pymodbus does not end by itself within twice its timeout.

        pymodbus times every request out (``timeout_s``); this guards against it
        not doing so, for every request of the cycle with one sleeping task. The
        request is then handled as a timeout.
        """
        limit = self.device.timeout_s * 2 + 1.0
        while True:
            await asyncio.sleep(limit / 2)
            now = time.monotonic()
            for link in links:
                asked, waiter = link.asked_at, link.waiter
                if asked is not None and now - asked > limit and waiter and not link.stuck:
                    link.stuck = True  # once: the waiter uncancels exactly one cancel
                    waiter.cancel()

    async def _cycle(self, links: list[_Link]) -> set[int]:
        """One cycle's requests over ``links``; returns the units that timed out."""
        fresh = next((link for link in links if link.fresh), None)
        if fresh is not None and self.device.read_identity:
            await self._read_identity(fresh)
            if fresh.client is None:
                links.remove(fresh)
        for link in links:
            link.fresh = False
        queue = deque(self.plan)
        dead: set[int] = set()
        async with asyncio.TaskGroup() as group:
            for link in links:
                group.create_task(self._lane(link, queue, dead))
        self._bad(queue, "disconnected")  # left over when every link was lost
        return dead

    async def _lane(self, link: _Link, queue: deque[ReadRequest], dead: set[int]) -> None:
        pause = self.device.request_pause_s
        answered = timed_out = 0
        while queue:
            request = queue.popleft()
            if request.unit in dead:
                self._bad([request], "timeout")
                continue
            outcome = await self._read(link, request, dead, queue)
            if outcome is _Outcome.LOST:
                self._bad([request], "disconnected")
                link.drop()
                return
            answered += outcome is _Outcome.ANSWERED
            timed_out += outcome is _Outcome.TIMEOUT
            if pause:
                await asyncio.sleep(pause)
        if timed_out and not answered:
            # Not one answer in a whole cycle: the connection may be half-open (a PLC
            # that rebooted never sends a reset). A fresh one costs the PLC little.
            self.counters["silent_reconnects"] += 1
            link.drop()

    # --- one request ----------------------------------------------------------------

    def _call(self, client: AsyncModbusTcpClient, request: ReadRequest) -> Awaitable[ModbusPDU]:
        read: Callable[..., Awaitable[ModbusPDU]] = {
            Table.COIL: client.read_coils,
            Table.DISCRETE_INPUT: client.read_discrete_inputs,
            Table.HOLDING_REGISTER: client.read_holding_registers,
            Table.INPUT_REGISTER: client.read_input_registers,
        }[request.table]
        return read(request.start, count=request.count, device_id=request.unit)

    async def _exchange(
        self, link: _Link, send: Callable[[AsyncModbusTcpClient], Awaitable[Any]]
    ) -> tuple[_Outcome, Any]:
        """One request with retries on timeout: the answer, or why there is none."""
        for _ in range(self.device.retries + 1):
            client = link.client
            if client is None or not client.connected:
                return _Outcome.LOST, None
            self.counters["requests"] += 1
            link.asked_at, link.waiter = time.monotonic(), asyncio.current_task()
            try:
                return _Outcome.ANSWERED, await send(client)
            except asyncio.CancelledError:
                if not link.stuck:
                    raise
                # The watchdog's cancel, not ours to pass on: a timeout. Unless the
                # task was cancelled by someone else too (a shutdown): that goes on.
                link.stuck = False
                waiter = link.waiter
                if waiter is not None and waiter.uncancel() > 0:
                    raise
                self.counters["timeouts"] += 1
            except ConnectionException:
                return _Outcome.LOST, None
            except (ModbusIOException, TimeoutError):
                if not client.connected:
                    return _Outcome.LOST, None
                self.counters["timeouts"] += 1
            except ModbusException as exc:
                self.counters["errors"] += 1
                return _Outcome.ANSWERED, exc
            finally:
                link.asked_at = link.waiter = None
        return _Outcome.TIMEOUT, None

    async def _read(
        self, link: _Link, request: ReadRequest, dead: set[int], queue: deque[ReadRequest]
    ) -> _Outcome:
        outcome, answer = await self._exchange(link, lambda c: self._call(c, request))
        if outcome is _Outcome.TIMEOUT:
            dead.add(request.unit)
            self._bad([request], "timeout")
        if outcome is not _Outcome.ANSWERED:
            return outcome
        ts_ns = self.now_ns()
        if isinstance(answer, ModbusException):
            self._bad([request], f"error: {answer}", ts_ns)
        elif answer.isError():
            code = int(getattr(answer, "exception_code", 0))
            parts = split(request) if code in _REFUSED_SPAN else []
            if parts:
                self._split(request, parts, code)
                queue.extendleft(reversed(parts))  # read next, in this cycle
                return outcome
            self.counters["errors"] += 1
            if code in _UNIT_GONE:
                dead.add(request.unit)
            self._bad([request], exception_reason(code), ts_ns)
        else:
            self._deliver(request, answer, ts_ns)
        return outcome

    def _split(self, request: ReadRequest, parts: list[ReadRequest], code: int) -> None:
        """From now on ``parts`` are read instead of ``request``, which the device refused."""
        self.plan = [part for r in self.plan for part in (parts if r is request else [r])]
        self.counters["splits"] += 1
        if self.counters["splits"] == 1:
            log.warning(
                "modbus.read_split",
                device=self.device.name,
                unit=request.unit,
                table=str(request.table),
                start=request.start,
                count=request.count,
                answer=exception_reason(code),
                parts=len(parts),
                note="reads refused for spanning unused addresses are split for the rest "
                "of the run; lower max_gap for this device to avoid the first refusal",
            )

    def _deliver(self, request: ReadRequest, answer: ModbusPDU, ts_ns: int) -> None:
        sample = self.sink.sample
        ids = self._ids
        if request.table.is_bits:
            bits: list[bool] = list(answer.bits)
            if len(bits) < request.count:
                self._short(request, len(bits), ts_ns)
                return
            for slot in request.slots:
                sample(Sample(tag_id=ids[slot.tag.name], ts_ns=ts_ns, value=bits[slot.offset]))
            return
        data = _register_bytes(answer)
        if len(data) // 2 < request.count:
            self._short(request, len(data) // 2, ts_ns)
            return
        readers = self._readers
        for slot in request.slots:
            name = slot.tag.name
            try:
                value = readers[name](data, 2 * slot.offset)
            except (CodecError, struct.error) as exc:
                sample(
                    Sample(
                        tag_id=ids[name],
                        ts_ns=ts_ns,
                        value=None,
                        quality=Quality.BAD,
                        reason=f"decode: {exc}",
                    )
                )
                continue
            sample(Sample(tag_id=ids[name], ts_ns=ts_ns, value=value))

    def _short(self, request: ReadRequest, got: int, ts_ns: int) -> None:
        self.counters["errors"] += 1
        self._bad([request], f"short answer: {got} of {request.count}", ts_ns)

    def _bad(self, requests: Iterable[ReadRequest], reason: str, ts_ns: int | None = None) -> None:
        ts = self.now_ns() if ts_ns is None else ts_ns
        for request in requests:
            for slot in request.slots:
                self.sink.sample(
                    Sample(
                        tag_id=self._ids[slot.tag.name],
                        ts_ns=ts,
                        value=None,
                        quality=Quality.BAD,
                        reason=reason,
                    )
                )

    # --- identity -------------------------------------------------------------------

    async def _read_identity(self, link: _Link) -> None:
        """43/14 basic objects, once per connection; a device without it gives {}."""
        unit = self.device.units[0].id
        outcome, answer = await self._exchange(
            link, lambda c: c.read_device_information(read_code=1, object_id=0, device_id=unit)
        )
        if outcome is _Outcome.LOST:
            link.drop()
            return
        identity: dict[str, str] = {}
        if (
            outcome is _Outcome.ANSWERED
            and not isinstance(answer, ModbusException)
            and not answer.isError()
        ):
            for key, raw in sorted(getattr(answer, "information", {}).items()):
                name = IDENTITY_NAMES.get(key, f"object_{key}")
                text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                identity[name] = text
        self.sink.device(
            DeviceInfo(
                device=self.device.name,
                protocol="modbus",
                endpoint=self.endpoint,
                identity=identity,
            )
        )
