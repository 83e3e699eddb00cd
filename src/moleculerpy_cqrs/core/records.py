"""What the toolkit stores beside the user's fields, and the numbers it stores there."""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any, Final

from moleculerpy_cqrs.stores.fields import FieldDeclaration, Record


class EventType(IntEnum):
    """``eventType`` of a stored event (the Go library's numbers)."""

    COMMAND = 0
    SNAPSHOT_CREATED = 1
    SNAPSHOT_COMPLETED = 2
    SNAPSHOT_FAILED = 3


class Status(IntEnum):
    """Dispatch ``status`` of a stored event (the Go library's numbers)."""

    CREATED = 0
    PROCESSING = 1
    COMPLETE = 2
    FAILED = 3
    RETRYING = 4


EVENT_FIELDS: Final[dict[str, FieldDeclaration]] = {
    "event": "string",
    "version": "integer",
    "created": "integer",
    "updated": "integer",
    "status": "integer",
    "eventType": "integer",
    "payload": "json",
    "meta": "json",
    "attempts": "integer",
    "error": "string",
    "idempotencyKey": {"type": "string", "unique": True},
}
"""Columns of every event store (``created``/``updated`` in Unix milliseconds;
``idempotencyKey`` NULL for events stored without a key). The key's unique index is part of the
declaration, so every adapter made from it has the index: created by ``connect`` (on a table an
earlier version made too), kept by restore and replace."""

IDEMPOTENCY_KEY: Final = "idempotencyKey"
"""The event store's unique column, and the ``ctx.meta`` entry a caller sets it with."""
MAX_KEY_LENGTH: Final = 200
ORIGIN_KEY: Final = "$cqrsOrigin"
"""The meta entry the dispatcher sends with each event: ``<event store>:<position>``."""

AGGREGATE_FIELDS: Final[dict[str, str]] = {"eventId": "integer"}
"""Columns the toolkit adds to every aggregate: the event that last wrote the row."""

DEAD_LETTER_FIELDS: Final[dict[str, str]] = {
    "eventId": "integer",
    "event": "string",
    "handler": "string",
    "kind": "string",
    "error": "string",
    "attempts": "integer",
    "created": "integer",
    "updated": "integer",
    "record": "json",
}
"""Columns of an aggregate's dead-letter table (``record`` is the event as stored)."""

EVENT_VERSION: Final = 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def answer(row: Record, extras: tuple[str, ...]) -> dict[str, Any]:
    """The answer to a stored command, as the Go library shapes it (plus ``id``)."""
    out = {
        "id": row["id"],
        "event": row["event"],
        "created": row["created"],
        "status": row["status"],
        "eventType": row["eventType"],
        "payload": row["payload"],
    }
    for name in extras:
        out[name] = row.get(name)
    return out


def delivered(row: Record, batch_size: int) -> dict[str, Any]:
    """An event as the dispatcher emits it and transformations receive it."""
    out = dict(row)
    for hidden in _NOT_DELIVERED:
        out.pop(hidden, None)
    out["batchSize"] = batch_size
    return out


_NOT_DELIVERED: Final = ("meta", "attempts", "error", IDEMPOTENCY_KEY)
