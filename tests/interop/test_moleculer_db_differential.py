"""The read actions answer as moleculer-db 0.8 itself does (issue 18): a differential test.

The same rows go into moleculer-db 0.8 services (its MemoryAdapter, on Moleculer.js 0.14,
installed by ``npm ci`` of ``tests/interop/node``) and into aggregates here (on memory, SQLite
and PostgreSQL in turn): ``orders``, whose
``buyer`` is populated from ``users`` by the same ``populates`` rules on both sides. Both answer
the same ``find``, ``count``, ``list`` and ``get`` params, written and generated (seeded), and
every answer (rows, or an error's name, code, type and data) must be equal, except where the
README's table "where this differs from moleculer-db, and why" says otherwise.

That table is data here: :data:`DIFFERENCES` holds one entry per row of it (a test checks the
two agree), each either a *normaliser* applied to every answer (and it must apply at least
once) or *written calls* that must differ. A difference that is not on the list fails the test;
so does a listed one that no longer shows (fixed: take its row out of the README).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.stores.base import StoreFactory
from moleculerpy_cqrs.testing.brokers import running_broker
from tests.interop.node_script import run_node_script
from tests.interop.test_http_gateway import Node, http, node, summary_once

__all__ = ["node"]  # the web example's node, a fixture

README = Path(__file__).resolve().parents[2] / "README.md"

REFERENCE = """
const { ServiceBroker } = require("moleculer");
const DbService = require("moleculer-db");
const fs = require("fs");
const { rows, users, populates, calls } = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const broker = new ServiceBroker({ logger: false });
broker.createService({ name: "users", mixins: [DbService] });
broker.createService({ name: "orders", mixins: [DbService], settings: { populates } });
const plain = (e) => ({
    name: e.name, code: e.code, type: e.type, data: e.data, message: e.message,
});
(async () => {
    await broker.start();
    if (users.length) await broker.call("users.insert", { entities: users });
    await broker.call("orders.insert", { entities: rows });
    const out = [];
    for (const [action, params] of calls) {
        try {
            out.push({ answer: await broker.call(`orders.${action}`, params) });
        } catch (e) {
            out.push({ error: plain(e) });
        }
    }
    console.log(JSON.stringify(out));
    await broker.stop();
})().catch((e) => { console.error(e); process.exit(1); });
"""

FIELDS = {
    "name": "string",
    "country": "string",
    "total": "integer",
    "key": "integer",
    "note": "string",
    "tags": "json",
    "buyer": "integer",
}
USER_FIELDS = {"name": "string", "key": "integer"}
NAMES = ["Émile Zola", "São Paulo", "émile", "ana", "Ana", "ZOË", "zoë", "Bob", "bob b", "Çelik"]
COUNTRIES = ["NZ", "AU", "US", "FR"]
COLOURS = ["green", "red", "blue"]
USERS = [{"key": u, "name": f"user {u}"} for u in range(1, 5)]


def _buyer(k: int) -> int | None:
    return None if k % 10 == 0 else 99 if k % 13 == 0 else k % 4 + 1


ROWS = [
    {
        "key": k,
        "name": NAMES[k % len(NAMES)],
        "country": COUNTRIES[k % 4],
        "total": k * 37 % 100,
        "note": None if k % 3 == 0 else f"note {k % 5}",
        "tags": [COLOURS[k % 3], k % 4] if k % 5 else [],
        "buyer": _buyer(k),
    }
    for k in range(1, 41)
]
# Rows whose buyer is a known user: populating them answers the same on both sides.
KNOWN_BUYERS = {"buyer": {"$in": [1, 2, 3, 4]}}
POPULATES = {
    "buyer": "users.get",
    "buyerName": {"field": "buyer", "action": "users.get", "params": {"fields": ["name"]}},
}

Call = tuple[str, dict[str, Any]]
Answer = dict[str, Any]


@dataclass
class Difference:
    """One row of the README's table: its first cell, and how the test meets it."""

    moleculer_db: str
    calls: list[Call] = field(default_factory=list)
    normalise: Callable[[Answer, Answer], tuple[Answer, Answer]] | None = None


def _rename_ids(theirs: Answer, ours: Answer) -> tuple[Answer, Answer]:
    return _walk_rows(
        theirs, lambda row: {("id" if k == "_id" else k): v for k, v in row.items()}
    ), ours


def _drop_event_ids(theirs: Answer, ours: Answer) -> tuple[Answer, Answer]:
    return theirs, _walk_rows(ours, lambda row: {k: v for k, v in row.items() if k != "eventId"})


def _validation_data(theirs: Answer, ours: Answer) -> tuple[Answer, Answer]:
    if _error_name(theirs) == _error_name(ours) == "ValidationError":
        return _without_data(theirs), _without_data(ours)
    return theirs, ours


def _not_found_message(theirs: Answer, ours: Answer) -> tuple[Answer, Answer]:
    if _error_name(theirs) == _error_name(ours) == "EntityNotFoundError":
        assert theirs["error"]["message"] == "Entity not found"
        assert ours["error"]["message"].startswith("Entity not found")
        ours = {"error": {**ours["error"], "message": "Entity not found"}}
    return theirs, ours


DIFFERENCES: dict[str, Difference] = {
    "top-level": Difference(
        "a top-level param that is not one of its own is ignored",
        [("find", {"country": "NZ", "sort": "key"}), ("count", {"country": {"$in": ["NZ"]}})],
    ),
    "unknown": Difference(
        "an unknown param or field is ignored (a query on it matches nothing)",
        [("find", {"query": {"colour": "red"}}), ("count", {"colour": "red"})],
    ),
    "null-compare": Difference(
        '`{"$ne": 3}` matches a row whose field is null or missing',
        [
            ("count", {"query": {"note": {"$ne": "note 1"}}}),
            ("count", {"query": {"note": {"$nin": ["x"]}}}),
        ],
    ),
    "operators": Difference(
        "`query` goes to the adapter as is (NeDB: `$regex`, `$size`, `$elemMatch`, `$where`, "
        "a `$not` or `$ne` inside an array, ...)",
        [
            ("count", {"query": {"tags": {"$size": 2}}}),
            ("count", {"query": {"tags": {"$ne": "red"}}}),
            ("count", {"query": {"total": {"$not": {"$gt": 3}}}}),
        ],
    ),
    "exists-null": Difference(
        '`{"$exists": true}` is true of a field that holds null, false of an empty array',
        [
            ("count", {"query": {"note": {"$exists": True}}}),
            ("count", {"query": {"note": {"$exists": False}}}),
            ("count", {"query": {"tags": {"$exists": True}}}),
        ],
    ),
    "search-and-query": Difference(
        "the MemoryAdapter ignores `query` when `search` is given",
        [("count", {"search": "ana", "searchFields": "name", "query": {"country": "AU"}})],
    ),
    "search-every-field": Difference(
        "the MemoryAdapter searches every field's text (`42` finds the number 42)",
        [("count", {"search": "4"})],
    ),
    "isearch": Difference("the MemoryAdapter ignores `iSearch`", [("count", {"iSearch": "ana"})]),
    "populate-no-rule": Difference(
        "`populate` naming no rule (or with no `populates` declared) is ignored",
        [("find", {"populate": "seller", "limit": 2, "sort": "key"})],
    ),
    "populate-shared-field": Difference(
        "two rules reading one field, one of them replacing it: the other may find the row put "
        "there, and leaves its key out",
        [("find", {"query": KNOWN_BUYERS, "populate": "buyer buyerName", "limit": 3})],
    ),
    "sort-list": Difference(
        "`sort` is text; a list (a repeated `?sort=`) is a 422",
        [("find", {"sort": ["-total", "key"], "fields": "key", "limit": 3})],
    ),
    "query-not-json": Difference(
        "`query` text that is not JSON is a `SyntaxError` (500)",
        [("count", {"query": "{not json"})],
    ),
    "number-text": Difference(
        'numbers as text go through JavaScript\'s `Number()` (`"1e2"`, `"0x10"`, `" 5 "`)',
        [("find", {"limit": "1e1", "sort": "key"}), ("list", {"pageSize": " 5 "})],
    ),
    "left-out": Difference(
        "a field with no value is left out of a row (a populated one too, when its id is null "
        "or not found)",
        [("find", {"populate": "buyer", "fields": "key buyer", "sort": "key"})],
    ),
    "ids": Difference(
        "ids are the adapter's (`_id`, a random string in the MemoryAdapter)", normalise=_rename_ids
    ),
    "event-id": Difference("a row holds what was stored", normalise=_drop_event_ids),
    "validation-data": Difference(
        "`ValidationError` data is fastest-validator's list of problems", normalise=_validation_data
    ),
    "not-found-message": Difference(
        "`EntityNotFoundError` says `Entity not found`", normalise=_not_found_message
    ),
}

WRITTEN: list[Call] = [
    ("find", {}),
    ("find", {"limit": 0, "sort": "key"}),
    ("find", {"limit": "0", "offset": "5", "sort": "key"}),
    ("find", {"limit": 3, "offset": 2, "sort": "-total,key"}),
    ("find", {"query": '{"total": {"$gt": 80}}', "sort": "key"}),
    ("find", {"query": {"$or": [{"country": "NZ"}, {"total": {"$lt": 10}}]}, "sort": "key"}),
    ("find", {"query": {"country": {"$in": ["FR", "AU"]}, "total": {"$gte": 50}}}),
    ("find", {"query": {"country": {"$nin": ["FR", "AU"]}}, "fields": "key total"}),
    ("find", {"search": "émile", "searchFields": "name", "sort": "key"}),
    ("find", {"search": "SÃO", "searchFields": ["name"], "sort": "key"}),
    ("find", {"search": "ZOË", "searchFields": "name country", "sort": "key"}),
    ("find", {"search": "3", "searchFields": "total key", "sort": "key"}),
    ("find", {"excludeFields": "name,country", "sort": "-key", "limit": 4}),
    ("find", {"query": {"total": {"$exists": True}}, "fields": "key", "sort": "key"}),
    ("find", {"query": {"$not": {"total": {"$gt": 50}}}, "fields": "key", "sort": "key"}),
    ("find", {"query": {"$not": {"note": "note 1"}}, "fields": "key", "sort": "key"}),
    ("find", {"query": {"note": {"$in": [None, "note 2"]}}, "fields": "key", "sort": "key"}),
    ("find", {"query": {"note": {"$nin": [None]}}, "fields": "key note", "sort": "key"}),
    ("find", {"query": {"tags": "green"}, "fields": "key tags", "sort": "key"}),
    ("find", {"query": {"tags": 3}, "fields": "key tags", "sort": "key"}),
    ("find", {"query": {"tags": {"$in": ["red", 0]}}, "fields": "key", "sort": "key"}),
    ("find", {"query": {"$not": {"tags": "blue"}}, "fields": "key", "sort": "key"}),
    ("find", {"query": KNOWN_BUYERS, "populate": "buyer", "sort": "key", "limit": 5}),
    ("find", {"query": KNOWN_BUYERS, "populate": ["buyerName"], "fields": "key buyerName"}),
    ("list", {"query": KNOWN_BUYERS, "populate": "buyer", "pageSize": 3, "page": 2, "sort": "key"}),
    (
        "get",
        {"id": [1, 2, 3], "populate": "buyerName", "mapping": True, "fields": ["buyerName", "key"]},
    ),
    ("get", {"id": 5, "populate": "buyer"}),
    ("count", {}),
    ("count", {"query": {"total": {"$lte": 20}}, "limit": 1, "offset": 3}),
    ("count", {"query": '{"country": "US"}'}),
    ("count", {"search": "ana", "searchFields": "name"}),
    ("list", {"sort": "key"}),
    ("list", {"pageSize": 0, "page": 2, "sort": "key"}),
    ("list", {"pageSize": "500", "sort": "key"}),
    ("list", {"pageSize": "7", "page": "3", "sort": "-total key"}),
    ("list", {"pageSize": 5, "page": 9, "sort": "key"}),
    ("list", {"limit": 1, "pageSize": 4, "sort": "key", "query": {"country": "NZ"}}),
    ("get", {"id": 7}),
    ("get", {"id": [9, 3, 999], "mapping": True}),
    ("get", {"id": 4, "mapping": True, "fields": ["name", "total"]}),
    ("get", {"id": [5, 6], "excludeFields": "name"}),
    ("get", {"id": 999}),
    ("get", {}),
    ("find", {"limit": -1}),
    ("find", {"offset": "x"}),
    ("list", {"page": 0}),
]


def _generated(count: int, seed: int) -> list[Call]:
    """Random params from the part of the query language both sides share."""
    rng = random.Random(seed)

    def condition(depth: int = 0) -> dict[str, Any]:
        kinds = ["compare", "in", "eq", "exists", "tags", "note", "or", "and", "not"]
        kind = rng.choice(kinds if depth < 2 else kinds[:6])
        if kind in ("or", "and"):
            return {f"${kind}": [condition(depth + 1) for _ in range(rng.randint(1, 3))]}
        if kind == "not":
            return {"$not": condition(depth + 1)}
        if kind == "in":
            pools: list[tuple[str, list[Any]]] = [
                ("country", list(COUNTRIES)),
                ("total", list(range(0, 100, 7))),
            ]
            name, pool = rng.choice(pools)
            return {name: {rng.choice(["$in", "$nin"]): rng.sample(pool, rng.randint(1, 3))}}
        if kind == "eq":
            return rng.choice([{"country": rng.choice(COUNTRIES)}, {"name": rng.choice(NAMES)}])
        if kind == "exists":
            # not on note (nulls) nor tags (empty arrays): see DIFFERENCES["exists-null"]
            return {rng.choice(["total", "country"]): {"$exists": rng.random() < 0.5}}
        if kind == "tags":
            values: list[Any] = [*COLOURS, 0, 1, 2, 3]
            if rng.random() < 0.5:
                return {"tags": rng.choice(values)}
            return {"tags": {"$in": rng.sample(values, rng.randint(1, 3))}}
        if kind == "note":  # a field holding nulls: only what treats null alike
            notes: list[Any] = [None, *(f"note {n}" for n in range(5))]
            if rng.random() < 0.5:
                return {"note": rng.choice(notes)}
            return {"note": {"$in": rng.sample(notes, rng.randint(1, 3))}}
        op = rng.choice(["$gt", "$gte", "$lt", "$lte", "$ne"])
        return {rng.choice(["total", "key"]): {op: rng.randint(0, 100)}}

    out: list[Call] = []
    for _ in range(count):
        action = rng.choice(["find", "count", "list"])
        params: dict[str, Any] = {}
        if rng.random() < 0.2:
            params["search"] = rng.choice(["a", "É", "zo", "SÃ", "b b", "ç", "1", "4"])
            params["searchFields"] = rng.choice(["name", "name total", ["key", "country"]])
        elif rng.random() < 0.85:
            query = condition()
            params["query"] = json.dumps(query) if rng.random() < 0.3 else query
        params["sort"] = rng.choice(["key", "-key", "total key", "-total,key", "name -key"])
        if action == "find" and rng.random() < 0.5:
            params["limit"] = rng.choice([0, 1, 5, "3", "0"])
            params["offset"] = rng.choice([0, 2, "4"])
        if action == "list":
            params["pageSize"] = rng.choice([0, 3, 10, 200, "5", "0"])
            params["page"] = rng.choice([1, 2, "3"])
        if action != "count" and rng.random() < 0.3:
            params["fields"] = rng.choice(["key total", ["key", "name"], "key,country,tags"])
        if action != "count" and rng.random() < 0.15:
            params["excludeFields"] = rng.choice(["note", ["tags", "buyer"]])
        if action != "count" and "search" not in params and rng.random() < 0.15:
            # only rows whose buyer is known (DIFFERENCES["left-out"]), one rule at a time
            # (DIFFERENCES["populate-shared-field"]); search ignores query (["search-and-query"])
            params["populate"] = rng.choice(["buyer", ["buyerName"], "buyerName"])
            params["query"] = {"$and": [KNOWN_BUYERS, _as_object(params.get("query", {}))]}
        out.append((action, params))
    return out


def _as_object(query: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(query) if isinstance(query, str) else query
    return parsed


KNOWN_CALLS = [(name, call) for name, d in DIFFERENCES.items() for call in d.calls]
CALLS: list[Call] = WRITTEN + _generated(400, seed=18) + [call for _, call in KNOWN_CALLS]


def _walk_rows(answer: Answer, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Answer:
    """``answer`` with ``change`` applied to every row in it, populated ones included."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            inner = {k: walk(v) for k, v in value.items()}
            return change(inner) if {"_id", "id", "key"} & set(value) else inner
        return value

    if "answer" not in answer:
        return answer
    return {"answer": walk(answer["answer"])}


def _error_name(answer: Answer) -> str | None:
    return answer["error"]["name"] if "error" in answer else None


def _without_data(answer: Answer) -> Answer:
    return {"error": {k: v for k, v in answer["error"].items() if k not in ("data", "message")}}


def _ordered(action: str, params: dict[str, Any], answer: Answer) -> Any:
    """Rows in a canonical order where ``params`` give none."""
    if "answer" not in answer or "sort" in params:
        return answer
    value = answer["answer"]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    if action == "find":
        return {"answer": sorted(value, key=key)}
    if action == "list":
        return {"answer": {**value, "rows": sorted(value["rows"], key=key)}}
    if action == "get" and isinstance(value, list):
        return {"answer": sorted(value, key=key)}
    return answer


def _compare(call: Call, theirs: Answer, ours: Answer, applied: set[str]) -> tuple[Any, Any]:
    ours = json.loads(json.dumps(ours))
    if "error" in ours:
        ours = {"error": {k: ours["error"][k] for k in ("name", "code", "type", "data", "message")}}
    for name, difference in DIFFERENCES.items():
        if difference.normalise is not None:
            before = (theirs, ours)
            theirs, ours = difference.normalise(theirs, ours)
            if (theirs, ours) != before:
                applied.add(name)
    if "error" in theirs:
        theirs = {"error": {k: v for k, v in theirs["error"].items() if k != "message"}}
    if "error" in ours:
        ours = {"error": {k: v for k, v in ours["error"].items() if k != "message"}}
    return _ordered(*call, theirs), _ordered(*call, ours)


Backend = Callable[[dict[str, str]], StoreFactory]


async def _ours(backend: Backend) -> list[Answer]:
    """The answers of the aggregates' read actions, called through a broker."""
    events = EventStore("orderEventStore", stores.memory())
    users = Aggregate("users", backend(USER_FIELDS), write_actions=True)
    orders = Aggregate("orders", backend(FIELDS), write_actions=True, populates=POPULATES)

    class Orders(events.mixin(), users.mixin(), orders.mixin(), Service):  # type: ignore[misc]
        name = "ordersService"

    out: list[Answer] = []
    async with running_broker(Orders()) as broker:
        await broker.call("users.insert", {"entities": USERS})  # ids 1, 2, ... as the keys
        await broker.call("orders.insert", {"entities": ROWS})
        for action, params in CALLS:
            try:
                out.append({"answer": await broker.call(f"orders.{action}", params)})
            except MoleculerError as error:
                out.append({"error": error.to_dict()})
    return out


async def _reference(
    node_modules: Path,
    tmp_path: Path,
    calls: list[Call] = CALLS,
    rows: list[dict[str, Any]] | None = None,
) -> list[Answer]:
    """moleculer-db's answers to ``calls`` (on ``orders``, holding ``rows``; by default the
    rows and users above, with their keys for ids)."""
    script, data = tmp_path / "reference.js", tmp_path / "calls.json"
    script.write_text(REFERENCE)
    users = [{"_id": u["key"], **u} for u in USERS] if rows is None else []
    rows = [{"_id": r["key"], **r} for r in ROWS] if rows is None else rows
    populates = POPULATES if users else {}
    data.write_text(
        json.dumps({"rows": rows, "users": users, "populates": populates, "calls": calls})
    )
    answers: list[Answer] = await run_node_script(node_modules, script, str(data))
    return answers


@pytest.fixture
def node_modules(node_dir: Path) -> Path:
    return node_dir / "node_modules"


@pytest.fixture(scope="module")
def reference(node_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Answer]:
    """moleculer-db's answers to :data:`CALLS`, asked once for every backend."""
    folder = tmp_path_factory.mktemp("reference")
    return asyncio.run(_reference(node_dir / "node_modules", folder))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return lambda fields: stores.memory(fields=fields)
    if request.param == "sqlite":
        return lambda fields: stores.sqlite(tmp_path, fields=fields)
    dsn, schema = request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema")
    return lambda fields: stores.postgres(dsn, fields=fields, schema=schema)


async def test_read_actions_answer_as_moleculer_db_does(
    reference: list[Answer], backend: Backend
) -> None:
    ours = await _ours(backend)
    known = {json.dumps(call, sort_keys=True): name for name, call in KNOWN_CALLS}
    applied: set[str] = set()
    unlisted, vanished = [], []
    for call, theirs, mine in zip(CALLS, reference, ours, strict=True):
        expected, got = _compare(call, theirs, mine, applied)
        listed = known.get(json.dumps(call, sort_keys=True))
        if listed is None and got != expected:
            unlisted.append(
                f"{call[0]} {json.dumps(call[1])}:\n  moleculer-db {str(expected)[:300]}"
                f"\n  here {str(got)[:300]}"
            )
        if listed is not None and got == expected:
            vanished.append(f"{listed}: {call[0]} {json.dumps(call[1])} answers alike now")
    assert not unlisted, (
        f"{len(unlisted)} of {len(CALLS)} differ, and no row of the README's table says so:\n"
        + "\n".join(unlisted[:10])
    )
    assert not vanished, "listed differences no longer show (fix the README):\n" + "\n".join(
        vanished
    )
    normalisers = {n for n, d in DIFFERENCES.items() if d.normalise is not None}
    assert applied == normalisers, f"never applied: {sorted(normalisers - applied)}"


def readme_differences() -> list[str]:
    """The first cells of the README's table "where this differs from moleculer-db"."""
    text = README.read_text()
    section = text[text.index("### Where this differs from moleculer-db, and why") :]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| moleculer-db |"))
    cells = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells.append(re.split(r"(?<!\\)\|", line)[1].strip())
    return cells


def test_the_list_of_differences_is_the_readmes_table() -> None:
    assert readme_differences() == [d.moleculer_db for d in DIFFERENCES.values()]


POPULATING_NODE = """
const { ServiceBroker } = require("moleculer");
const DbService = require("moleculer-db");
const broker = new ServiceBroker({
    nodeID: "js-mdb", transporter: process.argv[2], logger: false, requestTimeout: 20000,
});
broker.createService({
    name: "reviews",
    mixins: [DbService],
    settings: {
        populates: {
            order: "orders.get",
            orderTotal: { field: "order", action: "orders.get", params: { fields: ["total"] } },
            orderList: { field: "orders", action: "orders.get", params: { fields: "key" } },
        },
    },
});
(async () => {
    await broker.start();
    await broker.waitForServices(["orders"], 20000);
    await broker.call("reviews.insert", { entities: [
        { _id: 1, text: "fine", order: 3, orders: [2, 999, 1] },
        { _id: 2, text: "late", order: 999, orders: [] },
        { _id: 3, text: "none", order: null, orders: [5] },
    ] });
    const out = {
        find: await broker.call("reviews.find", { populate: "order orderList", sort: "_id" }),
        get: await broker.call(
            "reviews.get", { id: [3, 1], populate: ["orderTotal"], mapping: true },
        ),
    };
    console.log(JSON.stringify(out));
    await broker.stop();
})().catch((e) => { console.error(e); process.exit(1); });
"""


async def test_a_moleculer_db_service_populates_from_an_aggregate(
    node_modules: Path, tmp_path: Path, nats_url: str
) -> None:
    """moleculer-db's populate on the Moleculer.js node calls the aggregate's ``get {id: [...],
    mapping: true}`` on this node, over NATS, and places what it answers."""
    events = EventStore("orderEventStore", stores.memory())
    orders = Aggregate("orders", stores.memory(fields=FIELDS), write_actions=True)

    class Orders(events.mixin(), orders.mixin(), Service):  # type: ignore[misc]
        name = "ordersService"

    script = tmp_path / "populating.js"
    script.write_text(POPULATING_NODE)
    async with running_broker(Orders(), transporter=nats_url, node_id="py-node") as broker:
        await broker.call("orders.insert", {"entities": ROWS[:5]})
        row = {r["id"]: r for r in await broker.call("orders.find", {})}
        answer = await run_node_script(node_modules, script, nats_url)
    fine = {"_id": 1, "text": "fine", "orders": [2, 999, 1]}
    assert answer["find"] == [
        {**fine, "order": row[3], "orderList": [{"key": 2}, {"key": 1}]},
        {"_id": 2, "text": "late", "orders": [], "orderList": []},  # no order 999: left out
        {"_id": 3, "text": "none", "orders": [5], "orderList": [{"key": 5}]},
    ]
    assert answer["get"] == {
        "3": {"_id": 3, "text": "none", "order": None, "orders": [5]},
        "1": {**fine, "order": 3, "orderTotal": {"total": row[3]["total"]}},
    }


COUNTRIES_HTTP = ["NZ", "AU", "US", "FR", "DE", "BR", "NZ", "AU", "NZ", "CH", "US", "NZ"]
PROFILES = [
    {"name": f"p{n}", "country": c, "married": n % 3 == 0, "student": n % 4 == 1}
    for n, c in enumerate(COUNTRIES_HTTP)
]
ROUTES = {  # the web example's aliases: path -> the action they call
    "profile-summary": "list",
    "profile-summary-rows": "find",
    "profile-summary-count": "count",
}


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


QUERY_STRINGS: list[str] = [
    "profile-summary-rows?query=" + _q('{"total":{"$gt":1}}') + "&sort=country",
    "profile-summary-rows?limit=0&sort=-total,country",
    "profile-summary-rows?limit=2&offset=1&sort=country",
    "profile-summary-rows?fields=country%20total&sort=country",
    "profile-summary-rows?fields=country,totalMarried&sort=-total%20country",
    "profile-summary-rows?search=z&searchFields=country&sort=country",
    "profile-summary-rows?search=1&searchFields=total%20country&sort=country",
    "profile-summary-rows?query="
    + _q('{"$not":{"country":{"$in":["NZ","AU"]}}}')
    + "&sort=country",
    "profile-summary-rows?query=" + _q('{"totalStudents":{"$exists":true}}') + "&fields=country",
    "profile-summary-rows?excludeFields=totalStudents%20eventId&sort=country",
    "profile-summary?pageSize=0&sort=country",
    "profile-summary?pageSize=2&page=2&sort=country",
    "profile-summary?pageSize=500&sort=-total,country",
    "profile-summary?query=" + _q('{"country":{"$nin":["NZ"]}}') + "&pageSize=3&sort=country",
    "profile-summary-count?query=" + _q('{"totalMarried":{"$gte":1}}'),
    "profile-summary-count?search=n&searchFields=country",
    "profile-summary-count?limit=1&offset=2",
    "profile-summary-rows?limit=-1",
    "profile-summary?page=0",
    "profile-summary/999999",
]


def _as_call(query_string: str) -> Call:
    """The action and params moleculer-web passes for a request (query string values are
    text; a repeated one is a list)."""
    path, _, query = query_string.partition("?")
    if path.startswith("profile-summary/"):
        return "get", {"id": path.rpartition("/")[2]}
    params: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        params[key] = (
            [*params[key], value]
            if isinstance(params.get(key), list)
            else ([params[key], value] if key in params else value)
        )
    return ROUTES[path], params


def _over_http(node: Node, query_string: str) -> Answer:
    status, body = http("GET", f"{node.base}/{query_string}")
    if status == 200:
        return {"answer": body}
    return {"error": {k: body.get(k) for k in ("name", "code", "type", "data", "message")}}


def test_the_web_example_answers_query_strings_as_moleculer_db_does(
    node: Node, node_modules: Path, tmp_path: Path
) -> None:
    """Query strings sent over HTTP to the web example (moleculerpy-web in front of the
    profile example), compared with moleculer-db's answers to the same text params (as its
    gateway passes them; moleculer-db's sanitizeParams reads them)."""
    for profile in PROFILES:
        assert http("POST", f"{node.base}/profile/update", profile)[0] == 200
    totals: dict[str, int] = {}
    for country in COUNTRIES_HTTP:
        totals[country] = totals.get(country, 0) + 1
    summary_once(node, totals)
    _, rows = http("GET", f"{node.base}/profile-summary-rows?limit=0")
    stored = [
        {"_id": r["id"], **{k: v for k, v in r.items() if k not in ("id", "eventId")}} for r in rows
    ]
    calls = [_as_call(q) for q in QUERY_STRINGS]
    reference = asyncio.run(_reference(node_modules, tmp_path, calls, stored))
    applied: set[str] = set()
    differences = []
    for query_string, call, theirs in zip(QUERY_STRINGS, calls, reference, strict=True):
        expected, got = _compare(call, theirs, _over_http(node, query_string), applied)
        if got != expected:
            differences.append(f"{query_string}:\n  moleculer-db {expected}\n  here {got}")
    assert not differences, "\n".join(differences)
    assert {"ids", "validation-data", "not-found-message"} <= applied
