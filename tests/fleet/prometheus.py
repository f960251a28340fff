"""A real Prometheus server (Debian's ``prometheus``) on a free loopback port with its own TSDB
directory, started from one of the shipped config/fleet/ files with its targets and intervals
replaced by the test's, and queried over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.broker import free_port


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


class Prometheus:
    """``config`` is the shipped file's content after the test's changes (a dict)."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.port = free_port()
        self.config_path = directory / "prometheus.yml"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.directory / "prometheus.log", "ab") as log:
            self.process = subprocess.Popen(
                [binary("prometheus"), f"--config.file={self.config_path}", f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={self.directory / 'tsdb'}"],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until ``predicate()`` (errors while the server starts count as not yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except OSError:
                pass
            if self.process is not None and self.process.poll() is not None:
                log = (self.directory / "prometheus.log").read_text(errors="replace")
                raise AssertionError(f"prometheus exited with {self.process.returncode}: {log[-1500:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.5)
