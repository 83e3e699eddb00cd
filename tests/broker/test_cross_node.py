"""The event store on one node, an aggregate on another, over a real NATS server.

The aggregate's projector reads the log through ``profileEventStore.read``, is woken by the
``cqrs.profileEventStore.appended`` broadcast, and calls a transformation that lives on the
first node; that transformation reads the aggregate back on the second node, and must still
see the effect of every earlier event of the open batch (the batch's token travels in meta).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Context, Service, ServiceBroker, Settings, action, event

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.examples.profile import SUMMARY_FIELDS
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.nats_server import NatsServer
from tests.core.test_profile_example import expected


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:
        yield server.url


@pytest.fixture
async def brokers(nats_url: str) -> AsyncIterator[list[ServiceBroker]]:
    made: list[ServiceBroker] = []
    yield made
    for broker in reversed(made):
        await broker.stop()


async def node(made: list[ServiceBroker], name: str, url: str, service: Service) -> ServiceBroker:
    settings = Settings(transporter=url, log_level="WARNING", request_timeout=10)
    broker = ServiceBroker(name, settings=settings)
    made.append(broker)
    await broker.register(service)
    await broker.start()
    return broker


async def test_an_aggregate_on_another_node(
    tmp_path: Path, nats_url: str, brokers: list[ServiceBroker]
) -> None:
    events = EventStore("profileEventStore", stores.sqlite(tmp_path / "a"))
    summary = Aggregate(
        "profileSummaryAggregate",
        stores.sqlite(tmp_path / "b", fields=SUMMARY_FIELDS),
        batch_size=100,
    ).snapshot("profileEventStore")
    summary.on("profile.updated").update("profile.transformProfileSummary")

    class Profile(events.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated")

        @action(name="transformProfileSummary")
        async def transform(self, ctx: Context) -> dict[str, Any]:
            profile = ctx.params["payload"]
            found = await ctx.call("profileSummaryAggregate.find", {"country": profile["country"]})
            row = found[0] if found else {"total": 0, "totalMarried": 0, "totalStudents": 0}
            result = {
                "country": profile["country"],
                "total": row["total"] + 1,
                "totalMarried": row["totalMarried"] + profile["married"],
                "totalStudents": row["totalStudents"] + profile["student"],
            }
            return {**result, "id": row["id"]} if found else result

    class Summaries(summary.mixin(), Service):  # type: ignore[misc]
        name = "summaries"

    node_a = await node(brokers, "node-a", nats_url, Profile())
    node_b = await node(brokers, "node-b", nats_url, Summaries())
    await node_a.wait_for_services(["profileSummaryAggregate"], timeout=10)
    await node_b.wait_for_services(["profile", "profileEventStore"], timeout=10)

    rng = random.Random(7)
    profiles = [random_profile(rng) for _ in range(600)]
    await node_a.call("profile.$stopDispatch", {})  # nobody subscribes; keep the test lean
    for chunk in range(0, len(profiles), 50):  # bursts, so batches hold many events
        part = profiles[chunk : chunk + 50]
        await asyncio.gather(*(node_a.call("profile.update", p) for p in part))
    await asyncio.wait_for(summary.runtime(node_b).wait_caught_up(len(profiles)), 60)

    rows = await node_a.call("profileSummaryAggregate.find", {})
    status = await node_a.call("profileSummaryAggregate.status", {})
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)
    assert status["eventStore"] == "profileEventStore"
    assert status["checkpoint"] == status["head"] == len(profiles)


class _Heard(Service):
    """Hears the event store's ``appended`` announcements."""

    name = "heard"

    def __init__(self) -> None:
        super().__init__(self.name)
        self.heard = asyncio.Queue[Any]()

    @event(name="cqrs.noteEventStore.appended")
    async def appended(self, ctx: Context) -> None:
        await self.heard.put(ctx.params)


def _notes(tmp_path: Path) -> tuple[EventStore, Service]:
    events = EventStore("noteEventStore", stores.sqlite(tmp_path / "notes"))

    class Notes(events.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added")

    return events, Notes()


async def test_appends_are_announced_to_other_nodes(
    tmp_path: Path, nats_url: str, brokers: list[ServiceBroker]
) -> None:
    _, notes = _notes(tmp_path)
    listener = _Heard()
    node_a = await node(brokers, "node-a", nats_url, notes)
    await node(brokers, "node-b", nats_url, listener)
    await node_a.wait_for_services(["heard"], timeout=10)
    await node_a.call("notes.add", {"text": "hello"})
    assert await asyncio.wait_for(listener.heard.get(), 10) == {"head": 0}


async def test_with_no_other_node_listening_nothing_is_announced(tmp_path: Path) -> None:
    # This node's dispatcher and projectors are woken directly; a broadcast per commit would
    # cost as much as the append's own call.
    events, notes = _notes(tmp_path)
    listener = _Heard()
    async with running_broker(notes, listener) as broker:
        runtime = events.runtime(broker)
        for n in range(3):
            await broker.call("notes.add", {"n": n})
            assert runtime._announcing is not None
            await runtime._announcing
        assert listener.heard.empty()
        assert await broker.call("noteEventStore.count", {}) == 3
