"""The core's event-log port (:class:`~moleculerpy_cqrs.core.log.EventLog`) on a broker.

:class:`LocalEventLog` reads the event store's runtime directly when it runs on this node;
:class:`RemoteEventLog` goes through the event store's actions when it runs on another. This
module alone knows those action names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moleculerpy import ServiceBroker

from moleculerpy_cqrs.core.eventstore import EventStoreRuntime, until_ready
from moleculerpy_cqrs.core.log import EventLog, Listeners
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.errors import ResponseTooLargeError
from moleculerpy_cqrs.stores.fields import Record

READ = "read"
RECORD_SNAPSHOT = "recordSnapshot"
SETTLE_SNAPSHOT = "settleSnapshot"
SNAPSHOTS = "snapshots"


def snapshot_event(aggregate: str) -> str:
    """The name snapshot events of ``aggregate`` are stored under."""
    return f"{aggregate}.snapshot"


class LocalEventLog:
    """The log of an event store running on this node."""

    def __init__(self, runtime: EventStoreRuntime) -> None:
        self.name = runtime.name
        self._runtime = runtime

    async def read_after(self, position: int, limit: int) -> list[Record]:
        # Read as the event store's ``read`` action answers a node elsewhere: upcast (in
        # place: the adapter's rows are fresh, this reader's alone).
        return self._runtime.upcasters.read_all(
            await self._runtime.adapter.read_after(position, limit), in_place=True
        )

    async def head(self) -> int:
        return await self._runtime.adapter.head()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        return self._runtime.listeners.subscribe(wake)

    async def record_snapshot(self, aggregate: str, payload: dict[str, Any]) -> Record:
        return await self._runtime.record_snapshot(snapshot_event(aggregate), payload)

    async def settle_snapshot(
        self, event_id: int, payload: dict[str, Any], error: str | None
    ) -> None:
        await self._runtime.settle_snapshot(event_id, payload, error)

    async def snapshots(self, aggregate: str) -> list[Record]:
        return await self._runtime.snapshots(snapshot_event(aggregate))


class RemoteEventLog:
    """The log of an event store running on another node, through its actions; woken by
    ``listeners`` (the aggregate's service hears the event store's broadcasts)."""

    def __init__(self, name: str, port: BrokerPort, listeners: Listeners) -> None:
        self.name = name
        self._port = port
        self._listeners = listeners

    async def read_after(self, position: int, limit: int) -> list[Record]:
        while True:
            try:
                answer: dict[str, Any] = await self._port.call(
                    f"{self.name}.{READ}", {"after": position, "limit": limit}
                )
            except ResponseTooLargeError:
                if limit <= 1:
                    raise
                limit //= 2  # a page of large events: ask for fewer at a time
                continue
            events: list[Record] = answer["events"]
            return events

    async def head(self) -> int:
        answer: dict[str, Any] = await self._port.call(f"{self.name}.{READ}", {"limit": 0})
        return int(answer["head"])

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.subscribe(wake)

    async def record_snapshot(self, aggregate: str, payload: dict[str, Any]) -> Record:
        row: Record = await self._port.call(
            f"{self.name}.{RECORD_SNAPSHOT}",
            {"event": snapshot_event(aggregate), "payload": payload},
        )
        return row

    async def settle_snapshot(
        self, event_id: int, payload: dict[str, Any], error: str | None
    ) -> None:
        await self._port.call(
            f"{self.name}.{SETTLE_SNAPSHOT}", {"id": event_id, "payload": payload, "error": error}
        )

    async def snapshots(self, aggregate: str) -> list[Record]:
        rows: list[Record] = await self._port.call(
            f"{self.name}.{SNAPSHOTS}", {"event": snapshot_event(aggregate)}
        )
        return rows


def local_event_stores(broker: ServiceBroker) -> dict[str, EventStoreRuntime]:
    """The event stores whose service runs on this broker, by name."""
    services = getattr(broker.registry, "__services__", {})
    runtimes = (getattr(s, "runtime", None) for s in list(services.values()))
    return {r.name: r for r in runtimes if isinstance(r, EventStoreRuntime)}


async def event_log(
    broker: ServiceBroker, name: str, port: BrokerPort, listeners: Listeners
) -> EventLog:
    """The log of event store ``name``: local if it runs here, else through the broker."""
    local = local_event_stores(broker).get(name)
    if local is not None:
        await until_ready(local.ready, name)  # its table exists once it has started
        return LocalEventLog(local)
    await port.wait_for_actions([f"{name}.{READ}"])
    return RemoteEventLog(name, port, listeners)
