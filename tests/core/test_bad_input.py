"""Bad input through the broker gets a 422 that says what to fix, and stores nothing."""

from __future__ import annotations

from typing import Any

import pytest
from moleculerpy import Service
from moleculerpy.errors import ValidationError

from moleculerpy_cqrs import Aggregate, EntityNotFound, EventStore
from moleculerpy_cqrs.examples.profile import build
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.core.conftest import MakeStore


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


HOSTILE = ["'; DROP TABLE profileEventStore; --", 'x" OR 1=1 --', "Robert'); --", "%_\\"]


def _services(make_store: MakeStore) -> tuple[EventStore, Aggregate, Service]:
    factory = make_store()
    events = EventStore("userEventStore", factory, max_payload_bytes=64_000)
    users = Aggregate(
        "userAggregate",
        with_fields(factory, {"name": "string", "age": "integer", "score": "float"}),
        write_actions=True,
    )

    class Users(events.mixin(), users.mixin(), Service):  # type: ignore[misc]
        name = "users"
        register = events.map_action(
            "register", "user.registered", params={"name": "string", "age": "number"}
        )
        note = events.map_action("note", "user.noted")

    return events, users, Users()


async def _stored(broker: Any) -> int:
    count: int = await broker.call("userEventStore.count", {})
    return count


@pytest.mark.parametrize(
    ("action", "params", "says"),
    [
        ("users.register", {"name": 42, "age": 3}, "name"),
        ("users.register", {"name": "Ann", "age": "old"}, "age"),
        ("users.register", {"name": "Ann", "age": 3, "admin": True}, "admin"),
        ("users.note", {"blob": "x" * 70_000}, "limit"),
        ("users.note", {"bad": float("nan")}, "JSON"),
        ("users.note", {"nul": "a\x00b"}, "NUL"),
        ("users.note", {"emoji": "\ud83d"}, "lone surrogate"),
        ("users.note", {"\udc00key": 1}, "lone surrogate"),
        ("users.note", {"deep": [{"text": "ok \ud83d\ude00 then \ud83d"}]}, "U+D83D"),
        ("users.note", {"deep": _deep(100_000)}, "nests too deeply"),
    ],
)
async def test_bad_commands_are_refused_and_store_nothing(
    make_store: MakeStore, action: str, params: dict[str, Any], says: str
) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        with pytest.raises(ValidationError) as caught:
            await broker.call(action, params)
        assert caught.value.code == 422
        assert says in str(caught.value)
        assert await _stored(broker) == 0


@pytest.mark.parametrize(
    ("action", "params", "says"),
    [
        ("userAggregate.find", {"query": {"name; DROP TABLE x": 1}}, "unknown field"),
        ("userAggregate.find", {"query": {"age": {"$regex": ".*"}}}, "$regex is not supported"),
        ("userAggregate.find", {"query": {"age": {"$foo": 1}}}, "unknown operator"),
        ("userAggregate.find", {"sort": "-age; DROP TABLE x"}, "unknown field"),
        ("userAggregate.find", {"limit": -1}, "limit"),
        ("userAggregate.find", {"nonsense": 1}, "unknown parameter"),
        ("userAggregate.find", {"query": {"age": "ten"}}, "age"),
        ("userAggregate.list", {"pageSize": -1}, "pageSize"),
        ("userAggregate.list", {"pageSize": "ten"}, "pageSize"),
        ("userAggregate.find", {"populate": "author"}, "names no populate rule"),
        ("userAggregate.get", {"id": 1, "mapping": "yes"}, "mapping"),
        ("userAggregate.create", {}, "params cannot be empty!"),
        ("userAggregate.create", {"name": "x", "isAdmin": True}, "unknown field"),
        ("userAggregate.update", {"name": "x"}, "id field required!"),
        ("userAggregate.get", {"id": "1 OR 1=1"}, "id"),
        ("userEventStore.read", {"after": -5}, "after"),
        # integers beyond 64 bits, wherever an integer goes
        ("userAggregate.find", {"limit": 2**63}, "limit"),
        ("userAggregate.find", {"offset": 2**64}, "offset"),
        ("userAggregate.find", {"limit": "99999999999999999999"}, "limit"),
        ("userAggregate.list", {"page": 2**62, "pageSize": 10}, "page"),
        ("userAggregate.list", {"page": 2**70}, "page"),
        ("userAggregate.get", {"id": 2**63}, "id"),
        ("userAggregate.get", {"id": [1, 2**64]}, "id"),
        ("userAggregate.retryDeadLetters", {"ids": [2**64]}, "id"),
        ("userAggregate.deadLetters", {"page": 2**63}, "page"),
        ("userAggregate.find", {"query": {"id": {"in": [2**64]}}}, "id"),
        ("userAggregate.find", {"query": {"age": {">": 2**63}}}, "64-bit"),
        ("userAggregate.find", {"query": {"score": {">": 10**400}}}, "float range"),
        ("userAggregate.create", {"name": "x", "age": 2**63}, "64-bit"),
        ("userAggregate.create", {"name": "x", "score": -(10**400)}, "float range"),
        # only ASCII digits are digits
        ("userAggregate.get", {"id": "\u0663"}, "id"),
        ("userAggregate.get", {"id": "\u00b2"}, "id"),
        ("userAggregate.find", {"limit": "\u0663"}, "ASCII"),
        ("userAggregate.list", {"pageSize": "\uff15"}, "pageSize"),
        ("userAggregate.remove", {"id": "\u0661"}, "id"),
        # lone surrogates in any string value
        ("userAggregate.find", {"name": "\ud83d"}, "surrogate"),
        ("userAggregate.find", {"query": {"name": {"like": "\udfff%"}}}, "surrogate"),
        ("userAggregate.find", {"search": "\ud83d"}, "surrogate"),
        ("userAggregate.create", {"name": "\ud83d"}, "surrogate"),
        # a top-level field is an equality filter: operators belong under query
        ("userAggregate.find", {"name": {"like": "A%"}}, "equality filter"),
        ("userAggregate.count", {"age": {">": 1}}, "under query"),
        ("userAggregate.list", {"name": ["Ann"]}, "equality filter"),
        ("userAggregate.find", {"id": {"in": [1]}}, "equality filter"),
        ("userAggregate.find", {"query": _deep(100_000)}, "must be an object"),
        ("userAggregate.find", {"query": {"name": {"in": _deep(100_000)}}}, "not a value"),
        ("userAggregate.get", {"id": _deep(100_000)}, "id"),
        # queries too big for some backend are refused alike on all of them
        ("userAggregate.find", {"query": {"or": [{"age": i} for i in range(501)]}}, "at most"),
        ("userAggregate.find", {"query": {"name": {"like": "%" * 20_000}}}, "like pattern"),
    ],
)
async def test_bad_queries_and_writes_are_refused(
    make_store: MakeStore, action: str, params: dict[str, Any], says: str
) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        await broker.call("userAggregate.create", {"name": "Ann", "age": 30})
        with pytest.raises(ValidationError) as caught:
            await broker.call(action, params)
        assert caught.value.code == 422
        assert says in str(caught.value)
        assert await broker.call("userAggregate.count", {}) == 1


async def test_ids_in_other_scripts_digits_are_not_ids(make_store: MakeStore) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        for age in range(3):
            await broker.call("userAggregate.create", {"name": f"u{age}", "age": age})
        assert (await broker.call("userAggregate.get", {"id": "3"}))["name"] == "u2"
        for digits in ("\u0663", "\u00b3", "\uff13", "\u09e9"):  # 3 in other scripts
            with pytest.raises(ValidationError, match="ASCII digits"):
                await broker.call("userAggregate.get", {"id": digits})


async def test_an_in_list_beyond_postgresqls_bind_parameters_is_answered(
    make_store: MakeStore,
) -> None:
    *_, service = _services(make_store)
    many = list(range(1, 70_001))
    async with running_broker(service) as broker:
        for age in (5, 70_000, 80_000):
            await broker.call(
                "userAggregate.create", {"name": f"u{age}", "age": age, "score": age / 2}
            )
        scores = await broker.call(
            "userAggregate.count", {"query": {"score": {"in": [i / 2 for i in many]}}}
        )
        ids = await broker.call("userAggregate.count", {"query": {"id": {"not in": many}}})
        found = await broker.call(
            "userAggregate.find", {"query": {"age": {"in": many}}, "sort": "age"}
        )
        not_in = await broker.call("userAggregate.count", {"query": {"age": {"not in": many}}})
        names = await broker.call(
            "userAggregate.count", {"query": {"name": {"in": [f"u{i}" for i in many]}}}
        )
    assert [r["age"] for r in found] == [5, 70_000]
    assert not_in == 1
    assert names == 2
    assert scores == 2
    assert ids == 0


async def test_hostile_strings_are_stored_verbatim(make_store: MakeStore) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        for text in HOSTILE:
            await broker.call("users.register", {"name": text, "age": 1})
            await broker.call("userAggregate.create", {"name": text, "age": 1})
        stored = await broker.call("userEventStore.find", {"sort": "id"})
        rows = await broker.call("userAggregate.find", {"query": {"name": {"in": HOSTILE}}})
    assert [e["payload"]["name"] for e in stored] == HOSTILE
    assert sorted(r["name"] for r in rows) == sorted(HOSTILE)


async def test_missing_row_is_a_404(make_store: MakeStore) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        for action, params in (
            ("userAggregate.get", {"id": 99}),
            ("userAggregate.update", {"id": 99, "name": "x"}),
            ("userAggregate.remove", {"id": 99}),
        ):
            with pytest.raises(EntityNotFound) as caught:
                await broker.call(action, params)
            assert caught.value.code == 404


async def test_an_operator_object_as_a_command_field_cannot_reach_other_rows(
    make_store: MakeStore,
) -> None:
    """The seed's transformation looks its row up with ``find {"country": payload.country}``:
    a country sent as ``{"like": "A%"}`` must not select (and so update) Australia's row.

    The command itself is stored (the seed's map_action has no schema: the log keeps what was
    sent); its transformation's find is refused with a 422, so the event goes to dead letters.
    """
    _, summary, profile = build(make_store())
    async with running_broker(profile()) as broker:
        for country in ("AU", "AT"):
            await broker.call("profile.update", {"name": "x", "country": country})
        evil = await broker.call("profile.update", {"name": "evil", "country": {"like": "A%"}})
        await summary.runtime(broker).wait_caught_up()
        rows = await broker.call("profileSummaryAggregate.find", {"sort": "country"})
        dead = await broker.call("profileSummaryAggregate.deadLetters", {})
    assert [(r["country"], r["total"]) for r in rows] == [("AT", 1), ("AU", 1)]
    assert [d["eventId"] for d in dead["rows"]] == [evil["id"]]
    assert "equality filter" in dead["rows"][0]["error"]


async def test_meta_that_is_not_text_is_left_out_and_the_command_stored(
    make_store: MakeStore,
) -> None:
    *_, service = _services(make_store)
    async with running_broker(service) as broker:
        meta = {"who": "\ud83d", "ok": "yes", "also": ["\udc00"]}
        saved = await broker.call("users.note", {"n": 1}, meta=meta)
        stored = await broker.call("userEventStore.get", {"id": saved["id"]})
    assert stored["meta"] == {"ok": "yes"}


@pytest.mark.parametrize("params", [[1], "x", 5, 1.5, True])
async def test_every_action_refuses_params_that_are_not_an_object(
    make_store: MakeStore, params: Any
) -> None:
    *_, service = _services(make_store)
    actions = [
        *(f"userAggregate.{a}" for a in ("find", "count", "list", "get", "create", "insert")),
        *(f"userAggregate.{a}" for a in ("update", "remove", "status", "snapshot", "snapshots")),
        *(f"userAggregate.{a}" for a in ("restore", "replay", "deadLetters", "retryDeadLetters")),
        *(f"userEventStore.{a}" for a in ("find", "count", "list", "get", "read")),
        *(f"userEventStore.{a}" for a in ("recordSnapshot", "settleSnapshot")),
        "users.note",
    ]
    async with running_broker(service) as broker:
        for action in actions:
            with pytest.raises(ValidationError, match="must be an object"):
                await broker.call(action, params)
        assert await _stored(broker) == 0
