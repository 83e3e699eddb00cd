"""Bad input through the broker gets a 422 that says what to fix, and stores nothing."""

from __future__ import annotations

from typing import Any

import pytest
from moleculerpy import Service
from moleculerpy.errors import ValidationError

from moleculerpy_cqrs import Aggregate, EntityNotFound, EventStore
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore

HOSTILE = ["'; DROP TABLE profileEventStore; --", 'x" OR 1=1 --', "Robert'); --", "%_\\"]


def _services(make_store: MakeStore) -> tuple[EventStore, Aggregate, Service]:
    factory = make_store()
    events = EventStore("userEventStore", factory, max_payload_bytes=64_000)
    users = Aggregate("userAggregate", with_fields(factory, {"name": "string", "age": "integer"}))

    class Users(events.mixin(), users.mixin(), Service):  # type: ignore[misc]
        name = "users"
        register = events.map_action(
            "register", "user.registered", params={"name": "string", "age": "number"}
        )
        note = events.map_action("note", "user.noted")

    return events, users, Users()


async def _stored(broker: Any) -> int:
    count: int = await broker.call("userEventStore.count", {})
    return count


@pytest.mark.parametrize(
    ("action", "params", "says"),
    [
        ("users.register", {"name": 42, "age": 3}, "name"),
        ("users.register", {"name": "Ann", "age": "old"}, "age"),
        ("users.register", {"name": "Ann", "age": 3, "admin": True}, "admin"),
        ("users.note", {"blob": "x" * 70_000}, "limit"),
        ("users.note", {"bad": float("nan")}, "JSON"),
        ("users.note", {"nul": "a\x00b"}, "NUL"),
    ],
)
async def test_bad_commands_are_refused_and_store_nothing(
    make_store: MakeStore, action: str, params: dict[str, Any], says: str
) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        with pytest.raises(ValidationError) as caught:
            await broker.call(action, params)
        assert caught.value.code == 422
        assert says in str(caught.value)
        assert await _stored(broker) == 0


@pytest.mark.parametrize(
    ("action", "params", "says"),
    [
        ("userAggregate.find", {"query": {"name; DROP TABLE x": 1}}, "unknown field"),
        ("userAggregate.find", {"query": {"age": {"$regex": ".*"}}}, "unknown operator"),
        ("userAggregate.find", {"sort": "-age; DROP TABLE x"}, "unknown field"),
        ("userAggregate.find", {"limit": -1}, "limit"),
        ("userAggregate.find", {"nonsense": 1}, "unknown parameter"),
        ("userAggregate.find", {"query": {"age": "ten"}}, "age"),
        ("userAggregate.list", {"pageSize": 10_000}, "pageSize"),
        ("userAggregate.create", {}, "params cannot be empty!"),
        ("userAggregate.create", {"name": "x", "isAdmin": True}, "unknown field"),
        ("userAggregate.update", {"name": "x"}, "id field required!"),
        ("userAggregate.get", {"id": "1 OR 1=1"}, "id"),
        ("userEventStore.read", {"after": -5}, "after"),
    ],
)
async def test_bad_queries_and_writes_are_refused(
    make_store: MakeStore, action: str, params: dict[str, Any], says: str
) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        await broker.call("userAggregate.create", {"name": "Ann", "age": 30})
        with pytest.raises(ValidationError) as caught:
            await broker.call(action, params)
        assert caught.value.code == 422
        assert says in str(caught.value)
        assert await broker.call("userAggregate.count", {}) == 1


async def test_hostile_strings_are_stored_verbatim(make_store: MakeStore) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        for text in HOSTILE:
            await broker.call("users.register", {"name": text, "age": 1})
            await broker.call("userAggregate.create", {"name": text, "age": 1})
        stored = await broker.call("userEventStore.find", {"sort": "id"})
        rows = await broker.call("userAggregate.find", {"query": {"name": {"in": HOSTILE}}})
    assert [e["payload"]["name"] for e in stored] == HOSTILE
    assert sorted(r["name"] for r in rows) == sorted(HOSTILE)


async def test_missing_row_is_a_404(make_store: MakeStore) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        for action, params in (
            ("userAggregate.get", {"id": 99}),
            ("userAggregate.update", {"id": 99, "name": "x"}),
            ("userAggregate.remove", {"id": 99}),
        ):
            with pytest.raises(EntityNotFound) as caught:
                await broker.call(action, params)
            assert caught.value.code == 404
