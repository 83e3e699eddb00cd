"""``cqrs call ACTION`` (any action, from the shell) and ``cqrs dead-letters --discard``.

Both join the cluster with the operator commands' short-lived node
(:func:`moleculerpy_cqrs.face.client.session`) and pass ``meta``, which the operator's own
calls do not.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from datetime import datetime
from typing import Any

from moleculerpy.errors import MoleculerError, RequestTimeoutError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moleculerpy_cqrs.face.client import OperatorError, Options, Session, session


class CallFailed(Exception):
    """The called action answered an error: its name, code, type and data, as JSON."""

    def __init__(self, error: MoleculerError) -> None:
        self.detail = {
            "name": getattr(error, "wire_name", None)  # ours: the name on the wire
            or getattr(error, "name", None)
            or type(error).__name__,
            "message": getattr(error, "message", None) or str(error),
            "code": getattr(error, "code", None),
            "type": getattr(error, "type", None),
            "data": getattr(error, "data", None),
        }
        super().__init__(json.dumps(self.detail, default=str))


async def call(
    options: Options,
    action: str,
    params: Any,
    meta: dict[str, Any],
    *,
    call_timeout: float,
) -> None:
    """Call ``action`` once it is visible in the cluster and print its answer as JSON."""
    async with session(options) as s:
        await s.discover(lambda: _visible(s, action))
        if not _visible(s, action):
            services = ", ".join(sorted(s.services())) or "none"
            raise OperatorError(f"no action {action!r} in the cluster (services: {services})")
        answer = await _call(s, action, params, meta, call_timeout)
    sys.stdout.write(json.dumps(answer, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _visible(s: Session, action: str) -> bool:
    return any(
        action in (service.get("actions") or {})
        for node in list(s.broker.node_catalog.nodes.values())
        if not node.local and node.available
        for service in node.services
        if isinstance(service, dict)
    )


async def _call(s: Session, action: str, params: Any, meta: dict[str, Any], within: float) -> Any:
    try:
        return await s.broker.call(action, params, meta=meta, timeout=within)
    except (RequestTimeoutError, TimeoutError):
        raise OperatorError(f"{action}: no answer within {within:g}s") from None
    except MoleculerError as error:
        raise CallFailed(error) from None


def operator_name() -> str:
    """Who runs this command, as a discard records it: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def discard_dead_letters(
    options: Options, aggregate: str, ids: list[int] | None, *, call_timeout: float
) -> None:
    """Give up on an aggregate's dead letters (``ids``, or all); each is recorded as
    discarded, by whom and when."""
    async with session(options) as s:
        await s.aggregate(aggregate)
        params = {} if ids is None else {"ids": ids}
        try:
            answer = await _call(
                s, f"{aggregate}.discardDeadLetters", params, {"user": operator_name()},
                call_timeout,
            )  # fmt: skip
        except CallFailed as failed:
            raise OperatorError(
                f"{aggregate}.discardDeadLetters failed ({failed.detail['code']}): "
                f"{failed.detail['message']}"
            ) from None
    if options.as_json:
        sys.stdout.write(json.dumps(answer, indent=2, default=str) + "\n")
        return
    missing = answer.get("missing") or []
    note = f"; no dead letter {', '.join(map(str, missing))}" if missing else ""
    print(
        f"{aggregate}: discarded {answer.get('discarded')} (by {answer.get('by')}), "
        f"remaining {answer.get('remaining')}{note}; "
        f"`cqrs dead-letters {aggregate} --discarded` lists what was discarded",
        flush=True,
    )


async def discarded_dead_letters(
    options: Options, aggregate: str, *, page: int, page_size: int
) -> None:
    """List the dead letters discarded so far, with who discarded them and when."""
    async with session(options) as s:
        await s.aggregate(aggregate)
        answer = await s.call(
            f"{aggregate}.discardedDeadLetters", {"page": page, "pageSize": page_size}
        )
    if options.as_json:
        sys.stdout.write(json.dumps(answer, indent=2, default=str) + "\n")
        return
    # A table piped into grep keeps whole values rather than 80 columns of ellipses.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(width=wide, highlight=False)
    rows: list[dict[str, Any]] = answer.get("rows") or []
    total = answer.get("total", len(rows))
    if not total:
        console.print(f"no discarded dead letters in {escape(aggregate)}")
        return
    table = Table(
        title=f"discarded dead letters of {aggregate}",
        caption=f"page {answer.get('page')} of {answer.get('totalPages')}, {total} in all",
    )
    for column in ("dead letter", "event id", "event", "handler", "error", "by", "discarded"):
        right = column in ("dead letter", "event id")
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for row in rows:
        table.add_row(
            _cell(row.get("deadLetterId")),
            _cell(row.get("eventId")),
            escape(_cell(row.get("event"))),
            escape(_cell(row.get("handler"))),
            escape(_cell(row.get("error"))),
            escape(_cell(row.get("discardedBy"))),
            _when(row.get("discarded")),
        )
    console.print(table)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
