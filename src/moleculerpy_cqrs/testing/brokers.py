"""Running MoleculerPy brokers in tests and benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from moleculerpy import Service, ServiceBroker, Settings


@asynccontextmanager
async def running_broker(
    *services: Service,
    transporter: str = "memory://",
    node_id: str = "test-node",
    request_timeout: float = 30.0,
) -> AsyncIterator[ServiceBroker]:
    """A started broker with ``services`` registered; stopped on the way out."""
    broker = ServiceBroker(
        node_id,
        settings=Settings(
            transporter=transporter, log_level="ERROR", request_timeout=request_timeout
        ),
    )
    for service in services:
        await broker.register(service)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
