"""Starting up: an order that logs no error, and a projector that says what it waits for."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.core import projector as projector_module
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.testing.brokers import running_broker

MISSPELLED = "shop.transfromOrder"


class _Signal(logging.Handler):
    """Sets ``event`` when a warning mentioning ``text`` is logged."""

    def __init__(self, event: asyncio.Event, text: str) -> None:
        super().__init__(logging.WARNING)
        self.event, self.text = event, text

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_missing_transformation_is_named_in_status_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projector_module, "WARN_AFTER", 0.2)
    factory = stores.sqlite(tmp_path)
    events = EventStore("shopEventStore", factory)
    orders = Aggregate("orderAggregate", stores.with_fields(factory, {"sku": "string"}))
    orders.snapshot("shopEventStore").on("order.placed").create(MISSPELLED)

    class Shop(events.mixin(), orders.mixin(), Service):  # type: ignore[misc]
        name = "shop"
        place = events.map_action("place", "order.placed")

    warned = asyncio.Event()
    handler = _Signal(warned, MISSPELLED)
    logging.getLogger("moleculerpy_cqrs").addHandler(handler)
    try:
        async with running_broker(Shop()) as broker:
            await broker.call("shop.place", {"sku": "a"})
            await asyncio.wait_for(warned.wait(), 10)
            async with asyncio.timeout(2):  # no query action hangs meanwhile
                status: dict[str, Any] = await broker.call("orderAggregate.status", {})
                assert await broker.call("orderAggregate.find", {}) == []
                assert await broker.call("orderAggregate.count", {}) == 0
                assert (await broker.call("orderAggregate.list", {}))["total"] == 0
    finally:
        logging.getLogger("moleculerpy_cqrs").removeHandler(handler)
    assert status["state"] == "waiting"
    assert status["waitingFor"] == [MISSPELLED]
    assert status["lag"]["events"] == 1


async def test_fresh_nodes_start_without_logging_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for attempt in range(5):
        _, summary, service = profile.build(stores.sqlite(tmp_path / f"fresh{attempt}"))
        async with running_broker(service()) as broker:
            await broker.call("profile.update", {"name": "a", "country": "NZ"})
            await summary.runtime(broker).wait_caught_up()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems[:3]]
