"""An aggregate's write actions: refused by default (only the log writes it), served on opt-in."""

from __future__ import annotations

from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore, InvalidInput, ReadOnlyAggregateError, stores
from moleculerpy_cqrs.testing.brokers import running_broker

WRITES: list[tuple[str, dict[str, Any]]] = [
    ("create", {"name": "stray"}),
    ("insert", {"entity": {"name": "stray"}}),
    ("insert", {"entities": [{"name": "a"}, {"name": "b"}]}),
    ("update", {"id": 1, "name": "changed"}),
    ("remove", {"id": 1}),
    ("create", {"bogus": object}),  # refused as a write before its params are looked at
]


def _service(*, write_actions: bool | None) -> tuple[Aggregate, Service]:
    events = EventStore("noteEventStore", stores.memory())
    store = stores.memory(fields={"name": "string"})
    notes = (
        Aggregate("noteAggregate", store)  # the default
        if write_actions is None
        else Aggregate("noteAggregate", store, write_actions=write_actions)
    ).snapshot("noteEventStore")

    async def note(event: dict[str, Any]) -> dict[str, Any]:
        return {"name": event["payload"]["name"]}

    notes.on("note.added").create(note)

    class Notes(events.mixin(), notes.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added")

    return notes, Notes()


@pytest.mark.parametrize(("action", "params"), WRITES)
async def test_writes_are_refused_by_default_and_change_nothing(
    action: str, params: dict[str, Any]
) -> None:
    notes, service = _service(write_actions=None)
    async with running_broker(service) as broker:
        await broker.call("notes.add", {"name": "from the log"})
        await notes.runtime(broker).wait_caught_up()
        before = await broker.call("noteAggregate.find", {})
        with pytest.raises(ReadOnlyAggregateError) as caught:
            await broker.call(f"noteAggregate.{action}", params)
        after = await broker.call("noteAggregate.find", {})
    error = caught.value
    assert (error.code, error.type) == (405, "READ_ONLY_AGGREGATE")
    assert error.data == {"aggregate": "noteAggregate", "action": action}
    assert "map_action" in error.message
    assert "write_actions=True" in error.message
    assert after == before


async def test_write_actions_opt_in_serves_moleculer_db_writes() -> None:
    _, service = _service(write_actions=True)
    async with running_broker(service) as broker:
        created = await broker.call("noteAggregate.create", {"name": "direct"})
        inserted = await broker.call("noteAggregate.insert", {"entities": [{"name": "b"}]})
        updated = await broker.call("noteAggregate.update", {"id": created["id"], "name": "c"})
        removed = await broker.call("noteAggregate.remove", {"id": inserted[0]["id"]})
        rows = await broker.call("noteAggregate.find", {})
    assert (updated["id"], updated["name"]) == (created["id"], "c")
    assert removed["deletedCount"] == 1
    assert [(r["id"], r["name"]) for r in rows] == [(created["id"], "c")]


async def test_the_log_cannot_be_rewritten_through_the_snapshot_actions() -> None:
    _, service = _service(write_actions=None)
    async with running_broker(service) as broker:
        stored = await broker.call("notes.add", {"name": "from the log"})
        with pytest.raises(InvalidInput, match="not a snapshot event"):
            await broker.call(
                "noteEventStore.settleSnapshot",
                {"id": stored["id"], "payload": {"name": "rewritten"}, "error": None},
            )
        after = await broker.call("noteEventStore.get", {"id": stored["id"]})
    assert after["payload"] == {"name": "from the log"}
    assert (after["eventType"], after["event"]) == (0, "note.added")
