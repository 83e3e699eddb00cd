"""An HTTP face for the profile example: moleculerpy-web's API gateway in front of it.

    cqrs run profile web                              # one node, HTTP on 127.0.0.1:3000
    curl -X POST localhost:3000/api/profile/update -H 'content-type: application/json' \\
         -d '{"name": "Ann", "country": "NZ", "married": true}'
    curl 'localhost:3000/api/profile-summary?page=1&pageSize=10'
    curl localhost:3000/api/profile-summary/1
    curl 'localhost:3000/api/profile-events?sort=-id&pageSize=5'   # the log itself

The gateway only calls actions through the broker, so it may as well run on a node of its own
(``cqrs run web --transporter nats://...``). It needs the ``web`` extra: ``pip install
'moleculerpy-cqrs[web]'``, or in a clone ``.venv/bin/pip install -e '.[web]'``.
``CQRS_HTTP_HOST`` (default ``127.0.0.1``) and ``CQRS_HTTP_PORT`` (default 3000; 0 picks a
free port, which uvicorn's start-up line names) say where it listens. Errors keep their
status: a bad parameter is 422, a missing id 404, each with a JSON body that names the problem.
"""

from __future__ import annotations

import os

from moleculerpy_web import ApiGatewayService


class ProfileGateway(ApiGatewayService):  # type: ignore[misc]
    name = "api"
    settings = {
        "ip": os.environ.get("CQRS_HTTP_HOST", "127.0.0.1"),
        "port": int(os.environ.get("CQRS_HTTP_PORT", "3000")),
        "path": "/api",
        "routes": [
            {
                "path": "/",
                "aliases": {
                    "POST /profile/update": "profile.update",
                    "GET /profile-summary": "profileSummaryAggregate.list",
                    "GET /profile-summary/{id}": "profileSummaryAggregate.get",
                    "GET /profile-events": "profileEventStore.list",
                },
            }
        ],
    }


services = [ProfileGateway]
