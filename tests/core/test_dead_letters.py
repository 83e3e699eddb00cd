"""One bad event never stalls the system (invariant 5)."""

from __future__ import annotations

from typing import Any

from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore


def _setup(make_store: MakeStore, on_error: str = "dead_letter") -> tuple[Any, ...]:
    factory = make_store()
    events = EventStore("orderEventStore", factory)
    totals = Aggregate(
        "orderTotals",
        with_fields(factory, {"sku": "string", "qty": "integer"}),
        attempts=2,
        on_error=on_error,  # type: ignore[arg-type]
    ).snapshot("orderEventStore")
    broken = {"on": True}
    calls: list[int] = []

    async def to_row(event: dict[str, Any]) -> dict[str, Any]:
        calls.append(event["id"])
        if event["payload"]["sku"] == "poison" and broken["on"]:
            raise ValueError("cannot price poison")
        return {"sku": event["payload"]["sku"], "qty": event["payload"]["qty"]}

    totals.on("order.placed").create(to_row)

    class Orders(events.mixin(), totals.mixin(), Service):  # type: ignore[misc]
        name = "orders"
        place = events.map_action("place", "order.placed")

    return events, totals, Orders, broken, calls


async def test_poison_event_goes_to_dead_letters_and_retry_applies_it_once(
    make_store: MakeStore,
) -> None:
    _, totals, orders, broken, calls = _setup(make_store)
    async with running_broker(orders()) as broker:
        await broker.call("orders.place", {"sku": "a", "qty": 1})
        poison = await broker.call("orders.place", {"sku": "poison", "qty": 2})
        await broker.call("orders.place", {"sku": "b", "qty": 3})
        await totals.runtime(broker).wait_caught_up()

        rows = await broker.call("orderTotals.find", {"sort": "sku"})
        assert [r["sku"] for r in rows] == ["a", "b"]  # later events still projected
        assert calls.count(poison["id"]) == 2  # retried, then set aside
        dead = await broker.call("orderTotals.deadLetters", {})
        assert dead["total"] == 1
        (letter,) = dead["rows"]
        assert letter["eventId"] == poison["id"]
        assert "cannot price poison" in letter["error"]
        assert letter["attempts"] == 2
        status = await broker.call("orderTotals.status", {})
        assert status["deadLetters"] == 1
        assert status["checkpoint"] == status["head"] == 3

        still_broken = await broker.call("orderTotals.retryDeadLetters", {})
        assert still_broken["retried"] == 0
        assert still_broken["remaining"] == 1

        broken["on"] = False
        fixed = await broker.call("orderTotals.retryDeadLetters", {})
        assert fixed == {"retried": 1, "failed": [], "remaining": 0}
        again = await broker.call("orderTotals.retryDeadLetters", {})
        assert again["retried"] == 0
        rows = await broker.call("orderTotals.find", {"sort": "sku"})
    assert [(r["sku"], r["qty"]) for r in rows] == [("a", 1), ("b", 3), ("poison", 2)]


async def test_halt_mode_stops_at_the_bad_event_until_retried(make_store: MakeStore) -> None:
    _, totals, orders, broken, _ = _setup(make_store, on_error="halt")
    async with running_broker(orders()) as broker:
        await broker.call("orders.place", {"sku": "a", "qty": 1})
        await totals.runtime(broker).wait_caught_up()
        poison = await broker.call("orders.place", {"sku": "poison", "qty": 2})
        await broker.call("orders.place", {"sku": "b", "qty": 3})
        projector = totals.runtime(broker).projector
        assert projector is not None
        await projector.wait_halted()
        status = await broker.call("orderTotals.status", {})
        assert status["state"] == "halted"
        assert status["haltedAt"] == poison["id"]
        assert status["checkpoint"] == poison["id"] - 1
        assert [r["sku"] for r in await broker.call("orderTotals.find", {})] == ["a"]

        broken["on"] = False
        await broker.call("orderTotals.retryDeadLetters", {})
        await totals.runtime(broker).wait_caught_up()
        rows = await broker.call("orderTotals.find", {"sort": "sku"})
    assert [r["sku"] for r in rows] == ["a", "b", "poison"]
