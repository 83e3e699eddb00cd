"""The operator's web page and its JSON API, a Starlette application over the operator client.

Reading needs nothing: the page, the cluster's status with its charts, dead letters,
snapshots, the event stores' logs. Acting (retry, snapshot, restore, replay) needs the token
the node was started with (``--ui-token`` or ``CQRS_UI_TOKEN``), sent as ``Authorization:
Bearer <token>`` and compared in constant time; without a token configured the page is
read-only. Every action is a JSON ``POST`` from the page's own origin: a request that says it
comes from another site (``Origin``, ``Sec-Fetch-Site``) or is not JSON is refused before the
token is looked at, so a page elsewhere cannot make a logged-in browser act.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import Enum
from importlib.resources import files
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from moleculerpy_cqrs.face.client import OperatorClient, OperatorError
from moleculerpy_cqrs.face.ui.history import History

MAX_PAGE_SIZE: Final = 200
SAME_SITE: Final = ("same-origin", "none")
"""``Sec-Fetch-Site`` values of a request the page itself (or a person typing) made."""


def plain(value: Any) -> Any:
    """A typed value as JSON-ready data (dataclasses without their ``raw`` answers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "raw"
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OperatorPage:
    """The page's state: the client it calls through, the charts' history, the token."""

    def __init__(
        self,
        client: OperatorClient,
        *,
        token: str | None,
        history: History,
        call_timeout: float = 600.0,
    ) -> None:
        self.client = client
        self.token = token or None
        self.history = history
        self.call_timeout = call_timeout

    # ------------------------------------------------------------------ guards

    def check_action(self, request: Request) -> None:
        """Refuse (401/403/415) an action request that is cross-site, not JSON, or without
        the right token; nothing is called before this passes."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in SAME_SITE:
            raise Refused(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            if origin not in (f"http://{host}", f"https://{host}"):
                raise Refused(403, f"cross-site request refused (Origin: {origin})")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(415, "send actions as JSON (Content-Type: application/json)")
        if self.token is None:
            raise Refused(403, "this page is read-only: start it with --ui-token to act")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Refused(401, "this action needs the token: Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Refused(403, "wrong token")

    # ------------------------------------------------------------------ reads

    async def status(self, request: Request) -> Response:
        cluster = await self.client.status()
        now = time.time()
        self.history.add(cluster, now)
        aggregates = []
        for a in cluster.aggregates:
            item = plain(a)
            item["standbyNodes"] = list(a.standby)
            item["stalled"] = self.history.stalled(a.name, now)
            item["history"] = [
                [s.at, round(s.rate, 3), s.lag_events, s.lag_seconds]
                for s in self.history.samples(a.name)
            ]
            aggregates.append(item)
        stores = []
        for e in cluster.event_stores:
            item = plain(e)
            item["standbyNodes"] = list(e.standby)
            stores.append(item)
        return JSONResponse(
            {
                "eventStores": stores,
                "aggregates": aggregates,
                "unreachable": plain(cluster.unreachable),
                "canAct": self.token is not None,
                "stallAfter": self.history.stall_after,
                "now": now,
            }
        )

    async def dead_letters(self, request: Request) -> Response:
        name = request.path_params["name"]
        page = _count(request, "page", 1, 1, 10**9)
        size = _count(request, "pageSize", 20, 1, MAX_PAGE_SIZE)
        listed = await self.client.dead_letters(name, page=page, page_size=size)
        return JSONResponse(
            {**plain(listed), "totalPages": listed.total_pages, "caption": listed.caption()}
        )

    async def snapshots(self, request: Request) -> Response:
        rows = await self.client.snapshots(request.path_params["name"])
        return JSONResponse({"rows": plain(rows)})

    async def events(self, request: Request) -> Response:
        name = request.path_params["name"]
        page = _count(request, "page", 1, 1, 10**9)
        size = _count(request, "pageSize", 25, 1, MAX_PAGE_SIZE)
        event = request.query_params.get("event") or None
        listed = await self.client.events(
            name,
            page=page,
            page_size=size,
            event=event,
            since_ms=_time(request, "since"),
            until_ms=_time(request, "until"),
            failed_only=request.query_params.get("failed") in ("1", "true"),
        )
        return JSONResponse(
            {**plain(listed), "totalPages": listed.total_pages, "caption": listed.caption()}
        )

    async def event(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            event_id = int(request.path_params["id"])
        except ValueError:
            raise Refused(422, "an event id is a whole number") from None
        return JSONResponse(await self.client.event(name, event_id))

    # ------------------------------------------------------------------ actions

    async def retry(self, request: Request, body: dict[str, Any]) -> Any:
        ids = body.get("ids")
        if ids is not None and not (
            isinstance(ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise Refused(422, "ids must be a list of dead-letter ids (or left out: all)")
        name = request.path_params["name"]
        return plain(await self.client.retry(name, ids, within=self.call_timeout))

    async def snapshot(self, request: Request, body: dict[str, Any]) -> Any:
        name = request.path_params["name"]
        return {"snapshotId": await self.client.snapshot(name, within=self.call_timeout)}

    async def restore(self, request: Request, body: dict[str, Any]) -> Any:
        snapshot_id = body.get("snapshotId")
        if not isinstance(snapshot_id, str) or not snapshot_id:
            raise Refused(422, "restore takes snapshotId, the id of a completed snapshot")
        name = request.path_params["name"]
        return await self.client.restore(name, snapshot_id, within=self.call_timeout)

    async def replay(self, request: Request, body: dict[str, Any]) -> Any:
        return plain(await self.client.start_replay(request.path_params["name"]))

    async def check_token(self, request: Request, body: dict[str, Any]) -> Any:
        return {"ok": True}

    # ------------------------------------------------------------------ the app

    def app(self) -> Starlette:
        def read(handler: Callable[[Request], Awaitable[Response]]) -> Any:
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request)
                except Refused as refused:
                    return _error(refused.status, str(refused))
                except OperatorError as error:
                    return _error(_status_of(error), str(error))

            return endpoint

        def act(handler: Callable[[Request, dict[str, Any]], Awaitable[Any]]) -> Any:
            async def endpoint(request: Request) -> Response:
                try:
                    self.check_action(request)
                    try:
                        body = await request.json() if await request.body() else {}
                    except ValueError:
                        raise Refused(400, "the body is not JSON") from None
                    if not isinstance(body, dict):
                        raise Refused(422, "the body is a JSON object")
                    return JSONResponse(await handler(request, body))
                except Refused as refused:
                    headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
                    return _error(refused.status, str(refused), headers)
                except OperatorError as error:
                    return _error(_status_of(error), str(error))

            return endpoint

        aggregate = "/api/aggregates/{name}"
        store = "/api/event-stores/{name}"
        return Starlette(
            routes=[
                Route("/", page, methods=["GET"]),
                Route("/api/status", read(self.status), methods=["GET"]),
                Route(f"{aggregate}/dead-letters", read(self.dead_letters), methods=["GET"]),
                Route(f"{aggregate}/snapshots", read(self.snapshots), methods=["GET"]),
                Route(f"{aggregate}/retry", act(self.retry), methods=["POST"]),
                Route(f"{aggregate}/snapshot", act(self.snapshot), methods=["POST"]),
                Route(f"{aggregate}/restore", act(self.restore), methods=["POST"]),
                Route(f"{aggregate}/replay", act(self.replay), methods=["POST"]),
                Route(f"{store}/events", read(self.events), methods=["GET"]),
                Route(f"{store}/events/{{id}}", read(self.event), methods=["GET"]),
                Route("/api/token", act(self.check_token), methods=["POST"]),
            ]
        )


async def page(request: Request) -> Response:
    html = files("moleculerpy_cqrs.face.ui").joinpath("page.html").read_text(encoding="utf-8")
    return HTMLResponse(
        html,
        headers={
            # The page runs only its own inline script and talks only to its own origin.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "frame-ancestors 'none'",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_of(error: OperatorError) -> int:
    """An action's 4xx stays what it was (the operator fixes the request); anything else is
    the cluster's failure: 502."""
    return error.code if error.code is not None and 400 <= error.code < 500 else 502


def _count(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Refused(422, f"{name} is a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise Refused(422, f"{name} is a whole number from {low} to {high}")
    return value


def _time(request: Request, name: str) -> int | None:
    """A time parameter (ISO 8601, local time unless it says otherwise, or Unix ms) as Unix
    milliseconds."""
    raw = request.query_params.get(name)
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    try:
        return int(datetime.fromisoformat(raw).timestamp() * 1000)
    except ValueError:
        raise Refused(422, f"{name} is a time like 2026-12-02T19:30 (or Unix ms)") from None
