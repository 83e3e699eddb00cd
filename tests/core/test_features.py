"""What issue "CQRS core" asks beyond the Go tests: meta, map_event, failures, remove, None."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Context, Service, event

from moleculerpy_cqrs import Aggregate, EventStore, StoreError
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore
from tests.core.test_go_library import Collector

ROOT = Path(__file__).resolve().parents[2]


def _build(make_store: MakeStore, collector: Collector) -> tuple[EventStore, Aggregate, Service]:
    factory = make_store()
    events = EventStore("cartEventStore", factory)
    carts = Aggregate("cartAggregate", with_fields(factory, {"sku": "string"}), attempts=1)

    async def add(e: dict[str, Any]) -> dict[str, Any] | None:
        if e["payload"].get("skip"):
            return None
        if e["payload"].get("sku") == "bad-field":
            return {"sku": "x", "colour": "red"}  # not a declared field: an apply error
        return {"sku": e["payload"]["sku"]}

    async def drop(e: dict[str, Any]) -> dict[str, Any]:
        return {"query": {"sku": e["payload"]["sku"]}}

    carts.on("cart.added").create(add)
    carts.on("cart.removed").remove(drop)

    class Cart(events.mixin(), carts.mixin(), Service):  # type: ignore[misc]
        name = "cart"
        add = events.map_action("add", "cart.added")
        remove = events.map_action("remove", "cart.removed")
        heard = events.map_event("shop.sold", "cart.added")

        @event(name="cartAggregate.create.error")
        async def on_error(self, ctx: Context) -> None:
            await collector.add(ctx.params)

    return events, carts, Cart()


async def test_meta_is_kept_and_map_event_saves_what_it_hears(make_store: MakeStore) -> None:
    _, carts, service = _build(make_store, Collector())
    async with running_broker(service) as broker:
        saved = await broker.call("cart.add", {"sku": "a"}, meta={"user": "ann"})
        await broker.emit("shop.sold", {"sku": "b"})
        await carts.runtime(broker).wait_caught_up(2)
        stored = await broker.call("cartEventStore.find", {"sort": "id"})
        rows = await broker.call("cartAggregate.find", {"sort": "sku"})
    assert stored[0]["meta"] == {"user": "ann"}
    assert saved["created"] > 1_600_000_000_000  # milliseconds
    assert [(e["event"], e["payload"]) for e in stored] == [
        ("cart.added", {"sku": "a"}),
        ("cart.added", {"sku": "b"}),
    ]
    assert [r["sku"] for r in rows] == ["a", "b"]


async def test_meta_that_cannot_be_stored_is_left_out_not_refused(make_store: MakeStore) -> None:
    _, _, service = _build(make_store, Collector())
    meta = {
        "user": "ann",
        "$cqrsTx": "private",
        "$cqrsAggregate": "private",
        "$cqrsNode": "private",
        "nan": float("nan"),
        "pair": (1, 2),
        "deep": {"when": object()},
        "nul": "a\x00b",
    }
    async with running_broker(service) as broker:
        saved = await broker.call("cart.add", {"sku": "a"}, meta=meta)
        stored = await broker.call("cartEventStore.find", {})
    assert [e["meta"] for e in stored] == [{"user": "ann"}]
    assert saved["payload"] == {"sku": "a"}


async def test_remove_and_none(make_store: MakeStore) -> None:
    _, carts, service = _build(make_store, Collector())
    async with running_broker(service) as broker:
        for sku in ("a", "b", "c"):
            await broker.call("cart.add", {"sku": sku})
        await broker.call("cart.add", {"sku": "z", "skip": True})
        await broker.call("cart.remove", {"sku": "b"})
        await carts.runtime(broker).wait_caught_up(5)
        rows = await broker.call("cartAggregate.find", {"sort": "sku"})
        status = await broker.call("cartAggregate.status", {})
    assert [r["sku"] for r in rows] == ["a", "c"]
    assert status["checkpoint"] == status["head"] == 5
    assert status["lag"] == {"events": 0, "seconds": 0.0}


async def test_apply_errors_are_emitted_with_the_event(make_store: MakeStore) -> None:
    collector = Collector()
    _, _, service = _build(make_store, collector)
    async with running_broker(service) as broker:
        await broker.call("cart.add", {"sku": "bad-field"})
        (report,) = await collector.wait_for(1)
        dead = await broker.call("cartAggregate.deadLetters", {})
    assert "colour" in report["error"]
    assert report["event"]["payload"] == {"sku": "bad-field"}
    assert dead["rows"][0]["kind"] == "create"


async def test_a_failed_save_emits_event_failed(make_store: MakeStore) -> None:
    collector = Collector()
    events, _, service = _build(make_store, collector)

    class Watcher(Service):
        name = "watcher"

        @event(name="cart.added.failed")
        async def on_failed(self, ctx: Context) -> None:
            await collector.add(ctx.params)

    async with running_broker(service, Watcher()) as broker:
        await events.runtime(broker).adapter.close()  # the store is gone
        with pytest.raises(StoreError):
            await broker.call("cart.add", {"sku": "a"})
        (failed,) = await collector.wait_for(1)
    assert failed["event"] == "cart.added"
    assert "closed" in failed["error"]


def test_the_demo_continues_from_the_stored_state(tmp_path: Path) -> None:
    def demo() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "moleculerpy_cqrs.cli", "demo", "--count", "300",
             "--data", str(tmp_path / "data"), "--seed", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return done.stdout

    first, second = demo(), demo()
    assert "Continuing" not in first
    assert "profileSummaryAggregate" in first
    assert "Continuing: 300 events already stored" in second
    assert "log head 600" in second.replace("\n", " ")


async def test_calls_before_the_store_started_wait_for_it(make_store: MakeStore) -> None:
    """MoleculerPy lets other nodes call a service before its ``started()`` ran."""
    from moleculerpy_cqrs.broker.port import MoleculerPort
    from moleculerpy_cqrs.core.eventstore import EventStoreRuntime
    from moleculerpy_cqrs.core.records import EVENT_FIELDS

    factory = make_store()
    async with running_broker() as broker:
        runtime = EventStoreRuntime(
            "earlyEventStore",
            lambda: factory("earlyEventStore", EVENT_FIELDS),
            MoleculerPort(broker),
        )
        early = asyncio.create_task(runtime.append("early.called", {"n": 1}))
        await asyncio.sleep(0)
        assert not early.done()  # waiting, not failing with "not connected"
        await runtime.start(dispatch=False)
        row = await asyncio.wait_for(early, 10)
        await runtime.stop()
    assert row["id"] == 1
