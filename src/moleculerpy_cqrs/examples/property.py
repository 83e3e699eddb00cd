"""The seed's property example: ``property.create`` → ``property.created`` → two aggregates.

``propertyAggregate`` gets one row per property (``create``); ``propertySummaryAggregate``
keeps totals per country (``update``): how many properties, how many in beach cities and how
many in mountain towns. ``cqrs run property`` serves it on SQLite files under ``$CQRS_DATA``
(default ``data``), with snapshots in ``$CQRS_DATA/backups``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moleculerpy import Context, Service, action

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup, stores
from moleculerpy_cqrs.examples import data_folder
from moleculerpy_cqrs.stores import StoreFactory

PROPERTY_FIELDS = {
    "name": "string",
    "active": "boolean",
    "bathrooms": "float",
    "bedrooms": "integer",
    "city": "string",
    "countryCode": "string",
}
SUMMARY_FIELDS = {
    "countryCode": "string",
    "total": "integer",
    "beachCity": "integer",
    "mountain": "integer",
}
PROPERTY_PARAMS: dict[str, Any] = {
    "name": {"type": "string", "required": True, "minLength": 1},
    "active": "boolean",
    "bathrooms": {"type": "number", "min": 0},
    "bedrooms": {"type": "number", "min": 0},
    "city": "string",
    "countryCode": {"type": "string", "required": True, "minLength": 1},
}
"""What ``property.create`` takes in the shipped service (``cqrs run property``): a property
without a name or a country code, or with a value of the wrong type, is a 422 and nothing is
stored."""

BEACH_CITIES = frozenset({"Mount Maunganui", "Gisborne", "Napier", "Byron Bay", "Nelson"})
MOUNTAIN_TOWNS = frozenset({"Wanaka", "Queenstown", "Ohakune", "Aspen", "Zermatt"})


def build(
    store: StoreFactory | None = None,
    *,
    backups: str | Path | None = None,
    batch_size: int = 100,
    params: dict[str, Any] | None = None,
) -> tuple[EventStore, Aggregate, Aggregate, type[Service]]:
    """The event store, both aggregates and the property service, on ``store`` (default:
    SQLite files in the data folder); snapshots go to ``backups`` (default:
    ``<data folder>/backups``). ``params``: the params schema of ``property.create`` (the
    shipped service has :data:`PROPERTY_PARAMS`; by default, as in the Go seed, none)."""
    store = store or stores.sqlite(data_folder())
    snapshots = StoreBackup(backups or data_folder() / "backups")
    events = EventStore("propertyEventStore", store)
    properties = Aggregate(
        "propertyAggregate",
        stores.with_fields(store, PROPERTY_FIELDS),
        snapshots,
        batch_size=batch_size,
    ).snapshot("propertyEventStore")
    summary = Aggregate(
        "propertySummaryAggregate",
        stores.with_fields(store, SUMMARY_FIELDS),
        snapshots,
        batch_size=batch_size,
    ).snapshot("propertyEventStore")

    class PropertyService(events.mixin(), properties.mixin(), summary.mixin(), Service):  # type: ignore[misc]
        name = "property"

        create = events.map_action("create", "property.created", params=params)

        @action(name="transformProperty")
        async def transform_property(self, ctx: Context) -> dict[str, Any]:
            payload = ctx.params["payload"]
            return {k: payload.get(k) for k in PROPERTY_FIELDS}

        @action(name="transformCountrySummary")
        async def transform_country_summary(self, ctx: Context) -> dict[str, Any]:
            payload = ctx.params["payload"]
            code = payload["countryCode"]
            found = await ctx.call("propertySummaryAggregate.find", {"countryCode": code})
            row = found[0] if found else {"total": 0, "beachCity": 0, "mountain": 0}
            result = {
                "countryCode": code,
                "total": row["total"] + 1,
                "beachCity": row["beachCity"] + (payload.get("city") in BEACH_CITIES),
                "mountain": row["mountain"] + (payload.get("city") in MOUNTAIN_TOWNS),
            }
            if found:
                result["id"] = row["id"]
            return result

        on_created = properties.on("property.created").create("property.transformProperty")
        on_summary = summary.on("property.created").update("property.transformCountrySummary")

    return events, properties, summary, PropertyService


events, properties, summary, PropertyService = build(params=PROPERTY_PARAMS)
services = [PropertyService]
