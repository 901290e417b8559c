"""A real asyncua server in this process, on a free loopback port, owned by the test.

Usage::

    server = OpcuaTestServer()
    await server.start()
    await server.set("Level", 4.2)                       # Good, source timestamp now
    await server.set("Level", None, status=ua.StatusCodes.BadSensorFailure)
    await server.restart()                               # same port, fresh address space
    await server.stop()

Variables (all under ``ns=2;s=Plant.<name>``, see :data:`VARIABLES`) start at
their initial values on every start. Security (Basic256Sha256, Sign and
SignAndEncrypt, no None endpoint) needs a server certificate and key; a
``users`` mapping turns anonymous access off and checks user names and
passwords. Client certificates are accepted whatever their issuer (asyncua's
default) and recorded in ``client_certificates`` so a test can see which one
a client presented.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.hazmat.primitives.serialization import Encoding

from diode.loopback import free_port

NAMESPACE = "urn:diode:test"
VARIABLES: dict[str, tuple[Any, ua.VariantType]] = {
    "Level": (1.5, ua.VariantType.Double),
    "Temp": (20.0, ua.VariantType.Float),
    "Count": (0, ua.VariantType.Int32),
    "Big": (0, ua.VariantType.UInt64),
    "Running": (False, ua.VariantType.Boolean),
    "Label": ("idle", ua.VariantType.String),
    "Curve": ([1.0, 2.0], ua.VariantType.Double),
}
# Every built-in type a plant's server is likely to hold, arrays included, with
# values at their edges: the end-to-end fidelity test reads them all.
PLANT_TYPES: dict[str, tuple[Any, ua.VariantType]] = {
    "SByte": (-128, ua.VariantType.SByte),
    "Byte": (255, ua.VariantType.Byte),
    "Int16": (-32768, ua.VariantType.Int16),
    "UInt16": (65535, ua.VariantType.UInt16),
    "Int32": (-(2**31), ua.VariantType.Int32),
    "UInt32": (2**32 - 1, ua.VariantType.UInt32),
    "Int64": (-(2**63), ua.VariantType.Int64),
    "UInt64": (2**64 - 1, ua.VariantType.UInt64),
    "Float": (12.47, ua.VariantType.Float),  # held as the float32 nearest 12.47
    "FloatTiny": (2.9194613, ua.VariantType.Float),
    "Double": (0.1 + 0.2, ua.VariantType.Double),
    "Text": ("Grüße, 温度 \x00 end", ua.VariantType.String),
    "Bytes": (b"\x00\x01\xfe\xff diode", ua.VariantType.ByteString),
    "When": (dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC), ua.VariantType.DateTime),
    "Greeting": (ua.LocalizedText("Hallo", "de-DE"), ua.VariantType.LocalizedText),
    "Id": (uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63"), ua.VariantType.Guid),
    "Ref": (ua.NodeId("Tank.Level", 2), ua.VariantType.NodeId),
    "Code": (ua.StatusCode(ua.StatusCodes.BadSensorFailure), ua.VariantType.StatusCode),
    "QName": (ua.QualifiedName("Name", 2), ua.VariantType.QualifiedName),
    "Floats": ([1.1, -2.5, 3.4028234663852886e38], ua.VariantType.Float),
    "Doubles": ([0.1, -1e-300, 1.7976931348623157e308], ua.VariantType.Double),
    "Ints": ([1, -2, 2**31 - 1], ua.VariantType.Int32),
    "Words": (["x", "", "ü"], ua.VariantType.String),
    "Blobs": ([b"a", b"", b"\xff"], ua.VariantType.ByteString),
    "Texts": (
        [ua.LocalizedText("one", "en"), ua.LocalizedText("un", "fr")],
        ua.VariantType.LocalizedText,
    ),
    "Dates": (
        [
            dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
            dt.datetime(2099, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        ],
        ua.VariantType.DateTime,
    ),
    "Flags": ([True, False, True], ua.VariantType.Boolean),
    "Matrix": ([[1, 2, 3], [4, 5, 6]], ua.VariantType.Int32),
}
VARIABLES.update(PLANT_TYPES)
BUILD_INFO = {
    "product_uri": "urn:diode:test:plc",
    "manufacturer_name": "Diode Test Works",
    "product_name": "Test PLC",
    "software_version": "1.2.3",
    "build_number": "42",
}


def variant(value: Any, vtype: ua.VariantType) -> ua.Variant:
    """A Variant; a list of lists is a matrix (its Dimensions set)."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return ua.Variant(value, vtype, Dimensions=[len(value), len(value[0])])
    return ua.Variant(value, vtype)


def node_id(name: str) -> str:
    """The string NodeId of a test variable (the namespace is registered first: index 2)."""
    return f"ns=2;s=Plant.{name}"


class _Users(UserManager):
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcuaTestServer:
    """Start, stop and restart an asyncua server on one port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: dict[str, str] | None = None,
        policies: list[ua.SecurityPolicyType] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.policies = policies  # what a secure server offers; None: Sign and SignAndEncrypt
        self.certificate = certificate
        self.private_key = private_key
        self.users = users
        self.client_certificates: list[bytes] = []
        self.build_info = dict(BUILD_INFO)  # what the next start announces (a firmware update)
        self._server: Server | None = None
        self._nodes: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        server = Server(user_manager=_Users(self.users) if self.users is not None else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("diode test server")
        if self.certificate is not None and self.private_key is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy(
                self.policies
                or [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Basic256Sha256_Sign,
                ]
            )
            server.set_certificate_validator(self._record_certificate)
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        await server.set_build_info(
            **self.build_info, build_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        )
        idx = await server.register_namespace(NAMESPACE)
        plant = await server.nodes.objects.add_object(idx, "Plant")
        self._nodes = {}
        for name, (initial, vtype) in VARIABLES.items():
            self._nodes[name] = await plant.add_variable(
                ua.NodeId(f"Plant.{name}", idx), name, variant(initial, vtype)
            )
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def set(
        self,
        name: str,
        value: Any,
        *,
        status: int = ua.StatusCodes.Good,
        source_ts: dt.datetime | None = None,
    ) -> dt.datetime:
        """Write a value (with a status and a source timestamp); returns the timestamp used."""
        ts = source_ts or dt.datetime.now(dt.UTC)
        vtype = VARIABLES[name][1]
        value_variant = variant(value, vtype) if value is not None else ua.Variant()
        await self._nodes[name].write_value(
            ua.DataValue(value_variant, StatusCode=ua.StatusCode(status), SourceTimestamp=ts)
        )
        return ts

    async def _record_certificate(self, certificate: Any, app: Any) -> None:
        self.client_certificates.append(certificate.public_bytes(Encoding.DER))
