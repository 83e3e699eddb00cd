"""One bad event never stalls the system (invariant 5)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore
from moleculerpy_cqrs.errors import InvalidInput
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


async def test_each_dead_letter_is_logged_once_at_warning_with_what_to_run(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    _, totals, orders, _, _ = _setup(make_store)
    caplog.set_level(logging.WARNING, logger="moleculerpy_cqrs.core.projector")
    async with running_broker(orders()) as broker:
        poison = await broker.call("orders.place", {"sku": "poison", "qty": 2})
        await broker.call("orders.place", {"sku": "b", "qty": 3})
        await totals.runtime(broker).wait_caught_up()
    lines = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(lines) == 1
    (line,) = lines
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert f"event {poison['id']} (order.placed)" in message
    assert "on('order.placed').create(" in message  # the binding
    assert "ValueError: cannot price poison" in message
    assert "`cqrs dead-letters orderTotals`" in message


async def test_a_type_mismatch_in_an_answer_is_dead_lettered_and_logged(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    factory = make_store()
    events = EventStore("shopEventStore", factory)
    totals = Aggregate("skuTotals", with_fields(factory, {"sku": "string"}), attempts=1).snapshot(
        "shopEventStore"
    )

    async def wrong_type(event: dict[str, Any]) -> dict[str, Any]:
        return {"sku": 42}  # an integer for a string field

    totals.on("order.placed").create(wrong_type)

    class Shop(events.mixin(), totals.mixin(), Service):  # type: ignore[misc]
        name = "shop"
        place = events.map_action("place", "order.placed")

    caplog.set_level(logging.WARNING, logger="moleculerpy_cqrs.core.projector")
    async with running_broker(Shop()) as broker:
        placed = await broker.call("shop.place", {"sku": "a"})
        await totals.runtime(broker).wait_caught_up()
        assert (await broker.call("skuTotals.deadLetters", {}))["total"] == 1
    (message,) = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert f"event {placed['id']} (order.placed)" in message
    assert "sku" in message


async def test_discarded_dead_letters_are_gone_and_recorded(make_store: MakeStore) -> None:
    _, totals, orders, _, _ = _setup(make_store)
    async with running_broker(orders()) as broker:
        first = await broker.call("orders.place", {"sku": "poison", "qty": 1})
        await broker.call("orders.place", {"sku": "poison", "qty": 2})
        await totals.runtime(broker).wait_caught_up()
        dead = await broker.call("orderTotals.deadLetters", {"sort": "id"})
        one, two = (row["id"] for row in dead["rows"])

        gone = await broker.call(
            "orderTotals.discardDeadLetters", {"ids": [one, 999]}, meta={"user": "ann"}
        )
        assert gone == {"discarded": 1, "missing": [999], "remaining": 1, "by": "ann"}
        retried = await broker.call("orderTotals.retryDeadLetters", {})
        assert retried["remaining"] == 1  # the discarded one is not retried

        kept = await broker.call("orderTotals.discardedDeadLetters", {})
        (row,) = kept["rows"]
        assert row["deadLetterId"] == one
        assert row["eventId"] == first["id"]
        assert row["discardedBy"] == "ann"
        assert row["discarded"] > 0
        assert "cannot price poison" in row["error"]

        rest = await broker.call("orderTotals.discardDeadLetters", {})
        assert rest["discarded"] == 1
        assert rest["remaining"] == 0
        assert rest["by"].startswith("node ")
        assert (await broker.call("orderTotals.retryDeadLetters", {}))["remaining"] == 0
        status = await broker.call("orderTotals.status", {})
        assert status["deadLetters"] == 0
        assert status["discardedDeadLetters"] == 2
        assert two not in [
            r["id"] for r in (await broker.call("orderTotals.deadLetters", {}))["rows"]
        ]


async def test_discard_refuses_bad_ids_and_changes_nothing(make_store: MakeStore) -> None:
    _, totals, orders, _, _ = _setup(make_store)
    async with running_broker(orders()) as broker:
        await broker.call("orders.place", {"sku": "poison", "qty": 1})
        await totals.runtime(broker).wait_caught_up()
        for params in ({"ids": "all"}, {"ids": [True]}, {"id": 1}):
            with pytest.raises(InvalidInput):
                await broker.call("orderTotals.discardDeadLetters", params)
        assert (await broker.call("orderTotals.deadLetters", {}))["total"] == 1
