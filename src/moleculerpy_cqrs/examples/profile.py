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

PROFILE_V2_PARAMS: dict[str, Any] = {
    "fullName": {"type": "string", "minLength": 1},
    "address": {"type": "object", "required": True},
    "age": {"type": "number", "min": 0},
    "married": "boolean",
    "student": "boolean",
}
"""What ``profile.update`` takes in ``profile_v2`` (the validator does not look inside
``address``: the summary's transformation dead-letters one without a country)."""

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
    version: int = 1,
) -> tuple[EventStore, Aggregate, type[Service]]:
    """The event store, the summary aggregate and the profile service, on ``store`` (default:
    SQLite files in the data folder); snapshots go to ``backups`` (default:
    ``<data folder>/backups``). ``key="country"``: summaries of different countries are
    transformed concurrently. ``params``: the params schema of ``profile.update`` (the
    shipped service has :data:`PROFILE_PARAMS`; by default, as in the Go seed, none).
    ``version=2``: the profile's second shape, ``{fullName, address: {country}}``
    (``profile_v2``, :data:`PROFILE_V2_PARAMS`), with the upcaster that reads v1 events as v2
    and the summary's transformation for it."""
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
        version=version,
    ).snapshot("profileEventStore")
    if version == 2:
        events.upcast("profile.updated", 1, profile_v1_to_v2)

    class ProfileService(events.mixin(), summary.mixin(), Service):  # type: ignore[misc]
        name = "profile"

        update = events.map_action("update", "profile.updated", params=params, version=version)

        @action(name="transformProfileSummary")
        async def transform_profile_summary(self, ctx: Context) -> dict[str, Any]:
            profile = ctx.params["payload"]
            if version == 2:
                profile = {**profile, "country": profile["address"]["country"]}
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


def profile_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """``{name, country, ...}`` (v1) read as ``{fullName, address: {country}, ...}`` (v2)."""
    rest = {k: v for k, v in payload.items() if k not in ("name", "country")}
    return {**rest, "fullName": payload.get("name"), "address": {"country": payload["country"]}}


events, summary, ProfileService = build(params=PROFILE_PARAMS)
services = [ProfileService]
