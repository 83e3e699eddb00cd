"""Idempotency keys end to end, on memory, SQLite and PostgreSQL: a command is stored at most
once per key; a repeat gets the stored event, a repeat with other params a 409, a bad key a
422; group commit, restarts and map_event redeliveries included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker

from moleculerpy_cqrs import ConflictError, EventStore, InvalidInput
from moleculerpy_cqrs.broker.port import MoleculerPort
from moleculerpy_cqrs.core.eventstore import EventStoreRuntime
from moleculerpy_cqrs.core.records import EVENT_FIELDS
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.stores import StoreFactory, memory
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore

KEY = "idempotencyKey"


def _service(factory: StoreFactory, **options: Any) -> tuple[EventStore, Service]:
    events = EventStore("orderEventStore", factory, {"tenant": "string"})

    class Orders(events.mixin(), Service):  # type: ignore[misc]
        name = "orders"
        place = events.map_action("place", "order.placed", {"tenant": "acme"})
        placeById = events.map_action(
            "placeById",
            "order.placed",
            idempotency_key=lambda ctx: f"order-{ctx.params['orderId']}",
        )

    return events, Orders()


async def _stored(broker: ServiceBroker) -> list[dict[str, Any]]:
    read = await broker.call("orderEventStore.read", {"after": 0, "limit": 1000})
    events: list[dict[str, Any]] = read["events"]
    return events


async def test_a_repeat_gets_the_stored_event_and_stores_nothing(make_store: MakeStore) -> None:
    _, service = _service(make_store())
    async with running_broker(service) as broker:
        first = await broker.call("orders.place", {"item": "a", "qty": 2}, meta={KEY: "k-1"})
        again = await broker.call("orders.place", {"qty": 2, "item": "a"}, meta={KEY: "k-1"})
        other = await broker.call("orders.place", {"item": "a", "qty": 2}, meta={KEY: "k-2"})
        plain = await broker.call("orders.place", {"item": "a", "qty": 2})
        stored = await _stored(broker)
        status = await broker.call("orderEventStore.status", {})
    assert _same(again, first)  # key order in the params does not matter
    assert first["tenant"] == "acme"
    assert len({first["id"], other["id"], plain["id"]}) == 3
    assert [e["id"] for e in stored] == [first["id"], other["id"], plain["id"]]
    assert [e[KEY] for e in stored] == ["k-1", "k-2", None]
    assert all(KEY not in e["meta"] for e in stored)  # kept once, in its column
    assert (status["duplicates"], status["appended"]) == (1, 3)


async def test_a_repeat_with_other_params_is_a_409_naming_the_key_and_event(
    make_store: MakeStore,
) -> None:
    _, service = _service(make_store())
    async with running_broker(service) as broker:
        first = await broker.call("orders.place", {"item": "a"}, meta={KEY: "k-1"})
        with pytest.raises(ConflictError) as caught:
            await broker.call("orders.place", {"item": "b"}, meta={KEY: "k-1"})
        stored = await _stored(broker)
        status = await broker.call("orderEventStore.status", {})
    error = caught.value
    assert error.code == 409
    assert error.data["key"] == "k-1"
    assert error.data["id"] == first["id"]
    assert "'k-1'" in error.message
    assert str(first["id"]) in error.message
    assert [e["id"] for e in stored] == [first["id"]]
    assert status["duplicates"] == 0


@pytest.mark.parametrize(
    "key",
    [5, True, "", "x" * 201, "a\x00b", "lone \ud800 surrogate", {"k": 1}],
    ids=["int", "bool", "empty", "too-long", "nul", "surrogate", "object"],
)
async def test_an_invalid_key_is_a_422_and_stores_nothing(make_store: MakeStore, key: Any) -> None:
    _, service = _service(make_store())
    async with running_broker(service) as broker:
        with pytest.raises(InvalidInput) as caught:
            await broker.call("orders.place", {"item": "a"}, meta={KEY: key})
        ok = await broker.call("orders.place", {"item": "a"}, meta={KEY: "x" * 200})
        stored = await _stored(broker)
    assert caught.value.code == 422
    assert caught.value.field == KEY
    assert [e["id"] for e in stored] == [ok["id"]]


async def test_repeats_in_one_group_commit_store_one_event(make_store: MakeStore) -> None:
    events, service = _service(make_store())
    async with running_broker(service) as broker:
        committer = events.runtime(broker).committer

        async def place(n: int) -> dict[str, Any]:
            key = f"k-{n % 5}"
            answer: dict[str, Any] = await broker.call(
                "orders.place", {"key": key}, meta={KEY: key}
            )
            return answer

        answers = await asyncio.gather(*(place(n) for n in range(40)))
        stored = await _stored(broker)
        status = await broker.call("orderEventStore.status", {})
    assert committer.batches < 40  # they did share commits
    assert sorted(e[KEY] for e in stored) == [f"k-{i}" for i in range(5)]
    holder = {e[KEY]: e["id"] for e in stored}
    assert all(a["id"] == holder[a["payload"]["key"]] for a in answers)
    assert status["duplicates"] == 35


async def test_in_flight_repeats_with_other_params_store_one_and_refuse_the_rest(
    make_store: MakeStore,
) -> None:
    _, service = _service(make_store())
    async with running_broker(service) as broker:
        results = await asyncio.gather(
            *(broker.call("orders.place", {"n": n}, meta={KEY: "k"}) for n in range(10)),
            return_exceptions=True,
        )
        stored = await _stored(broker)
    answered = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(answered) == 1
    assert len(refused) == 9
    assert all(isinstance(r, ConflictError) for r in refused)
    assert [e["id"] for e in stored] == [answered[0]["id"]]


async def test_a_key_derived_from_the_params(make_store: MakeStore) -> None:
    _, service = _service(make_store())
    async with running_broker(service) as broker:
        first = await broker.call("orders.placeById", {"orderId": 7, "item": "a"})
        again = await broker.call("orders.placeById", {"orderId": 7, "item": "a"})
        with pytest.raises(ConflictError):
            await broker.call("orders.placeById", {"orderId": 7, "item": "b"})
        stored = await _stored(broker)
    assert _same(again, first)
    assert [e[KEY] for e in stored] == ["order-7"]


async def test_a_repeat_after_a_restart_gets_the_stored_event(make_store: MakeStore) -> None:
    factory = make_store()
    _, service = _service(factory)
    async with running_broker(service) as broker:
        first = await broker.call("orders.place", {"item": "a"}, meta={KEY: "k-1"})
    _, service = _service(factory)
    async with running_broker(service) as broker:
        again = await broker.call("orders.place", {"item": "a"}, meta={KEY: "k-1"})
        with pytest.raises(ConflictError):
            await broker.call("orders.place", {"item": "b"}, meta={KEY: "k-1"})
        stored = await _stored(broker)
    assert _same(again, first)
    assert [e["id"] for e in stored] == [first["id"]]


async def test_map_event_stores_a_redelivered_event_once(make_store: MakeStore) -> None:
    factory = make_store()
    orders = EventStore("orderEventStore", factory)
    audit = EventStore("auditEventStore", factory)

    class Orders(orders.mixin(), Service):  # type: ignore[misc]
        name = "orders"
        place = orders.map_action("place", "order.placed")

    class Audit(audit.mixin(), Service):  # type: ignore[misc]
        name = "audit"
        placed = audit.map_event("order.placed", "audit.orderPlaced")
        other = audit.map_event(
            "external.thing", "audit.thing", idempotency_key=lambda ctx: ctx.params.get("msgId")
        )

    async with running_broker(Orders(), Audit()) as broker:
        runtime = audit.runtime(broker)
        committed = asyncio.Event()
        runtime.listeners.subscribe(committed.set)
        first = await broker.call("orders.place", {"item": "a"})
        await asyncio.wait_for(committed.wait(), 10)  # delivered by the dispatcher, stored
        # A local emit awaits its handlers: what follows is stored (or not) once it returns.
        # The dispatcher delivers at least once: after a crash it sends the event again.
        meta = {"$cqrsOrigin": f"orderEventStore:{first['id']}"}
        await broker.emit("order.placed", {"id": first["id"], "payload": {"item": "a"}}, meta)
        for _ in range(2):
            await broker.emit("external.thing", {"msgId": "m-1", "v": 1})
        await broker.emit("external.thing", {"v": 2})  # no key: stored as heard
        assert (runtime.duplicates, runtime.committer.appended) == (2, 3)
        stored = (await broker.call("auditEventStore.read", {"after": 0, "limit": 10}))["events"]
    assert [e["event"] for e in stored] == ["audit.orderPlaced", "audit.thing", "audit.thing"]
    assert [e[KEY] for e in stored] == [
        f"$cqrsOrigin:orderEventStore:{first['id']}",
        "m-1",
        None,
    ]
    assert all("$cqrsOrigin" not in e["meta"] for e in stored)


def _same(repeat: dict[str, Any], first: dict[str, Any]) -> bool:
    """A repeat is answered the stored event as it is now: its dispatch status may have
    moved on since the first answer; all else is the same."""
    return {**repeat, "status": None} == {**first, "status": None}


async def test_a_log_made_before_keys_gets_the_unique_key_at_start(make_store: MakeStore) -> None:
    # A log an earlier version made (no idempotencyKey column, no index): the start adds the
    # column and the unique index the event store's declared fields hold.
    factory = make_store()
    before = {k: v for k, v in EVENT_FIELDS.items() if k != KEY}
    old = factory("orderEventStore", {**before, "tenant": "string"}, {})
    await old.connect()
    (kept,) = await old.append([{"event": "order.placed", "payload": {"item": "old"}}])
    await old.close()
    _, service = _service(factory)
    async with running_broker(service) as broker:
        first = await broker.call("orders.place", {"item": "a"}, meta={KEY: "k-1"})
        again = await broker.call("orders.place", {"item": "a"}, meta={KEY: "k-1"})
        stored = await _stored(broker)
    assert _same(again, first)
    assert [e["id"] for e in stored] == [kept["id"], first["id"]]
    log = factory("orderEventStore", {**EVENT_FIELDS, "tenant": "string"}, {})
    await log.connect()
    try:
        with pytest.raises(ConflictError):  # the index is in the database, not only declared
            await log.insert({"event": "x", KEY: "k-1"})
    finally:
        await log.close()


async def test_an_event_store_refuses_an_adapter_without_the_unique_key() -> None:
    fields = {**EVENT_FIELDS, KEY: "string"}  # the key's column, but not unique
    async with running_broker() as broker:
        with pytest.raises(ConfigurationError, match="idempotencyKey"):
            EventStoreRuntime(
                "orderEventStore",
                lambda: memory()("orderEventStore", fields),
                MoleculerPort(broker),
            )
