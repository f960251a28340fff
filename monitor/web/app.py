"""The review page's HTTP side (Starlette): the page, the alerts' clips, and posting a verdict.

``POST /api/review`` takes the same JSON as the MQTT ``review`` command (``event_id``,
``verdict``, ``condition``, ``note``, ``request_id``) with the token in ``Authorization: Bearer``,
and hands it to the daemon's ``Commands``: the verdict is applied exactly once by the same
``Reviewer``, and the event log line, the MQTT review message and the counter all follow as for
MQTT. The reply is the command's reply; the HTTP status says what kind of answer it is:
200 applied; 400 malformed or invalid; 401 missing or wrong token; 403 the page takes no
verdicts (no token configured); 404 unknown event; 409 already reviewed, or refused by the
reviewer (e.g. the clip is gone); 413 body too large; 500 the daemon failed. Everything is
checked before the verdict is handed on; the reviewer checks again under its lock, so a race
with another operator still ends in one verdict.

The token is sent in a header, never in a form or a cookie: a page on another site cannot set
that header on a request to this one without a CORS preflight, which this app never grants, so
a browser tab elsewhere cannot post verdicts with the operator's session.

Clips are served from the clip folder only: the path after ``/clips/`` must be relative, without
``.`` or ``..`` parts, name a ``.flac`` file and still lie inside the folder once symlinks are
resolved. Chromium, Firefox and Safari play FLAC in ``<audio>``, so clips go out as saved, as
``audio/flac`` (with range requests, which the players use to seek).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from monitor.errors import CommandError
from monitor.outputs.messages import VERDICTS
from monitor.review.verdicts import (
    MAX_PAYLOAD_BYTES,
    ReviewLog,
    find_alert,
    parse_verdict,
)
from monitor.service.commands import check_token
from monitor.web.views import Site, alert_views, machine_views

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
CLIP_SUFFIX = ".flac"
FLAC_TYPE = "audio/flac"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Refused(Exception):
    """A request answered with ``status`` and a one-line ``message``, nothing changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def clip_file(clips_dir: Path, relative: str) -> Path:
    """The clip file at ``relative`` under ``clips_dir``, or ``Refused``."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative or any(
            p in ("", ".", "..") for p in parts):
        raise Refused(400, f"bad clip path {relative!r}: a relative path inside the clip folder is expected")
    root = clips_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise Refused(403, f"clip path {relative!r} leaves the clip folder")
    if path.suffix != CLIP_SUFFIX or not path.is_file():
        raise Refused(404, f"no clip {relative!r} in the clip folder")
    return path


async def _body(request: Request) -> bytes:
    """The request body, refused past MAX_PAYLOAD_BYTES without reading further."""
    declared = request.headers.get("content-length")
    too_large = Refused(413, f"body too large (at most {MAX_PAYLOAD_BYTES} bytes)")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_PAYLOAD_BYTES):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_PAYLOAD_BYTES:
            raise too_large
    return bytes(body)


def _request_id(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("request_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def create_app(site: Site, host: str = "127.0.0.1") -> Starlette:
    """The application for ``site``; bound to a loopback ``host``, it answers only requests
    naming a loopback host (a DNS-rebinding page elsewhere cannot read it through the browser)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
    templates = Jinja2Templates(env=env)

    async def page(request: Request) -> Response:
        config = site.config()
        token = config.web.token_file or config.mqtt.command_token_file
        machines, alerts = await run_in_threadpool(lambda: (machine_views(site), alert_views(site)))
        context = {"machines": machines, "alerts": alerts, "verdicts": VERDICTS, "takes_verdicts": token is not None,
                   "conditions": config.enrollment.conditions, "daemon": config.daemon.name, "site": config.mqtt.site,
                   "threshold": config.alerts.threshold}
        return templates.TemplateResponse(request, "page.html", context, headers={"Cache-Control": "no-store"})

    async def clip(request: Request) -> Response:
        try:
            path = clip_file(site.clips_dir(), request.path_params["path"])
        except Refused as exc:
            log.warning("web: clip refused: %s", exc)
            return PlainTextResponse(f"{exc}\n", status_code=exc.status)
        return FileResponse(path, media_type=FLAC_TYPE)

    async def review(request: Request) -> Response:
        try:
            body = await _body(request)
            reply, status = await run_in_threadpool(_review, site, body, request.headers.get("authorization"))
        except Refused as exc:
            log.warning("web: verdict refused (%d): %s", exc.status, exc)
            request_id = _request_id(body) if exc.status != 413 else None
            return JSONResponse({"ok": False, "error": str(exc), "request_id": request_id}, status_code=exc.status)
        return JSONResponse(reply, status_code=status)

    routes = [Route("/", page), Route("/clips/{path:path}", clip), Route("/api/review", review, methods=["POST"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK_NAMES, host])] if _loopback(host) else []
    return Starlette(routes=routes, middleware=middleware)


def _review(site: Site, body: bytes, authorization: str | None) -> tuple[dict[str, Any], int]:
    """Check a posted verdict as far as can be without the reviewer's lock, then apply it
    through the daemon's command path; (reply, HTTP status)."""
    config = site.config()
    token_file = config.web.token_file or config.mqtt.command_token_file
    if token_file is None:
        raise Refused(403, "this page takes no verdicts: set web.token_file (or mqtt.command_token_file)")
    scheme, _, token = (authorization or "").partition(" ")
    try:
        check_token(token.strip() if scheme.lower() == "bearer" else None, token_file,
                    "web.token_file" if config.web.token_file else "mqtt.command_token_file")
    except CommandError as exc:
        raise Refused(401, str(exc)) from None
    try:
        verdict = parse_verdict(body, config.enrollment)
    except CommandError as exc:
        raise Refused(400, str(exc)) from None
    try:
        alert = find_alert(config.daemon.resolved_event_log(), verdict.event_id)
    except CommandError as exc:
        raise Refused(404, str(exc)) from None
    if alert.machine not in {m.name for m in site.machines}:
        raise Refused(404, f"event {verdict.event_id!r} is for machine {alert.machine!r}, not monitored here")
    done = ReviewLog(site.state_dir).find(verdict.event_id)
    if done is not None:
        raise Refused(409, f"event {verdict.event_id!r} already reviewed: {done.verdict} ({done.who}, {done.time})")
    reply = site.review(alert.machine, body)
    if reply.get("ok"):
        return reply, 200
    return reply, 500 if str(reply.get("error", "")).startswith("internal error") else 409
