"""An OPC UA server showing each machine's status to a plant's SCADA/MES, with alert alarms.

Plants read machine states from OPC UA, not from our MQTT JSON. The server (``asyncua``, the
optional extra ``opcua``) runs its own asyncio loop on its own thread and learns of every
change from a ``PlantFeed`` subscription, so the pipeline never waits for it: a client that
stalls, or a server that cannot keep up, only lets that subscription's bounded queue drop its
oldest changes (the variables then jump to the latest status).

The address space follows OPC 40001-1 (Machinery) naming where it fits, in our own namespace
(the Machinery nodeset itself is not loaded)::

    Objects/Machines/<site>/<machine>                       one object per machine
        Identification/ComponentName, Location              (MachineIdentificationType names)
        MachineryItemState/CurrentState                     NotAvailable | NotExecuting | Executing
        State, StateDetail, Severity, FusedRank, Anomalous, WindowEnd, SensorFault,
        AnomalousShare1h, AnomalousShare24h, RankEwma, BankVersion,
        LastAlertEventId, LastAlertType, LastAlertTime, LastVerdict

An alert raise or clear is an event of ``AcousticAlarmType`` (a subtype of AlarmConditionType)
from the machine object and from the Server object; a person's verdict on the last alert is one
more with ``AckedState`` true. asyncua sends these events and replays retained (active) ones
on ConditionRefresh, but has no condition state machine: Acknowledge, Confirm, AddComment,
Enable/Disable and Shelve called by a client are not implemented, so verdicts come only from
the daemon's own review path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.event_generator import EventGenerator

from monitor.config import OpcUaConfig
from monitor.errors import AsdError, ConfigError
from monitor.outputs.plant import QUEUE_CHANGES, Change, MachineStatus, PlantFeed

log = logging.getLogger(__name__)

START_SECONDS = 30.0  # building the standard address space takes about a second on a small box
DRAIN_POLL_SECONDS = 0.5  # how soon the drain notices a stop
EVENT_TYPE = "AcousticAlarmType"

POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}

# MachineStatus field -> (browse name, OPC UA type). Times are UtcTime (ISO strings in the feed).
VARIABLES: dict[str, tuple[str, ua.VariantType]] = {
    "state": ("State", ua.VariantType.String),
    "detail": ("StateDetail", ua.VariantType.String),
    "severity": ("Severity", ua.VariantType.String),
    "fused_rank": ("FusedRank", ua.VariantType.Double),
    "anomalous": ("Anomalous", ua.VariantType.Boolean),
    "window_end": ("WindowEnd", ua.VariantType.DateTime),
    "sensor_fault": ("SensorFault", ua.VariantType.String),
    "anomalous_1h": ("AnomalousShare1h", ua.VariantType.Double),
    "anomalous_24h": ("AnomalousShare24h", ua.VariantType.Double),
    "rank_ewma": ("RankEwma", ua.VariantType.Double),
    "bank_version": ("BankVersion", ua.VariantType.String),
    "alert_event_id": ("LastAlertEventId", ua.VariantType.String),
    "alert_type": ("LastAlertType", ua.VariantType.String),
    "alert_time": ("LastAlertTime", ua.VariantType.DateTime),
    "verdict": ("LastVerdict", ua.VariantType.String),
}

# Our machine states as OPC 40001-1 MachineryItemState. Only a scored window says the machine
# runs; "idle" is its sound matching the enrolled site noise (or no bank yet: see StateDetail).
ITEM_STATES = {"starting": "NotAvailable", "sensor_fault": "NotAvailable", "idle": "NotExecuting",
               "normal": "Executing", "alert": "Executing", "enrolling": "Executing"}

# Our severity as the OPC UA event Severity (1..1000; 801+ is "high" in Part 9's guidance).
EVENT_SEVERITY = {"ok": 100, "warning": 500, "alarm": 800}

EVENT_FIELDS = [("AlertEventId", ua.VariantType.String), ("Site", ua.VariantType.String),
                ("Machine", ua.VariantType.String), ("Rule", ua.VariantType.String),
                ("FusedRank", ua.VariantType.Double), ("AlertType", ua.VariantType.String)]


class _Users:
    """asyncua's user manager: the one configured user, and anonymous only when allowed.
    The password is compared in constant time, and never logged.

    With a Basic256Sha256 policy it also refuses a session on a channel without security:
    asyncua 2.1 lets a client open a None channel (meant for discovery) and activate a session
    on it whatever policy the endpoints offer, which would read every value unencrypted. Such a
    channel carries no client certificate (None or empty), which is how it is recognised here."""

    def __init__(self, username: str | None, password: str | None, anonymous: bool, secure: bool) -> None:
        self._username, self._password, self._anonymous, self._secure = username, password, anonymous, secure

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if self._secure and not certificate:
            log.warning("OPC UA: session refused on a channel without security")
            return None
        if username is None:
            return User(role=UserRole.User) if self._anonymous else None
        if self._username is None or self._password is None or password is None:
            return None
        if hmac.compare_digest(username.encode(), self._username.encode()) and \
                hmac.compare_digest(password.encode(), self._password.encode()):
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA: login refused for user %r", username)
        return None


@dataclass
class _MachineNodes:
    variables: dict[str, Node]
    item_state: Node
    events: list[EventGenerator]  # from the machine object, and from the Server object
    condition: ua.NodeId  # ConditionId of the machine's acoustic alarm (not exposed as a node)


class OpcUaServer:
    """The OPC UA endpoint for one daemon. ``start`` returns once clients can connect, or raises
    ``ConfigError`` (a certificate that does not load, a port taken); ``stop`` ends it."""

    def __init__(self, config: OpcUaConfig, site: str, name: str, machines: list[str], feed: PlantFeed,
                 where: str = "", queue_size: int = QUEUE_CHANGES) -> None:
        self.config = config
        self.site = site
        self.name = name
        self.machines = machines
        self.feed = feed
        self.where = where  # "<config file>: " for error messages
        self.port: int | None = None  # the port listened on (differs from the endpoint's with port 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None  # why it did not start
        self._thread: threading.Thread | None = None
        self._subscription = feed.subscribe(queue_size)  # now: no change after construction is missed
        self._nodes: dict[str, _MachineNodes] = {}

    @property
    def dropped(self) -> int:
        """Changes lost to a full queue: their events are lost, and every variable is then
        rewritten from the feed's snapshot (a lost change may hold the only news of a field)."""
        return self._subscription.dropped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_SECONDS):
            raise AsdError(f"opcua: the OPC UA server did not start within {START_SECONDS:g} s")
        if self._error is not None:
            self._thread.join()
            self.feed.unsubscribe(self._subscription)
            raise self._error
        log.info("OPC UA on %s (port %s, security %s)", self.config.endpoint, self.port, self.config.security_policy)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=10)
        self.feed.unsubscribe(self._subscription)

    # ------------------------------------------------------------ the server's thread
    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:
            if self._ready.is_set():  # after start: logged, and the daemon goes on without OPC UA
                log.exception("OPC UA server failed")
            else:
                self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._server()
        try:
            self._ready.set()
            await self._drain()
        finally:
            await server.stop()

    async def _server(self) -> Server:
        """Build, secure and start the server; every failure a one-line ``ConfigError``."""
        cfg = self.config
        password = None
        if cfg.password_file is not None:
            password = self._read(cfg.password_file, "password_file").decode().strip()
        server = Server(user_manager=_Users(cfg.username, password, cfg.allow_anonymous, cfg.security_policy != "None"))
        server.iserver.bind_condition_methods = True  # ConditionRefresh(2): off unless asked for
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"asd-monitor {self.name}")
        await server.set_application_uri(f"urn:asd-monitor:{self.name}")
        server.set_security_policy([POLICIES[cfg.security_policy]])
        tokens: list[type] = [ua.UserNameIdentityToken] if cfg.username is not None else []
        server.set_identity_tokens(tokens + ([ua.AnonymousIdentityToken] if cfg.allow_anonymous else []))
        if cfg.certificate_file is not None:
            await self._load(server.load_certificate, cfg.certificate_file, "certificate_file")
        if cfg.private_key_file is not None:
            await self._load(server.load_private_key, cfg.private_key_file, "private_key_file")
        await self._address_space(server)
        known = self.feed.snapshot()
        for machine in self.machines:
            await self._write(machine, known.get(machine) or MachineStatus(machine), set(VARIABLES))
        try:
            await server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror is a sentence
            raise ConfigError(f"{self.where}opcua.endpoint: cannot listen on {cfg.endpoint} ({reason})") from None
        self.port = server.bserver.port if server.bserver is not None else None
        return server

    def _read(self, path: Path, key: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.where}opcua.{key}: cannot read {path} ({exc.strerror})") from None

    async def _load(self, load: Any, path: Path, key: str) -> None:
        content = self._read(path, key)
        pem = content.lstrip().startswith(b"-----BEGIN")  # by content: asyncua would go by the file's suffix
        try:
            await load(content, format="pem" if pem else "der")
        except (ValueError, TypeError) as exc:  # cryptography: not a certificate / key
            raise ConfigError(f"{self.where}opcua.{key}: {path} is not a usable PEM/DER file ({exc})") from None

    async def _address_space(self, server: Server) -> None:
        ns = await server.register_namespace(self.config.namespace)
        machines = await server.nodes.objects.add_folder(ua.NodeId("Machines", ns), ua.QualifiedName("Machines", ns))
        site = await machines.add_folder(ua.NodeId(self.site, ns), ua.QualifiedName(self.site, ns))
        event_type = await server.create_custom_event_type(ns, EVENT_TYPE, ua.ObjectIds.AlarmConditionType,
                                                           EVENT_FIELDS)
        for machine in self.machines:
            path = f"{self.site}/{machine}"
            obj = await site.add_object(ua.NodeId(path, ns), ua.QualifiedName(machine, ns))
            ident = await obj.add_object(ua.NodeId(f"{path}/Identification", ns), ua.QualifiedName("Identification", ns))
            await ident.add_property(ua.NodeId(f"{path}/Identification/ComponentName", ns),
                                     ua.QualifiedName("ComponentName", ns), ua.LocalizedText(machine))
            await ident.add_property(ua.NodeId(f"{path}/Identification/Location", ns),
                                     ua.QualifiedName("Location", ns), self.site)
            item = await obj.add_object(ua.NodeId(f"{path}/MachineryItemState", ns),
                                        ua.QualifiedName("MachineryItemState", ns))
            current = await item.add_variable(ua.NodeId(f"{path}/MachineryItemState/CurrentState", ns),
                                              ua.QualifiedName("CurrentState", ns), ua.LocalizedText("NotAvailable"))
            variables = {}
            for field, (browse, kind) in VARIABLES.items():
                variables[field] = await obj.add_variable(ua.NodeId(f"{path}/{browse}", ns), ua.QualifiedName(browse, ns),
                                                          ua.get_default_value(kind), varianttype=kind)
            events = [await server.get_event_generator(event_type, emitter) for emitter in (obj, server.nodes.server)]
            for generator in events:
                generator.event.SourceNode = obj.nodeid
                generator.event.SourceName = machine
            self._nodes[machine] = _MachineNodes(variables, current, events,
                                                 ua.NodeId(f"{path}/AcousticAnomaly", ns))

    # ------------------------------------------------------------ changes into the address space
    async def _drain(self) -> None:
        """Apply the feed's changes in order until stopped. Waiting for a change happens on an
        executor thread, so the loop keeps serving clients meanwhile."""
        loop = asyncio.get_running_loop()
        assert self._stop is not None
        dropped = 0
        while not self._stop.is_set():
            change = await loop.run_in_executor(None, self._subscription.get, DRAIN_POLL_SECONDS)
            try:
                if self._subscription.dropped != dropped:
                    dropped = self._subscription.dropped
                    log.warning("OPC UA: %d change(s) dropped so far (a slow server); rewriting every variable", dropped)
                    for machine, status in self.feed.snapshot().items():
                        if machine in self._nodes:
                            await self._write(machine, status, set(VARIABLES))
                if change is not None and change.status.machine in self._nodes:
                    await self._apply(change)
            except Exception:  # one bad value must not end the server
                log.exception("OPC UA: applying a change failed")

    async def _apply(self, change: Change) -> None:
        status = change.status
        await self._write(status.machine, status, change.changed)
        if change.alert is not None:
            alert = change.alert
            active = alert.type == "raise"
            await self._event(status, _time(alert.end), f"{status.machine}: {'acoustic anomaly' if active else 'anomaly cleared'}"
                              f" (fused rank {alert.fused_rank:.3f}, {alert.rule})", EVENT_SEVERITY[alert.severity],
                              active=active, acked=False, rule=alert.rule, rank=alert.fused_rank, kind=alert.type)
        elif "verdict" in change.changed and status.verdict:
            await self._event(status, datetime.now(timezone.utc), f"{status.machine}: verdict {status.verdict}",
                              EVENT_SEVERITY[status.severity], active=status.alert_type == "raise", acked=True,
                              rule="", rank=status.fused_rank, kind=status.alert_type)

    async def _write(self, machine: str, status: MachineStatus, fields: set[str] | frozenset[str]) -> None:
        nodes = self._nodes[machine]
        now = datetime.now(timezone.utc)
        for field in fields & VARIABLES.keys():
            _, kind = VARIABLES[field]
            value = getattr(status, field)
            if kind is ua.VariantType.DateTime:
                value = _time(value) if value else None
            if value is None:  # not yet known: the OPC UA way is a status, not a made-up value
                data = ua.DataValue(ua.Variant(None, ua.VariantType.Null),
                                    StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
                                    SourceTimestamp=now, ServerTimestamp=now)
            else:
                data = ua.DataValue(ua.Variant(value, kind), SourceTimestamp=now, ServerTimestamp=now)
            await nodes.variables[field].write_value(data)
        if "state" in fields:
            await nodes.item_state.write_value(ua.LocalizedText(ITEM_STATES.get(status.state, "NotAvailable")))

    async def _event(self, status: MachineStatus, when: datetime, message: str, severity: int, *, active: bool,
                     acked: bool, rule: str, rank: float | None, kind: str) -> None:
        nodes = self._nodes[status.machine]
        for generator in nodes.events:
            event = generator.event
            event.NodeId = nodes.condition
            event.ConditionName = "AcousticAnomaly"
            event.Severity = severity
            event.Retain = active  # an active alarm is replayed to a client's ConditionRefresh
            setattr(event, "EnabledState/Id", True)
            event.EnabledState = ua.LocalizedText("Enabled")
            setattr(event, "ActiveState/Id", active)
            event.ActiveState = ua.LocalizedText("Active" if active else "Inactive")
            setattr(event, "AckedState/Id", acked)
            event.AckedState = ua.LocalizedText("Acknowledged" if acked else "Unacknowledged")
            event.AlertEventId = status.alert_event_id
            event.Site = self.site
            event.Machine = status.machine
            event.Rule = rule
            event.FusedRank = ua.Variant(rank, ua.VariantType.Double if rank is not None else ua.VariantType.Null)
            event.AlertType = kind
            await generator.trigger(when, message)


def _time(iso: str) -> datetime:
    """The feed's ISO 8601 UTC string as an aware datetime (OPC UA UtcTime)."""
    value = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
