"""The event log as the core's workers see it (a port), and how they learn that it grew.

A worker on the event store's own node reads the log directly and is woken by the committer;
a worker elsewhere reads it through the broker and is woken by the event store's broadcast.
Nothing polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from moleculerpy_cqrs.stores.fields import Record


class Wakeup:
    """A level-triggered wake-up: ``arm`` before looking for work, ``wait`` if none was found.

    Arming first means a wake that lands between the look and the wait is never lost.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def arm(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class EventLog(Protocol):
    """The core's one view of an event store: its log and its snapshot records.

    ``broker/log.py`` implements it twice: straight on the event store's runtime when it runs
    on this node, and through the event store's actions when it runs on another (only the
    broker layer knows those action names).
    """

    name: str

    async def read_after(self, position: int, limit: int) -> list[Record]:
        """Committed events after ``position`` in position order, at most ``limit`` stored
        ones, as read now (:mod:`~moleculerpy_cqrs.core.upcast`): current name and version;
        a split event as its pieces (same ``id``, told apart by ``part``); one that cannot be
        upcast in its stored form with ``upcastError``."""
        ...

    async def head(self) -> int:
        """The last committed position (0: empty)."""
        ...

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever the log grows; answers a function that unsubscribes."""
        ...

    async def record_snapshot(self, aggregate: str, payload: dict[str, Any]) -> Record:
        """Append a snapshot-created event (eventType 1) for ``aggregate``; answers it."""
        ...

    async def settle_snapshot(
        self, event_id: int, payload: dict[str, Any], error: str | None
    ) -> None:
        """Mark a snapshot event completed (2), or failed (3) with ``error``."""
        ...

    async def snapshots(self, aggregate: str) -> list[Record]:
        """Every snapshot event of ``aggregate``, oldest first."""
        ...


class Listeners:
    """The wake functions of the workers reading one log."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(wake)
        return lambda: self._listeners.remove(wake) if wake in self._listeners else None

    def notify(self) -> None:
        for wake in list(self._listeners):
            wake()
