"""A declaration that no longer matches its existing table refuses the start with one line
(issue 17 item 4): a type change or a field added or dropped for an aggregate, a type change
for an event store's extra field; a newly declared extra field of an event store is added."""

from __future__ import annotations

from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, ConfigurationError, EventStore, stores
from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore


def notes_service(
    factory: StoreFactory,
    fields: dict[str, str],
    extras: dict[str, str] | None = None,
    version: int = 1,
) -> tuple[Service, Aggregate]:
    events = EventStore("noteEventStore", factory, fields=extras)
    notes = Aggregate("noteAggregate", stores.with_fields(factory, fields), version=version)

    async def note(event: dict[str, Any]) -> dict[str, Any]:
        return {"k": event["payload"]["k"]}

    notes.on("note.added").create(note)

    class Notes(events.mixin(), notes.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added", dict.fromkeys(extras or {}, "1"))

    return Notes(), notes


async def first_run(factory: StoreFactory, extras: dict[str, str] | None = None) -> None:
    service, notes = notes_service(factory, {"k": "string", "n": "integer"}, extras)
    async with running_broker(service) as broker:
        await broker.call("notes.add", {"k": "a"})
        await notes.runtime(broker).wait_caught_up()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (
            {"k": "string", "n": "string"},
            "aggregate 'noteAggregate': field 'n' is declared string but its table holds integer",
        ),
        (
            {"k": "string", "n": "integer", "tag": "string"},
            "aggregate 'noteAggregate': field 'tag' (string) is declared but its table has no "
            "such column",
        ),
        (
            {"k": "string"},
            "aggregate 'noteAggregate': field 'n' (integer) is in its table but no longer declared",
        ),
    ],
    ids=["type", "added", "dropped"],
)
async def test_an_aggregate_whose_table_differs_is_refused_at_start(
    make_store: MakeStore, fields: dict[str, str], says: str
) -> None:
    factory = make_store()
    await first_run(factory)
    service, _ = notes_service(factory, fields)
    with pytest.raises(ConfigurationError) as refused:
        async with running_broker(service):
            pass
    message = str(refused.value)
    assert message.startswith(says)
    assert "replay into a new aggregate table, or bump the aggregate's version" in message
    assert "\n" not in message
    # Nothing was changed: the old declaration still starts, with its rows.
    service, notes = notes_service(factory, {"k": "string", "n": "integer"})
    async with running_broker(service) as broker:
        await notes.runtime(broker).wait_caught_up()
        assert await broker.call("noteAggregate.find", {"fields": ["k", "n"]}) == [
            {"k": "a", "n": None}
        ]


async def test_an_event_store_extra_field_may_be_added_but_not_change_type(
    make_store: MakeStore,
) -> None:
    factory = make_store()
    await first_run(factory, {"tenant": "string"})
    service, _ = notes_service(factory, {"k": "string", "n": "integer"}, {"tenant": "integer"})
    with pytest.raises(ConfigurationError) as refused:
        async with running_broker(service):
            pass
    assert str(refused.value).startswith(
        "event store 'noteEventStore': field 'tenant' is declared integer but its table "
        "holds string; stored events keep their type"
    )
    extras = {"tenant": "string", "region": "string"}
    service, notes = notes_service(factory, {"k": "string", "n": "integer"}, extras)
    async with running_broker(service) as broker:
        await broker.call("notes.add", {"k": "b"})
        await notes.runtime(broker).wait_caught_up()
        stored = await broker.call("noteEventStore.find", {"fields": ["tenant", "region"]})
    assert stored == [{"tenant": "1", "region": None}, {"tenant": "1", "region": "1"}]


async def test_a_version_bump_starts_on_a_table_whose_fields_differ_and_rebuilds_it(
    make_store: MakeStore,
) -> None:
    """Fields changed together with the aggregate's version: the start is not refused, and
    the rebuild makes the table with the declared fields (a changed type, a new field)."""
    factory = make_store()
    await first_run(factory)
    service, notes = notes_service(
        factory, {"k": "string", "n": "string", "tag": "string"}, None, 2
    )
    async with running_broker(service) as broker:
        await notes.runtime(broker).wait_caught_up()
        status = await broker.call("noteAggregate.status", {})
        assert (status["version"], status["tableVersion"]) == (2, 2)
        assert await broker.call("noteAggregate.find", {"fields": ["k", "n", "tag"]}) == [
            {"k": "a", "n": None, "tag": None}
        ]
        assert await broker.call("noteAggregate.count", {"query": {"n": "x"}}) == 0
    assert await factory("noteAggregate").stored_fields() == {
        "eventId": "integer",
        "k": "string",
        "n": "string",
        "tag": "string",
    }
