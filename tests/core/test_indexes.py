"""Declared indexes through the whole toolkit: an event store's extra fields and an aggregate's
fields keep their index flags into the tables, a replay keeps them, and a unique field refuses a
duplicate over the broker with a 409 (a transformation that would make one is dead-lettered)."""

from __future__ import annotations

from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, ConflictError, EventStore, stores
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore


async def test_declared_indexes_reach_the_tables_and_survive_a_replay(
    make_store: MakeStore,
) -> None:
    factory = make_store()
    events = EventStore(
        "noteEventStore", factory, fields={"tag": {"type": "string", "index": True}}
    )
    notes = Aggregate(
        "noteAggregate",
        stores.with_fields(factory, {"k": {"type": "string", "unique": True}, "n": "integer"}),
        write_actions=True,
    )

    async def note(event: dict[str, Any]) -> dict[str, Any]:
        return {"k": event["payload"]["k"], "n": event["id"]}

    notes.on("note.added").create(note)

    class Notes(events.mixin(), notes.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added", {"tag": "t"})

    async with running_broker(Notes()) as broker:
        for k in ("a", "b", "a"):  # the second "a" cannot be created: dead-lettered
            await broker.call("notes.add", {"k": k})
        runtime = notes.runtime(broker)
        await runtime.wait_caught_up()
        assert events.runtime(broker).adapter.indexes == {"tag": False, "idempotencyKey": True}
        assert runtime.adapter.indexes == {"k": True}
        dead = await broker.call("noteAggregate.deadLetters", {})
        assert dead["total"] == 1
        assert "field 'k' of store 'noteAggregate' is unique" in str(dead["rows"][0])
        await broker.call("noteAggregate.replay", {"wait": True})
        assert runtime.adapter.indexes == {"k": True}
        with pytest.raises(ConflictError) as refused:
            await broker.call("noteAggregate.insert", {"entity": {"k": "b", "n": 0}})
        assert refused.value.code == 409
        assert refused.value.data["field"] == "k"
        found = await broker.call("noteAggregate.find", {"query": {"k": {"in": ["a", "b"]}}})
        assert [r["k"] for r in found] == ["a", "b"]
        assert await broker.call("noteEventStore.count", {"query": {"tag": "t"}}) == 3
