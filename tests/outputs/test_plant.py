"""The plant feed: each machine's status for OPC UA / Sparkplug B, changes to subscribers without
ever waiting for them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from monitor.outputs.plant import PlantFeed
from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config, enroll, run_to_end


def test_a_change_reaches_every_subscriber_with_the_fields_that_changed() -> None:
    feed = PlantFeed()
    feed.add_machines(["fan"])
    first, second = feed.subscribe(), feed.subscribe()
    feed.update("fan", state="normal", severity="ok")  # severity was already ok
    for subscription in (first, second):
        change = subscription.get(timeout=1)
        assert change is not None and change.changed == {"state"} and change.status.state == "normal"
    feed.update("fan", state="normal")  # nothing new: nobody hears of it
    assert first.get(timeout=0.05) is None


def test_a_full_queue_drops_its_oldest_change_and_never_blocks_the_caller() -> None:
    feed = PlantFeed()
    slow = feed.subscribe(maxsize=3)
    for i in range(10):
        feed.update("fan", fused_rank=i / 10)
    assert slow.dropped == 7
    assert [slow.get(0).status.fused_rank for _ in range(3)] == [0.7, 0.8, 0.9]
    assert feed.snapshot()["fan"].fused_rank == 0.9


def test_a_waiting_subscriber_wakes_on_a_change() -> None:
    feed = PlantFeed()
    subscription = feed.subscribe()
    got = []
    reader = threading.Thread(target=lambda: got.append(subscription.get(timeout=5)))
    reader.start()
    feed.update("fan", severity="warning")
    reader.join(5)
    assert got and got[0].status.severity == "warning"


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unknown machine status fields: colour"):
        PlantFeed().update("fan", colour="red")


def test_a_daemon_run_fills_the_status_and_announces_the_alert(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnffffnnnn"))
    enroll(config, tmp_path / "bank")
    daemon = Daemon(config)
    subscription = daemon.plant.subscribe()  # before start: every change from the first
    run_to_end(daemon)
    status = daemon.outputs.plant.snapshot()["motor"]
    assert status.bank_version and status.fused_rank is not None and status.window_end
    changes = list(iter(lambda: subscription.get(0), None))
    alerts = [c.alert.type for c in changes if c.alert is not None]
    assert alerts[0] == "raise" and status.alert_type == alerts[-1]
    assert status.alert_event_id == [c.alert for c in changes if c.alert is not None][-1].event_id
    assert any(c.status.state == "alert" for c in changes)
