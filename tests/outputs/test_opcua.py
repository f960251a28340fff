"""The OPC UA server with a real asyncua client: the address space, a state change and an alarm
event on real audio (the shipped MIMII fan clips), logins, config errors, and clients that
stall or never read while the daemon runs, which must not delay a window."""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path

import pytest

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import Config, MachineConfig, OpcUaConfig, config_from_dict
from monitor.demo import enroll_clips, replay_clips
from monitor.enrollment.files import enroll_files
from monitor.errors import EXIT_CONFIG, ConfigError, MissingDependency
from monitor.outputs.fanout import WindowReport
from monitor.outputs.messages import AlertEvent, ReviewMessage
from monitor.outputs.plant import PlantFeed
from monitor.scoring.detector import Detector
from monitor.service.daemon import Daemon
from tests.daemons import daemon_config, write_yaml

needs_asyncua = pytest.mark.skipif(find_spec("asyncua") is None, reason="asyncua (extra 'opcua') is not installed")
NAMESPACE = OpcUaConfig().namespace
DRAIN_GRACE = 2.0  # seconds a change may take to reach the variables on a loaded box
ANONYMOUS = OpcUaConfig(enabled=True, endpoint="opc.tcp://127.0.0.1:0/asd/", allow_anonymous=True)


def fan_config(tmp_path: Path, opcua: OpcUaConfig, speed: float = 1000.0) -> Config:
    """The shipped fan: 3 healthy clips then 5 faulty ones, against a bank of 7 other healthy
    clips (logmel: the fault alarms within seconds, without a CNN)."""
    config = daemon_config(tmp_path, replay_clips())
    config = replace(config, machines=[MachineConfig("fan", "replay")], opcua=opcua,
                     sources=[replace(config.sources[0], speed=speed)])
    store = BankStore(config.daemon.state_dir / "banks" / "fan")
    enroll_files(Detector.from_config(config), store, enroll_clips(), "default")
    return config


def url(port: int | None) -> str:
    return f"opc.tcp://127.0.0.1:{port}/asd/"


async def alarm_type(client):
    ns = await client.get_namespace_index(NAMESPACE)
    return await client.nodes.base_event_type.get_child(
        ["0:ConditionType", "0:AcknowledgeableConditionType", "0:AlarmConditionType", f"{ns}:AcousticAlarmType"])


async def machine_node(client, site: str = "test", machine: str = "fan"):
    ns = await client.get_namespace_index(NAMESPACE)
    return ns, await client.nodes.objects.get_child([f"{ns}:Machines", f"{ns}:{site}", f"{ns}:{machine}"])


class Collector:
    """asyncua's subscription handler: every data change and event, as they come."""

    def __init__(self) -> None:
        self.values: list[object] = []
        self.events: list[dict] = []

    def datachange_notification(self, node, value, data) -> None:
        self.values.append(value)

    def event_notification(self, event) -> None:
        self.events.append({k: v.Value for k, v in event.get_event_props_as_fields_dict().items()})


# ------------------------------------------------------------------ config
def test_opcua_is_off_by_default_and_bound_to_loopback() -> None:
    config = config_from_dict({})
    assert not config.opcua.enabled and config.opcua.endpoint == "opc.tcp://127.0.0.1:4840/asd/"
    assert not config.opcua.allow_anonymous and config.opcua.security_policy == "None"


@pytest.mark.parametrize(("section", "message"), [
    ({"security_policy": "Basic128Rsa15"}, ("opcua.security_policy: must be one of None, Basic256Sha256_Sign, "
                                            "Basic256Sha256_SignAndEncrypt, got 'Basic128Rsa15'")),
    ({"security_policy": "Basic256Sha256_Sign"}, ("opcua.security_policy: Basic256Sha256_Sign needs "
                                                  "certificate_file and private_key_file")),
    ({"certificate_file": "/nonexistent/cert.der"}, "opcua.certificate_file: /nonexistent/cert.der does not exist"),
    ({"endpoint": "http://127.0.0.1:4840/"}, "opcua.endpoint: expected opc.tcp://HOST:PORT/PATH"),
    ({"username": "scada"}, "opcua.password_file: give username and password_file together"),
    ({"enabled": True}, "opcua.allow_anonymous: nobody could log in"),
    ({"password": "secret"}, "opcua.password: unknown key"),  # never in the YAML
])
def test_a_bad_opcua_setting_is_one_line_naming_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^<config>: " + message.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict({"opcua": section})


@needs_asyncua
def test_a_taken_port_is_a_config_error_before_any_audio(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = daemon_config(tmp_path, replay_clips()[:1])
        path = write_yaml(tmp_path / "site.yaml", replace(config, opcua=replace(ANONYMOUS, endpoint=url(port))))
        assert main(["run", "-c", str(path)]) == EXIT_CONFIG
    assert capfd.readouterr().err.endswith(f"asd-monitor: config error: {path}: opcua.endpoint: cannot listen on "
                                           f"{url(port)} (Address already in use)\n")


@needs_asyncua
def test_a_certificate_that_does_not_load_names_its_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    config = daemon_config(tmp_path, replay_clips()[:1])
    daemon = Daemon(replace(config, opcua=replace(ANONYMOUS, security_policy="Basic256Sha256_SignAndEncrypt",
                                                  certificate_file=cert, private_key_file=key)))
    with pytest.raises(ConfigError, match=f"^opcua.certificate_file: {cert} is not a usable PEM/DER file"):
        daemon.start()
    assert daemon.machines == [] and daemon.windows_processed == 0  # it stopped before machines and audio


def test_without_asyncua_the_daemon_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncua", None)  # as if not installed: importing it fails
    monkeypatch.delitem(sys.modules, "monitor.outputs.opcua", raising=False)
    daemon = Daemon(replace(daemon_config(tmp_path, replay_clips()[:1]), opcua=ANONYMOUS))
    with pytest.raises(MissingDependency, match=r"^opcua.enabled: asyncua is not installed: pip install 'asd-monitor\[opcua\]'"):
        daemon.start()
    assert daemon.machines == []


# ------------------------------------------------------------------ logins and security
@contextmanager
def server(opcua: OpcUaConfig, feed: PlantFeed | None = None, **options) -> Iterator:
    from monitor.outputs.opcua import OpcUaServer

    feed = feed or PlantFeed()
    feed.update("fan", state="normal", severity="ok", fused_rank=0.25)
    running = OpcUaServer(opcua, "test", "asd-test", ["fan"], feed, **options)
    running.start()
    try:
        yield running
    finally:
        running.stop()


async def read_state(endpoint: str, **login: str) -> str:
    """The machine's state; a write to it must fail (every variable is read-only)."""
    from asyncua import Client, ua

    client = Client(endpoint)
    if "user" in login:
        client.set_user(login["user"])
        client.set_password(login["password"])
    async with client:
        ns, fan = await machine_node(client)
        state = await fan.get_child(f"{ns}:State")
        with pytest.raises(ua.UaStatusCodeError, match="BadNotWritable|BadUserAccessDenied"):
            await state.write_value(ua.Variant("alert", ua.VariantType.String))
        return await state.read_value()


@needs_asyncua
def test_only_the_configured_user_logs_in(tmp_path: Path) -> None:
    from asyncua.ua.uaerrors import BadIdentityTokenRejected, BadUserAccessDenied

    secret = tmp_path / "opcua.password"
    secret.write_text("s3cret\n")
    opcua = OpcUaConfig(enabled=True, endpoint="opc.tcp://127.0.0.1:0/asd/", username="scada", password_file=secret)
    with server(opcua) as running:
        assert asyncio.run(read_state(url(running.port), user="scada", password="s3cret")) == "normal"
        with pytest.raises(BadUserAccessDenied):
            asyncio.run(read_state(url(running.port), user="scada", password="wrong"))
        with pytest.raises(BadIdentityTokenRejected):  # anonymous was not allowed
            asyncio.run(read_state(url(running.port)))


@needs_asyncua
def test_sign_and_encrypt_with_certificates(tmp_path: Path) -> None:
    """Basic256Sha256 SignAndEncrypt: the server's certificate and key from the config, a client
    with its own; a session on a channel without security is refused by the server."""
    from asyncua import Client, ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.ua.uaerrors import BadUserAccessDenied
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def certificates() -> None:
        # The server's key as "server.key": the server tells PEM from DER by content, not suffix.
        for key, uri, use in (("server.key", "urn:asd-monitor:asd-test", ExtendedKeyUsageOID.SERVER_AUTH),
                              ("client-key.pem", "urn:asd-monitor:client", ExtendedKeyUsageOID.CLIENT_AUTH)):
            name = key.split(".")[0].split("-")[0]
            await setup_self_signed_certificate(tmp_path / key, tmp_path / f"{name}.der", uri, socket.gethostname(),
                                                [use], {"commonName": name})

    asyncio.run(certificates())
    opcua = replace(ANONYMOUS, security_policy="Basic256Sha256_SignAndEncrypt",
                    certificate_file=tmp_path / "server.der", private_key_file=tmp_path / "server.key")

    async def read() -> str:
        client = Client(url(running.port))
        client.application_uri = "urn:asd-monitor:client"
        await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{tmp_path / 'client.der'},"
                                         f"{tmp_path / 'client-key.pem'}")
        async with client:
            ns, fan = await machine_node(client)
            return await (await fan.get_child(f"{ns}:State")).read_value()

    async def plain_channel() -> None:
        """A session on a channel without security, asked for step by step (a client's own
        endpoint check would stop before the server is asked). asyncua alone accepts it."""
        client = Client(url(running.port))
        await client.connect_socket()
        try:
            await client.send_hello()
            await client.open_secure_channel()  # a None channel: allowed, for discovery
            params = ua.CreateSessionParameters(
                ClientDescription=ua.ApplicationDescription(ApplicationUri="urn:x", ApplicationType=ua.ApplicationType.Client),
                EndpointUrl=url(running.port), SessionName="plain", RequestedSessionTimeout=60000, ClientNonce=bytes(32))
            await client.uaclient.create_session(params)
            await client.uaclient.activate_session(ua.ActivateSessionParameters(
                UserIdentityToken=ua.AnonymousIdentityToken(PolicyId="anonymous")))
        finally:
            client.disconnect_socket()

    with server(opcua) as running:
        assert asyncio.run(read()) == "normal"
        with pytest.raises(BadUserAccessDenied):
            asyncio.run(plain_channel())


@needs_asyncua
def test_raise_verdict_and_clear_as_alarm_events_and_condition_refresh(tmp_path: Path) -> None:
    """The alarm's life as A&C events: active on the raise, acknowledged by a person's verdict,
    inactive (no longer retained) on the clear; ConditionRefresh replays only an active one."""
    from asyncua import Client, ua

    feed = PlantFeed()
    raised = AlertEvent("fan-1", "raise", "test", "fan", "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:10.000Z",
                        0.97, 0.9, {}, "default", None)

    async def scenario(running) -> tuple[list[dict], list[dict], list[dict]]:
        async def refreshed() -> list[dict]:
            async with Client(url(running.port)) as late:
                collector = Collector()
                subscription = await late.create_subscription(20, collector)
                await subscription.subscribe_events(late.nodes.server, await alarm_type(late))
                await late.get_node(ua.ObjectIds.ConditionType).call_method(
                    ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                    ua.Variant(subscription.subscription_id, ua.VariantType.UInt32))
                await asyncio.sleep(0.3)
                return collector.events

        async with Client(url(running.port)) as client:
            collector = Collector()
            subscription = await client.create_subscription(20, collector)
            # Every machine's alarms, from the Server object, with the alarm type's fields.
            await subscription.subscribe_events(client.nodes.server, await alarm_type(client))
            feed.alert(raised)
            feed.review(ReviewMessage("fan-1", "test", "fan", "fault", "default", "", "2026-12-01T10:05:00Z", "cli"))
            await asyncio.sleep(0.3)
            while_active = await refreshed()
            feed.alert(replace(raised, type="clear", end="2026-12-01T10:10:00.000Z", fused_rank=0.2, severity="ok"))
            await asyncio.sleep(0.3)
            return collector.events, while_active, await refreshed()

    with server(ANONYMOUS, feed) as running:
        events, while_active, after_clear = asyncio.run(scenario(running))
    raise_, verdict, clear = events
    assert (raise_["ActiveState/Id"], raise_["AckedState/Id"], raise_["Retain"], raise_["AlertType"]) == (True, False, True, "raise")
    assert raise_["SourceName"] == "fan" and raise_["Time"] == datetime(2026, 12, 1, 10, 0, 10, tzinfo=timezone.utc)
    assert (verdict["ActiveState/Id"], verdict["AckedState/Id"], verdict["Message"].Text) == (True, True, "fan: verdict fault")
    assert (clear["ActiveState/Id"], clear["Retain"], clear["Severity"]) == (False, False, 100)
    assert {e["AlertEventId"] for e in events} == {"fan-1"}
    assert [e["ActiveState/Id"] for e in while_active] == [True] and after_clear == []


@needs_asyncua
def test_after_changes_were_dropped_every_variable_is_rewritten() -> None:
    """A change lost to a full queue may be the only news of a field (here the bank version):
    the server must not keep the stale value."""
    from asyncua import Client

    feed = PlantFeed()
    with server(ANONYMOUS, feed, queue_size=3) as running:
        running._loop.call_soon_threadsafe(time.sleep, 0.5)  # the server's loop busy for a while
        time.sleep(0.1)
        feed.update("fan", bank_version="v000002")
        for i in range(10):
            feed.update("fan", fused_rank=i / 10)

        async def read() -> tuple[str, float]:
            async with Client(url(running.port)) as client:
                ns, fan = await machine_node(client)
                return (await (await fan.get_child(f"{ns}:BankVersion")).read_value(),
                        await (await fan.get_child(f"{ns}:FusedRank")).read_value())

        assert asyncio.run(read()) == ("v000002", 0.9)
        assert running.dropped == 8


# ------------------------------------------------------------------ a daemon on real audio
@needs_asyncua
def test_a_client_browses_reads_and_hears_the_alert_on_real_audio(tmp_path: Path) -> None:
    from asyncua import ua

    daemon = Daemon(fan_config(tmp_path, ANONYMOUS))
    subscribed = threading.Event()
    # The first window waits for the client, so the alert cannot come before it subscribes.
    daemon.add_listener(lambda report: subscribed.wait(30))
    collector = Collector()

    async def scenario() -> dict:
        from asyncua import Client

        await asyncio.to_thread(daemon.start)
        runner = threading.Thread(target=daemon.run)
        runner.start()
        async with Client(url(daemon.opcua.port)) as client:
            ns, fan = await machine_node(client)
            names = {(await child.read_browse_name()).Name for child in await fan.get_children()}
            state = await fan.get_child(f"{ns}:State")
            assert await state.read_value() in ("starting", "normal")
            subscription = await client.create_subscription(50, collector)
            await subscription.subscribe_data_change(state)
            await subscription.subscribe_events(fan, await alarm_type(client))
            subscribed.set()
            await asyncio.to_thread(runner.join, 60)
            assert not runner.is_alive(), "the replay did not finish in time"
            await asyncio.sleep(0.3)  # the last notifications (publishing interval 50 ms)
            read = {name: await (await fan.get_child(path)).read_value() for name, path in (
                ("id", f"{ns}:LastAlertEventId"), ("item", [f"{ns}:MachineryItemState", f"{ns}:CurrentState"]),
                ("component", [f"{ns}:Identification", f"{ns}:ComponentName"]), ("bank", f"{ns}:BankVersion"),
                ("rank", f"{ns}:FusedRank"))}
        daemon.stop()
        return {"names": names, **read}

    got = asyncio.run(scenario())
    status = daemon.plant.snapshot()["fan"]
    assert {"Identification", "MachineryItemState", "State", "Severity", "FusedRank", "SensorFault", "BankVersion",
            "AnomalousShare1h", "AnomalousShare24h", "RankEwma", "LastAlertTime", "LastAlertEventId",
            "LastVerdict"} <= got["names"]
    assert "alert" in collector.values, collector.values
    raises = [e for e in collector.events if e["AlertType"] == "raise"]
    assert raises, collector.events
    event = raises[0]
    assert event["Machine"] == "fan" and event["Site"] == "test" and event["Rule"] == "n_of_m"
    assert event["FusedRank"] > daemon.config.alerts.threshold and event["ActiveState/Id"] is True
    assert event["Retain"] is True and event["Severity"] == 800
    assert event["AlertEventId"] == got["id"] == status.alert_event_id
    assert got["item"] == ua.LocalizedText("Executing") and got["component"] == ua.LocalizedText("fan")
    assert got["bank"] == status.bank_version and got["rank"] == pytest.approx(status.fused_rank)


# ------------------------------------------------------------------ hostile clients
async def hostile_clients(port: int) -> list:
    """One client stalls in the middle of its Hello, one connects and says nothing, and one
    subscribes to every variable and alarm (publishing every 10 ms) and then never reads its
    socket again."""
    from asyncua import Client

    clients: list = []
    for payload in (b"HEL", b""):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(payload)  # a third of a message header, or nothing at all
        clients.append(raw)
    reader = Client(url(port))
    await reader.connect()
    _, fan = await machine_node(reader)
    subscription = await reader.create_subscription(10, Collector())
    await subscription.subscribe_data_change(await fan.get_variables())
    await subscription.subscribe_events(fan)
    reader.uaclient.protocol.transport.pause_reading()  # never reads again
    clients.append(reader)
    return clients


@needs_asyncua
def test_stalled_and_unread_clients_do_not_delay_a_window(tmp_path: Path) -> None:
    """The replay runs twice in one daemon: alone, then with the hostile clients. Windows take
    what they took without them, the plant queue drops nothing, and afterwards a fresh client
    reads the latest status (the server was never wedged)."""
    from asyncua import Client

    # A window every 0.2 s: each is done before the next is ready, so a latency is its own.
    config = fan_config(tmp_path, ANONYMOUS, speed=50.0)
    daemon = Daemon(replace(config, sources=[replace(config.sources[0], paths=replay_clips() * 2)]))
    reports: list[WindowReport] = []
    daemon.add_listener(reports.append)
    first_pass = len(replay_clips())

    async def scenario() -> tuple[list, float, tuple[str, float]]:
        await asyncio.to_thread(daemon.start)
        runner = threading.Thread(target=daemon.run)
        runner.start()
        while len(reports) < first_pass:
            await asyncio.sleep(0.02)
        clients = await hostile_clients(daemon.opcua.port)
        in_place = time.monotonic()
        await asyncio.to_thread(runner.join, 60)
        assert not runner.is_alive(), "the replay did not finish in time"
        async with Client(url(daemon.opcua.port)) as client:
            ns, fan = await machine_node(client)
            deadline = time.monotonic() + DRAIN_GRACE
            while True:  # the drain applies a change within milliseconds; allow for a loaded box
                latest = (await (await fan.get_child(f"{ns}:LastAlertEventId")).read_value(),
                          await (await fan.get_child(f"{ns}:FusedRank")).read_value())
                if latest[0] == daemon.plant.snapshot()["fan"].alert_event_id or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        return clients, in_place, latest

    clients, in_place, (event_id, rank) = asyncio.run(scenario())
    status = daemon.plant.snapshot()["fan"]
    daemon.stop()
    for raw in clients[:2]:
        raw.close()
    assert event_id == status.alert_event_id and rank == pytest.approx(status.fused_rank)
    assert daemon.opcua.dropped == 0
    alone = [r.done - r.ready for r in reports[:first_pass]]
    hostile = [r.done - r.ready for r in reports if r.ready >= in_place]
    assert len(hostile) >= 5
    print(f"window latency ms, median/max: alone {1000 * statistics.median(alone):.0f}/{1000 * max(alone):.0f}, "
          f"with hostile clients {1000 * statistics.median(hostile):.0f}/{1000 * max(hostile):.0f} ({len(hostile)} windows)")
    assert statistics.median(hostile) < statistics.median(alone) + 0.1
    assert max(hostile) < max(alone) + 0.5
