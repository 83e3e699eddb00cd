"""Several nodes serving one event store and aggregate on one database (invariants 3 and 9)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from moleculerpy import Context, Service, ServiceBroker, event

from moleculerpy_cqrs.core.aggregate import AggregateRuntime
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore
from tests.core.test_profile_example import expected


async def _sees_the_other(broker: ServiceBroker, other: str) -> None:
    """Wait for MoleculerPy's ``$node.connected`` about ``other`` (unless it came already)."""
    connected = asyncio.Event()

    async def on_connected(payload: Any) -> None:
        if other in broker.node_catalog.nodes:
            connected.set()

    broker.local_bus.on("$node.connected", on_connected)
    if other not in broker.node_catalog.nodes:
        await connected.wait()


async def _send(brokers: list[ServiceBroker], profiles: list[dict[str, Any]]) -> None:
    for start in range(0, len(profiles), 100):
        chunk = profiles[start : start + 100]
        await asyncio.gather(
            *(brokers[i % len(brokers)].call("profile.update", p) for i, p in enumerate(chunk))
        )


async def _connected(a: ServiceBroker, b: ServiceBroker) -> None:
    await asyncio.wait_for(_sees_the_other(a, b.nodeID), 10)
    await asyncio.wait_for(_sees_the_other(b, a.nodeID), 10)


async def _first_caught_up(runtimes: list[AggregateRuntime], position: int) -> None:
    waits = [asyncio.create_task(r.wait_caught_up(position)) for r in runtimes]
    try:
        await asyncio.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), 60)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def test_racing_projectors_apply_each_event_once(
    make_store: MakeStore, nats_url: str
) -> None:
    """With no lease (ttl 0) both projectors run at once: the checkpoint check saves us."""
    factory = make_store()
    _, summary_a, service_a = profile.build(factory, batch_size=20, lease_ttl=0)
    _, summary_b, service_b = profile.build(factory, batch_size=20, lease_ttl=0)
    rng = random.Random(3)
    profiles = [random_profile(rng) for _ in range(1500)]
    async with (
        running_broker(service_a(), node_id="node-a", transporter=nats_url) as a,
        running_broker(service_b(), node_id="node-b", transporter=nats_url) as b,
    ):
        await _connected(a, b)
        await _send([a, b], profiles)
        runtime_a, runtime_b = summary_a.runtime(a), summary_b.runtime(b)
        await asyncio.wait_for(runtime_a.wait_caught_up(len(profiles)), 60)
        await asyncio.wait_for(runtime_b.wait_caught_up(len(profiles)), 60)
        rows = await a.call("profileSummaryAggregate.find", {})
        assert runtime_a.projector is not None
        assert runtime_b.projector is not None
        stale = runtime_a.projector.stats.stale + runtime_b.projector.stats.stale
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)
    assert stale > 0, "the two projectors never raced: the test proved nothing"


class Deliveries:
    """How often each event id was delivered; awaitable until ``n`` distinct ids arrived."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self._changed = asyncio.Condition()

    async def add(self, event_id: int) -> None:
        async with self._changed:
            self.counts[event_id] += 1
            self._changed.notify_all()

    async def wait_for(self, n: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.counts) >= n), 30)


def _listener(deliveries: Deliveries) -> Service:
    class Listener(Service):
        name = "listener"

        @event(name="profile.updated")
        async def on_updated(self, ctx: Context) -> None:
            await deliveries.add(ctx.params["id"])

    return Listener()


async def test_one_node_works_at_a_time_and_another_takes_over(
    make_store: MakeStore, nats_url: str
) -> None:
    factory = make_store()
    _, summary_a, service_a = profile.build(factory, batch_size=20, lease_ttl=1.0)
    events_b, summary_b, service_b = profile.build(factory, batch_size=20, lease_ttl=1.0)
    rng = random.Random(4)
    first = [random_profile(rng) for _ in range(400)]
    then = [random_profile(rng) for _ in range(200)]
    deliveries = Deliveries()
    async with running_broker(
        service_b(), _listener(deliveries), node_id="node-b", transporter=nats_url
    ) as b:
        async with running_broker(service_a(), node_id="node-a", transporter=nats_url) as a:
            await _connected(a, b)
            await _send([a, b], first)
            runtimes = [summary_a.runtime(a), summary_b.runtime(b)]
            await _first_caught_up(runtimes, len(first))
            applied = [r.projector.stats.applied if r.projector else 0 for r in runtimes]
            assert sorted(applied)[0] == 0, f"both projectors worked: {applied}"
            dispatched = events_b.runtime(b).dispatcher
            await deliveries.wait_for(len(first))
        # node-a stopped: node-b serves alone, whoever held the leases before.
        await _send([b], then)
        total = len(first) + len(then)
        await asyncio.wait_for(summary_b.runtime(b).wait_caught_up(total), 30)
        await deliveries.wait_for(total)
        rows = await b.call("profileSummaryAggregate.find", {})
        assert not dispatched.standby
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(first + then)
    assert sorted(deliveries.counts) == list(range(1, total + 1))
    doubles = [i for i, n in deliveries.counts.items() if n > 1 and i <= len(first)]
    assert not doubles, f"events delivered twice while both nodes were up: {doubles[:5]}"
