"""Services for ``tests/face/test_calls.py``, run by ``cqrs run tests/face/calls_node.py``.

``shop.place`` stores ``order.placed``; the aggregate ``shipping`` fails on ``{"sku":
"poison"}`` (a dead letter to discard). ``shop.refuse`` answers an error with data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moleculerpy import Context, Service, action

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.errors import InvalidInput

DATA = Path(os.environ.get("CQRS_DATA", "data"))
store = stores.sqlite(str(DATA))
events = EventStore("shopEventStore", store)
shipping = Aggregate("shipping", stores.with_fields(store, {"sku": "string"}), attempts=1).snapshot(
    "shopEventStore"
)


async def to_shipment(event: dict[str, Any]) -> dict[str, Any]:
    if event["payload"]["sku"] == "poison":
        raise ValueError("cannot ship poison")
    return {"sku": event["payload"]["sku"]}


shipping.on("order.placed").create(to_shipment)


class Shop(events.mixin(), shipping.mixin(), Service):  # type: ignore[misc]
    name = "shop"
    place = events.map_action("place", "order.placed")

    @action(name="refuse")
    async def refuse(self, ctx: Context) -> None:
        raise InvalidInput("no such sku", field="sku")

    @action(name="whoami")
    async def whoami(self, ctx: Context) -> Any:
        return {"params": ctx.params, "user": ctx.meta.get("user")}


services = [Shop]
