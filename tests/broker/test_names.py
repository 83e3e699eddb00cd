"""One name, one thing: clashes between event stores, aggregates and services are refused."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from moleculerpy import Context, Service, ServiceBroker, Settings, action

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.face import runner
from moleculerpy_cqrs.testing.brokers import running_broker


async def test_an_event_store_named_like_its_own_service_is_refused() -> None:
    events = EventStore("orders", stores.memory())

    class Orders(events.mixin(), Service):  # type: ignore[misc]
        name = "orders"
        place = events.map_action("place", "order.placed")

    with pytest.raises(ConfigurationError) as refused:
        async with running_broker(Orders()):
            pass
    line = str(refused.value)
    assert "\n" not in line
    assert "event store 'orders' (of service 'orders')" in line
    assert "the service 'orders'" in line


async def test_an_aggregate_named_like_another_service_is_refused() -> None:
    events = EventStore("shopEvents", stores.memory())
    totals = Aggregate("billing", stores.memory()).snapshot("shopEvents")

    class Billing(Service):
        name = "billing"

        @action()
        async def pay(self, ctx: Context) -> str:
            return "paid"

    class Shop(events.mixin(), totals.mixin(), Service):  # type: ignore[misc]
        name = "shop"

    with pytest.raises(ConfigurationError, match=r"the aggregate 'billing' .* the service"):
        async with running_broker(Billing(), Shop()):
            pass


async def test_a_service_registered_after_a_store_of_its_name_is_refused() -> None:
    events = EventStore("orders", stores.memory())

    class Shop(events.mixin(), Service):  # type: ignore[misc]
        name = "shop"

    class Orders(Service):
        name = "orders"

    with pytest.raises(ConfigurationError) as refused:
        async with running_broker(Shop(), Orders()):
            pass
    assert "the service 'orders' and the event store 'orders' are both named" in str(refused.value)


async def test_two_services_of_one_name_on_a_node_are_refused_by_cqrs_run(
    tmp_path: Path,
) -> None:
    module = tmp_path / "twice.py"
    module.write_text(
        "from moleculerpy import Service\n\n"
        "class A(Service):\n    name = 'orders'\n\n"
        "class B(Service):\n    name = 'orders'\n"
    )
    with pytest.raises(ConfigurationError, match="both named 'orders'"):
        await runner.start_node([str(module)])


async def test_a_clash_across_nodes_is_refused_at_start_and_logged_by_the_running_node(
    tmp_path: Path, nats_url: str
) -> None:
    events = EventStore("orders", stores.sqlite(tmp_path / "data"))

    class Shop(events.mixin(), Service):  # type: ignore[misc]
        name = "shop"
        place = events.map_action("place", "order.placed")

    heard: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "name clash" in record.getMessage() and not heard.done():
                heard.set_result(record.getMessage())

    handler = Heard(level=logging.ERROR)
    logging.getLogger("moleculerpy_cqrs.broker.names").addHandler(handler)
    module = tmp_path / "orders_service.py"
    module.write_text(
        "from moleculerpy import Service, action\n\n"
        "class Orders(Service):\n    name = 'orders'\n\n"
        "    @action()\n    async def place(self, ctx):\n        return 'placed'\n"
    )
    running = ServiceBroker("shop-node", settings=Settings(transporter=nats_url, log_level="ERROR"))
    await running.register(Shop())
    await running.start()
    try:
        with pytest.raises(ConfigurationError) as refused:
            await runner.start_node([str(module)], node_id="orders-node", transporter=nats_url)
        line = str(refused.value)
        assert "\n" not in line
        assert "the service 'orders' on node orders-node" in line
        assert "the event store 'orders' on node shop-node" in line
        logged = await asyncio.wait_for(heard, 10)
        assert "the event store 'orders' on node shop-node" in logged
        assert "the service 'orders' on node orders-node" in logged
    finally:
        logging.getLogger("moleculerpy_cqrs.broker.names").removeHandler(handler)
        await running.stop()


async def test_instances_of_one_event_store_on_two_nodes_are_no_clash(
    tmp_path: Path, nats_url: str
) -> None:
    module = tmp_path / "shop_service.py"
    module.write_text(
        "from moleculerpy import Service\n"
        "from moleculerpy_cqrs import EventStore, stores\n\n"
        f"events = EventStore('orders', stores.sqlite({str(tmp_path / 'data')!r}))\n\n"
        "class Shop(events.mixin(), Service):\n    name = 'shop'\n"
        "    place = events.map_action('place', 'order.placed')\n"
    )
    first, _ = await runner.start_node([str(module)], node_id="one", transporter=nats_url)
    try:
        second, _ = await runner.start_node([str(module)], node_id="two", transporter=nats_url)
        await second.stop()
    finally:
        await first.stop()
