"""Services for the operator tests, run by ``cqrs run tests/face/ops_node.py``.

``opsEventStore`` feeds two aggregates on SQLite files under ``$CQRS_DATA``: ``orderTotals``
(backed up with ``StoreBackup``, for snapshots and restores) and ``shipments``, whose
transformation fails on ``{"sku": "poison"}`` until the file ``$CQRS_DATA/fixed`` exists (a
dead letter the operator can list, then re-drive once the transformation is "fixed").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup, stores

DATA = Path(os.environ.get("CQRS_DATA", "data"))
FIELDS = {"sku": "string", "qty": "integer"}

store = stores.sqlite(str(DATA))
events = EventStore("opsEventStore", store)
totals = Aggregate(
    "orderTotals", stores.with_fields(store, FIELDS), snapshot=StoreBackup(DATA / "backups")
).snapshot("opsEventStore")
shipments = Aggregate("shipments", stores.with_fields(store, FIELDS), attempts=1).snapshot(
    "opsEventStore"
)


async def to_order(event: dict[str, Any]) -> dict[str, Any]:
    return {"sku": event["payload"]["sku"], "qty": event["payload"]["qty"]}


async def to_shipment(event: dict[str, Any]) -> dict[str, Any]:
    if event["payload"]["sku"] == "poison" and not (DATA / "fixed").exists():
        raise ValueError("cannot ship poison")
    return {"sku": event["payload"]["sku"], "qty": event["payload"]["qty"]}


totals.on("order.placed").create(to_order)
shipments.on("order.shipped").create(to_shipment)


class OpsService(events.mixin(), totals.mixin(), shipments.mixin(), Service):  # type: ignore[misc]
    name = "ops"

    place = events.map_action("place", "order.placed")
    ship = events.map_action("ship", "order.shipped")


services = [OpsService]
