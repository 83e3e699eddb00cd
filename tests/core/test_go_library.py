"""The Go library's own tests (moleculer-go/cqrs), ported: same answers, same texts."""

from __future__ import annotations

import asyncio
from typing import Any

from moleculerpy import Context, Service, action, event

from moleculerpy_cqrs import Aggregate, EventStore, NoSnapshot
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore

PROPERTY = {
    "name": "Beach villa",
    "active": True,
    "bathrooms": 1.5,
    "bedrooms": 12,
    "city": "Wanaka",
    "countryCode": "NZ",
}


class Collector:
    """Gathers what a listener receives; awaitable until ``n`` items arrived."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def add(self, item: dict[str, Any]) -> None:
        async with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.items) >= n), 10)
        return self.items


def property_service(events: EventStore, *extra_mixins: type) -> Service:
    class PropertyService(events.mixin(), *extra_mixins, Service):  # type: ignore[misc]
        name = "property"
        create = events.map_action("create", "property.created")
        tagged = events.map_action("createTagged", "property.created", {"tag": "valueX"})

    return PropertyService()


def listener(collector: Collector) -> Service:
    class Listener(Service):
        name = "listener"

        @event(name="property.created")
        async def on_created(self, ctx: Context) -> None:
            await collector.add(ctx.params)

    return Listener()


async def test_store_an_event(make_store: MakeStore) -> None:
    events = EventStore("propertyEventStore", make_store(), {"tag": "string"})
    async with running_broker(property_service(events)) as broker:
        answer = await broker.call("property.create", dict(PROPERTY))
    assert answer["created"] > 0
    assert answer["event"] == "property.created"
    assert answer["id"] == 1
    assert answer["status"] == 0
    assert answer["eventType"] == 0
    assert answer["payload"] == PROPERTY


async def test_dispatch_then_stop_and_start(make_store: MakeStore) -> None:
    collector = Collector()
    events = EventStore(
        "propertyEventStore", make_store(), {"tag": "string"}, dispatch_batch_size=5
    )
    async with running_broker(property_service(events), listener(collector)) as broker:
        await broker.call("property.create", dict(PROPERTY))
        (first,) = await collector.wait_for(1)
        assert first["event"] == "property.created"
        assert first["payload"] == PROPERTY

        await broker.call("property.$stopDispatch", {})
        for i in range(5):
            await broker.call("property.create", {**PROPERTY, "bedrooms": i})
        assert len(collector.items) == 1  # nothing is dispatched while stopped
        await broker.call("property.$startDispatch", {})
        received = await collector.wait_for(6)
    assert [r["payload"]["bedrooms"] for r in received[1:]] == [0, 1, 2, 3, 4]
    assert {r["batchSize"] for r in received[1:]} == {5}
    assert all(r["status"] == 1 for r in received)


async def test_extra_fields_come_back(make_store: MakeStore) -> None:
    events = EventStore("propertyEventStore", make_store(), {"tag": "string"})
    async with running_broker(property_service(events)) as broker:
        answer = await broker.call("property.createTagged", dict(PROPERTY))
        stored = await broker.call("propertyEventStore.get", {"id": answer["id"]})
    assert answer["tag"] == "valueX"
    assert stored["tag"] == "valueX"


async def test_aggregate_create(make_store: MakeStore) -> None:
    factory = make_store()
    events = EventStore("propertyEventStore", factory, {"tag": "string"})
    messages = Aggregate(
        "messageAggregate",
        _fields(factory, {"message": "string"}),
        NoSnapshot,
    ).snapshot("propertyEventStore")
    seen: list[dict[str, Any]] = []

    class Transforms(messages.mixin(), Service):  # type: ignore[misc]
        name = "transforms"

        @action(name="welcome")
        async def welcome(self, ctx: Context) -> dict[str, Any]:
            seen.append(ctx.params)
            p = ctx.params["payload"]
            return {"message": f"Hi John, Property {p['name']} with {p['bedrooms']} was added "
                               "to your account!"}  # fmt: skip

        on_created = messages.on("property.created").create("transforms.welcome")

    async with running_broker(property_service(events), Transforms()) as broker:
        assert await broker.call("messageAggregate.count", {}) == 0
        await broker.call("property.create", dict(PROPERTY))
        await messages.runtime(broker).wait_caught_up()
        rows = await broker.call("messageAggregate.find", {})
    assert seen[0]["id"] == 1
    assert seen[0]["payload"]["name"] == "Beach villa"
    assert seen[0]["payload"]["bedrooms"] == 12
    assert [r["message"] for r in rows] == [
        "Hi John, Property Beach villa with 12 was added to your account!"
    ]
    assert rows[0]["eventId"] == 1


async def test_aggregate_create_many(make_store: MakeStore) -> None:
    factory = make_store()
    events = EventStore("propertyEventStore", factory, {"tag": "string"})
    rooms = Aggregate("roomAggregate", _fields(factory, {"room": "integer"})).snapshot(
        "propertyEventStore"
    )

    async def five_rooms(event: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"room": i} for i in range(5)]

    rooms.on("property.created").create_many(five_rooms)

    class Holder(rooms.mixin(), Service):  # type: ignore[misc]
        name = "holder"

    async with running_broker(property_service(events), Holder()) as broker:
        await broker.call("property.create", dict(PROPERTY))
        await rooms.runtime(broker).wait_caught_up()
        assert await broker.call("roomAggregate.count", {}) == 5


async def test_property_example(make_store: MakeStore) -> None:
    from moleculerpy_cqrs.examples import property as example

    _, properties, summary, service = example.build(make_store())
    async with running_broker(service()) as broker:
        await broker.call(
            "property.create",
            {
                "name": "Beach Villa",
                "active": True,
                "bathrooms": 1.5,
                "city": "Wanaka",
                "countryCode": "NZ",
            },
        )
        await properties.runtime(broker).wait_caught_up()
        await summary.runtime(broker).wait_caught_up()
        rows = await broker.call("propertyAggregate.find", {})
        fields = ["countryCode", "total", "beachCity", "mountain"]
        totals = await broker.call("propertySummaryAggregate.find", {"fields": fields})
    assert len(rows) == 1
    assert rows[0]["bathrooms"] == 1.5
    assert rows[0]["active"] is True
    assert totals == [{"countryCode": "NZ", "total": 1, "beachCity": 0, "mountain": 1}]


def _fields(factory: Any, fields: dict[str, str]) -> Any:
    from moleculerpy_cqrs.stores import with_fields

    return with_fields(factory, fields)
