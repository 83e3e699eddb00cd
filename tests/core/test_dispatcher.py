"""The dispatcher: order, statuses, retries, restarts, and no busy polling."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from moleculerpy import Context, Service, event

from moleculerpy_cqrs import EventStore, Status
from moleculerpy_cqrs.broker.port import MoleculerPort
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore
from tests.core.test_go_library import Collector


def _setup(make_store: MakeStore, **options: Any) -> tuple[EventStore, Service, Collector]:
    events = EventStore("noteEventStore", make_store(), **options)
    collector = Collector()

    class Notes(events.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added")

        @event(name="note.added")
        async def on_added(self, ctx: Context) -> None:
            await collector.add(ctx.params)

    return events, Notes(), collector


async def _statuses(broker: Any) -> list[int]:
    rows = await broker.call("noteEventStore.find", {"sort": "id", "fields": ["status"]})
    return [r["status"] for r in rows]


async def _settled(events: EventStore, broker: Any, position: int) -> list[int]:
    """The statuses once the dispatcher has settled every event up to ``position``."""
    await asyncio.wait_for(events.runtime(broker).dispatcher.wait_settled(position), 10)
    return await _statuses(broker)


async def test_in_order_and_marked_complete(make_store: MakeStore) -> None:
    events, service, collector = _setup(make_store)
    async with running_broker(service) as broker:
        await asyncio.gather(*(broker.call("notes.add", {"n": i}) for i in range(50)))
        received = await collector.wait_for(50)
        assert await _settled(events, broker, 50) == [int(Status.COMPLETE)] * 50
    assert [r["id"] for r in received] == list(range(1, 51))


class FlakyPort(MoleculerPort):
    """The real port, whose first ``failures`` emits cannot hand the event over."""

    def __init__(self, port: MoleculerPort, failures: int) -> None:
        super().__init__(port.broker)
        self.failures = failures

    async def emit(self, event: str, payload: dict[str, Any], meta: Any = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("transporter unreachable")
        await super().emit(event, payload, meta)


@pytest.mark.parametrize(("failures", "final"), [(2, Status.COMPLETE), (3, Status.FAILED)])
async def test_failed_delivery_is_retried_then_marked_failed(
    make_store: MakeStore, failures: int, final: Status
) -> None:
    events, service, collector = _setup(make_store, dispatch_attempts=3)
    async with running_broker(service) as broker:
        runtime = events.runtime(broker)
        await runtime.dispatcher.stop()
        dispatcher = runtime.dispatcher
        dispatcher.backoff = 0.01
        dispatcher._port = FlakyPort(MoleculerPort(broker), failures)
        await broker.call("notes.add", {"n": 1})
        await broker.call("notes.add", {"n": 2})
        dispatcher.start()
        received = await collector.wait_for(1 if final == Status.FAILED else 2)
        assert await _settled(events, broker, 2) == [int(final), int(Status.COMPLETE)]
        first = await broker.call("noteEventStore.get", {"id": 1})
    assert [r["payload"]["n"] for r in received] == ([2] if final == Status.FAILED else [1, 2])
    assert first["attempts"] == min(failures + 1, 3)
    assert "transporter unreachable" in first["error"]


async def test_restarts_after_broker_stop_and_start(make_store: MakeStore) -> None:
    _, service, collector = _setup(make_store)
    async with running_broker(service) as broker:
        await broker.call("notes.add", {"n": 1})
        await collector.wait_for(1)
        await broker.stop()
        await broker.start()
        await broker.call("notes.add", {"n": 2})
        received = await collector.wait_for(2)
    assert [r["payload"]["n"] for r in received] == [1, 2]


async def test_events_left_processing_by_a_crash_are_delivered_again(
    make_store: MakeStore,
) -> None:
    factory = make_store()
    events, service, collector = _setup(lambda: factory)
    async with running_broker(service) as broker:
        await broker.call("notes.$stopDispatch", {})
        await broker.call("notes.add", {"n": 1})
        # What a crash between "processing" and "complete" leaves behind:
        await events.runtime(broker).adapter.update(1, {"status": int(Status.PROCESSING)})
    events2, service2, collector2 = _setup(lambda: factory)
    async with running_broker(service2) as broker:
        (again,) = await collector2.wait_for(1)
        assert await _settled(events2, broker, 1) == [int(Status.COMPLETE)]
    assert again["payload"] == {"n": 1}
    assert collector.items == []


@pytest.mark.slow
async def test_an_idle_node_uses_no_cpu(make_store: MakeStore) -> None:
    events, service, collector = _setup(make_store)
    async with running_broker(service) as broker:
        await broker.call("notes.add", {"n": 1})
        await collector.wait_for(1)
        assert await _settled(events, broker, 1) == [int(Status.COMPLETE)]
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(10)  # the measurement window, not synchronisation
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
    assert used < 0.01, f"idle node used {used:.1%} of a core"
