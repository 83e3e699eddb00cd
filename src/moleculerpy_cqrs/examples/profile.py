"""The seed's profile example: ``profile.update`` → ``profile.updated`` → a summary by country.

``cqrs run profile`` serves it on SQLite files under ``$CQRS_DATA`` (default ``data``), with
snapshots in ``$CQRS_DATA/backups``; tests and benchmarks call :func:`build` with the stores
they want.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moleculerpy import Context, Service, action

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup, stores
from moleculerpy_cqrs.examples import data_folder
from moleculerpy_cqrs.stores import StoreFactory

PROFILE_PARAMS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1},
    "country": {"type": "string", "required": True, "minLength": 1},
    "age": {"type": "number", "min": 0},
    "married": "boolean",
    "student": "boolean",
}
"""What ``profile.update`` takes in the shipped service (``cqrs run profile``): a command
without a country, or with a country that is not text, is a 422 and nothing is stored (the
summary's transformation could only dead-letter it)."""

SUMMARY_FIELDS = {
    "country": "string",
    "total": "integer",
    "totalMarried": "integer",
    "totalStudents": "integer",
}


def build(
    store: StoreFactory | None = None,
    *,
    summary_store: StoreFactory | None = None,
    backups: str | Path | None = None,
    batch_size: int = 1000,
    dispatch_batch_size: int = 100,
    lease_ttl: float = 5.0,
    key: str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[EventStore, Aggregate, type[Service]]:
    """The event store, the summary aggregate and the profile service, on ``store`` (default:
    SQLite files in the data folder); snapshots go to ``backups`` (default:
    ``<data folder>/backups``). ``key="country"``: summaries of different countries are
    transformed concurrently. ``params``: the params schema of ``profile.update`` (the
    shipped service has :data:`PROFILE_PARAMS`; by default, as in the Go seed, none)."""
    store = store or stores.sqlite(data_folder())
    events = EventStore(
        "profileEventStore", store, dispatch_batch_size=dispatch_batch_size, lease_ttl=lease_ttl
    )
    summary = Aggregate(
        "profileSummaryAggregate",
        summary_store or stores.with_fields(store, SUMMARY_FIELDS),
        snapshot=StoreBackup(backups or data_folder() / "backups"),
        batch_size=batch_size,
        lease_ttl=lease_ttl,
    ).snapshot("profileEventStore")

    class ProfileService(events.mixin(), summary.mixin(), Service):  # type: ignore[misc]
        name = "profile"

        update = events.map_action("update", "profile.updated", params=params)

        @action(name="transformProfileSummary")
        async def transform_profile_summary(self, ctx: Context) -> dict[str, Any]:
            profile = ctx.params["payload"]
            found = await ctx.call("profileSummaryAggregate.find", {"country": profile["country"]})
            result: dict[str, Any] = {}
            if found:
                summary = found[0]
                result["id"] = summary["id"]
            else:
                summary = {"country": profile["country"], "total": 0,
                           "totalMarried": 0, "totalStudents": 0}  # fmt: skip
            result["total"] = summary["total"] + 1
            result["totalMarried"] = summary["totalMarried"] + (1 if profile.get("married") else 0)
            result["totalStudents"] = summary["totalStudents"] + (
                1 if profile.get("student") else 0
            )
            result["country"] = summary["country"]
            return result

        on_updated = summary.on("profile.updated").update(
            "profile.transformProfileSummary", key=key
        )

    return events, summary, ProfileService


events, summary, ProfileService = build(params=PROFILE_PARAMS)
services = [ProfileService]
