"""The batch engine: what a batch's transformations see, what a failure undoes, what runs at
once, and that no transaction is open while they run (invariants 4, 5, 10 and 12)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moleculerpy import Context, Service, ServiceBroker, Settings, action

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup, stores
from moleculerpy_cqrs.core.aggregate import AggregateRuntime
from moleculerpy_cqrs.core.batch import BatchView, EarlyRows, IdCounter
from moleculerpy_cqrs.core.joins import AGGREGATE_KEY, NODE_KEY, TOKEN_KEY
from moleculerpy_cqrs.core.slices import read_keys_early
from moleculerpy_cqrs.errors import ConfigurationError, Conflict
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.fields import ID, FieldType
from moleculerpy_cqrs.stores.query import Query, parse_find
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.broker.test_compat import wait_for_nodes
from tests.core.conftest import MakeStore
from tests.core.test_profile_example import expected

FIELDS: dict[str, FieldType] = {"k": "string", "n": "integer"}


@asynccontextmanager
async def held(runtime: AggregateRuntime) -> AsyncIterator[None]:
    """Hold the projector so that what is appended meanwhile makes one batch."""
    await runtime.projecting.wait()
    assert runtime.projector is not None
    async with runtime.projector.paused():
        yield


# ---------------------------------------------------------------------- the view


values = st.one_of(st.none(), st.integers(-3, 3))
keys = st.sampled_from(["a", "b", "c", None])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), keys, values),
        st.tuples(st.just("update"), st.integers(1, 12), values),
        st.tuples(st.just("rekey"), st.integers(1, 12), keys),
        st.tuples(st.just("remove"), st.integers(1, 12), st.none()),
        st.tuples(st.just("remove_where"), keys, st.none()),
        st.tuples(st.just("mark"), st.none(), st.none()),
        st.tuples(st.just("undo"), st.none(), st.none()),
    ),
    max_size=25,
)
some_keys = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3)
lookups = st.one_of(
    st.fixed_dictionaries({"k": keys}),  # equality: the overlay index, or prefetched rows
    st.fixed_dictionaries({"k": st.fixed_dictionaries({"in": some_keys})}),
    st.fixed_dictionaries({"k": st.fixed_dictionaries({"not in": some_keys})}),
    st.fixed_dictionaries({"n": st.fixed_dictionaries({"in": st.lists(st.integers(-3, 3))})}),
    st.fixed_dictionaries({"k": keys, "n": st.fixed_dictionaries({">": st.integers(-3, 3)})}),
    st.fixed_dictionaries(
        {"or": st.lists(st.fixed_dictionaries({"k": keys}), min_size=1, max_size=2)}
    ),
    st.fixed_dictionaries({"id": st.fixed_dictionaries({"in": st.lists(st.integers(1, 12))})}),
    st.fixed_dictionaries({"id": st.integers(1, 12), "n": st.integers(-3, 3)}),
)
queries = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "query": st.one_of(
                lookups,
                st.fixed_dictionaries({"n": st.fixed_dictionaries({">": st.integers(-3, 3)})}),
            ),
            "fields": st.sampled_from([["id"], ["n", "k"], ["k"]]),
            "sort": st.sampled_from(["n", "-n", "k -n", "-k", "-id"]),
            "limit": st.integers(0, 6),
            "offset": st.integers(0, 4),
        },
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(st.tuples(keys, values), max_size=8),
    prefetched=st.one_of(st.none(), st.lists(keys, max_size=3)),
    ops=operations,
    asked=queries,
    early=queries,
)
def test_a_batch_reads_what_the_table_will_hold(
    initial: list[tuple[str | None, int | None]],
    prefetched: list[str | None] | None,
    ops: list[tuple[str, Any, Any]],
    asked: list[dict[str, Any]],
    early: list[dict[str, Any]],
) -> None:
    """Whatever a batch did (undone effects included), every read of its view answers what
    the table answers once the batch's changes are written: same rows, order, ids, projections,
    paging and counts (SQLite file). Lookups go through the overlay's index (equality, in, or,
    id), and through rows prefetched by key (``prefetched``: the batch's keys, read before it
    runs); ``early`` reads are made before the batch's changes, to fill the overlay's index
    and the view's caches that later changes must keep true."""

    async def check() -> None:
        async with stores.sqlite(":memory:")("t", FIELDS) as table:
            await table.insert_many([{"k": k, "n": n} for k, n in initial])
            view = BatchView(table, IdCounter())
            if prefetched is not None:
                await view.prefetch("k", prefetched)
            for q in early:
                await _answers(view, q)
            await _run_ops(view, ops, early)
            for key in ("a", "b", "c"):  # a transformation's find {k: key}, the short way
                quick = view.find_by_key({"k": key})
                assert (quick is not None) == (key in (prefetched or ()))
                if quick is not None:
                    assert quick == await view.find(parse_find(FIELDS, {"k": key}))
            asked_too = [*asked, *PROBES]
            seen = [await _answers(view, q) for q in asked_too]
            await table.apply(view.changes())
            assert seen == [await _answers(table, q) for q in asked_too]

    asyncio.run(check())


async def _run_ops(
    view: BatchView,
    ops: list[tuple[str, Any, Any]],
    early: list[dict[str, Any]],
    between: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Apply ``ops`` to ``view`` (with reads between now and then); ``between(i)`` runs
    before op ``i``."""
    marks = [0]
    for i, (op, a, b) in enumerate(ops):
        if between is not None:
            await between(i)
        if op == "mark":
            marks.append(view.mark())
        elif op == "undo":
            view.undo(marks.pop() if len(marks) > 1 else 0)
        elif op == "create":
            await view.create({"k": a, "n": b})
        elif op == "update":
            if await view.get(a) is not None:
                await view.update(a, {"n": b})
        elif op == "rekey":
            if await view.get(a) is not None:
                await view.update(a, {"k": b})
        elif op == "remove":
            await view.remove(a)
        else:
            await view.remove_where(parse_find(FIELDS, {"k": a}).where)
        if op == "create" and a == "b":  # now and then, reads between changes
            for q in early:
                await _answers(view, q)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(st.tuples(keys, values), max_size=8),
    prefetched=st.one_of(st.none(), st.lists(keys, max_size=3)),
    first=operations,
    second=operations,
    landed_at=st.integers(0, 30),
    rebased=st.booleans(),
    asked=queries,
    early=queries,
    # before one of the earlier batch's first ops, or (99) after its write landed
    read_early_at=st.one_of(st.none(), st.integers(0, 4), st.just(99)),
)
def test_a_batch_after_an_unwritten_one_reads_what_the_table_will_hold(
    initial: list[tuple[str | None, int | None]],
    prefetched: list[str | None] | None,
    first: list[tuple[str, Any, Any]],
    second: list[tuple[str, Any, Any]],
    landed_at: int,
    rebased: bool,
    asked: list[dict[str, Any]],
    early: list[dict[str, Any]],
    read_early_at: int | None,
) -> None:
    """The projector's pipeline: a batch's view opened after an earlier batch whose write may
    land at any point of it (before any of its changes, between two, after its reads, or not
    before its own write) answers every read as the table will once both are written; the
    earlier view, its write landed, still answers as the table does (its counts too); and
    after the earlier write has landed the later view may read the table directly
    (``rebase``). With ``read_early_at``, the later batch's keys were read from the table
    while the earlier one was still being transformed (before its op ``read_early_at``;
    past its last op, after its write landed), and are taken from that read, the earlier
    view laid over it (``EarlyRows``)."""

    async def check() -> None:
        async with stores.sqlite(":memory:")("t", FIELDS) as table:
            await table.insert_many([{"k": k, "n": n} for k, n in initial])
            ids = IdCounter()
            one = BatchView(table, ids)
            taken: list[EarlyRows] = []
            land_at = landed_at

            async def read_early(i: int) -> None:
                if read_early_at == i and prefetched is not None and not taken:
                    units = [({"payload": {"k": k}}, KEYED_ON_K) for k in prefetched]
                    read = (await read_keys_early(table, units, lambda: [one])).get("k")
                    taken.extend([read] if read is not None else [])

            await _run_ops(one, first, early, read_early)
            await read_early(len(first))
            one.writing = True
            if read_early_at is not None and read_early_at > len(first):
                await table.apply(one.changes())  # landed before the read: laid over again
                one.written()
                land_at = -1
                await read_early(read_early_at)
            two = BatchView(table, ids, after=one)
            if prefetched is not None:
                await two.prefetch("k", prefetched, taken[0] if taken else None)
            landed = land_at == -1

            async def land(i: int) -> None:
                nonlocal landed
                if i == land_at and not landed:
                    await table.apply(one.changes())
                    one.written()
                    landed = True
                    probes = [*asked, *PROBES]
                    assert [await _answers(one, q) for q in probes] == [
                        await _answers(table, q) for q in probes
                    ]

            await _run_ops(two, second, early, land)
            await land(len(second))
            if landed and rebased:
                two.rebase()
            asked_too = [*asked, *PROBES]
            seen = [await _answers(two, q) for q in asked_too]
            if not landed:
                await table.apply(one.changes())
                one.written()
            await table.apply(two.changes())
            assert seen == [await _answers(table, q) for q in asked_too]

    asyncio.run(check())


@dataclass(frozen=True)
class _KeyedOnK:
    """A binding keyed by ``payload.k`` (``read_keys_early`` needs only this much of one)."""

    key: str = "k"
    key_field: str | None = None
    handler_name: str = "t"

    def key_of(self, event: dict[str, Any]) -> Any:
        return event["payload"]["k"]


KEYED_ON_K: Final = _KeyedOnK()


PROBES: list[dict[str, Any]] = [
    *({"query": {"k": k}, "sort": "-n"} for k in ("a", "b", "c", None)),
    {"query": {"k": {"in": ["a", "b"]}}, "sort": "k -n", "limit": 3},
    {"query": {"k": "a", "n": {">": 0}}, "fields": ["id"]},
]  # every batch is asked these too: lookups by key, prefetched or through the overlay index


async def _answers(store: Adapter | BatchView, params: dict[str, Any]) -> tuple[Any, ...]:
    query = parse_find(FIELDS, params)
    return (await store.find(query), await store.count(Query(where=query.where)))


UNIQUE_FIELDS: dict[str, Any] = {"k": {"type": "string", "unique": True}, "n": "integer"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(st.sampled_from(["a", "b", "c", "d", None]), max_size=4, unique=True),
    ops=operations,
)
def test_a_batch_refuses_what_its_write_would_refuse(
    initial: list[str | None], ops: list[tuple[str, Any, Any]]
) -> None:
    """With a unique field, every create or update the view accepts can be written (the
    batch's write never fails on it), and one it refuses (409, naming the field) changes
    nothing; reads still answer what the table holds after the write."""

    async def check() -> None:
        async with stores.sqlite(":memory:")("t", UNIQUE_FIELDS) as table:
            await table.insert_many([{"k": k, "n": 0} for k in initial])
            view = BatchView(table, IdCounter())
            for op, a, b in ops:
                before = view.changes()
                refused: Conflict | None = None
                try:
                    if op == "create":
                        await view.create({"k": a, "n": b})
                    elif op in ("update", "rekey") and await view.get(a) is not None:
                        await view.update(a, {"k": b} if op == "rekey" else {"n": b})
                    elif op == "remove":
                        await view.remove(a)
                    elif op == "undo":
                        view.undo(0)
                except Conflict as error:
                    refused = error
                if refused is not None:
                    assert refused.code == 409
                    assert refused.data["field"] == "k"
                    assert view.changes() == before
            seen = [await _answers(view, q) for q in PROBES]
            await table.apply(view.changes())
            assert seen == [await _answers(table, q) for q in PROBES]

    asyncio.run(check())


async def test_a_unique_value_freed_by_the_batch_is_taken_only_after_it(tmp_path: Path) -> None:
    async with stores.sqlite(tmp_path / "db")("t", UNIQUE_FIELDS) as table:
        await table.insert_many([{"k": "x", "n": 1}])
        view = BatchView(table, IdCounter())
        with pytest.raises(Conflict, match="'k' of store 't' is unique and 'x'"):
            await view.create({"k": "x", "n": 2})  # the table holds it
        mine = await view.create({"k": "y", "n": 2})
        with pytest.raises(Conflict, match="'y'"):
            await view.create({"k": "y", "n": 3})  # the batch holds it
        await view.update(1, {"k": "z"})
        with pytest.raises(Conflict, match="free only once the batch is written"):
            await view.update(mine[ID], {"k": "x"})
        await table.apply(view.changes())
        view = BatchView(table, IdCounter())
        await view.update(mine[ID], {"k": "x"})  # the next batch may take it
        await table.apply(view.changes())
        assert {r["k"] for r in await table.find()} == {"x", "z"}


async def test_undo_takes_back_one_events_effects_and_its_ids(tmp_path: Path) -> None:
    async with stores.sqlite(tmp_path / "db")("t", FIELDS) as table:
        view = BatchView(table, IdCounter())
        first = await view.create({"k": "a", "n": 1})
        mark = view.mark()
        await view.update(first[ID], {"n": 2})
        await view.create({"k": "b", "n": 3})
        view.undo(mark)
        again = await view.create({"k": "c", "n": 4})
        assert again[ID] == first[ID] + 1  # the undone create's id is given out again
        await table.apply(view.changes())
        rows = await table.find(Query(sort=((ID, False),)))
        assert [(r["k"], r["n"]) for r in rows] == [("a", 1), ("c", 4)]


async def test_undoing_a_second_change_puts_the_overlay_index_back(tmp_path: Path) -> None:
    async with stores.sqlite(tmp_path / "db")("t", FIELDS) as table:
        view = BatchView(table, IdCounter())
        row = await view.create({"k": "a", "n": 1})
        assert [r[ID] for r in await view.find(parse_find(FIELDS, {"k": "a"}))] == [row[ID]]
        mark = view.mark()
        await view.update(row[ID], {"k": "b"})
        assert await view.find(parse_find(FIELDS, {"k": "a"})) == []
        view.undo(mark)
        assert [r[ID] for r in await view.find(parse_find(FIELDS, {"k": "a"}))] == [row[ID]]
        assert await view.count(parse_find(FIELDS, {"k": "b"})) == 0


async def test_reads_pinned_to_prefetched_keys_need_no_round_trip(tmp_path: Path) -> None:
    async with stores.sqlite(tmp_path / "db")("t", FIELDS) as table:
        await table.insert_many([{"k": k, "n": n} for n in range(3) for k in "abc"])
        view = BatchView(table, IdCounter())
        await view.prefetch("k", ["a", "b", "zz"])
        assert view.store_reads == 1
        found = await view.find(parse_find(FIELDS, {"k": "a", "sort": "-n", "limit": 2}))
        assert [(r["k"], r["n"]) for r in found] == [("a", 2), ("a", 1)]
        await view.update(found[0][ID], {"n": 7})
        await view.create({"k": "zz", "n": 1})
        assert await view.count(parse_find(FIELDS, {"query": {"k": {"in": ["a", "zz"]}}})) == 4
        assert await view.find(parse_find(FIELDS, {"k": "zz", "n": 5})) == []
        assert view.store_reads == 1  # every read above was answered from memory
        await view.find(parse_find(FIELDS, {"k": "c"}))  # not prefetched: the store answers
        assert view.store_reads == 2


# ---------------------------------------------------------------------- failures


def _lines_service(make_store: MakeStore, attempts: int = 1) -> tuple[Aggregate, type[Service]]:
    factory = make_store()
    events = EventStore("lineEventStore", factory)
    lines = Aggregate(
        "lineAggregate", stores.with_fields(factory, FIELDS), attempts=attempts
    ).snapshot("lineEventStore")

    async def explode(event: dict[str, Any]) -> list[dict[str, Any]]:
        p = event["payload"]
        rows: list[dict[str, Any]] = [{"k": p["k"], "n": 1}, {"k": p["k"], "n": 2}]
        if p.get("bad"):
            rows.append({"k": p["k"], "n": "not a number"})  # refused: the whole event fails
        return rows

    lines.on("line.added").create_many(explode)

    class Lines(events.mixin(), lines.mixin(), Service):  # type: ignore[misc]
        name = "lines"
        add = events.map_action("add", "line.added")

    return lines, Lines


async def test_a_failing_event_discards_only_its_own_effects(make_store: MakeStore) -> None:
    lines, service = _lines_service(make_store)
    async with running_broker(service()) as broker:
        runtime = lines.runtime(broker)
        async with held(runtime):
            for k, bad in (("a", False), ("b", True), ("c", False)):
                await broker.call("lines.add", {"k": k, "bad": bad})
        await runtime.wait_caught_up()
        rows = await broker.call("lineAggregate.find", {"sort": "id"})
        assert [(r["k"], r["n"]) for r in rows] == [("a", 1), ("a", 2), ("c", 1), ("c", 2)]
        assert [r["id"] for r in rows] == [1, 2, 3, 4]  # b's undone rows left no gap
        dead = await broker.call("lineAggregate.deadLetters", {})
        assert [d["record"]["payload"]["k"] for d in dead["rows"]] == ["b"]
        assert runtime.projector is not None
        assert runtime.projector.stats.batches == 1  # one batch, the bad event inside it


async def test_a_duplicate_of_a_unique_field_fails_its_event_alone(
    make_store: MakeStore,
) -> None:
    """The second registration of an email is refused by the batch (409 naming the field) and
    dead-lettered; the events around it, in the same batch, are written."""
    factory = make_store()
    events = EventStore("userEventStore", factory)
    fields = {"email": {"type": "string", "unique": True}}
    users = Aggregate("users", stores.with_fields(factory, fields), attempts=2)
    users.snapshot("userEventStore")

    async def register(event: dict[str, Any]) -> dict[str, Any]:
        return {"email": event["payload"]["email"]}

    users.on("user.registered").create(register)

    class Users(events.mixin(), users.mixin(), Service):  # type: ignore[misc]
        name = "signup"
        register = events.map_action("register", "user.registered")

    async with running_broker(Users()) as broker:
        runtime = users.runtime(broker)
        await broker.call("signup.register", {"email": "a@x"})
        await runtime.wait_caught_up()
        async with held(runtime):
            for email in ("b@x", "a@x", "c@x", "b@x"):
                await broker.call("signup.register", {"email": email})
        await asyncio.wait_for(runtime.wait_caught_up(), 30)  # the batch's write never fails
        rows = await broker.call("users.find", {"sort": "id"})
        dead = await broker.call("users.deadLetters", {})
    assert [r["email"] for r in rows] == ["a@x", "b@x", "c@x"]
    assert [r["id"] for r in rows] == [1, 2, 3]  # the refused creates took no id
    assert [d["record"]["payload"]["email"] for d in dead["rows"]] == ["a@x", "b@x"]
    assert all("'email'" in d["error"] and d["attempts"] == 2 for d in dead["rows"])


# ---------------------------------------------------------------------- no transaction open


async def test_appends_go_on_while_a_transformation_runs(tmp_path: Path) -> None:
    """The log and the aggregate share one SQLite file (one write lock): an append must not
    wait for a transformation that has not answered yet."""
    factory = stores.sqlite(tmp_path / "one.db")
    events = EventStore("slowEventStore", factory)
    slow = Aggregate("slowAggregate", stores.with_fields(factory, FIELDS)).snapshot(
        "slowEventStore"
    )
    entered, release = asyncio.Event(), asyncio.Event()

    async def transform(event: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        await release.wait()
        return {"k": event["payload"]["k"], "n": 0}

    slow.on("slow.added").create(transform)

    class Slow(events.mixin(), slow.mixin(), Service):  # type: ignore[misc]
        name = "slow"
        add = events.map_action("add", "slow.added")

    async with running_broker(Slow()) as broker:
        await broker.call("slow.add", {"k": "first"})
        await asyncio.wait_for(entered.wait(), 10)
        second = await asyncio.wait_for(broker.call("slow.add", {"k": "second"}), 10)
        assert second["id"] == 2
        rows = await broker.call("slowAggregate.find", {})
        assert rows == []  # nothing of the open batch is visible outside it
        release.set()
        await slow.runtime(broker).wait_caught_up()
        assert len(await broker.call("slowAggregate.find", {})) == 2


# ---------------------------------------------------------------------- concurrency by key


def _keyed_service(
    make_store: MakeStore, key: str | None
) -> tuple[Aggregate, type[Service], dict[str, Any]]:
    factory = make_store()
    events = EventStore("keyEventStore", factory)
    totals = Aggregate(
        "keyTotals", stores.with_fields(factory, FIELDS), concurrency=4, batch_size=1000
    ).snapshot("keyEventStore")
    probe: dict[str, Any] = {"running": 0, "most": 0, "starts": [], "both": asyncio.Event()}

    @action(name="count")
    async def count(service: Service, ctx: Context) -> dict[str, Any]:
        p = ctx.params["payload"]
        probe["running"] += 1
        probe["most"] = max(probe["most"], probe["running"])
        probe["starts"].append((p["k"], p["seq"]))
        try:
            if probe["running"] >= 2:
                probe["both"].set()
            if p["seq"] == 0 and key is not None:
                await probe["both"].wait()  # only ever set if another key runs meanwhile
            else:
                await asyncio.sleep(0)
            found = await ctx.call("keyTotals.find", {"k": p["k"]})
        finally:
            probe["running"] -= 1
        if found:
            return {"id": found[0]["id"], "n": found[0]["n"] + 1}
        return {"k": p["k"], "n": 1}

    totals.on("key.seen").update("keys.count", key=key)

    class Keys(events.mixin(), totals.mixin(), Service):  # type: ignore[misc]
        name = "keys"
        add = events.map_action("add", "key.seen")
        count_action = count

    return totals, Keys, probe


@pytest.mark.parametrize("key", ["k", None])
async def test_keys_transform_concurrently_and_each_key_in_log_order(
    make_store: MakeStore, key: str | None
) -> None:
    totals, service, probe = _keyed_service(make_store, key)
    sequence = [(k, i) for i in range(6) for k in ("a", "b", "c")]
    async with running_broker(service()) as broker:
        runtime = totals.runtime(broker)
        async with held(runtime):
            for k, i in sequence:
                await broker.call("keys.add", {"k": k, "seq": i})
        await asyncio.wait_for(runtime.wait_caught_up(), 20)
        rows = await broker.call("keyTotals.find", {"sort": "k"})
    assert [(r["k"], r["n"]) for r in rows] == [("a", 6), ("b", 6), ("c", 6)]
    assert [r["id"] for r in rows] == [1, 2, 3]  # ids in log order, whatever ran first
    for k in "abc":
        assert [i for kk, i in probe["starts"] if kk == k] == list(range(6))
    if key is None:
        assert probe["most"] == 1, "without a key, transformations run one at a time"
    else:
        assert 2 <= probe["most"] <= 3  # one per key at most (and at most concurrency=4)


async def test_no_more_keys_transform_at_once_than_the_concurrency(tmp_path: Path) -> None:
    """Ten keys, concurrency 4: four transformations wait at once (each until four do), never
    a fifth; each finished one lets the next in, until every event is applied."""
    factory = stores.sqlite(tmp_path)
    events = EventStore("slotEventStore", factory)
    totals = Aggregate(
        "slotTotals", stores.with_fields(factory, FIELDS), concurrency=4, batch_size=1000
    ).snapshot("slotEventStore")
    probe: dict[str, Any] = {"running": 0, "most": 0, "full": asyncio.Event()}

    @action(name="count")
    async def count(service: Service, ctx: Context) -> dict[str, Any]:
        probe["running"] += 1
        probe["most"] = max(probe["most"], probe["running"])
        try:
            if probe["running"] == 4:
                probe["full"].set()
            await asyncio.sleep(0)  # each lets the others start, if slots allow
            await probe["full"].wait()  # set once four run together, and never cleared
        finally:
            probe["running"] -= 1
        return {"k": ctx.params["payload"]["k"], "n": 1}

    totals.on("slot.seen").create("slots.count", key="k")

    class Slots(events.mixin(), totals.mixin(), Service):  # type: ignore[misc]
        name = "slots"
        add = events.map_action("add", "slot.seen")
        count_action = count

    async with running_broker(Slots()) as broker:
        runtime = totals.runtime(broker)
        async with held(runtime):
            for i in range(10):
                await broker.call("slots.add", {"k": f"k{i}"})
        await asyncio.wait_for(runtime.wait_caught_up(), 20)
        assert await broker.call("slotTotals.count", {}) == 10
    assert probe["most"] == 4


async def test_keyed_summary_equals_the_recomputation(make_store: MakeStore) -> None:
    _, summary, service = profile.build(make_store(), batch_size=500, key="country")
    rng = random.Random(7)
    profiles = [random_profile(rng) for _ in range(1500)]
    async with running_broker(service()) as broker:
        async with held(summary.runtime(broker)):
            await asyncio.gather(*(broker.call("profile.update", p) for p in profiles))
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 60)
        rows = await broker.call("profileSummaryAggregate.find", {})
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)


ACCOUNT_FIELDS: dict[str, FieldType] = {"accountId": "string", "balance": "integer"}


def _accounts_service(
    make_store: MakeStore, key: str, key_field: str | None
) -> tuple[Aggregate, type[Service]]:
    """One row per account; ``account.deposited`` finds its row by ``accountId`` through the
    broker (an action transformation) and adds to the balance."""
    factory = make_store()
    events = EventStore("accountEventStore", factory)
    accounts = Aggregate("accounts", stores.with_fields(factory, ACCOUNT_FIELDS))
    accounts.snapshot("accountEventStore")

    @action(name="credit")
    async def credit(service: Service, ctx: Context) -> dict[str, Any]:
        p = ctx.params["payload"]
        found = await ctx.call("accounts.find", {"accountId": p[key]})
        if found:
            return {"id": found[0]["id"], "balance": found[0]["balance"] + p["amount"]}
        return {"accountId": p[key], "balance": p["amount"]}

    accounts.on("account.deposited").update("bank.credit", key=key, key_field=key_field)

    class Bank(events.mixin(), accounts.mixin(), Service):  # type: ignore[misc]
        name = "bank"
        deposit = events.map_action("deposit", "account.deposited")
        credit_action = credit

    return accounts, Bank


@pytest.mark.parametrize(("key", "key_field"), [("accountId", None), ("account", "accountId")])
async def test_a_keyed_batch_reads_its_rows_in_one_query(
    make_store: MakeStore, key: str, key_field: str | None
) -> None:
    """Per-entity read model: every deposit of a batch finds its account's row through the
    broker; the batch reads the store once (its keys' rows), and each deposit still sees the
    ones before it, in the batch and in earlier batches."""
    accounts, service = _accounts_service(make_store, key, key_field)
    rng = random.Random(3)
    first = [(f"acc{i}", i) for i in range(20)]  # an earlier batch opens 20 accounts
    later = [(f"acc{rng.randrange(30)}", rng.randrange(1, 9)) for _ in range(200)]
    async with running_broker(service()) as broker:
        runtime = accounts.runtime(broker)
        for batch in (first, later):
            async with held(runtime):
                for account, amount in batch:
                    await broker.call("bank.deposit", {key: account, "amount": amount})
            assert runtime.projector is not None
            reads_before = runtime.projector.stats.store_reads
            await asyncio.wait_for(runtime.wait_caught_up(), 30)
        assert runtime.projector is not None
        assert runtime.projector.stats.store_reads - reads_before == 1
        rows = await broker.call("accounts.find", {})
    totals: dict[str, int] = {}
    for account, amount in first + later:
        totals[account] = totals.get(account, 0) + amount
    assert {r["accountId"]: r["balance"] for r in rows} == totals
    assert len(rows) == len(totals)


async def test_batches_overlap_their_writes_and_see_each_others_effects(
    make_store: MakeStore,
) -> None:
    """The pipeline: a batch's transformations run while the write of the batch before it
    is under way, and still read its effects (the same few accounts in every batch)."""
    accounts, service = _accounts_service(make_store, "accountId", None)
    rng = random.Random(5)
    deposits = [(f"acc{rng.randrange(4)}", rng.randrange(1, 9)) for _ in range(300)]
    async with running_broker(service()) as broker:
        runtime = accounts.runtime(broker)
        async with held(runtime):
            assert runtime.projector is not None
            runtime.projector.batch_size = 40
            runtime.projector.pipeline_seconds = 3600.0  # one step for the whole log
            for account, amount in deposits:
                await broker.call("bank.deposit", {"accountId": account, "amount": amount})
        await asyncio.wait_for(runtime.wait_caught_up(), 30)
        assert runtime.projector.stats.overlapped == 7  # 8 batches, each but the first
        assert runtime.projector.stats.batches == 8
        rows = await broker.call("accounts.find", {})
    totals: dict[str, int] = {}
    for account, amount in deposits:
        totals[account] = totals.get(account, 0) + amount
    assert {r["accountId"]: r["balance"] for r in rows} == totals
    assert len(rows) == len(totals)


async def test_a_key_field_must_be_a_declared_field(tmp_path: Path) -> None:
    factory = stores.sqlite(tmp_path / "db")
    accounts = Aggregate("accounts", stores.with_fields(factory, ACCOUNT_FIELDS))
    accounts.snapshot("accountEventStore")
    accounts.on("account.deposited").update("bank.credit", key="a", key_field="account")
    events = EventStore("accountEventStore", factory)

    class Bank(events.mixin(), accounts.mixin(), Service):  # type: ignore[misc]
        name = "bank"

    with pytest.raises(ConfigurationError, match="key_field='account' must name a declared"):
        async with running_broker(Bank()):
            pass


# ---------------------------------------------------------------------- batch tokens


async def test_a_read_for_a_batch_this_node_does_not_hold_is_refused(
    make_store: MakeStore,
) -> None:
    *_, service = profile.build(make_store())
    async with running_broker(service(), node_id="here") as broker:
        meta = {TOKEN_KEY: "0123", AGGREGATE_KEY: "profileSummaryAggregate", NODE_KEY: "there"}
        with pytest.raises(Conflict) as raised:
            await broker.call("profileSummaryAggregate.find", {}, meta)
        assert raised.value.code == 409
        assert "'there'" in str(raised.value)
        assert "not on node 'here'" in str(raised.value)
        # A token of another aggregate is none of this one's business.
        other = {**meta, AGGREGATE_KEY: "someOtherAggregate"}
        assert await broker.call("profileSummaryAggregate.find", {}, other) == []


async def test_a_transformation_elsewhere_reads_the_batch_on_the_projectors_node(
    tmp_path: Path, nats_url: str
) -> None:
    """Node A projects; the transformation lives on node B, which also serves the aggregate's
    actions (its own projector waits for a transformation that never comes). B's reads of
    the aggregate inside A's batch must reach A, not B's local service."""
    events = EventStore("profileEventStore", stores.sqlite(tmp_path / "log"))
    shared = stores.sqlite(tmp_path / "summary", fields=profile.SUMMARY_FIELDS)

    def aggregate(transform: str) -> Aggregate:
        agg = Aggregate("profileSummaryAggregate", shared, batch_size=200)
        agg.snapshot("profileEventStore")
        agg.on("profile.updated").update(transform)
        return agg

    summary_a, summary_b = aggregate("transformer.summary"), aggregate("transformer.missing")

    class Writer(events.mixin(), summary_a.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated")

    class Transformer(summary_b.mixin(), Service):  # type: ignore[misc]
        name = "transformer"

        @action(name="summary")
        async def summary(self, ctx: Context) -> dict[str, Any]:
            p = ctx.params["payload"]
            found = await ctx.call("profileSummaryAggregate.find", {"country": p["country"]})
            row = found[0] if found else {"total": 0, "totalMarried": 0, "totalStudents": 0}
            out = {
                "country": p["country"],
                "total": row["total"] + 1,
                "totalMarried": row["totalMarried"] + bool(p.get("married")),
                "totalStudents": row["totalStudents"] + bool(p.get("student")),
            }
            return {**out, "id": row["id"]} if found else out

    rng = random.Random(11)
    profiles = [random_profile(rng) for _ in range(600)]
    async with running_broker(Writer(), node_id="node-a", transporter=nats_url) as a:
        runtime_a = summary_a.runtime(a)
        async with running_broker(Transformer(), node_id="node-b", transporter=nats_url):
            await asyncio.gather(*(a.call("profile.update", p) for p in profiles))
            await asyncio.wait_for(runtime_a.wait_caught_up(), 60)
            rows = await a.call("profileSummaryAggregate.find", {})
            dead = await a.call("profileSummaryAggregate.deadLetters", {})
    assert dead["total"] == 0, dead["rows"][:1]
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == expected(profiles)


# ---------------------------------------------------------------------- ids and the dispatcher


async def test_restore_and_replay_give_back_the_same_ids(
    make_store: MakeStore, tmp_path: Path
) -> None:
    factory = make_store()
    events = EventStore("noteEventStore", factory)
    notes = Aggregate(
        "noteAggregate",
        stores.with_fields(factory, FIELDS),
        snapshot=StoreBackup(tmp_path / "backups"),
    ).snapshot("noteEventStore")

    async def note(event: dict[str, Any]) -> dict[str, Any]:
        return {"k": event["payload"]["k"], "n": event["id"]}

    async def drop(event: dict[str, Any]) -> dict[str, Any]:
        return {"query": {"k": event["payload"]["k"]}}

    notes.on("note.added").create(note)
    notes.on("note.dropped").remove(drop)

    class Notes(events.mixin(), notes.mixin(), Service):  # type: ignore[misc]
        name = "notes"
        add = events.map_action("add", "note.added")
        drop_ = events.map_action("drop", "note.dropped")

    async def rows(broker: ServiceBroker) -> list[tuple[int, str]]:
        await notes.runtime(broker).wait_caught_up()
        found = await broker.call("noteAggregate.find", {"sort": "id"})
        return [(r["id"], r["k"]) for r in found]

    async with running_broker(Notes()) as broker:
        for k in ("a", "b", "c"):
            await broker.call("notes.add", {"k": k})
        await broker.call("notes.drop", {"k": "c"})  # the highest id is gone: not reused
        snapshot_id = await broker.call("noteAggregate.snapshot", {})
        await broker.call("notes.add", {"k": "d"})
        before = await rows(broker)
        assert before == [(1, "a"), (2, "b"), (4, "d")]
        await broker.call("noteAggregate.restore", {"snapshotID": snapshot_id})
        assert await rows(broker) == before
        await broker.call("noteAggregate.replay", {"wait": True})
        assert await rows(broker) == before


async def test_the_dispatcher_writes_its_bookkeeping_once_per_batch(make_store: MakeStore) -> None:
    events, _, service = profile.build(make_store(), dispatch_batch_size=100)
    async with running_broker(service()) as broker:
        await broker.call("profile.$stopDispatch", {})
        for p in [random_profile(random.Random(i)) for i in range(1000)]:
            await broker.call("profile.update", p)
        dispatcher = events.runtime(broker).dispatcher
        before = dispatcher.settlements
        await broker.call("profile.$startDispatch", {})
        await asyncio.wait_for(dispatcher.wait_settled(1000), 30)
        assert 1 <= dispatcher.settlements - before <= 10  # at most one per batch of 100
        stored = await broker.call("profileEventStore.count", {"query": {"status": 2}})
        assert stored == 1000


async def test_transformations_are_called_on_the_projectors_node_when_it_serves_them(
    tmp_path: Path, nats_url: str
) -> None:
    """Node B serves the same transformation as node A; A's projector calls A's, even with
    MoleculerPy's ``prefer_local`` turned off (which would spread them round-robin)."""
    calls: dict[str, int] = {"a": 0, "b": 0}

    def transformer(node: str) -> type[Service]:
        class Transformer(Service):
            name = "transformer"

            @action(name="row")
            async def row(self, ctx: Context) -> dict[str, Any]:
                calls[node] += 1
                return {"k": ctx.params["payload"]["k"], "n": 1}

        return Transformer

    factory = stores.sqlite(tmp_path / "a")
    events = EventStore("rowEventStore", factory)
    rows = Aggregate("rowAggregate", stores.with_fields(factory, FIELDS)).snapshot("rowEventStore")
    rows.on("row.added").create("transformer.row")

    class Rows(events.mixin(), rows.mixin(), Service):  # type: ignore[misc]
        name = "rows"
        add = events.map_action("add", "row.added")

    settings = Settings(transporter=nats_url, log_level="ERROR", prefer_local=False)
    a = ServiceBroker("node-a", settings=settings)
    async with running_broker(transformer("b")(), node_id="node-b", transporter=nats_url):
        await a.register(Rows())
        await a.register(transformer("a")())
        await a.start()
        try:
            await wait_for_nodes(a, {"node-b": {"transformer"}})
            assert len(a.registry.get_all_actions("transformer.row")) == 2
            for i in range(20):
                await a.call("rows.add", {"k": str(i)})
            await asyncio.wait_for(rows.runtime(a).wait_caught_up(), 20)
        finally:
            await a.stop()
    assert calls == {"a": 20, "b": 0}


async def test_halting_on_a_binding_keeps_its_event_whole(make_store: MakeStore) -> None:
    """An event with two bindings whose second fails in halt mode: neither binding's effect
    is written, so after the fix and the resume the event is applied exactly once."""
    factory = make_store()
    events = EventStore("twoEventStore", factory)
    two = Aggregate(
        "twoAggregate", stores.with_fields(factory, FIELDS), attempts=1, on_error="halt"
    ).snapshot("twoEventStore")
    broken = {"on": True}

    async def first(event: dict[str, Any]) -> dict[str, Any]:
        return {"k": "first", "n": event["id"]}

    async def second(event: dict[str, Any]) -> dict[str, Any]:
        if broken["on"]:
            raise ValueError("not yet")
        return {"k": "second", "n": event["id"]}

    two.on("two.added").create(first)
    two.on("two.added").create(second)

    class Two(events.mixin(), two.mixin(), Service):  # type: ignore[misc]
        name = "two"
        add = events.map_action("add", "two.added")

    async with running_broker(Two()) as broker:
        runtime = two.runtime(broker)
        await broker.call("two.add", {})
        await runtime.projecting.wait()
        assert runtime.projector is not None
        await asyncio.wait_for(runtime.projector.wait_halted(), 10)
        assert await broker.call("twoAggregate.find", {}) == []
        broken["on"] = False
        await broker.call("twoAggregate.retryDeadLetters", {})
        await asyncio.wait_for(runtime.wait_caught_up(), 10)
        rows = await broker.call("twoAggregate.find", {"sort": "k"})
    assert [r["k"] for r in rows] == ["first", "second"]
