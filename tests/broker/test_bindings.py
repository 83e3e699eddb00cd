"""A binding to an event its event store neither produces nor holds is warned about at start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.broker import bindings
from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.testing.brokers import running_broker

LOGGER = "moleculerpy_cqrs.broker.aggregate"


async def to_row(event: dict[str, Any]) -> dict[str, Any]:
    return {"sku": event["payload"]["sku"]}


def shop(factory: StoreFactory, produced: str, bound: str) -> tuple[Aggregate, type[Service]]:
    events = EventStore("shopEvents", factory)
    shipped = Aggregate("shipped", stores.with_fields(factory, {"sku": "string"}))
    shipped.snapshot("shopEvents").on(bound).create(to_row)

    class Shop(events.mixin(), shipped.mixin(), Service):  # type: ignore[misc]
        name = "shop"
        ship = events.map_action("ship", produced)
        place = events.map_action("place", "order.placed")

    return shipped, Shop


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "may never fire" in r.getMessage()]


async def test_a_misspelled_binding_is_warned_about_with_the_closest_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    shipped, service = shop(stores.memory(), "order.shipped", "order.shiped")
    async with running_broker(service()) as broker:
        await shipped.runtime(broker).wait_caught_up()
    (line,) = warnings(caplog)
    assert "aggregate shipped: on('order.shiped') may never fire" in line
    assert "no map_action or map_event of shopEvents produces 'order.shiped'" in line
    assert "did you mean 'order.shipped'?" in line


async def test_a_produced_or_stored_event_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    monkeypatch.setattr(bindings, "SAMPLE", 0)  # stored long ago: found by counting
    factory = stores.sqlite(tmp_path)
    shipped, service = shop(factory, "order.shipped", "order.shipped")
    async with running_broker(service()) as broker:
        await broker.call("shop.ship", {"sku": "a"})
        await shipped.runtime(broker).wait_caught_up()
    assert warnings(caplog) == []
    # The producer is gone (renamed), but the log holds the bound event: still no warning.
    shipped, service = shop(factory, "order.sent", "order.shipped")
    async with running_broker(service()) as broker:
        await shipped.runtime(broker).wait_caught_up()
        assert await broker.call("shipped.count", {}) == 1
    assert warnings(caplog) == []


async def test_a_name_events_are_read_under_is_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stored as ``order.sent``, read as ``order.shipped`` (a rename): binding the name
    events are read under is right, so no warning."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    events = EventStore("shopEvents", stores.memory())
    events.rename("order.sent", "order.shipped")
    shipped = Aggregate("shipped", stores.with_fields(stores.memory(), {"sku": "string"}))
    shipped.snapshot("shopEvents").on("order.shipped").create(to_row)

    class Shop(events.mixin(), shipped.mixin(), Service):  # type: ignore[misc]
        name = "shop"
        ship = events.map_action("ship", "order.sent")

    async with running_broker(Shop()) as broker:
        await broker.call("shop.ship", {"sku": "a"})
        await shipped.runtime(broker).wait_caught_up()
        assert await broker.call("shipped.count", {}) == 1
    assert warnings(caplog) == []
