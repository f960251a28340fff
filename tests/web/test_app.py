"""The review page over real HTTP against a real daemon: the page's content, clips served only
from the clip folder, and verdicts through the daemon's command path, bad ones refused with a
clear status and nothing changed."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("starlette", reason="the review page needs the optional extra 'web'")

from monitor.config import WebConfig, config_from_dict
from monitor.errors import ConfigError
from monitor.service.daemon import Daemon
from tests.web.conftest import TOKEN, ReviewSite, review_events, reviews_file


def request(site: ReviewSite, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (the path is sent as given: no client-side normalisation)."""
    where = urlsplit(site.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post(site: ReviewSite, payload: dict | bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    status, _headers, data = request(site, "POST", "/api/review", body, headers)
    return status, json.loads(data)


def clip_path(site: ReviewSite) -> str:
    return "/clips/" + site.clip.relative_to(site.state_dir / "clips").as_posix()


def test_the_page_shows_machines_trend_alerts_clips_and_banks(review_site) -> None:
    site = review_site()
    status, headers, body = request(site, "GET", "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'id="machine-demo-fan"' in page and 'data-field="state">alert<' in page
    assert 'data-field="severity">alarm<' in page and "anomalous_ratio_1h" in page
    assert 'id="bank-demo-fan" data-field="bank">v000001<' in page
    assert "<polyline points=" in page and "<circle" in page  # the trend, with anomalous windows marked
    assert f'id="alert-{site.event_id}"' in page and f'src="{clip_path(site)}"' in page
    assert 'id="token"' in page and page.count('class="verdict"') == 1
    windows = site.daemon.outputs.history.read("demo-fan", 0.0)
    assert len(windows) > 0 and windows.anomalous.any()
    assert (f"{len(windows)} windows, {len(windows)} scored, {int(windows.anomalous.sum())} anomalous"
            in " ".join(page.split()))


def test_clips_are_served_as_flac_from_the_clip_folder_only(review_site, tmp_path: Path) -> None:
    site = review_site()
    status, headers, body = request(site, "GET", clip_path(site))
    assert status == 200 and headers["content-type"] == "audio/flac" and body == site.clip.read_bytes()
    status, headers, body = request(site, "GET", clip_path(site), headers={"Range": "bytes=0-99"})
    assert status == 206 and len(body) == 100  # the players seek with range requests

    secret = tmp_path / "secret.flac"
    secret.write_bytes(b"fLaC not yours")
    os.symlink(secret, site.clip.parent / "escape.flac")
    (site.clip.parent / "notes.txt").write_text("not a clip")
    machine = site.clip.parent.name
    cases = {
        f"/clips/{machine}/../../events.jsonl": 400,
        "/clips/%2e%2e/events.jsonl": 400,
        f"/clips/{machine}/%2e%2e/%2e%2e/banks": 400,
        "/clips//etc/passwd": 400,
        "/clips/%2Fetc%2Fpasswd": 400,
        f"/clips/{machine}/escape.flac": 403,
        f"/clips/{machine}/nothing.flac": 404,
        f"/clips/{machine}/notes.txt": 404,
    }
    for path, expected in cases.items():
        status, headers, body = request(site, "GET", path)
        assert status == expected, path
        assert body.count(b"\n") == 1 and b"fLaC" not in body, path


def test_bad_verdicts_are_refused_and_change_nothing(review_site) -> None:
    site = review_site()
    event = site.event_id
    good = {"event_id": event, "verdict": "normal", "request_id": "r1"}
    cases = [
        (post(site, good, token=None), 401, "missing or wrong token"),
        (post(site, good, token="wrong"), 401, "missing or wrong token"),
        (post(site, b"{oops"), 400, "malformed JSON"),
        (post(site, {"event_id": event, "verdict": "maybe"}), 400, "verdict must be one of"),
        (post(site, {"event_id": event, "verdict": "normal", "bank": "x"}), 400, "unknown field 'bank'"),
        (post(site, {"event_id": "demo-fan-1", "verdict": "normal", "request_id": "r2"}), 404, "unknown event 'demo-fan-1'"),
        (post(site, {"event_id": event, "verdict": "normal", "note": "x" * 10_000}), 413, "body too large"),
    ]
    for (status, reply), expected, message in cases:
        assert status == expected and not reply["ok"] and message in reply["error"], (reply, expected)
    assert cases[5][0][1]["request_id"] == "r2"  # replies carry the request id, as on MQTT
    # A body that does not declare its size is cut off at the cap as well.
    where = urlsplit(site.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    connection.putrequest("POST", "/api/review")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"x" * 3000
    for _ in range(3):
        connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 413 and "body too large" in json.loads(response.read())["error"]
    connection.close()
    status, _headers, _body = request(site, "GET", "/api/review")
    assert status == 405
    # Refused by the reviewer itself (checked under its lock): the clip is gone.
    site.clip.unlink()
    status, reply = post(site, {"event_id": event, "verdict": "normal", "request_id": "r3"})
    assert status == 409 and "is gone" in reply["error"] and reply["request_id"] == "r3"
    # Nothing changed: no bank version, no verdict, no review event.
    assert site.store.versions() == ["v000001"] and site.store.current() == "v000001"
    assert reviews_file(site) == [] and review_events(site) == []


def test_two_operators_at_once_give_one_verdict(review_site) -> None:
    site = review_site()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda verdict: post(site, {"event_id": site.event_id, "verdict": verdict}),
                                ["normal", "normal"]))
    assert sorted(status for status, _reply in answers) == [200, 409]
    assert site.store.versions() == ["v000001", "v000002"] and len(reviews_file(site)) == 1


def test_a_verdict_goes_through_the_daemon_like_mqtt(review_site, mosquitto) -> None:
    mosquitto.register("asd/demo/demo-fan/review", "plant")
    site = review_site(broker=mosquitto)
    status, reply = post(site, {"event_id": site.event_id, "verdict": "normal", "condition": "default",
                                "note": "the conveyor next door", "request_id": "web-1"})
    assert status == 200, reply
    assert reply["ok"] and reply["verdict"] == "normal" and reply["version"] == "v000002" and reply["request_id"] == "web-1"
    assert site.store.current() == "v000002" and site.daemon.machines[0].bank_version == "v000002"
    ((retained, _topic, payload),) = mosquitto.collect("asd/demo/demo-fan/review", 1, timeout=10, client_id="plant")
    message = json.loads(payload)
    assert not retained and (message["event_id"], message["who"], message["version"]) == (site.event_id, "web", "v000002")
    assert [(r["event_id"], r["who"]) for r in reviews_file(site)] == [(site.event_id, "web")]
    assert [(e["event_id"], e["who"]) for e in review_events(site)] == [(site.event_id, "web")]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{site.daemon.telemetry.port}/metrics", timeout=5).read().decode()
    assert 'asd_reviews_total{machine="demo-fan",verdict="normal"} 1.0' in metrics
    # Exactly once: a second verdict is refused, and the page now shows the answer and the new bank.
    status, reply = post(site, {"event_id": site.event_id, "verdict": "fault"})
    assert status == 409 and "already reviewed: normal (web" in reply["error"]
    _status, _headers, body = request(site, "GET", "/")
    page = body.decode()
    assert 'data-field="bank">v000002<' in page and "versions: v000001, v000002" in page
    assert "<b>normal</b>" in page and 'class="verdict"' not in page
    assert site.store.versions() == ["v000001", "v000002"]


def test_without_a_token_the_page_is_read_only(review_site) -> None:
    site = review_site(token=False)
    status, reply = post(site, {"event_id": site.event_id, "verdict": "normal"}, token="anything")
    assert status == 403 and "takes no verdicts" in reply["error"]
    _status, _headers, body = request(site, "GET", "/")
    assert "read-only" in body.decode() and 'class="verdict"' not in body.decode()
    assert site.store.versions() == ["v000001"] and reviews_file(site) == []


def test_a_foreign_host_name_is_refused_on_loopback(review_site) -> None:
    site = review_site()
    status, _headers, _body = request(site, "GET", "/", headers={"Host": "attacker.example"})
    assert status == 400  # a DNS-rebinding page cannot read the page through the browser
    assert request(site, "GET", "/", headers={"Host": "localhost"})[0] == 200


def test_web_config_is_checked(tmp_path: Path) -> None:
    assert config_from_dict({}).web == WebConfig()
    assert config_from_dict({}).web.enabled is False and WebConfig().host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"web.token_file: .*nope does not exist"):
        config_from_dict({"web": {"token_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="web.port"):
        config_from_dict({"web": {"port": 70000}})
    with pytest.raises(ConfigError, match="web.host"):
        config_from_dict({"web": {"host": " "}})
    with pytest.raises(ConfigError, match="web.colour"):
        config_from_dict({"web": {"colour": "blue"}})


def test_a_taken_port_is_a_config_error_at_start(review_site, tmp_path: Path) -> None:
    site = review_site()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    config = replace(site.daemon.config, web=WebConfig(enabled=True, port=taken.getsockname()[1]),
                     daemon=replace(site.daemon.config.daemon, state_dir=tmp_path / "other"))
    daemon = Daemon(config)
    try:
        with pytest.raises(ConfigError, match="web.host, web.port"):
            daemon.start()
    finally:
        daemon.stop()
        taken.close()
