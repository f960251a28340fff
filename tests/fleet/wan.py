"""A site's WAN link on one machine: a TCP relay between the site broker's bridge and the
central broker, which a test cuts and restores while the central broker keeps running (its
consumers stay connected, as they would when one site's line goes down).

Three kinds of cut: ``reset`` closes every connection and refuses new ones (a router that
answers with resets: the bridge notices at once); ``blackhole`` silently discards everything in
both directions (a dead line: the bridge notices only when its keepalive expires, and what it
sent meanwhile is lost on the wire and must be re-sent from its persistent session);
``acks-lost`` discards only what comes back from the centre (a one-way failure: the central
broker receives and delivers what the bridge sends, but the bridge never sees the PUBACKs and
re-sends those messages after reconnecting, so the consumers get them twice).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Literal

log = logging.getLogger(__name__)

CutKind = Literal["reset", "blackhole", "acks-lost"]
UP, DOWN = "site->central", "central->site"


class WanLink:
    """Listens on ``port`` (127.0.0.1) and relays every connection to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        # Bound at once, so that no other process takes the port before start().
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._dropping: set[str] = set()  # directions whose data is discarded

    def start(self) -> None:
        if self._listener is None:  # after a cut: the same port again (create_server sets SO_REUSEADDR)
            self._listener = socket.create_server(("127.0.0.1", self.port))
        listener = self._listener
        threading.Thread(target=self._accept, args=(listener,), name=f"wan-{self.port}", daemon=True).start()

    def cut(self, kind: CutKind = "reset") -> None:
        if kind != "reset":
            with self._lock:
                self._dropping = {UP, DOWN} if kind == "blackhole" else {DOWN}
            return
        self._close_listener()
        self._close_connections()

    def restore(self) -> None:
        """The line is back: connections from before or during the cut are gone (their peers
        gave up on them), new ones are relayed."""
        with self._lock:
            self._dropping = set()
        self._close_connections()
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self._close_listener()
        self._close_connections()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()

    def _close_connections(self) -> None:
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut() or stop()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the central broker is down: refused, as a real connection would be
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink, direction in ((client, upstream, UP), (upstream, client, DOWN)):
                threading.Thread(target=self._pump, args=(source, sink, direction), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                dropped = direction in self._dropping
            if dropped:
                continue
            try:
                sink.sendall(data)
            except OSError:
                break
        with self._lock:
            self._sockets -= {source, sink}
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
