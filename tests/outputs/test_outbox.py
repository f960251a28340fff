"""The on-disk outbox: FIFO and ack semantics, durability across close and kill -9, the bound
(retained messages go before alerts, alerts are never dropped), and refusal of damaged files."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from monitor.errors import OutboxError, OutboxFull
from monitor.outputs.outbox import Outbox, OutboxMessage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def contents(outbox: Outbox) -> list[OutboxMessage]:
    """Drain the outbox the way the delivery thread does; what it held, oldest first."""
    found = []
    while (message := outbox.peek()) is not None:
        found.append(message)
        outbox.ack(message.id)
    return found


def test_fifo_peek_and_ack(path: Path) -> None:
    outbox = Outbox(path, 10)
    first = outbox.put("asd/s/m/alert", '{"n":1}')
    second = outbox.put("asd/s/m/state", '{"n":2}', retain=True)
    third = outbox.put("asd/s/m/alert", '{"n":3}', qos=0)
    assert first < second < third
    assert len(outbox) == 3
    assert outbox.peek() == OutboxMessage(first, "asd/s/m/alert", '{"n":1}', 1, False)
    assert outbox.peek() == outbox.peek(), "peek must not consume"
    outbox.ack(first)
    assert outbox.peek() == OutboxMessage(second, "asd/s/m/state", '{"n":2}', 1, True)
    outbox.ack(first)  # a second ack of the same id (a re-sent message) is harmless
    outbox.ack(10_000)
    assert len(outbox) == 2
    outbox.ack(third)  # acks need not be in order
    assert [m.id for m in contents(outbox)] == [second]
    assert outbox.peek() is None and len(outbox) == 0
    outbox.close()


def test_ids_keep_increasing_after_emptying_and_reopening(path: Path) -> None:
    outbox = Outbox(path, 10)
    last = outbox.put("t/a", "x")
    outbox.ack(last)
    outbox.close()
    outbox = Outbox(path, 10)
    assert outbox.put("t/a", "y") > last, "a reused id could be taken for an already acked message"
    outbox.close()


def test_messages_survive_close_and_reopen(path: Path) -> None:
    outbox = Outbox(path, 10)
    sent = [("asd/s/m/alert", f'{{"i":{i},"text":"Lüfter ⚠"}}', 1, i % 2 == 1) for i in range(5)]
    for topic, payload, qos, retain in sent:
        outbox.put(topic, payload, qos, retain)
    outbox.close()
    reopened = Outbox(path, 10)
    assert len(reopened) == 5
    assert [(m.topic, m.payload, m.qos, m.retain) for m in contents(reopened)] == sent
    reopened.close()


def test_messages_survive_kill_9(path: Path) -> None:
    """put() returns only once the message is committed: a process killed right after keeps it."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from monitor.outputs.outbox import Outbox\n"
         "outbox = Outbox(Path(sys.argv[1]), 100)\n"
         "for i in range(20): outbox.put('asd/s/m/alert', f'alert {i}')\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n",
         str(path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert path.with_name(path.name + "-wal").exists(), "WAL journal expected"
    outbox = Outbox(path, 100)  # also: the dead process's lock is gone
    assert [m.payload for m in contents(outbox)] == [f"alert {i}" for i in range(20)]
    outbox.close()


def test_full_drops_a_superseded_retained_message_first(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(path, 4)
    outbox.put("s/b", "b1", retain=True)
    outbox.put("a", "alert1")
    old_state = outbox.put("s/a", "a1", retain=True)
    outbox.put("s/a", "a2", retain=True)
    with caplog.at_level(logging.WARNING, logger="monitor.outputs.outbox"):
        outbox.put("a", "alert2")
    assert len(outbox) == 4
    assert outbox.dropped_total == 1
    (record,) = caplog.records
    message = record.getMessage()
    assert str(path) in message and f"dropped message {old_state}" in message and "superseded" in message
    assert "2 alerts, 2 retained" in message
    # b1 is older but still the latest state of its topic: it stays.
    assert [m.payload for m in contents(outbox)] == ["b1", "alert1", "a2", "alert2"]
    outbox.close()


def test_full_then_drops_the_oldest_retained_message(path: Path) -> None:
    outbox = Outbox(path, 3)
    outbox.put("a", "alert1")
    outbox.put("s/b", "b1", retain=True)
    outbox.put("s/c", "c1", retain=True)
    outbox.put("a", "alert2")
    assert [m.payload for m in contents(outbox)] == ["alert1", "c1", "alert2"]
    outbox.close()


def test_full_of_alerts_refuses_and_keeps_every_alert(path: Path) -> None:
    outbox = Outbox(path, 3)
    for i in range(3):
        outbox.put("a", f"alert{i}")
    with pytest.raises(OutboxFull, match=f"outbox {path}: full of alerts") as info:
        outbox.put("a", "alert3")
    assert "\n" not in str(info.value)
    # Neither is a new retained message traded for an alert, nor for itself.
    with pytest.raises(OutboxFull):
        outbox.put("s/a", "state", retain=True)
    assert len(outbox) == 3
    assert [m.payload for m in contents(outbox)] == ["alert0", "alert1", "alert2"]
    outbox.put("a", "room again")
    assert len(outbox) == 1
    outbox.close()


def test_concurrent_puts_and_acks_keep_fifo(path: Path) -> None:
    outbox = Outbox(path, 10_000)
    writers = [threading.Thread(target=lambda w=w: [outbox.put(f"t/{w}", str(i)) for i in range(100)]) for w in range(4)]
    delivered: list[OutboxMessage] = []

    def consume() -> None:
        while len(delivered) < 400:
            message = outbox.peek()
            if message is not None:
                delivered.append(message)
                outbox.ack(message.id)

    consumer = threading.Thread(target=consume)
    for thread in [*writers, consumer]:
        thread.start()
    for thread in [*writers, consumer]:
        thread.join(timeout=30)
    assert len(delivered) == 400 and len(outbox) == 0
    assert [m.id for m in delivered] == sorted(m.id for m in delivered)
    for w in range(4):  # each writer's messages in its own order
        assert [m.payload for m in delivered if m.topic == f"t/{w}"] == [str(i) for i in range(100)]
    outbox.close()


def test_garbage_file_is_refused_and_kept(path: Path) -> None:
    garbage = b"this is not an SQLite database\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(OutboxError, match=f"outbox {path}: not a usable database") as info:
        Outbox(path, 10)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == garbage, "a damaged outbox may hold alerts: never overwrite it"


def test_damaged_pages_are_refused_and_kept(path: Path) -> None:
    outbox = Outbox(path, 1000)
    for i in range(300):
        outbox.put("asd/s/m/alert", f"alert {i} " + "x" * 200)
    outbox.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page:6 * page] = b"\xa5" * (3 * page)
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match=f"outbox {path}: .*(corrupt|malformed|not a usable)"):
        Outbox(path, 1000)
    assert path.read_bytes() == bytes(data)


def test_another_sqlite_database_is_not_touched(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE bank (x)")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match=f"outbox {path}: an SQLite database that is not an outbox"):
        Outbox(path, 10)


def test_second_instance_on_the_same_file_is_refused(path: Path) -> None:
    """Two daemons on one state dir would send everything twice."""
    outbox = Outbox(path, 10)
    with pytest.raises(OutboxError, match=f"outbox {path}: in use by another process"):
        Outbox(path, 10)
    outbox.close()
    Outbox(path, 10).close()


@pytest.mark.parametrize("topic", ["", "asd/+/alert", "asd/#", "a\0b"])
def test_unpublishable_topics_are_refused(path: Path, topic: str) -> None:
    """Such a message would block the head of the FIFO forever."""
    outbox = Outbox(path, 10)
    with pytest.raises(ValueError, match="not a valid MQTT topic name"):
        outbox.put(topic, "x")
    assert len(outbox) == 0
    outbox.close()


def test_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError, match="max_messages must be >= 1"):
        Outbox(path, 0)
    outbox = Outbox(path, 10)
    with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
        outbox.put("t", "x", qos=3)
    outbox.close()
