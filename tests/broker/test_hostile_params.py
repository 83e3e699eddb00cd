"""Arbitrary params thrown at every store action and at map_action commands (hypothesis).

One broker per backend (memory, SQLite, PostgreSQL), the same call sent to each. Every call
must answer within a bound, with success or a 4xx Moleculer error (never a 5xx, never a
bare exception); a failed call must leave the store as it was; and SQLite and PostgreSQL must
give the same answer to the same call (a differential test: their states evolve in step).

Left out: ``<aggregate>.snapshot`` on an aggregate without a backup strategy answers a 500
(the Go library's "no backup strategy" error) after storing a failed snapshot event; that is
the snapshot engine's to decide. ``status`` answers times, which differ between backends.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moleculerpy import Service, ServiceBroker, Settings
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.testing.postgres_server import isolated_schema

FIELDS = {"s": "string", "i": "integer", "f": "float", "b": "boolean", "j": "json", "d": "datetime"}
CALL_BOUND = 10.0
EXAMPLES = 500

STORE_ACTIONS = ["find", "count", "list", "get", "create", "insert", "update", "remove"]
ACTIONS = (
    [f"hostileAggregate.{a}" for a in STORE_ACTIONS]
    + [f"readOnlyAggregate.{a}" for a in STORE_ACTIONS]
    + [f"hostileAggregate.{a}" for a in ("deadLetters", "retryDeadLetters", "snapshots")]
    + ["hostileAggregate.restore"]  # snapshot itself: see the module docstring
    + [f"hostileEventStore.{a}" for a in ("recordSnapshot", "settleSnapshot")]
    + [f"hostileEventStore.{a}" for a in ("find", "count", "list", "get", "read")]
    + ["hostile.note", "hostile.register"]
)

# --------------------------------------------------------------------------- the values

OPERATORS = [
    "=", "!=", "<>", ">", ">=", "<", "<=", "$gt", "$in", "like", "not like", "in", "not in",
    "between", "not between", "or", "and", "$or",
]  # fmt: skip
WORDS = [
    *FIELDS, "id", "query", "sort", "limit", "offset", "fields", "search", "searchFields",
    "page", "pageSize", "entity", "entities", "after", "name", "age", "ids", "snapshotID",
    "payload", "event", "error", "wait", "hostileAggregate.snapshot", *OPERATORS,
]  # fmt: skip
STRANGE_TEXT = [
    "\ud83d", "\udc00x", "\x00", "\u0663", "\u00b2", "\uff15", "12", "-3", "0", " 1",
    "%", "_", "\\", "A%", "%a%", "'; DROP TABLE x; --", "\u00e9", "\U0001f600", "",
    "2026-01-01T00:00:00", "2026-01-01T00:00:00+05:00", "\u0662\u0660\u0662\u0666-01-01",
    "-total s", "i,s", "-id",
]  # fmt: skip
BIG_INTS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, 2**1024]

keys = st.one_of(st.sampled_from(WORDS), st.sampled_from(STRANGE_TEXT), st.text(max_size=4))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.sampled_from(BIG_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(STRANGE_TEXT),
    st.sampled_from(WORDS),
    st.text(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(list(FIELDS))
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5)
good = {
    "s": st.one_of(text, st.sampled_from(["A%", "a_b", "\\", "\u00e9", "NZ", "AU"])),
    "i": st.one_of(st.integers(-5, 5), st.sampled_from([2**63 - 1, -(2**63), 2**53 + 1])),
    "f": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "b": st.booleans(),
    "j": st.recursive(
        st.none() | st.booleans() | st.integers(-5, 5) | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=2),
        max_leaves=4,
    ),
    "d": st.sampled_from(
        ["2026-01-01T00:00:00", "2026-01-01T00:00:00+05:00", "1970-01-01T00:00:00.5+00:00"]
    ),
}
record = st.fixed_dictionaries({}, optional={f: good[f] for f in FIELDS})
ORDERED_OPS = ["=", "!=", ">", ">=", "<", "<="]


@st.composite
def good_query(draw: st.DrawFn) -> dict[str, Any]:
    field = draw(st.sampled_from(["s", "i", "f", "d", "b", "id"]))
    value = draw(st.integers(1, 6)) if field == "id" else draw(good[field])
    kind = draw(st.sampled_from(["eq", "compare", "in", "between", "like", "null"]))
    if kind == "compare" and field != "b":
        cond: Any = {draw(st.sampled_from(ORDERED_OPS)): value}
    elif kind == "in":
        cond = {"in": [value, value]}
    elif kind == "between" and field != "b":
        cond = {"between": [value, value]}
    elif kind == "like" and field == "s":
        cond = {"like": value}
    elif kind == "null" and field != "id":
        cond = None
    else:
        cond = value
    query: dict[str, Any] = {"query": {field: cond}}
    if draw(st.booleans()):
        query["sort"] = draw(st.sampled_from(["-i", "s", "-f d", "b -id"]))
    if draw(st.booleans()):
        query["limit"] = draw(st.integers(0, 3))
    return query


params = st.one_of(
    record,
    st.builds(lambda e: {"entity": e}, record),
    st.builds(lambda i, e: {"id": i, **e}, st.integers(1, 6), record),
    st.builds(lambda i: {"id": i}, st.integers(1, 6)),
    good_query(),
    st.dictionaries(keys, values, max_size=4),
    # well-formed shapes, so that calls get past the first check and reach the stores
    st.builds(lambda f, v: {f: v}, st.sampled_from([*FIELDS, "id"]), values),
    st.builds(
        lambda f, op, v: {"query": {f: {op: v}}},
        st.sampled_from([*FIELDS, "id"]),
        st.sampled_from(OPERATORS),
        values,
    ),
    st.builds(lambda e: {"entity": e}, st.dictionaries(field_names, values)),
    st.builds(
        lambda i, e: {"id": i, **e}, values, st.dictionaries(st.sampled_from(list(FIELDS)), values)
    ),
    st.none(),
)
READS = [f"{a}.{r}" for a in ("hostileAggregate", "readOnlyAggregate") for r in ("find", "count")]
calls = st.one_of(
    st.tuples(st.sampled_from(ACTIONS), params),
    # calls that mostly succeed, so that there are rows to find, update and remove
    st.tuples(st.just("hostileAggregate.create"), record),
    st.tuples(
        st.just("hostileAggregate.insert"),
        st.builds(lambda e: {"entities": e}, st.lists(record, max_size=3)),
    ),
    st.tuples(
        st.just("hostileAggregate.update"),
        st.builds(lambda i, e: {"id": i, **e}, st.integers(1, 6), record),
    ),
    st.tuples(
        st.sampled_from(["hostileAggregate.remove", "hostileAggregate.get"]),
        st.builds(lambda i: {"id": i}, st.integers(1, 6)),
    ),
    st.tuples(st.sampled_from(READS), good_query()),
    st.tuples(st.just("hostile.note"), st.dictionaries(st.sampled_from(STRANGE_TEXT), values)),
)

# --------------------------------------------------------------------------- the nodes


def _service(factory: StoreFactory) -> Service:
    events = EventStore("hostileEventStore", factory)
    hostile = Aggregate(
        "hostileAggregate", stores.with_fields(factory, FIELDS), write_actions=True
    ).snapshot("hostileEventStore")
    read_only = Aggregate("readOnlyAggregate", stores.with_fields(factory, FIELDS)).snapshot(
        "hostileEventStore"
    )

    class Hostile(events.mixin(), hostile.mixin(), read_only.mixin(), Service):  # type: ignore[misc]
        name = "hostile"
        note = events.map_action("note", "hostile.noted")
        register = events.map_action(
            "register", "hostile.registered", params={"name": "string", "age": "number"}
        )

    return Hostile()


async def _start(label: str, factory: StoreFactory) -> ServiceBroker:
    broker = ServiceBroker(
        f"hostile-{label}",
        settings=Settings(transporter="memory://", log_level="CRITICAL", request_timeout=30),
    )
    await broker.register(_service(factory))
    await broker.start()
    await broker.call("hostile.$stopDispatch", {})  # statuses stay put: answers compare
    return broker


@pytest.fixture
def factories(tmp_path: Path, postgres_dsn: str) -> Iterator[dict[str, StoreFactory]]:
    with isolated_schema(postgres_dsn) as schema:
        yield {
            "memory": stores.memory(),
            "sqlite": stores.sqlite(tmp_path / "sqlite"),
            "postgres": stores.postgres(postgres_dsn, schema=schema),
        }


# --------------------------------------------------------------------------- the checks


def _outcome(answer: Any) -> Any:
    """An answer as compared across backends: errors by name, code and message; event rows
    without their times (each backend stamps its own)."""
    if isinstance(answer, MoleculerError):
        return ("error", type(answer).__name__, answer.code, answer.message)
    return _timeless(answer)


def _timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in ("created", "updated")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


async def _state(broker: ServiceBroker) -> Any:
    return (
        await broker.call("hostileAggregate.find", {"sort": "id"}),
        await broker.call("readOnlyAggregate.count", {}),
        _timeless(await broker.call("hostileEventStore.find", {"sort": "id"})),
    )


async def _call(broker: ServiceBroker, action: str, call_params: Any) -> Any:
    try:
        answer = await asyncio.wait_for(broker.call(action, call_params), CALL_BOUND)
    except MoleculerError as error:
        answer = error
    except TimeoutError:
        raise AssertionError(f"{action} {call_params!r}: no answer in {CALL_BOUND}s") from None
    if isinstance(answer, MoleculerError):
        assert 400 <= answer.code < 500, f"{action} {call_params!r}: {answer!r}"
    return answer


async def _check(brokers: dict[str, ServiceBroker], action: str, call_params: Any) -> None:
    outcomes: dict[str, Any] = {}
    for label, broker in brokers.items():
        before = await _state(broker)
        answer = await _call(broker, action, call_params)
        if isinstance(answer, MoleculerError):
            assert await _state(broker) == before, f"{label}: {action} failed yet stored"
        outcomes[label] = _outcome(answer)
    assert outcomes["sqlite"] == outcomes["postgres"], (action, call_params, outcomes)
    assert outcomes["memory"] == outcomes["sqlite"], (action, call_params, outcomes)


def test_every_call_answers_a_4xx_or_success_and_sqlite_agrees_with_postgresql(
    factories: dict[str, StoreFactory],
) -> None:
    loop = asyncio.new_event_loop()
    brokers = {
        label: loop.run_until_complete(_start(label, factory))
        for label, factory in factories.items()
    }

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(calls)
    def one_call(call: tuple[str, Any]) -> None:
        loop.run_until_complete(_check(brokers, *call))

    try:
        one_call()
    finally:
        for broker in brokers.values():
            loop.run_until_complete(broker.stop())
        loop.close()
