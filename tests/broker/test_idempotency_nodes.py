"""Two nodes on one PostgreSQL, over a real NATS server, receiving the same idempotency keys
at once: each key is stored once, both nodes answer the same event, nobody gets a 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker, Settings

from moleculerpy_cqrs import ConflictError, EventStore, stores

KEYS = 40


@pytest.fixture
async def two_nodes(
    nats_url: str, postgres_dsn: str, pg_schema: str
) -> AsyncIterator[list[tuple[ServiceBroker, EventStore]]]:
    made: list[tuple[ServiceBroker, EventStore]] = []
    for name in ("node-a", "node-b"):
        events = EventStore("orderEventStore", stores.postgres(postgres_dsn, schema=pg_schema))

        class Orders(events.mixin(), Service):  # type: ignore[misc]
            name = "orders"
            place = events.map_action("place", "order.placed")

        settings = Settings(transporter=nats_url, log_level="WARNING", request_timeout=20)
        broker = ServiceBroker(name, settings=settings)
        await broker.register(Orders())
        await broker.start()
        made.append((broker, events))
    try:
        yield made
    finally:
        for broker, _ in reversed(made):
            await broker.stop()


async def _place(node: tuple[ServiceBroker, EventStore], key: str, params: Any) -> Any:
    broker, events = node
    # Straight to this node's own event store (a broker call could be balanced to the other).
    runtime = events.runtime(broker)
    return await runtime.append("order.placed", params, idempotency_key=key)


async def test_the_same_keys_on_two_nodes_at_once_are_stored_once(
    two_nodes: list[tuple[ServiceBroker, EventStore]],
) -> None:
    a, b = two_nodes
    # All at once (each node's group commit takes its calls in one transaction), then key by
    # key (the two nodes race for each key).
    answers = await asyncio.gather(
        *(_place(node, f"k-{i}", {"i": i}) for i in range(KEYS // 2) for node in (a, b, a, b))
    )
    for i in range(KEYS // 2, KEYS):
        answers += await asyncio.gather(
            *(_place(node, f"k-{i}", {"i": i}) for node in (b, a, b, a))
        )
    read = await a[0].call("orderEventStore.read", {"after": 0, "limit": 1000})
    stored = {e["idempotencyKey"]: e["id"] for e in read["events"]}
    assert len(read["events"]) == KEYS
    assert sorted(stored) == sorted(f"k-{i}" for i in range(KEYS))
    assert all(answer["id"] == stored[f"k-{answer['payload']['i']}"] for answer in answers)
    runtimes = [events.runtime(broker) for broker, events in two_nodes]
    assert sum(r.committer.appended for r in runtimes) == KEYS
    assert sum(r.duplicates for r in runtimes) == 3 * KEYS


async def test_other_params_under_the_same_key_on_two_nodes_get_a_409(
    two_nodes: list[tuple[ServiceBroker, EventStore]],
) -> None:
    a, b = two_nodes
    calls = [
        _place(node, f"k-{i}", {"node": n}) for i in range(KEYS) for n, node in enumerate((a, b))
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    read = await a[0].call("orderEventStore.read", {"after": 0, "limit": 1000})
    assert len(read["events"]) == KEYS
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == KEYS
    assert all(isinstance(r, ConflictError) for r in refused)
    by_key = {e["idempotencyKey"]: e["id"] for e in read["events"]}
    assert all(
        isinstance(r, ConflictError) and by_key[r.data["key"]] == r.data["id"] for r in refused
    )
    answered = [r for r in results if isinstance(r, dict)]
    assert sorted(r["id"] for r in answered) == sorted(by_key.values())
