"""Read-model versions: a newer node rebuilds the table, an older one stands aside."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, ConflictError, EventStore, StoreBackup
from moleculerpy_cqrs.core.maintenance import VERSION_KEY
from moleculerpy_cqrs.stores import StoreFactory, with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore


class Deploy:
    """One deploy of a service whose aggregate counts profiles by country; version 2 counts
    each profile ten times (a changed transformation)."""

    def __init__(
        self, store: StoreFactory, version: int, *, backups: Path | None = None, **options: Any
    ) -> None:
        self.events = EventStore("profileEventStore", store, lease_ttl=options.get("ttl", 5.0))
        self.summary = Aggregate(
            "byCountry",
            with_fields(store, {"country": "string", "total": "integer"}),
            StoreBackup(backups) if backups else None,  # type: ignore[arg-type]
            version=version,
            replay_batch_size=options.get("replay_batch_size", 1000),
            lease_ttl=options.get("ttl", 5.0),
        ).snapshot("profileEventStore")
        if backups is None:
            from moleculerpy_cqrs import NoSnapshot

            self.summary.snapshot_strategy = NoSnapshot
        self.hold = options.get("hold")  # an asyncio.Event a v2 transformation waits for
        self.seen: list[int] = []
        step = 10 if version == 2 else 1
        summary, deploy = self.summary, self

        async def count(event: dict[str, Any]) -> dict[str, Any]:
            deploy.seen.append(event["id"])
            if deploy.hold is not None and event["id"] == options.get("hold_at"):
                await deploy.hold.wait()
            country = event["payload"]["country"]
            found = await deploy.broker.call("byCountry.find", {"country": country})
            if found:
                return {"id": found[0]["id"], "total": found[0]["total"] + step}
            return {"country": country, "total": step}

        summary.on("profile.updated").update(count)

        class Profile(self.events.mixin(), summary.mixin(), Service):  # type: ignore[misc]
            name = "profile"
            update = self.events.map_action("update", "profile.updated")

        self.service = Profile()
        self.broker: Any = None

    async def __aenter__(self) -> Any:
        self._cm = running_broker(self.service)
        self.broker = await self._cm.__aenter__()
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)


async def _totals(broker: Any) -> list[tuple[str, int]]:
    rows = await broker.call("byCountry.find", {"sort": "country"})
    return [(r["country"], r["total"]) for r in rows]


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def _v1_log(store: StoreFactory, countries: list[str]) -> None:
    v1 = Deploy(store, 1)
    async with v1 as broker:
        for country in countries:
            await broker.call("profile.update", {"country": country})
        await v1.summary.runtime(broker).wait_caught_up()
        assert await _totals(broker) == sorted((c, countries.count(c)) for c in set(countries))


async def test_a_version_bump_rebuilds_while_reads_answer_from_the_old_table(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    await _v1_log(store, ["NZ", "NZ", "FR"])
    hold = asyncio.Event()
    v2 = Deploy(store, 2, hold=hold, hold_at=2)
    with caplog.at_level(logging.WARNING, logger="moleculerpy_cqrs.core.maintenance"):
        async with v2 as broker:

            async def rebuilding() -> bool:
                status = await broker.call("byCountry.status", {})
                return bool(status["state"] == "rebuilding")

            await _until(rebuilding, "the rebuild started")
            status = await broker.call("byCountry.status", {})
            assert status["rebuild"].startswith("rebuilding v2: ")
            assert (status["version"], status["tableVersion"]) == (2, 1)
            # reads answer from the v1 table, whole, while the rebuild runs
            assert await _totals(broker) == [("FR", 1), ("NZ", 2)]
            await broker.call("profile.update", {"country": "FR"})  # appends go on too
            hold.set()
            await v2.summary.runtime(broker).wait_caught_up()
            assert await _totals(broker) == [("FR", 20), ("NZ", 20)]
            status = await broker.call("byCountry.status", {})
            assert (status["state"], status["tableVersion"], status["rebuild"]) == (
                "running",
                2,
                None,
            )
            assert sorted(v2.seen).count(4) == 1  # the event appended meanwhile: once
    assert "rebuilding version 2 from the log (the table holds version 1" in caplog.text
    async with Deploy(store, 2) as broker:  # a restart does not rebuild again
        await broker.call("profile.update", {"country": "NZ"})
        await _until(
            lambda: _same(_totals(broker), [("FR", 20), ("NZ", 30)]), "applied once, in v2"
        )


async def _same(totals: Any, expected: list[tuple[str, int]]) -> bool:
    return bool(await totals == expected)


async def test_an_older_node_does_not_project_and_answers_reads(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    await _v1_log(store, ["NZ"])
    async with Deploy(store, 2) as broker:
        await broker.call("profile.update", {"country": "NZ"})
        await _until(lambda: _same(_totals(broker), [("NZ", 20)]), "v2 built")
    old = Deploy(store, 1)
    with caplog.at_level(logging.WARNING, logger="moleculerpy_cqrs.core.maintenance"):
        async with old as broker:

            async def outdated() -> bool:
                status = await broker.call("byCountry.status", {})
                return bool(status["state"] == "outdated")

            await _until(outdated, "the old node stood aside")
            await broker.call("profile.update", {"country": "NZ"})  # stored, not projected
            status = await broker.call("byCountry.status", {})
            assert status["rebuild"] == (
                "outdated: this node runs v1, the table was built by v2; not projecting"
            )
            assert status["checkpoint"] == 2
            assert await _totals(broker) == [("NZ", 20)]  # reads answered
            with pytest.raises(ConflictError, match="replay it from a node running"):
                await broker.call("byCountry.replay", {})
            assert old.seen == []
    assert "this node runs version 1, the table was built by version 2" in caplog.text


async def test_a_snapshot_of_another_version_is_refused_with_a_hint_to_replay(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = make_store()
    v1 = Deploy(store, 1, backups=tmp_path)
    async with v1 as broker:
        await broker.call("profile.update", {"country": "NZ"})
        await v1.summary.runtime(broker).wait_caught_up()
        snapshot_id = await broker.call("byCountry.snapshot", {})
    v2 = Deploy(store, 2, backups=tmp_path)
    async with v2 as broker:
        await v2.summary.runtime(broker).wait_caught_up()
        refused = r"made by version 1 of byCountry; this node runs version 2: replay instead"
        with pytest.raises(ConflictError, match=refused + r" \(cqrs replay byCountry\)"):
            await broker.call("byCountry.restore", {"snapshotID": snapshot_id})
        assert await _totals(broker) == [("NZ", 10)]
        own = await broker.call("byCountry.snapshot", {})
        restored = await broker.call("byCountry.restore", {"snapshotID": own})
        assert restored["snapshotId"] == own


async def test_a_new_aggregate_starts_at_its_version_without_a_rebuild(
    make_store: MakeStore,
) -> None:
    store = make_store()
    v2 = Deploy(store, 2)
    async with v2 as broker:
        await broker.call("profile.update", {"country": "NZ"})
        runtime = v2.summary.runtime(broker)
        await runtime.wait_caught_up()
        assert await runtime.adapter.get_meta(VERSION_KEY) == 2
        assert v2.seen == [1]
        assert runtime.maintenance is not None
        assert runtime.maintenance.replay_progress.state == "idle"
