"""The local control socket: ``<state_dir>/control.sock``, one JSON request per connection.

Request: ``{"machine": "fan-1", "command": "enroll", ...enrollment fields}`` or
``{"machine": "fan-1", "command": "review", "event_id": ..., "verdict": ...}`` (a verdict on an
alert, see monitor/review/); the reply is one JSON line. Only local users who can reach the
state directory can use it (it is created mode 0600), which is the authentication: the same
people who could edit the bank directly. So a request here needs no
``mqtt.command_token_file`` token: that one guards MQTT.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, str], dict[str, Any]]  # (machine, payload, command) -> reply
COMMANDS = ("enroll", "review")
MAX_REQUEST_BYTES = 65536


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        outer = handler

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST_BYTES)
                request = None
                try:
                    request = json.loads(line)
                    machine = request.pop("machine")
                    command = request.pop("command")
                    if command not in COMMANDS:
                        raise ValueError(f"command must be one of {', '.join(map(repr, COMMANDS))}")
                    reply = outer(machine, json.dumps(request).encode(), command)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    # Answered like every reply: with the request's request_id, as far as it was read.
                    request_id = request.get("request_id") if isinstance(request, dict) else None
                    reply = {"ok": False, "error": f"bad request: {exc}",
                             "request_id": request_id if isinstance(request_id, str) else None}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        path.unlink(missing_ok=True)  # a stale socket from a killed daemon
        self._server = socketserver.ThreadingUnixStreamServer(str(path), _Request)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("control socket %s", self.path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def request(path: Path, machine: str, fields: dict[str, Any], timeout: float = 10.0,
            command: str = "enroll") -> dict[str, Any]:
    """Send one command to a running daemon and return its reply (used by the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ConnectionError(f"{path}: no daemon is listening ({exc.strerror or exc})") from None
        sock.sendall(json.dumps({"machine": machine, "command": command, **fields}).encode() + b"\n")
        data = sock.makefile("rb").readline()
    return json.loads(data)
