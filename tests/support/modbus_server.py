"""A real pymodbus TCP server in the test's event loop, whose values tests change live.

Built from ``pymodbus.simulator`` (the datastore classes are deprecated and
cannot change values while serving): each unit has its own four tables of
``size`` addresses. Values set with :meth:`ModbusSimServer.set_registers` /
:meth:`set_bits` are applied by the device's ``action`` callback at the next
read, the documented way to change a simulated device. The server counts every
request it received, and a unit can be made dead (requests are dropped, the
client times out) or made to answer a Modbus exception. A register table can
have holes, addresses the device does not have: a read that touches one is
answered exception 2 (illegal data address), as many PLCs do (pymodbus's
simulator marks them ``DataType.INVALID``). ``stop()`` closes the listener and
every connection; ``start()`` serves again on the same port.

    server = ModbusSimServer(units=[1, 2])
    await server.start()
    server.set_registers(1, "holding_register", 100, [0x42F6, 0xE979])
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import cast

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from diode.loopback import free_port

# Function code -> table name, as the poller's config spells them.
TABLE_OF_FUNCTION = {1: "coil", 2: "discrete_input", 3: "holding_register", 4: "input_register"}
FUNCTION_OF_TABLE = {name: code for code, name in TABLE_OF_FUNCTION.items()}
BIT_TABLES = ("coil", "discrete_input")


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the server received it."""

    unit: int
    function_code: int
    address: int
    count: int


class ModbusSimServer:
    """A Modbus TCP simulator on 127.0.0.1 with live values, request counts and faults."""

    def __init__(
        self,
        units: list[int] | tuple[int, ...] = (1,),
        *,
        size: int = 1024,
        port: int | None = None,
        identity: dict[int, str] | None = None,
        holes: dict[tuple[int, str], list[range]] | None = None,
    ) -> None:
        if size % 16:
            raise ValueError("size must be a multiple of 16 (bit tables pack 16 per register)")
        self.units = tuple(units)
        self.size = size
        self.port = port or free_port()
        # Objects of function 43/14 by id (0 VendorName, 1 ProductCode, 2 Revision...);
        # None: the device answers "illegal function", as many PLCs do.
        self.identity = identity
        self.seen: list[SeenRequest] = []
        self.dead: set[int] = set()
        # unit -> Modbus exception code it answers every read with (2 = illegal address)
        self.exception: dict[int, int] = {}
        # (unit, register table) -> address ranges the device does not have
        self.holes = holes or {}
        if any(table in BIT_TABLES for _, table in self.holes):
            raise ValueError("holes are for register tables")
        # Every value a test set, by (unit, table), and the tables whose device
        # registers do not hold them yet (all of them after a restart).
        self._values: dict[tuple[int, str], dict[int, int | bool]] = {}
        self._dirty: set[tuple[int, str]] = set()
        self._server: ModbusTcpServer | None = None

    # --- values --------------------------------------------------------------------

    def set_registers(self, unit: int, table: str, address: int, values: list[int]) -> None:
        """Registers from ``address`` (0-based) hold ``values`` from the next read on."""
        self._set(unit, table, {address + i: v & 0xFFFF for i, v in enumerate(values)})

    def set_bits(self, unit: int, table: str, address: int, values: list[bool]) -> None:
        """Coils or discrete inputs from ``address`` hold ``values`` from the next read on."""
        self._set(unit, table, {address + i: bool(v) for i, v in enumerate(values)})

    def _set(self, unit: int, table: str, values: dict[int, int | bool]) -> None:
        if unit not in self.units or table not in FUNCTION_OF_TABLE:
            raise ValueError(f"no unit {unit} or table {table!r} here")
        if any(not 0 <= address < self.size for address in values):
            raise ValueError(f"addresses outside 0..{self.size - 1}")
        self._values.setdefault((unit, table), {}).update(values)
        self._dirty.add((unit, table))

    async def _action(
        self,
        unit: int,
        function_code: int,
        start_address: int,
        _address: int,
        _count: int,
        registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if unit in self.exception:
            return ExcCodes(self.exception[unit])
        table = TABLE_OF_FUNCTION.get(function_code, "")
        if (unit, table) not in self._dirty:
            return None
        self._dirty.discard((unit, table))
        for address, value in self._values[unit, table].items():
            if table in BIT_TABLES:
                # Bit tables are packed 16 bits a register, bit 0 first.
                index, bit = divmod(address, 16)
                index -= start_address
                registers[index] = registers[index] & ~(1 << bit) | (int(value) << bit)
            else:
                registers[address - start_address] = int(value)
        return None

    # --- requests seen, dead units ------------------------------------------------

    def requests(self, unit: int | None = None, function_code: int | None = None) -> int:
        """How many requests the server received (for one unit / function, if given)."""
        return sum(
            1
            for r in self.seen
            if (unit is None or r.unit == unit)
            and (function_code is None or r.function_code == function_code)
        )

    def functions(self) -> Counter[int]:
        return Counter(r.function_code for r in self.seen)

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            if isinstance(pdu, ReadDeviceInformationResponse):
                return self._identity_answer(pdu)
            return pdu
        self.seen.append(
            SeenRequest(
                unit=pdu.dev_id,
                function_code=pdu.function_code,
                address=getattr(pdu, "address", 0),
                count=getattr(pdu, "count", 0),
            )
        )
        if pdu.dev_id in self.dead:
            # pymodbus's server handles a received PDU only when this hook returns
            # one: returning None drops the request, as a unit behind a gateway
            # that is switched off would, and the client times out.
            return cast(ModbusPDU, None)
        return pdu

    def _identity_answer(self, pdu: ReadDeviceInformationResponse) -> ModbusPDU:
        # pymodbus keeps device identity in a process-wide control block; answer
        # from this server's own identity so that servers in one test process differ.
        if self.identity is None:
            return ExceptionResponse(
                0x2B,
                ExcCodes.ILLEGAL_FUNCTION,
                device_id=pdu.dev_id,
                transaction=pdu.transaction_id,
            )
        return ReadDeviceInformationResponse(
            read_code=pdu.read_code,
            information={k: v.encode() for k, v in self.identity.items()},
            dev_id=pdu.dev_id,
            transaction_id=pdu.transaction_id,
        )

    # --- life cycle ---------------------------------------------------------------

    def _devices(self) -> list[SimDevice]:
        def bits() -> list[SimData]:
            return [SimData(0, count=self.size, values=False, datatype=DataType.BITS)]

        def regs(unit: int, table: str) -> list[SimData]:
            blocks: list[SimData] = []
            at = 0
            for hole in sorted(self.holes.get((unit, table), []), key=lambda r: r.start):
                if hole.start > at:
                    blocks.append(SimData(at, count=hole.start - at, datatype=DataType.REGISTERS))
                blocks.append(SimData(hole.start, count=len(hole), datatype=DataType.INVALID))
                at = hole.stop
            if at < self.size:
                blocks.append(SimData(at, count=self.size - at, datatype=DataType.REGISTERS))
            return blocks

        return [
            SimDevice(
                id=unit,
                simdata=(
                    bits(),
                    bits(),
                    regs(unit, "holding_register"),
                    regs(unit, "input_register"),
                ),
                action=partial(self._action, unit),
            )
            for unit in self.units
        ]

    async def start(self) -> None:
        """Serve (again) on ``self.port``, with every value set so far."""
        if self._server is not None:
            return
        self._dirty = set(self._values)
        server = ModbusTcpServer(
            self._devices(), address=("127.0.0.1", self.port), trace_pdu=self._trace_pdu
        )
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
            await asyncio.sleep(0)  # let the transports report their close

    @property
    def running(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> ModbusSimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
