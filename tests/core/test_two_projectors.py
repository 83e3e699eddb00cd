"""Two nodes running the same aggregate on one database never both apply an event."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from moleculerpy import ServiceBroker

from examples import profile
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


async def test_two_projectors_of_one_aggregate_apply_each_event_once(
    make_store: MakeStore, nats_url: str
) -> None:
    factory = make_store()
    _, summary_a, service_a = profile.build(factory, batch_size=20)
    _, summary_b, service_b = profile.build(factory, batch_size=20)
    rng = random.Random(3)
    profiles = [random_profile(rng) for _ in range(1500)]
    async with (
        running_broker(service_a(), node_id="node-a", transporter=nats_url) as a,
        running_broker(service_b(), node_id="node-b", transporter=nats_url) as b,
    ):
        await a.wait_for_services(["profileSummaryAggregate"], timeout=10)
        await asyncio.wait_for(_sees_the_other(a, "node-b"), 10)
        await asyncio.wait_for(_sees_the_other(b, "node-a"), 10)
        for start in range(0, len(profiles), 100):
            chunk = profiles[start : start + 100]
            await asyncio.gather(
                *((a if i % 2 else b).call("profile.update", p) for i, p in enumerate(chunk))
            )
        runtime_a, runtime_b = summary_a.runtime(a), summary_b.runtime(b)
        # Each projector wakes for its own node's appends; both end at the head.
        await asyncio.wait_for(runtime_a.wait_caught_up(len(profiles)), 60)
        await asyncio.wait_for(runtime_b.wait_caught_up(len(profiles)), 60)
        rows = await a.call("profileSummaryAggregate.find", {})
        assert runtime_a.projector is not None
        assert runtime_b.projector is not None
        stale = runtime_a.projector.stats.stale + runtime_b.projector.stats.stale
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)
    assert stale > 0, "the two projectors never raced: the test proved nothing"
