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
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.net import free_port

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
BUILD_INFO = {
    "product_uri": "urn:diode:test:plc",
    "manufacturer_name": "Diode Test Works",
    "product_name": "Test PLC",
    "software_version": "1.2.3",
    "build_number": "42",
}


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
            product_uri=BUILD_INFO["product_uri"],
            manufacturer_name=BUILD_INFO["manufacturer_name"],
            product_name=BUILD_INFO["product_name"],
            software_version=BUILD_INFO["software_version"],
            build_number=BUILD_INFO["build_number"],
            build_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        )
        idx = await server.register_namespace(NAMESPACE)
        plant = await server.nodes.objects.add_object(idx, "Plant")
        self._nodes = {}
        for name, (initial, vtype) in VARIABLES.items():
            self._nodes[name] = await plant.add_variable(
                ua.NodeId(f"Plant.{name}", idx), name, ua.Variant(initial, vtype)
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
        variant = ua.Variant(value, vtype) if value is not None else ua.Variant()
        await self._nodes[name].write_value(
            ua.DataValue(variant, StatusCode=ua.StatusCode(status), SourceTimestamp=ts)
        )
        return ts

    async def _record_certificate(self, certificate: Any, app: Any) -> None:
        self.client_certificates.append(certificate.public_bytes(Encoding.DER))
