"""An HTTP face for the profile example: moleculerpy-web's API gateway in front of it.

    cqrs run profile web                              # one node, HTTP on 127.0.0.1:3000
    curl -X POST localhost:3000/api/profile/update -H 'content-type: application/json' \\
         -d '{"name": "Ann", "country": "NZ", "married": true}'
    curl 'localhost:3000/api/profile-summary?page=1&pageSize=10'
    curl localhost:3000/api/profile-summary/1
    curl -G localhost:3000/api/profile-summary-rows --data-urlencode 'query={"total":{"$gt":1}}'
    curl 'localhost:3000/api/profile-summary-count?search=n&searchFields=country'
    curl 'localhost:3000/api/profile-events?sort=-id&pageSize=5'   # the log itself

The gateway only calls actions through the broker, so it may as well run on a node of its own
(``cqrs run web --transporter nats://...``). It needs the ``web`` extra: ``pip install
'moleculerpy-cqrs[web]'``, or in a clone ``.venv/bin/pip install -e '.[web]'``.
``CQRS_HTTP_HOST`` (default ``127.0.0.1``) and ``CQRS_HTTP_PORT`` (default 3000; 0 picks a
free port, which uvicorn's start-up line names) say where it listens. Errors keep their
status: a bad parameter is 422 (``profile.update`` declares its params schema: a profile
without a country, or with a country that is not text, is refused and nothing is stored), a
body that is not JSON 415, malformed JSON 400, a missing id 404, each with a JSON body that
names the problem (an action's client error keeps its name, code, type and data, as
moleculer-web sends them). The read actions take their params from the query string as moleculer-db
reads them (``?query={...}`` as JSON text, ``?limit=0``, ``?fields=country total``,
``?sort=-total``, ``?search=nz&searchFields=country``); a test holds these to moleculer-db's
own answers (tests/interop/test_moleculer_db_differential.py).

Retries are safe with the ``Idempotency-Key`` header (the IETF httpapi draft; quoted or not):
it becomes ``meta.idempotencyKey``, so a repeat of a POST is answered the event stored first
and stores nothing, and a repeat with another body answers 409::

    curl -X POST localhost:3000/api/profile/update -H 'Idempotency-Key: "order-7"' \\
         -H 'content-type: application/json' -d '{"name": "Ann", "country": "NZ"}'
"""

from __future__ import annotations

import os
from typing import Any

from moleculerpy.errors import MoleculerError
from moleculerpy_web import ApiGatewayService, GatewayError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

WRITES = ("POST", "PUT", "PATCH")
IDEMPOTENCY_HEADER = "idempotency-key"


class UnsupportedMediaTypeError(GatewayError):  # type: ignore[misc]
    """A command's body that is not JSON: 415, saying what to send."""

    def __init__(self, content_type: str) -> None:
        got = content_type or "no content-type"
        super().__init__(
            f"send the body as a JSON object with content-type: application/json, not {got}",
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            {"contentType": content_type or None},
        )


class ActionError(GatewayError):  # type: ignore[misc]
    """A client error (4xx) of an action, answered as moleculer-web answers it: with the
    action's own name, code, type and data (moleculerpy-web renames them, e.g. a
    ``ValidationError`` to ``UnprocessableEntityError``, and answers every client error other
    than 401, 403, 404 and 422 as 400, where a client must tell a 409 apart)."""

    def __init__(self, error: MoleculerError) -> None:
        plain = error.to_dict()
        data = plain.get("data")
        super().__init__(str(error), int(plain["code"]), plain.get("type"), data)
        self.name = plain.get("name") or type(error).__name__
        self.data = data  # as it is: moleculer-db's data may be a list, or null

    def to_response_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "message": self.message,
            "code": self.status_code,
            "type": self.type,
            "data": self.data,
        }


class _ClientErrorsAsTheyAre:
    """The broker as the gateway calls it, but an action's client error keeps its shape."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    async def call(self, action: str, params: Any = None, **options: Any) -> Any:
        try:
            return await self._broker.call(action, params, **options)
        except MoleculerError as error:
            code = getattr(error, "code", None)
            if not isinstance(code, int) or not 400 <= code < 500:
                raise
            raise ActionError(error) from error


async def before_call(ctx: Any, route: Any, request: Any) -> None:
    """The ``Idempotency-Key`` header to ``meta.idempotencyKey`` (a structured-field string
    is quoted: the quotes are not part of the key)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None:
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1]
        ctx.meta["idempotencyKey"] = key
    ctx.broker = _ClientErrorsAsTheyAre(ctx.broker)


class ProfileGateway(ApiGatewayService):  # type: ignore[misc]
    name = "api"
    settings = {
        "ip": os.environ.get("CQRS_HTTP_HOST", "127.0.0.1"),
        "port": int(os.environ.get("CQRS_HTTP_PORT", "3000")),
        "path": "/api",
        "routes": [
            {
                "path": "/",
                "onBeforeCall": before_call,
                "aliases": {
                    "POST /profile/update": "profile.update",
                    "GET /profile-summary": "profileSummaryAggregate.list",
                    "GET /profile-summary/{id}": "profileSummaryAggregate.get",
                    "GET /profile-summary-rows": "profileSummaryAggregate.find",
                    "GET /profile-summary-count": "profileSummaryAggregate.count",
                    "GET /profile-events": "profileEventStore.list",
                },
            }
        ],
    }

    async def _handle(self, request: Request) -> Response:
        # moleculerpy-web 0.1.1 parses a form body with a package it does not install (a 500)
        # and drops any other body that is not JSON (the action then sees no params): a
        # command's body must be JSON.
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";")[0].strip().lower()
        # (Starlette keeps the body it read for the handler to read again.)
        if request.method in WRITES and media_type != "application/json" and await request.body():
            error = UnsupportedMediaTypeError(content_type)
            return JSONResponse(error.to_response_dict(), status_code=error.status_code)
        response: Response = await super()._handle(request)
        return response


services = [ProfileGateway]
