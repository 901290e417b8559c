"""The demo's two controllers, on free loopback ports, serving one :class:`Process`.

* :class:`ModbusPlc`: a pymodbus 3.16 ``pymodbus.simulator`` device (unit 1).
  Values are written into the device's registers by its ``action`` callback at
  read time, the documented way to change a simulated device (the datastore
  classes are deprecated and cannot change values while serving).
* :class:`OpcuaPlc`: an asyncua server whose variables a task updates.

Layout (what the demo's transmitter config reads)::

    Modbus unit 1   holding 0-1    level_m     float32 ABCD
                    holding 10-11  parts       uint32  ABCD
                    coil 0         pump        bool
    OPC UA          ns=2;s=Line1.Temperature   Double
                    ns=2;s=Line1.Flow          Float
                    ns=2;s=Line1.Batches       UInt32
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from typing import Any

from asyncua import ua
from asyncua.server.server import Server
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from diode.demo.process import Process
from diode.loopback import free_port

UNIT = 1
LEVEL_REGISTER = 0
PARTS_REGISTER = 10
PUMP_COIL = 0
TABLE_SIZE = 32  # a multiple of 16: bit tables pack 16 coils a register
READ_COILS, READ_HOLDING = 1, 3

OPCUA_NAMESPACE = "urn:diode:demo"
OPCUA_UPDATE_S = 0.1
BATCH_EVERY_S = 2.0
# name -> (initial value, variant type); NodeId ns=2;s=Line1.<name>
OPCUA_VARIABLES: dict[str, tuple[Any, ua.VariantType]] = {
    "Temperature": (60.0, ua.VariantType.Double),
    "Flow": (0.0, ua.VariantType.Float),
    "Batches": (0, ua.VariantType.UInt32),
}


def words(fmt: str, value: float | int) -> list[int]:
    """A 32-bit value as two big-endian registers (ABCD, the Modbus default)."""
    return list(struct.unpack(">HH", struct.pack(fmt, value)))


class ModbusPlc:
    """A Modbus TCP PLC on 127.0.0.1 whose registers follow the process."""

    def __init__(self, process: Process, port: int | None = None) -> None:
        self.process = process
        self.port = port or free_port()
        self.reads = 0
        self._server: ModbusTcpServer | None = None

    async def _action(
        self,
        function_code: int,
        start_address: int,
        _address: int,
        _count: int,
        registers: list[int],
        _set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # ``registers`` is the whole table from ``start_address``: write the live
        # values in place and pymodbus answers the request from them.
        self.reads += 1
        process = self.process
        process.advance(time.monotonic())
        if function_code == READ_HOLDING:
            at = LEVEL_REGISTER - start_address
            registers[at : at + 2] = words(">f", process.level_m)
            at = PARTS_REGISTER - start_address
            registers[at : at + 2] = words(">I", process.parts)
        elif function_code == READ_COILS:
            index, bit = divmod(PUMP_COIL, 16)
            index -= start_address
            registers[index] = registers[index] & ~(1 << bit) | (int(process.pump_on) << bit)
        return None

    async def start(self) -> None:
        def bits() -> list[SimData]:
            return [SimData(0, count=TABLE_SIZE, values=False, datatype=DataType.BITS)]

        def regs() -> list[SimData]:
            return [SimData(0, count=TABLE_SIZE, values=0, datatype=DataType.REGISTERS)]

        device = SimDevice(id=UNIT, simdata=(bits(), bits(), regs(), regs()), action=self._action)
        server = ModbusTcpServer([device], address=("127.0.0.1", self.port))
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
            await asyncio.sleep(0)  # let the transports report their close


class OpcuaPlc:
    """An OPC UA server on 127.0.0.1 whose variables a task keeps up with the process."""

    def __init__(self, process: Process, port: int | None = None) -> None:
        self.process = process
        self.port = port or free_port()
        self.updates = 0
        self._server: Server | None = None
        self._nodes: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    @staticmethod
    def node_id(name: str) -> str:
        # The demo namespace is the first one registered after the standard two: index 2.
        return f"ns=2;s=Line1.{name}"

    async def start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("diode demo line 1")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(OPCUA_NAMESPACE)
        line = await server.nodes.objects.add_object(idx, "Line1")
        for name, (initial, vtype) in OPCUA_VARIABLES.items():
            self._nodes[name] = await line.add_variable(
                f"ns={idx};s=Line1.{name}", name, ua.Variant(initial, vtype)
            )
        await server.start()
        self._server = server
        self._task = asyncio.create_task(self._update())

    async def _update(self) -> None:
        process = self.process
        while True:
            process.advance(time.monotonic())
            values = {
                "Temperature": process.temperature_c(),
                "Flow": process.flow_m3h(),
                "Batches": int(process.t // BATCH_EVERY_S),
            }
            for name, value in values.items():
                # Good status, source timestamp now (asyncua's default for a plain value).
                await self._nodes[name].write_value(value, OPCUA_VARIABLES[name][1])
            self.updates += 1
            await asyncio.sleep(OPCUA_UPDATE_S)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
