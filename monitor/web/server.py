"""Runs the review page with uvicorn on a thread of its own, beside the pipeline.

The socket is bound in ``start`` on the caller's thread, so a taken port or a wrong address is a
start-up error (the daemon turns it into a config error, as for the metrics port) rather than a
thread dying later. uvicorn runs its own asyncio loop in the thread; the page's blocking work
(reading the event log, applying a verdict, which embeds a clip) runs in its worker threads, so
neither the loop nor the daemon's workers wait on each other. uvicorn leaves signal handling to
the main thread when it is not on it, and ``log_config=None`` keeps the daemon's logging as it is.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from monitor.config import WebConfig
from monitor.web.app import create_app
from monitor.web.views import Site

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


class WebServer:
    def __init__(self, config: WebConfig, site: Site) -> None:
        self.config = config
        self.site = site
        self.port: int | None = None  # once started (the bound one when config.port is 0)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; ``OSError`` when the address cannot be bound."""
        host, port = self.config.host, self.config.port
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.site, host), loop="asyncio", http="h11", lifespan="off",
                                log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise OSError(f"the review page did not start on {host}:{self.port}")
            time.sleep(0.02)
        log.info("review page on http://%s:%s/", host if ":" not in host else f"[{host}]", self.port)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            log.warning("the review page did not stop within %.0f s", STOP_TIMEOUT_SECONDS)
        self._server = self._thread = None
