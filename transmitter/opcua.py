"""The OPC UA poller: one session per server, its values handed to a sink as samples.

Pipeline of one :class:`OpcuaPoller` (one server)::

    server --publish--> Subscription queue (asyncua, bounded) --> _consume --+
    server <--Read----- _poll_loop (one per poll interval, batched) ---------+--> sink.sample()
    server <--Read----- _watch (session health, subscription silence)
                                |
                                +-- session lost: one BAD "disconnected" sample per tag,
                                    then a fresh Client + subscriptions after a backoff

asyncua does not rebuild a lost session by itself in a way we can rely on
(asyncua #70, #1034, #1660: subscriptions not restored after a server restart),
so each session is a fresh :class:`asyncua.Client` built by :meth:`run`, torn
down whole when anything about it looks wrong, and rebuilt after an
exponential backoff with jitter. Nothing here raises out of :meth:`run` but
cancellation; nothing loops without awaiting a timer or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.common.utils import ServiceError
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509

from diode.config.opcua import OpcuaNode, OpcuaServer
from diode.records import (
    DEPTH_MAX,
    INT64_MIN,
    UINT64_MAX,
    DeviceInfo,
    Quality,
    Sample,
    TagInfo,
    Value,
)
from diode.records import ValueType as VT
from transmitter import certs
from transmitter.sink import SampleSink

log = structlog.get_logger(__name__)

DISCONNECTED = "disconnected"
UNSUPPORTED = "unsupported type"
DEFAULT_TYPE = VT.FLOAT64
MAX_NODES_PER_READ = 500  # well under the MaxNodesPerRead of common PLC servers
SESSION_TIMEOUT_MS = 120_000  # a dead session of ours is dropped by the server in 2 min
CERT_WARN_DAYS = 30
SUBSCRIPTION_QUEUE = 10_000  # notifications buffered between asyncua and _consume, at least
DROP_LOG_INTERVAL_S = 10.0


class _CountedSubscription(Subscription):
    """asyncua's subscription, with what its full queue drops counted.

    asyncua drops a notification silently when the queue between its publish
    loop and our consumer is full (``OverflowPolicy.DROP_OLDEST``); each drop is
    a lost value the receiver must hear of (nothing is lost silently), so it is
    counted and reaches the heartbeat as ``poll_notifications_dropped``.
    """

    def __init__(self, *args: Any, on_drop: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_drop = on_drop

    def _handle_overflow(self, event: Any) -> None:
        self._on_drop()
        super()._handle_overflow(event)


# OPC UA Part 6 5.1.2 built-in DataType NodeIds (namespace 0) -> our value types.
# An array node (ValueRank >= 0) has its elements' type; its value is an array.
_BUILTIN_TYPES: dict[int, VT] = {
    1: VT.BOOL,
    2: VT.INT8,  # SByte
    3: VT.UINT8,  # Byte
    4: VT.INT16,
    5: VT.UINT16,
    6: VT.INT32,
    7: VT.UINT32,
    8: VT.INT64,
    9: VT.UINT64,
    10: VT.FLOAT32,
    11: VT.FLOAT64,
    12: VT.STRING,
    13: VT.DATETIME,
    14: VT.GUID,
    15: VT.BYTESTRING,
    16: VT.STRING,  # XmlElement, as its text
    17: VT.NODE_ID,
    18: VT.NODE_ID,  # ExpandedNodeId
    19: VT.STATUS_CODE,
    20: VT.QUALIFIED_NAME,
    21: VT.LOCALIZED_TEXT,
    29: VT.INT32,  # Enumeration
}

_BUILD_INFO: dict[str, int] = {
    "product_name": ObjectIds.Server_ServerStatus_BuildInfo_ProductName,
    "manufacturer_name": ObjectIds.Server_ServerStatus_BuildInfo_ManufacturerName,
    "software_version": ObjectIds.Server_ServerStatus_BuildInfo_SoftwareVersion,
    "build_number": ObjectIds.Server_ServerStatus_BuildInfo_BuildNumber,
    "product_uri": ObjectIds.Server_ServerStatus_BuildInfo_ProductUri,
}


class ServerUntrusted(Exception):
    """The server's certificate is not in the trust list (nor signed by a CA in it)."""


class _SessionLost(Exception):
    """The current session is no longer trusted; rebuild it."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with multiplicative jitter; pure, so tests can pin it."""

    initial_s: float
    max_s: float
    jitter: float
    rng: random.Random = field(default_factory=random.Random)
    _next_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def reset(self) -> None:
        self._next_s = self.initial_s

    def next_delay(self) -> float:
        """The wait before the next attempt; doubles up to ``max_s`` each call."""
        base = self._next_s
        self._next_s = min(self._next_s * 2.0, self.max_s)
        spread = self.rng.uniform(-self.jitter, self.jitter)
        # Never below a tenth of the initial wait: a refused connection must not spin.
        return max(base * (1.0 + spread), self.initial_s / 10.0)


def rfc3339(ts: datetime) -> str:
    """An OPC UA DateTime (always UTC) as RFC 3339 text with microseconds."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _plain(value: object, depth: int) -> Value:  # noqa: PLR0911 - one return per kind
    """One Variant value (or array element) in its wire form; ValueError if there is none."""
    if value is None or isinstance(value, bool | str | float | bytes):
        return value
    if isinstance(value, int):  # also IntEnum values of enumerations
        if INT64_MIN <= value <= UINT64_MAX:
            return int(value)
        raise ValueError("integer out of the 64-bit range")
    if isinstance(value, list | tuple):
        if depth >= DEPTH_MAX:
            raise ValueError("array nested too deep")
        return tuple(_plain(item, depth + 1) for item in value)
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, ua.LocalizedText):
        return (value.Text or "", value.Locale or "")
    if isinstance(value, ua.StatusCode):
        return (int(value.value), value.name)
    if isinstance(value, ua.QualifiedName | ua.NodeId):  # ExpandedNodeId is a NodeId
        return value.to_string()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, ua.Variant):  # an element of an array of Variants
        return _plain(value.Value, depth)
    raise ValueError(f"{UNSUPPORTED} {type(value).__name__}")


def plain_value(value: object) -> tuple[Value, str]:
    """A Variant's Python value as one we carry, or ``(None, reason)`` if we cannot.

    Scalars and arrays (as tuples, nested for matrices) of every built-in type
    but structures: ByteString as bytes, DateTime as RFC 3339 text,
    LocalizedText as ``(text, locale)``, StatusCode as ``(code, name)``, Guid,
    NodeId and QualifiedName as their text. Nothing a server sends raises:
    what has no faithful form here is ``(None, reason)``, costing that value only.
    """
    try:
        return _plain(value, 0), ""
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        reason = str(exc)
        return None, reason if reason.startswith(UNSUPPORTED) else f"{UNSUPPORTED}: {reason}"


def _epoch_ns(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # asyncua decodes OPC UA DateTime (always UTC) as naive or aware
        ts = ts.replace(tzinfo=UTC)
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    # OPC UA's "null" DateTime (1601-01-01) decodes to a date before 1970: not a timestamp.
    return ns if ns > 0 else None


def quality_of(status: ua.StatusCode | None) -> tuple[Quality, str]:
    """OPC UA status code -> our quality, and the code's name when it is not Good."""
    if status is None or status.is_good():
        return Quality.GOOD, ""
    name = status.name
    if status.is_uncertain():
        return Quality.UNCERTAIN, name
    return Quality.BAD, name


def _read_secret(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


def _source(endpoint: str, node_id: str) -> str:
    return "opcua://" + endpoint.removeprefix("opc.tcp://") + "#" + node_id


@dataclass(slots=True)
class _Tag:
    node: OpcuaNode
    tag_id: int
    node_id: ua.NodeId


class OpcuaPoller:
    """Reads one OPC UA server's nodes into a sink, forever, surviving anything the server does.

    ``catalogue`` lists what each tag id means (value types refined from the
    server's DataType after each connect), ``deadbands`` the sender-side
    absolute deadband per tag id, and ``counters`` what happened, for the
    heartbeat.
    """

    def __init__(
        self,
        server: OpcuaServer,
        *,
        tag_id: Callable[[str, str], int],
        sink: SampleSink,
        now_ns: Callable[[], int] = time.time_ns,
        state_dir: Path | None = None,
    ) -> None:
        self._server = server
        self._sink = sink
        self._now_ns = now_ns
        self._cert_dir = server.cert_dir or state_dir
        self._tags = [
            _Tag(
                node=n, tag_id=tag_id(server.name, n.name), node_id=ua.NodeId.from_string(n.node_id)
            )
            for n in server.nodes
        ]
        self.catalogue: list[TagInfo] = [
            TagInfo(
                tag_id=t.tag_id,
                name=t.node.name,
                device=server.name,
                value_type=t.node.type or DEFAULT_TYPE,
                unit=t.node.unit,
                source=_source(server.endpoint, t.node.node_id),
                description=t.node.description,
            )
            for t in self._tags
        ]
        self.deadbands: dict[int, float] = {t.tag_id: t.node.deadband for t in self._tags}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connects",
                "connect_failures",
                "sessions_lost",
                "watchdog_fired",
                "samples",
                "bad_samples",
                "monitor_rejected",
                "read_errors",
                "poll_overruns",
                "notifications_dropped",
                "server_untrusted",
            ),
            0,
        )
        self._drops_logged_at = float("-inf")
        self._bad_announced = False
        self._handles: dict[int, _Tag] = {}
        self._backoff = Backoff(
            server.reconnect_initial_s, server.reconnect_max_s, server.reconnect_jitter
        )
        self._log = log.bind(device=server.name, endpoint=server.endpoint)

    # -- the outer loop -----------------------------------------------------

    async def run(self) -> None:
        """Connect, stream, and reconnect after any failure, until cancelled."""
        while True:
            cause = DISCONNECTED
            try:
                cause = await self._session()
            except Exception as exc:  # any failure ends this session, never the poller
                self.counters["connect_failures"] += 1
                self._log.warning("opcua.session_failed", error=repr(exc))
            self._announce_lost(cause)
            delay = self._backoff.next_delay()
            self._log.info("opcua.reconnect_wait", delay_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _emit_bad(self, tags: Iterable[_Tag], reason: str) -> None:
        """One BAD sample, no value, for each of ``tags``, stamped now."""
        now = self._now_ns()
        for tag in tags:
            self._emit(
                Sample(tag_id=tag.tag_id, ts_ns=now, value=None, quality=Quality.BAD, reason=reason)
            )

    def _announce_lost(self, cause: str) -> None:
        """One BAD sample per tag when the values stop being live, not one per attempt."""
        if self._bad_announced:
            return
        self._bad_announced = True
        self._emit_bad(self._tags, DISCONNECTED)
        self._log.warning("opcua.values_lost", cause=cause, tags=len(self._tags))

    def _emit(self, sample: Sample) -> None:
        self.counters["samples"] += 1
        if sample.quality is Quality.BAD:
            self.counters["bad_samples"] += 1
        self._sink.sample(sample)

    # -- one session ----------------------------------------------------------

    async def _session(self) -> str:
        """One connected session; returns why it ended."""
        client = await self._new_client()
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            self._log.info("opcua.connection_lost", error=repr(exc))
            lost.set()

        client.connection_lost_callback = on_lost
        try:
            async with asyncio.timeout(self._server.timeout_s * 3):
                await client.connect()
            self.counters["connects"] += 1
            await self._read_build_info(client)
            await self._refine_types(client)
            subscribed = [t for t in self._tags if t.node.mode == "subscribe"]
            polled = [t for t in self._tags if t.node.mode == "poll"]
            subscription, silent_limit_s = (
                await self._subscribe(client, subscribed) if subscribed else (None, 0.0)
            )
            self._bad_announced = False
            self._backoff.reset()
            cause = DISCONNECTED  # _watch only ends by raising _SessionLost
            self._log.info("opcua.connected", subscribed=len(subscribed), polled=len(polled))
            try:
                async with asyncio.TaskGroup() as tg:
                    if subscription is not None:
                        tg.create_task(self._consume(subscription))
                    for interval, group in self._poll_groups(polled).items():
                        tg.create_task(self._poll_loop(client, interval, group))
                    tg.create_task(self._watch(lost, subscription, silent_limit_s))
            except* _SessionLost as group:
                first = group.exceptions[0]
                cause = first.cause if isinstance(first, _SessionLost) else DISCONNECTED
            self.counters["sessions_lost"] += 1
            self._log.warning("opcua.session_lost", cause=cause)
            return cause
        finally:
            await self._close(client)

    async def _new_client(self) -> Client:
        server = self._server
        client = Client(
            server.endpoint,
            timeout=server.timeout_s,
            # The client's own health probe (a Read of ServerState) runs this often.
            watchdog_intervall=max(0.5, min(server.timeout_s, server.watchdog_s / 2)),
        )
        client.name = client.description = f"diode transmitter ({socket.gethostname()})"
        client.application_uri = certs.APPLICATION_URI
        client.product_uri = "urn:diode"
        client.session_timeout = SESSION_TIMEOUT_MS
        if server.secure:
            await self._set_security(client)
        if server.username is not None and server.password_file is not None:
            client.set_user(server.username)
            client.set_password(await asyncio.to_thread(_read_secret, server.password_file))
        return client

    async def _set_security(self, client: Client) -> None:
        server = self._server
        if server.certificate is not None and server.private_key is not None:
            cert, key = server.certificate, server.private_key
        else:
            if self._cert_dir is None:
                raise ValueError("security is on but neither certificate nor cert_dir is known")
            cert, key = await asyncio.to_thread(certs.ensure_client_certificate, self._cert_dir)
        # The session's ApplicationUri must be the one in the certificate (Part 4 5.6.2).
        uri = await asyncio.to_thread(certs.application_uri_of, cert)
        expiry = await asyncio.to_thread(certs.expires_at, cert)
        days_left = (expiry - datetime.now(UTC)).days
        if days_left < CERT_WARN_DAYS:
            # Renewing means re-trusting on every server: warn well before it bites.
            self._log.warning("opcua.client_cert_expiring", certificate=str(cert), days=days_left)
        if uri:
            client.application_uri = uri
        mode = getattr(ua.MessageSecurityMode, server.security_mode)
        location = server.server_certificate or server.trust_list
        if location is None:  # the config refuses this; a model built in code may not
            raise ValueError("security is on but neither server_certificate nor trust_list is set")
        anchors = await asyncio.to_thread(certs.load_trust_list, location)
        # set_security reads the server's certificate from an unsecured GetEndpoints:
        # it proves nothing until checked, so it is checked here, before the secure
        # channel opens, and again at CreateSession (the certificate the session
        # proves it holds), before ActivateSession sends the password.
        await client.set_security(
            SecurityPolicyBasic256Sha256, certificate=str(cert), private_key=str(key), mode=mode
        )
        offered = client.security_policy.peer_certificate
        if offered is None:
            raise ServerUntrusted("the endpoint offered no server certificate")
        self._check_server(x509.load_der_x509_certificate(offered), anchors)
        client.certificate_validator = self._validator(anchors)

    def _check_server(self, cert: x509.Certificate, anchors: list[x509.Certificate]) -> None:
        why = certs.why_untrusted(cert, anchors, datetime.now(UTC))
        if why is None:
            return
        self.counters["server_untrusted"] += 1
        # Once per session attempt: the reconnect backoff bounds the rate.
        self._log.error(
            "opcua.server_untrusted",
            why=why,
            subject=cert.subject.rfc4514_string(),
            sha256=certs.fingerprint(cert),
            fix="if this is the server, add its certificate (or its CA) to trust_list",
        )
        raise ServerUntrusted(why)

    def _validator(
        self, anchors: list[x509.Certificate]
    ) -> Callable[[x509.Certificate, ua.ApplicationDescription], Awaitable[None]]:
        async def validate(cert: x509.Certificate, _app: ua.ApplicationDescription) -> None:
            try:
                self._check_server(cert, anchors)
            except ServerUntrusted:
                raise ServiceError(StatusCodes.BadCertificateUntrusted) from None

        return validate

    async def _close(self, client: Client) -> None:
        # A polite CloseSession, but never one that holds up a shutdown or a rebuild:
        # a server that does not answer within a second gets its socket closed.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self._server.timeout_s, 1.0)):
                await client.disconnect()
        with contextlib.suppress(Exception):
            client.disconnect_socket()

    # -- after connect: identity and types ------------------------------------

    async def _read(
        self, client: Client, node_ids: Sequence[ua.NodeId], attribute: AttributeIds
    ) -> list[ua.DataValue]:
        """Batched Read of one attribute of many nodes, in chunks the server accepts."""
        out: list[ua.DataValue] = []
        for start in range(0, len(node_ids), MAX_NODES_PER_READ):
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            for node_id in node_ids[start : start + MAX_NODES_PER_READ]:
                rv = ua.ReadValueId()
                rv.NodeId = node_id
                rv.AttributeId = attribute
                params.NodesToRead.append(rv)
            out.extend(await client.uaclient.read(params))
        return out

    async def _read_build_info(self, client: Client) -> None:
        keys = list(_BUILD_INFO)
        values = await self._read(
            client, [ua.NodeId(ua.Int32(_BUILD_INFO[k])) for k in keys], AttributeIds.Value
        )
        identity: dict[str, str] = {}
        for key, dv in zip(keys, values, strict=True):
            value, problem = plain_value(dv.Value.Value if dv.Value is not None else None)
            if not problem and value is not None and quality_of(dv.StatusCode)[0] is Quality.GOOD:
                # Text from the server may hold bytes that are not UTF-8 (asyncua keeps
                # them as lone surrogates, which no record can carry): replaced, as
                # this is a label, not a value.
                identity[key] = str(value).encode("utf-8", "replace").decode("utf-8")
        identity.update(await self._endpoint_identity(client))
        self._sink.device(
            DeviceInfo(
                device=self._server.name,
                protocol="opcua",
                endpoint=self._server.endpoint,
                identity=identity,
            )
        )

    async def _endpoint_identity(self, client: Client) -> dict[str, str]:
        """The server's certificate and the security it offers, for the SOC (issue 19).

        A changed certificate is a swapped or reinstalled server; an endpoint
        weaker than before (a None one appearing) is a security downgrade.
        """
        try:
            endpoints = await client.get_endpoints()
        except Exception as exc:  # a server that will not say: no identity, never a failure
            self._log.info("opcua.endpoints_unread", error=repr(exc))
            return {}
        found: dict[str, str] = {}
        certificates = sorted(
            {
                hashlib.sha256(e.ServerCertificate).hexdigest()
                for e in endpoints
                if e.ServerCertificate
            }
        )
        if certificates:
            found["server_certificate_sha256"] = ",".join(certificates)
        offered = sorted(
            {
                f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name.rstrip('_')}"
                for e in endpoints
            }
        )
        if offered:
            found["endpoints_security"] = " ".join(offered)
        return found

    async def _refine_types(self, client: Client) -> None:
        """Set unconfigured value types from the nodes' DataType attribute."""
        open_tags = [i for i, t in enumerate(self._tags) if t.node.type is None]
        if not open_tags:
            return
        results = await self._read(
            client, [self._tags[i].node_id for i in open_tags], AttributeIds.DataType
        )
        for i, dv in zip(open_tags, results, strict=True):
            data_type = dv.Value.Value if dv.Value is not None else None
            if not isinstance(data_type, ua.NodeId) or data_type.NamespaceIndex != 0:
                continue
            if not isinstance(data_type.Identifier, int):
                continue
            found = _BUILTIN_TYPES.get(data_type.Identifier)
            if found is not None and found != self.catalogue[i].value_type:
                old = self.catalogue[i]
                self.catalogue[i] = new = TagInfo(
                    tag_id=old.tag_id,
                    name=old.name,
                    device=old.device,
                    value_type=found,
                    unit=old.unit,
                    source=old.source,
                    description=old.description,
                )
                self._sink.tag(new)

    # -- subscriptions ------------------------------------------------------

    async def _subscribe(self, client: Client, tags: list[_Tag]) -> tuple[Subscription, float]:
        """One subscription for all subscribed tags; returns it and its silence limit."""
        server = self._server
        interval = server.publishing_interval_ms
        # A keepalive at least three times per watchdog period, so a healthy but
        # quiet subscription is never mistaken for a dead one.
        keepalive = max(1, int(server.watchdog_s * 1000.0 / interval / 3))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = max(3 * keepalive, int(SESSION_TIMEOUT_MS / interval))
        params.MaxNotificationsPerPublish = 10_000
        params.PublishingEnabled = True
        params.Priority = 0
        # Built directly rather than with Client.create_subscription, which would
        # revise our keepalive count from the session timeout (hours, not seconds)
        # and hand the subscription to asyncua's own stale-recreation logic: here the
        # whole session is rebuilt instead, by one owner.
        subscription = _CountedSubscription(
            client.uaclient.session,
            params,
            None,
            queue_maxsize=self._queue_bound(tags),
            overflow=OverflowPolicy.DROP_OLDEST,
            on_drop=self._dropped,
        )
        result = await subscription.init()
        revised_s = (
            result.RevisedPublishingInterval * max(1, result.RevisedMaxKeepAliveCount) / 1000
        )
        silent_limit_s = max(server.watchdog_s, 2.0 * revised_s)
        if silent_limit_s > server.watchdog_s:
            self._log.warning(
                "opcua.watchdog_widened", watchdog_s=silent_limit_s, keepalive_s=revised_s
            )

        self._handles = {}
        requests = []
        for handle, tag in enumerate(tags, start=1):
            requests.append(self._monitor_request(handle, tag))
            self._handles[handle] = tag
        results = await subscription.create_monitored_items(requests)
        now = self._now_ns()
        for tag, outcome in zip(tags, results, strict=True):
            if isinstance(outcome, ua.StatusCode):
                self.counters["monitor_rejected"] += 1
                self._log.warning(
                    "opcua.monitor_rejected", node=tag.node.node_id, status=outcome.name
                )
                self._emit(
                    Sample(
                        tag_id=tag.tag_id,
                        ts_ns=now,
                        value=None,
                        quality=Quality.BAD,
                        reason=outcome.name,
                    )
                )
        return subscription, silent_limit_s

    def _queue_bound(self, tags: list[_Tag]) -> int:
        """Room for two publishes' worth of notifications between asyncua and :meth:`_consume`.

        asyncua hands a whole PublishResponse to the queue at once and drops the
        oldest events, silently, when it is full. One publish may carry, per item,
        a sample per sampling interval up to the item's queue size (and servers,
        asyncua's own among them, may ignore MaxNotificationsPerPublish), so a fixed
        bound lost half of every publish from 20 000 items at 1 Hz.
        """
        server = self._server
        per_publish = 0
        for tag in tags:
            queue, sampling = server.queue_for(tag.node), server.sampling_ms(tag.node)
            due = server.publishing_interval_ms / sampling if sampling > 0 else queue
            per_publish += min(queue, max(1, math.ceil(due)))
        return max(SUBSCRIPTION_QUEUE, 2 * per_publish)

    def _dropped(self) -> None:
        """A notification asyncua's full queue dropped: a lost value, counted and logged."""
        self.counters["notifications_dropped"] += 1
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_INTERVAL_S:
            self._drops_logged_at = now
            self._log.warning(
                "opcua.notifications_dropped",
                dropped_total=self.counters["notifications_dropped"],
                queue=SUBSCRIPTION_QUEUE,
            )

    def _monitor_request(self, handle: int, tag: _Tag) -> ua.MonitoredItemCreateRequest:
        node = tag.node
        item = ua.ReadValueId()
        item.NodeId = tag.node_id
        item.AttributeId = AttributeIds.Value
        mparams = ua.MonitoringParameters()
        mparams.ClientHandle = handle
        mparams.SamplingInterval = self._server.sampling_ms(node)
        mparams.QueueSize = self._server.queue_for(node)
        mparams.DiscardOldest = True
        if node.deadband_type != "none":
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            flt.DeadbandType = (
                ua.DeadbandType.Absolute
                if node.deadband_type == "absolute"
                else ua.DeadbandType.Percent  # the server needs EURange; it may refuse
            )
            flt.DeadbandValue = node.deadband_value
            mparams.Filter = flt
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = item
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = mparams
        return request

    async def _consume(self, subscription: Subscription) -> None:
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                tag = self._handles.get(event.data.monitored_item.ClientHandle)
                if tag is not None:
                    self._emit(self._sample(tag.tag_id, event.data.monitored_item.Value))
            elif isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if not status.is_good():
                    raise _SessionLost(f"subscription status {status.name}")
        raise _SessionLost("subscription closed")

    # -- polling ------------------------------------------------------------

    @staticmethod
    def _poll_groups(tags: Iterable[_Tag]) -> dict[float, list[_Tag]]:
        groups: dict[float, list[_Tag]] = {}
        for tag in tags:
            groups.setdefault(tag.node.poll_interval_s, []).append(tag)
        return groups

    async def _poll_loop(self, client: Client, interval_s: float, tags: list[_Tag]) -> None:
        node_ids = [t.node_id for t in tags]
        deadline = time.monotonic()
        while True:
            try:
                values = await self._read(client, node_ids, AttributeIds.Value)
            except UaStatusCodeError as exc:  # the service failed, the session did not
                self.counters["read_errors"] += 1
                self._emit_bad(tags, ua.StatusCode(exc.code).name)
            except (TimeoutError, ConnectionError, OSError) as exc:
                raise _SessionLost(f"read failed: {exc!r}") from exc
            else:
                for tag, dv in zip(tags, values, strict=True):
                    self._emit(self._sample(tag.tag_id, dv))
            deadline += interval_s
            delay = deadline - time.monotonic()
            if delay < 0:  # the read took longer than the interval: skip, do not pile up
                self.counters["poll_overruns"] += 1
                deadline = time.monotonic()
                delay = 0.0
            await asyncio.sleep(delay)

    # -- health ---------------------------------------------------------------

    async def _watch(
        self, lost: asyncio.Event, subscription: Subscription | None, silent_limit_s: float
    ) -> None:
        started = time.monotonic()
        tick = min(1.0, self._server.watchdog_s / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await lost.wait()
            if lost.is_set():
                raise _SessionLost(DISCONNECTED)
            if subscription is not None:
                last = subscription.last_publish_at or started
                silent = time.monotonic() - last
                if silent > silent_limit_s:
                    self.counters["watchdog_fired"] += 1
                    raise _SessionLost(f"watchdog: subscription silent for {silent:.1f} s")

    # -- conversion -----------------------------------------------------------

    def _sample(self, tag_id: int, dv: ua.DataValue | None) -> Sample:
        """A DataValue as a sample; whatever is wrong with it costs this one value only.

        A timestamp the wire cannot carry is left for the outbox to judge
        (``records.unrepresentable``), which reports the value BAD with the reason.
        """
        now = self._now_ns()
        if dv is None:
            return Sample(
                tag_id=tag_id, ts_ns=now, value=None, quality=Quality.BAD, reason="no value"
            )
        try:
            ts = _epoch_ns(dv.SourceTimestamp) or _epoch_ns(dv.ServerTimestamp) or now
            quality, reason = quality_of(dv.StatusCode)
        except Exception as exc:  # a server's odd DataValue must never end the session
            return Sample(
                tag_id=tag_id,
                ts_ns=now,
                value=None,
                quality=Quality.BAD,
                reason=f"bad DataValue: {exc!r}",
            )
        value, problem = plain_value(dv.Value.Value if dv.Value is not None else None)
        if problem:
            quality, reason = Quality.BAD, problem
        return Sample(tag_id=tag_id, ts_ns=ts, value=value, quality=quality, reason=reason)
