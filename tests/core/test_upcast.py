"""Event versions, upcasters and renames: every reader of the log sees the current shape."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moleculerpy import Context, Service, action, event

from moleculerpy_cqrs import Aggregate, ConfigurationError, EventStore, Status, Upcasted
from moleculerpy_cqrs.core.upcast import UPCAST_ERROR, Upcasters, UpcastFailed
from moleculerpy_cqrs.stores import StoreFactory, with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore
from tests.core.test_go_library import Collector

# ---------------------------------------------------------------------- chains checked


def _checked(build: Any) -> str:
    upcasters = Upcasters("profileEventStore")
    build(upcasters)
    with pytest.raises(ConfigurationError) as caught:
        upcasters.check()
    return str(caught.value)


def _same(payload: Any) -> Any:
    return payload


def test_a_gap_in_a_chain_names_the_event_and_the_missing_version() -> None:
    def build(u: Upcasters) -> None:
        u.declare("profile.updated", 3)
        u.add("profile.updated", 1, _same)

    message = _checked(build)
    assert "'profile.updated' is at version 3 but has no upcaster from version 2" in message
    assert "v1 -> v2 -> v3" in message


def test_a_version_bump_without_upcasters_does_not_reach_the_current_version() -> None:
    message = _checked(lambda u: u.declare("profile.updated", 2))
    assert "no upcaster from version 1" in message
    assert "events.upcast('profile.updated', 1, fn)" in message


def test_a_duplicate_step_is_refused() -> None:
    def build(u: Upcasters) -> None:
        u.declare("profile.updated", 2)
        u.add("profile.updated", 1, _same)
        u.add("profile.updated", 1, _same)

    assert "'profile.updated' has 2 upcasters from version 1 (to 2)" in _checked(build)


def test_renames_in_a_cycle_are_refused() -> None:
    def build(u: Upcasters) -> None:
        u.rename("profile.changed", "profile.updated")
        u.rename("profile.updated", "profile.changed")

    message = _checked(build)
    assert "cycle: profile.changed -> profile.updated -> profile.changed" in message


def test_a_step_past_the_current_version_is_refused() -> None:
    def build(u: Upcasters) -> None:
        u.declare("profile.updated", 2)
        u.add("profile.updated", 1, _same)
        u.add("profile.updated", 2, _same)

    assert "goes from version 2 to 3, past it" in _checked(build)


def test_two_mappings_storing_different_versions_are_refused() -> None:
    def build(u: Upcasters) -> None:
        u.declare("profile.updated", 1)
        u.declare("profile.updated", 2)
        u.add("profile.updated", 1, _same)

    assert "stored at versions [1, 2]" in _checked(build)


def test_an_upcaster_of_a_renamed_event_would_never_run() -> None:
    def build(u: Upcasters) -> None:
        u.rename("profile.changed", "profile.updated")
        u.add("profile.changed", 1, _same)

    assert "register it under 'profile.updated'" in _checked(build)


def test_a_step_may_rename_and_reads_are_idempotent() -> None:
    upcasters = Upcasters("s")
    upcasters.declare("profile.updated", 2)
    upcasters.add("profile.created", 1, lambda p: Upcasted("profile.updated", {"fullName": p}))
    upcasters.add("profile.updated", 1, v1_to_v2)
    upcasters.check()
    stored = {"id": 7, "event": "profile.created", "version": 1, "eventType": 0, "payload": "A"}
    (read,) = upcasters.read(stored)
    assert (read["event"], read["version"], read["payload"]) == (
        "profile.updated",
        2,
        {"fullName": "A"},
    )
    assert upcasters.read(read) == [read]  # a read event reads as itself
    assert stored["payload"] == "A"  # the stored row is left as it was
    past = Upcasters("s")  # an answer past the target's current version cannot be read
    past.add("a", 1, lambda p: Upcasted("b", p))
    past.check()
    failed = past.read_all([{**stored, "event": "a"}])
    assert "'b' at version 2, past that event's current version 1" in failed[0]["upcastError"]


def _mixed_upcasters() -> Upcasters:
    """Every kind of reading: a two-step chain (``a``, which raises for ``boom``), a rename
    into it (``b``), a step that renames (``e``), a split (``c``) and an event with no steps."""

    def step(to: int) -> Any:
        def upcast(payload: dict[str, Any]) -> dict[str, Any]:
            if payload["n"] == "boom":
                raise ValueError("cannot read boom")
            return {**payload, "v": to}

        return upcast

    upcasters = Upcasters("s")
    upcasters.declare("a", 3)
    upcasters.add("a", 1, step(2))
    upcasters.add("a", 2, step(3))
    upcasters.rename("b", "a")
    upcasters.add("e", 1, lambda p: Upcasted("a", p))
    upcasters.declare("c", 2)
    upcasters.add("c", 1, lambda p: [{**p, "piece": 0}, {**p, "piece": 1}])
    upcasters.declare("d", 1)
    upcasters.check()
    return upcasters


_MIXED = _mixed_upcasters()

_stored_rows = st.lists(
    st.builds(
        lambda i, event, version, kind, n: {
            "id": i,
            "event": event,
            "version": version,
            "eventType": kind,
            "payload": {"n": n},
            "meta": {},
        },
        st.integers(1, 1000),
        st.sampled_from("abcde"),
        st.sampled_from([1, 2, 3, 4, None]),
        st.sampled_from([0, 0, 0, 1]),  # mostly commands; 1: a snapshot event, never upcast
        st.sampled_from([1, 2, "boom"]),
    ),
    max_size=12,
)


@given(_stored_rows)
def test_reading_many_rows_is_reading_each_in_turn(rows: list[dict[str, Any]]) -> None:
    # read_all keeps the previous row's chain and may change rows in place: neither may
    # change what any row reads as, nor (unless asked) touch the rows it was given.
    expected: list[dict[str, Any]] = []
    for row in rows:
        try:
            expected += _MIXED.read(copy.deepcopy(row))
        except UpcastFailed as failed:
            expected.append({**row, UPCAST_ERROR: str(failed)})
    given_rows = copy.deepcopy(rows)
    assert _MIXED.read_all(given_rows) == expected
    assert given_rows == rows  # copied where read, not changed
    assert _MIXED.read_all(copy.deepcopy(rows), in_place=True) == expected


async def test_a_broken_chain_stops_the_node_from_starting() -> None:
    from moleculerpy_cqrs.stores import memory

    events = EventStore("profileEventStore", memory())
    events.upcast("profile.updated", 1, _same)

    class Profile(events.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated", version=3)

    with pytest.raises(ConfigurationError, match="no upcaster from version 2"):
        async with running_broker(Profile()):
            pass


# ---------------------------------------------------------------------- the profile, v1 -> v2


def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    if payload.get("name") == "boom":
        raise ValueError("cannot read boom")
    return {"fullName": payload["name"], "address": {"country": payload["country"]}}


class Node:
    """One deploy of the profile service over one store: v1 or v2 of the code."""

    def __init__(
        self, store: StoreFactory, version: int, *, project: bool = True, **options: Any
    ) -> None:
        self.events = EventStore("profileEventStore", store)
        self.heard = Collector()
        self.summary = Aggregate(
            "byCountry",
            with_fields(store, {"country": "string", "total": "integer", "names": "json"}),
            attempts=1,
        ).snapshot("profileEventStore")
        heard = self.heard
        if version == 2:
            self.events.upcast("profile.updated", 1, options.get("upcaster", v1_to_v2))
        for old, new in options.get("renames", []):
            self.events.rename(old, new)
        summary = self.summary
        summary.on("profile.updated").update("profile.count")
        for extra in options.get("also", []):
            summary.on(extra).update("profile.count")
        mixins = (self.events.mixin(), summary.mixin()) if project else (self.events.mixin(),)

        class Profile(*mixins, Service):  # type: ignore[misc]
            name = "profile"
            update = self.events.map_action("update", "profile.updated", version=version)
            changed = self.events.map_action("change", "profile.changed")

            @action(name="count")
            async def count(self, ctx: Context) -> dict[str, Any]:
                p = ctx.params["payload"]
                if version == 1:
                    country, name = p["country"], p["name"]
                else:
                    country, name = p["address"]["country"], p["fullName"]
                found = await ctx.call("byCountry.find", {"country": country})
                if found:
                    row = found[0]
                    names = [*row["names"], name]
                    return {"id": row["id"], "total": row["total"] + 1, "names": names}
                return {"country": country, "total": 1, "names": [name]}

            @event(name="profile.updated")
            async def on_updated(self, ctx: Context) -> None:
                await heard.add(ctx.params)

        self.service = Profile()

    def running(self) -> Any:
        return running_broker(self.service)

    async def start(self) -> Any:
        self._cm = self.running()
        self.broker = await self._cm.__aenter__()
        return self.broker

    async def stop(self) -> None:
        await self._cm.__aexit__(None, None, None)


async def _write_v1(
    store: StoreFactory, profiles: list[dict[str, Any]], action: str = "update"
) -> None:
    """The log as v1 of the code left it, not yet dispatched."""
    v1 = Node(store, 1, project=False)
    broker = await v1.start()
    try:
        await broker.call("profile.$stopDispatch", {})
        for p in profiles:
            await broker.call(f"profile.{action}", p)
    finally:
        await v1.stop()


async def test_every_reader_sees_v2_and_the_stored_rows_stay_v1(make_store: MakeStore) -> None:
    store = make_store()
    await _write_v1(store, [{"name": "Ann", "country": "NZ"}, {"name": "Bo", "country": "NZ"}])
    v2 = Node(store, 2)
    broker = await v2.start()
    try:
        new = await broker.call("profile.update", {"fullName": "Cy", "address": {"country": "FR"}})
        assert new["id"] == 3
        await v2.summary.runtime(broker).wait_caught_up()
        heard = await asyncio.wait_for(v2.heard.wait_for(3), 10)
        # the dispatcher emits the current shape, with the current version
        assert [(h["version"], h["payload"]) for h in heard] == [
            (2, {"fullName": "Ann", "address": {"country": "NZ"}}),
            (2, {"fullName": "Bo", "address": {"country": "NZ"}}),
            (2, {"fullName": "Cy", "address": {"country": "FR"}}),
        ]
        # the projector (live) ran the v2 transformation on v1 events
        rows = await broker.call("byCountry.find", {"sort": "country"})
        assert [(r["country"], r["total"], r["names"]) for r in rows] == [
            ("FR", 1, ["Cy"]),
            ("NZ", 2, ["Ann", "Bo"]),
        ]
        # the event store's read actions answer v2; raw: true the stored form
        read = await broker.call("profileEventStore.read", {"after": 0, "limit": 10})
        assert [e["version"] for e in read["events"]] == [2, 2, 2]
        assert read["events"][0]["payload"] == {"fullName": "Ann", "address": {"country": "NZ"}}
        found = await broker.call("profileEventStore.find", {"sort": "id"})
        assert found[1]["payload"]["fullName"] == "Bo"
        page = await broker.call("profileEventStore.list", {"sort": "id"})
        assert page["rows"][0]["payload"]["fullName"] == "Ann"
        got = await broker.call("profileEventStore.get", {"id": 1})
        assert got["payload"]["address"] == {"country": "NZ"}
        raw = await broker.call("profileEventStore.find", {"sort": "id", "raw": True})
        assert [(r["version"], r["payload"].get("name")) for r in raw] == [
            (1, "Ann"),
            (1, "Bo"),
            (2, None),
        ]
        raw_read = await broker.call("profileEventStore.read", {"after": 0, "raw": True})
        assert raw_read["events"][0]["payload"] == {"name": "Ann", "country": "NZ"}
        status = await broker.call("profileEventStore.status", {})
        assert status["versions"] == {"profile.changed": 1, "profile.updated": 2}
        # a replay reads through the same choke point
        await broker.call("byCountry.replay", {})
        await _replayed(broker)
        rows = await broker.call("byCountry.find", {"sort": "country"})
        assert [(r["country"], r["total"]) for r in rows] == [("FR", 1), ("NZ", 2)]
    finally:
        await v2.stop()


async def _replayed(broker: Any) -> None:
    for _ in range(500):
        status = await broker.call("byCountry.status", {})
        if not (status["replay"] or {}).get("running"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("replay did not finish")


async def test_renamed_events_are_dispatched_and_projected_under_the_new_name(
    make_store: MakeStore,
) -> None:
    store = make_store()
    await _write_v1(store, [{"name": "Ann", "country": "NZ"}], action="change")
    v2 = Node(store, 2, renames=[("profile.changed", "profile.updated")])
    broker = await v2.start()
    try:
        await v2.summary.runtime(broker).wait_caught_up()
        (heard,) = await asyncio.wait_for(v2.heard.wait_for(1), 10)
        assert (heard["event"], heard["version"]) == ("profile.updated", 2)
        assert heard["payload"]["fullName"] == "Ann"  # renamed at v1, then upcast
        rows = await broker.call("byCountry.find", {})
        assert [(r["country"], r["total"]) for r in rows] == [("NZ", 1)]
        raw = await broker.call("profileEventStore.get", {"id": 1, "raw": True})
        assert raw["event"] == "profile.changed"
        assert (await broker.call("profileEventStore.status", {}))["renames"] == {
            "profile.changed": "profile.updated"
        }
    finally:
        await v2.stop()


def _split(payload: dict[str, Any]) -> list[Any]:
    """A v1 event that held two people reads as two v2 events."""
    return [
        v1_to_v2({"name": n, "country": payload["country"]}) for n in payload["name"].split("+")
    ]


async def test_a_split_event_is_applied_once_per_piece_and_checkpointed_by_position(
    make_store: MakeStore,
) -> None:
    store = make_store()
    await _write_v1(
        store,
        [{"name": "Ann+Bo", "country": "NZ"}, {"name": "Cy", "country": "FR"}],
    )
    v2 = Node(store, 2, upcaster=_split)
    broker = await v2.start()
    try:
        runtime = v2.summary.runtime(broker)
        assert await runtime.wait_caught_up() == 2  # the stored positions
        heard = await asyncio.wait_for(v2.heard.wait_for(3), 10)
        assert [(h["id"], h.get("part"), h.get("parts")) for h in heard] == [
            (1, 0, 2),
            (1, 1, 2),
            (2, None, None),
        ]
        rows = await broker.call("byCountry.find", {"sort": "country"})
        assert [(r["country"], r["total"], r["names"]) for r in rows] == [
            ("FR", 1, ["Cy"]),
            ("NZ", 2, ["Ann", "Bo"]),
        ]
        got = await broker.call("profileEventStore.get", {"id": 1})
        assert [g["payload"]["fullName"] for g in got] == ["Ann", "Bo"]
    finally:
        await v2.stop()
    again = Node(store, 2, upcaster=_split)  # a restart reads on from the checkpoint
    broker = await again.start()
    try:
        await broker.call("profile.update", {"fullName": "Di", "address": {"country": "NZ"}})
        await again.summary.runtime(broker).wait_caught_up()
        rows = await broker.call("byCountry.find", {"country": "NZ"})
        assert rows[0]["names"] == ["Ann", "Bo", "Di"]  # nothing applied twice
    finally:
        await again.stop()


async def test_an_upcaster_that_raises_dead_letters_that_event_and_the_rest_go_on(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    await _write_v1(
        store,
        [
            {"name": "Ann", "country": "NZ"},
            {"name": "boom", "country": "NZ"},
            {"name": "Bo", "country": "NZ"},
        ],
    )
    fixed = {"on": False}

    def flaky(payload: dict[str, Any]) -> dict[str, Any]:
        if fixed["on"] and payload["name"] == "boom":
            payload = {**payload, "name": "Boom"}
        return v1_to_v2(payload)

    v2 = Node(store, 2, upcaster=flaky)
    broker = await v2.start()
    try:
        await v2.summary.runtime(broker).wait_caught_up()
        heard = await asyncio.wait_for(v2.heard.wait_for(2), 10)
        assert [h["id"] for h in heard] == [1, 3]
        await asyncio.wait_for(v2.events.runtime(broker).dispatcher.wait_settled(3), 10)
        raw = await broker.call("profileEventStore.get", {"id": 2, "raw": True})
        assert raw["status"] == Status.FAILED
        assert "cannot read boom" in raw["error"]
        dead = await broker.call("byCountry.deadLetters", {})
        (letter,) = dead["rows"]
        assert (letter["eventId"], letter["kind"]) == (2, "upcast")
        assert "upcasting 'profile.updated' from version 1 failed" in letter["error"]
        assert letter["record"]["payload"] == {"name": "boom", "country": "NZ"}  # as stored
        said = [r for r in caplog.records if "could not be upcast" in r.getMessage()]
        assert [r.levelname for r in said] == ["WARNING"]
        assert "event 2 (profile.updated) dead-lettered" in said[0].getMessage()
        again = await broker.call("byCountry.retryDeadLetters", {})
        assert again["retried"] == 0
        assert "cannot read boom" in again["failed"][0]["error"]
        fixed["on"] = True  # the upcaster is fixed: the retry reads the event again
        again = await broker.call("byCountry.retryDeadLetters", {})
        assert again == {"retried": 1, "failed": [], "remaining": 0}
        rows = await broker.call("byCountry.find", {})
        assert rows[0]["names"] == ["Ann", "Bo", "Boom"]
        assert rows[0]["total"] == 3
    finally:
        await v2.stop()
