"""Where workers read the event log from, and how they learn that it grew.

A worker on the event store's own node reads the adapter directly and is woken by the
committer; a worker elsewhere reads through ``<eventStore>.read`` and is woken by the
``cqrs.<eventStore>.appended`` broadcast. Nothing polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.stores.base import Adapter
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


class LogSource(Protocol):
    name: str

    async def read_after(self, position: int, limit: int) -> list[Record]: ...

    async def head(self) -> int: ...

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever the log grows; answers a function that unsubscribes."""
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


class LocalLog:
    """The log read straight from the event store's adapter, on its own node."""

    def __init__(self, name: str, adapter: Adapter, listeners: Listeners) -> None:
        self.name = name
        self._adapter = adapter
        self._listeners = listeners

    async def read_after(self, position: int, limit: int) -> list[Record]:
        return await self._adapter.read_after(position, limit)

    async def head(self) -> int:
        return await self._adapter.head()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.subscribe(wake)


class RemoteLog:
    """The log read through ``<eventStore>.read`` when the event store lives on another node."""

    def __init__(self, name: str, port: BrokerPort, listeners: Listeners) -> None:
        self.name = name
        self._port = port
        self._listeners = listeners

    async def read_after(self, position: int, limit: int) -> list[Record]:
        answer: dict[str, Any] = await self._port.call(
            f"{self.name}.read", {"after": position, "limit": limit}
        )
        events: list[Record] = answer["events"]
        return events

    async def head(self) -> int:
        answer: dict[str, Any] = await self._port.call(f"{self.name}.read", {"limit": 0})
        return int(answer["head"])

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.subscribe(wake)
