"""Snapshots, restore and replay: the Go library's tests 6-10 and what it never finished."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker

from moleculerpy_cqrs import (
    Aggregate,
    Conflict,
    EntityNotFound,
    EventStore,
    NoSnapshot,
    StoreBackup,
    StoreError,
)
from moleculerpy_cqrs.core.snapshots import NO_BACKUP_ERROR, NOT_CONFIGURED_ERROR
from moleculerpy_cqrs.stores import StoreFactory, with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore

PROPERTY = {"name": "Beach villa", "bedrooms": 12, "city": "Wanaka", "countryCode": "NZ"}


def build(
    factory: StoreFactory, strategy: Any, *, snapshot_store: bool = True
) -> tuple[EventStore, Aggregate, Service]:
    events = EventStore("propertyEventStore", factory)
    rooms = Aggregate(
        "roomAggregate",
        with_fields(factory, {"room": "integer", "name": "string"}),
        strategy,
        replay_batch_size=50,
        write_actions=True,  # the tests write stray rows to see what a replay does to them
    )
    if snapshot_store:
        rooms.snapshot("propertyEventStore")

    async def five_rooms(event: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"room": i, "name": event["payload"]["name"]} for i in range(5)]

    rooms.on("property.created").create_many(five_rooms)

    class Property(events.mixin(), rooms.mixin(), Service):  # type: ignore[misc]
        name = "property"
        create = events.map_action("create", "property.created")

    return events, rooms, Property()


async def create(broker: ServiceBroker, rooms: Aggregate, n: int, tag: str = "x") -> None:
    for i in range(n):
        await broker.call("property.create", {**PROPERTY, "name": f"{tag}{i}"})
    await rooms.runtime(broker).wait_caught_up()


async def count(broker: ServiceBroker) -> int:
    total: int = await broker.call("roomAggregate.count", {})
    return total


async def delete_all_rows(broker: ServiceBroker) -> None:
    for row in await broker.call("roomAggregate.find", {"fields": ["id"]}):
        await broker.call("roomAggregate.remove", {"id": row["id"]})


async def test_6_snapshot_without_an_event_store(make_store: MakeStore, tmp_path: Path) -> None:
    *_, service = build(make_store(), StoreBackup(tmp_path), snapshot_store=False)
    async with running_broker(service) as broker:
        with pytest.raises(Conflict, match=f"^{NOT_CONFIGURED_ERROR}$"):
            await broker.call("roomAggregate.snapshot", {})


async def test_7_snapshot_with_no_backup_strategy(make_store: MakeStore) -> None:
    _, rooms, service = build(make_store(), NoSnapshot)
    async with running_broker(service) as broker:
        await create(broker, rooms, 10)
        assert await count(broker) == 50
        with pytest.raises(StoreError) as caught:
            await broker.call("roomAggregate.snapshot", {})
        assert str(caught.value) == NO_BACKUP_ERROR
        assert await broker.call("propertyEventStore.count", {"query": {"eventType": 3}}) == 1


async def test_8_to_10_snapshot_restore_and_replay(make_store: MakeStore, tmp_path: Path) -> None:
    _, rooms, service = build(make_store(), StoreBackup(tmp_path / "bkp"))
    async with running_broker(service) as broker:
        await create(broker, rooms, 10)
        snapshot_id = await broker.call("roomAggregate.snapshot", {})
        assert isinstance(snapshot_id, str)
        assert snapshot_id.startswith("snapshot_")
        assert await broker.call("propertyEventStore.count", {"query": {"eventType": 2}}) == 1
        assert (tmp_path / "bkp" / snapshot_id / "roomAggregate").is_dir()
        await create(broker, rooms, 1)
        assert await count(broker) == 55  # test 8

        await delete_all_rows(broker)
        assert await count(broker) == 0
        restored = await broker.call("roomAggregate.restore", {"snapshotID": snapshot_id})
        assert restored["checkpoint"] == 10
        await rooms.runtime(broker).wait_caught_up()
        # test 9: the backup is back; test 10: the event stored since is applied again
        assert await count(broker) == 55
        await create(broker, rooms, 1)
        assert await count(broker) == 60  # test 10: a new event after a restore

        await delete_all_rows(broker)
        answer = await broker.call(
            "roomAggregate.replay", {"snapshotID": snapshot_id, "wait": True}
        )
        assert answer["state"] == "restored"
        assert await count(broker) == 60  # restore-and-replay caught up with 2 later events
        snapshots = await broker.call("roomAggregate.snapshots", {})
    (listed,) = snapshots
    assert listed["snapshotId"] == snapshot_id
    assert listed["status"] == "completed"
    assert listed["checkpoint"] == 10
    assert listed["size"] > 0


async def test_a_failed_backup_is_marked_failed_and_cannot_be_restored(
    make_store: MakeStore, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the backups should go")
    _, rooms, service = build(make_store(), StoreBackup(blocker))
    async with running_broker(service) as broker:
        await create(broker, rooms, 2)
        with pytest.raises(StoreError, match="could not backup the aggregate"):
            await broker.call("roomAggregate.snapshot", {})
        (failed,) = await broker.call("roomAggregate.snapshots", {})
        assert failed["status"] == "failed"
        assert "could not backup" in failed["error"]
        with pytest.raises(Conflict, match="failed"):
            await broker.call("roomAggregate.restore", {"snapshotID": failed["snapshotId"]})
        with pytest.raises(EntityNotFound):
            await broker.call("roomAggregate.restore", {"snapshotID": "snapshot_nope"})
        await create(broker, rooms, 1)  # the projector still runs
        assert await count(broker) == 15
        status = await broker.call("roomAggregate.status", {})
    assert status["state"] == "running"


async def test_replay_rebuilds_the_same_table(make_store: MakeStore, tmp_path: Path) -> None:
    _, rooms, service = build(make_store(), StoreBackup(tmp_path))
    async with running_broker(service) as broker:
        await create(broker, rooms, 30)
        before = await broker.call("roomAggregate.find", {"sort": "name room"})
        await broker.call("roomAggregate.create", {"room": 99, "name": "stray"})
        done = await broker.call("roomAggregate.replay", {"wait": True})
        after = await broker.call("roomAggregate.find", {"sort": "name room"})
        status = await broker.call("roomAggregate.status", {})
    assert done["state"] == "done"
    assert done["done"] == done["total"] == 30
    assert _content(after) == _content(before)  # the stray row is gone: rebuilt from the log
    assert status["checkpoint"] == 30
    assert status["replay"]["state"] == "done"


waits_during: list[float] = []


def _content(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["name"], r["room"], r["eventId"]) for r in rows]


async def _writer(
    broker: ServiceBroker, stop: asyncio.Event, waits: list[float], busy: asyncio.Event
) -> int:
    written = 0
    while not stop.is_set():
        started = time.perf_counter()
        during = busy.is_set()
        await broker.call("property.create", {**PROPERTY, "name": f"w{written}"})
        waits.append(time.perf_counter() - started)
        if during and busy.is_set():
            waits_during.append(waits[-1])
        written += 1
        await asyncio.sleep(0.005)  # a steady load, not a flood that outruns any rebuild
    return written


async def _reader(broker: ServiceBroker, stop: asyncio.Event, floor: int, seen: list[int]) -> None:
    while not stop.is_set():
        rows = await broker.call("roomAggregate.count", {})
        assert rows >= floor, f"a reader saw {rows} rows, fewer than the {floor} always there"
        assert rows % 5 == 0, f"a reader saw a partial table ({rows} rows)"
        seen.append(rows)
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("operation", ["snapshot+restore", "replay"])
async def test_writes_and_reads_never_stop(
    make_store: MakeStore, tmp_path: Path, operation: str
) -> None:
    _, rooms, service = build(make_store(), StoreBackup(tmp_path))
    async with running_broker(service) as broker:
        await create(broker, rooms, 300)
        stop, busy = asyncio.Event(), asyncio.Event()
        waits: list[float] = []
        seen: list[int] = []
        waits_during.clear()
        writer = asyncio.create_task(_writer(broker, stop, waits, busy))
        reader = asyncio.create_task(_reader(broker, stop, 1500, seen))
        for _ in range(2):
            await asyncio.sleep(0.05)  # let the writer run between operations
            busy.set()
            if operation == "replay":
                await broker.call("roomAggregate.replay", {"wait": True})
            else:
                snapshot_id = await broker.call("roomAggregate.snapshot", {})
                await broker.call("roomAggregate.restore", {"snapshotID": snapshot_id})
            busy.clear()
        stop.set()
        written = await writer
        await reader
        await rooms.runtime(broker).wait_caught_up()
        total = await count(broker)
        names = {r["name"] for r in await broker.call("roomAggregate.find", {"fields": ["name"]})}
    assert waits_during, "no append ran while the operation did"
    assert seen
    assert max(waits) < 2.0, f"an append waited {max(waits):.2f}s"
    assert total == (300 + written) * 5  # equals a recomputation from the whole log
    assert names == {f"x{i}" for i in range(300)} | {f"w{i}" for i in range(written)}


async def test_an_interrupted_snapshot_is_marked_failed_once_nobody_takes_it(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """The node taking a snapshot dies mid-backup (its task is cancelled, so it neither
    settles the snapshot nor renews its heartbeat): once the heartbeat has expired, the
    snapshot is listed failed, and a restore of it is refused with 409."""
    _, rooms, service = build(make_store(), StoreBackup(tmp_path))
    async with running_broker(service) as broker:
        await create(broker, rooms, 2)
        maintenance = rooms.runtime(broker).maintenance
        assert maintenance is not None
        maintenance.heartbeat_ttl = 0.3
        entered = asyncio.Event()

        async def hang(location: str) -> int:
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("never")

        maintenance.adapter.backup = hang  # type: ignore[method-assign]
        taking = asyncio.create_task(broker.call("roomAggregate.snapshot", {}))
        await asyncio.wait_for(entered.wait(), 10)
        (listed,) = await broker.call("roomAggregate.snapshots", {})
        assert listed["status"] == "created"  # still being taken: not failed
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        # The heartbeat may have been cancelled before its first write: then only the
        # snapshot's age counts.
        alive = await maintenance.adapter.get_meta(f"snapshot.taking.{listed['snapshotId']}")
        until = float(alive["until"]) if isinstance(alive, dict) else 0.0
        expiry = max(until, listed["created"] / 1000 + 0.3)
        await asyncio.sleep(max(expiry - time.time(), 0) + 0.05)  # until the heartbeat expires
        (listed,) = await broker.call("roomAggregate.snapshots", {})
        assert listed["status"] == "failed"
        assert "interrupted" in listed["error"]
        with pytest.raises(Conflict) as refused:
            await broker.call("roomAggregate.restore", {"snapshotID": listed["snapshotId"]})
        assert refused.value.code == 409
