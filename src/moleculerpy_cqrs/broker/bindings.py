"""A start-up check of an aggregate's bindings: each one's event should be one its event store
produces (a ``map_action``/``map_event``) or has stored. ``on("order.shiped")`` for
``order.shipped`` would otherwise never fire, with no word: the events are stored, the
checkpoint advances and the rows never change."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from typing import Any

from moleculerpy_cqrs.core.log import EventLog
from moleculerpy_cqrs.core.port import BrokerPort

log = logging.getLogger(__name__)

SAMPLE = 1000
"""How many of the log's latest events give the stored names a misspelling is compared with."""


async def unproduced(
    aggregate: str, events: Iterable[str], store: str, port: BrokerPort, source: EventLog
) -> list[str]:
    """A warning line for each bound event that no producer of ``store`` declares and that
    the log has never held, naming the closest produced or stored name."""
    wanted = sorted(set(events))
    if not wanted:
        return []
    status: dict[str, Any] = await port.call(f"{store}.status", {})
    produced = {str(name) for name in status.get("produces") or []}
    # Names events are read under (renames, upcasters' new names) are produced too.
    produced |= {str(name) for name in status.get("versions") or {}}
    produced |= {str(name) for name in (status.get("renames") or {}).values()}
    missing = [name for name in wanted if name not in produced]
    if not missing:
        return []
    head = await source.head()
    recent = await source.read_after(max(head - SAMPLE, 0), SAMPLE)
    stored = {str(event["event"]) for event in recent}
    lines = []
    for name in missing:
        if name in stored or await port.call(f"{store}.count", {"event": name}):
            continue
        candidates = sorted((produced | stored) - {name})
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(candidates[:10]) or "none"
        lines.append(
            f"aggregate {aggregate}: on({name!r}) may never fire: no map_action or map_event "
            f"of {store} produces {name!r} and its log holds none{hint} "
            f"(produced or stored: {known})"
        )
    return lines
