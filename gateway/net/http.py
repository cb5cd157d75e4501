"""The plain HTTP routes beside the WebSocket: ``/healthz``, ``/metrics``, ``/``.

They answer from the running gateway's state and never change it. The
dashboard's files are read off the event loop: validations must not wait on
the disk.
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response as HttpResponse

from gateway import metrics
from gateway.auth import Principal
from gateway.cluster.member import ClusterMember
from gateway.core.engine import RiskEngine
from gateway.fanout import Fanout
from gateway.persistence import RecordStore
from protocol.codes import Mode, Role


class _Connection(Protocol):
    @property
    def principal(self) -> Principal | None: ...


class Served(Protocol):
    """What the routes read of the running gateway."""

    @property
    def engine(self) -> RiskEngine: ...
    @property
    def store(self) -> RecordStore: ...
    @property
    def fanout(self) -> Fanout: ...
    @property
    def sessions(self) -> Mapping[int, _Connection]: ...
    @property
    def member(self) -> ClusterMember | None: ...


DASHBOARD_DIR = Path(__file__).resolve().parent.parent.parent / "clients" / "dashboard"
# The dashboard's files: path -> (file in DASHBOARD_DIR, content type).
_DASHBOARD_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}
_MODE_GAUGE = {Mode.NORMAL: 0, Mode.REDUCING: 1, Mode.HALTED: 2}


async def respond(gateway: Served, connection: ServerConnection, path: str) -> HttpResponse:
    """The answer to a plain HTTP request for ``path`` (404 when unknown)."""
    if path == "/healthz":
        return healthz(gateway)
    if path == "/metrics":
        refresh_gauges(gateway)
        payload, content_type = metrics.render()
        return HttpResponse(
            200,
            "OK",
            Headers([("Content-Type", content_type), ("Content-Length", str(len(payload)))]),
            payload,
        )
    asset = _DASHBOARD_ASSETS.get(path)
    if asset is not None:
        name, content_type = asset
        try:
            async with aiofiles.open(DASHBOARD_DIR / name, "rb") as handle:
                page = await handle.read()
        except OSError:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "dashboard not installed\n")
        return HttpResponse(
            200,
            "OK",
            Headers(
                [
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(page))),
                    ("Cache-Control", "no-store"),
                    ("X-Content-Type-Options", "nosniff"),
                ]
            ),
            page,
        )
    return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")


def healthz(gateway: Served) -> HttpResponse:
    """200 with the gateway's mode; 503 once persistence has failed, or, in
    a cluster, while the member is fenced."""
    mode = gateway.engine.gateway_mode.mode.value
    failed = gateway.store.failed
    member = gateway.member
    cluster = None if member is None else member.health()
    body: dict[str, Any]
    if failed is not None:
        body = {"status": "failing", "mode": mode, "reason": f"persistence failure: {failed}"}
    elif cluster is not None and not cluster["reachable"]:
        reason = member.share.unavailable if member is not None else None
        body = {"status": "failing", "mode": mode, "reason": reason}
    else:
        body = {"status": "ok", "mode": mode}
    if cluster is not None:
        body["cluster"] = cluster
    status = http.HTTPStatus.OK if body["status"] == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
    return json_response(status, body)


def refresh_gauges(gateway: Served) -> None:
    """Set the gauges that are read, not counted, just before a scrape."""
    engine = gateway.engine
    metrics.EMERGENCY_MODE.set(_MODE_GAUGE[engine.gateway_mode.mode])
    metrics.GROSS_EXPOSURE.set(float(engine.gross_exposure))
    by_role = {role.value: 0 for role in Role}
    for session in gateway.sessions.values():
        if session.principal is not None:
            by_role[session.principal.role.value] += 1
    for role, count in by_role.items():
        metrics.CONNECTIONS.labels(role=role).set(count)
    stats = gateway.fanout.stats()
    metrics.QUEUED_BYTES.set(stats.get("queued_bytes", 0))
    for channel, count in stats.get("subscribers", {}).items():
        metrics.SUBSCRIBERS.labels(channel=channel).set(count)
    metrics.update_journal(gateway.store.stats())


def json_response(status: http.HTTPStatus, body: dict[str, Any]) -> HttpResponse:
    payload = orjson.dumps(body) + b"\n"
    return HttpResponse(
        status.value,
        status.phrase,
        Headers([("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]),
        payload,
    )
