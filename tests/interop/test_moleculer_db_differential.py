"""The read actions answer as moleculer-db 0.8 itself does (issue 18): a differential test.

The same rows go into a moleculer-db 0.8 service (its MemoryAdapter, on Moleculer.js 0.14,
installed by ``npm ci`` of ``tests/interop/node``) and into an aggregate here; both answer the same
``find``, ``count``, ``list`` and ``get`` params, written and generated, and every answer must
be equal. The params keep clear of the differences the README's table lists ("where this differs
from moleculer-db, and why"): every field of every row has a value (moleculer-db leaves out an
empty field, we answer null), ``search`` always names its ``searchFields`` and comes without
``query`` (the MemoryAdapter searches every field's text and then ignores ``query``), and ids
are the row's ``key`` on both sides (the MemoryAdapter takes a given ``_id``); the moleculer-db
rows carry the aggregate's ``eventId`` column, null.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.testing.brokers import running_broker

REFERENCE = """
const { ServiceBroker } = require("moleculer");
const DbService = require("moleculer-db");
const fs = require("fs");
const { rows, calls } = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const broker = new ServiceBroker({ logger: false });
broker.createService({ name: "orders", mixins: [DbService] });
(async () => {
    await broker.start();
    await broker.call("orders.insert", { entities: rows });
    const out = [];
    for (const [action, params] of calls) {
        try {
            out.push({ answer: await broker.call(`orders.${action}`, params) });
        } catch (e) {
            out.push({ error: { name: e.name, code: e.code, type: e.type, data: e.data } });
        }
    }
    console.log(JSON.stringify(out));
    await broker.stop();
})().catch((e) => { console.error(e); process.exit(1); });
"""

FIELDS = {"name": "string", "country": "string", "total": "integer", "key": "integer"}
NAMES = ["Émile Zola", "São Paulo", "émile", "ana", "Ana", "ZOË", "zoë", "Bob", "bob b", "Çelik"]
COUNTRIES = ["NZ", "AU", "US", "FR"]
ROWS = [
    {"key": k, "name": NAMES[k % len(NAMES)], "country": COUNTRIES[k % 4], "total": k * 37 % 100}
    for k in range(1, 41)
]

WRITTEN: list[tuple[str, dict[str, Any]]] = [
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
    ("find", {"excludeFields": "name,country", "sort": "-key", "limit": 4}),
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
]


def _generated(count: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Random params from the part of the query language both sides share."""
    rng = random.Random(seed)

    def condition(depth: int = 0) -> dict[str, Any]:
        kind = rng.choice(["compare", "in", "eq", "or", "and"] if depth < 2 else ["compare"])
        if kind == "or" or kind == "and":
            return {f"${kind}": [condition(depth + 1) for _ in range(rng.randint(1, 3))]}
        if kind == "in":
            choices: list[tuple[str, list[Any]]] = [
                ("country", list(COUNTRIES)),
                ("total", list(range(0, 100, 7))),
            ]
            field, values = rng.choice(choices)
            op = rng.choice(["$in", "$nin"])
            return {field: {op: rng.sample(values, rng.randint(1, 3))}}
        if kind == "eq":
            return rng.choice([{"country": rng.choice(COUNTRIES)}, {"name": rng.choice(NAMES)}])
        op = rng.choice(["$gt", "$gte", "$lt", "$lte", "$ne"])
        return {rng.choice(["total", "key"]): {op: rng.randint(0, 100)}}

    out: list[tuple[str, dict[str, Any]]] = []
    for _ in range(count):
        action = rng.choice(["find", "count", "list"])
        params: dict[str, Any] = {}
        if rng.random() < 0.2:
            params["search"] = rng.choice(["a", "É", "zo", "SÃ", "b b", "ç"])
            params["searchFields"] = "name"
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
            params["fields"] = rng.choice(["key total", ["key", "name"], "key,country"])
        out.append((action, params))
    return out


CALLS = WRITTEN + _generated(300, seed=18)


def _rows(rows: list[dict[str, Any]], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with moleculer-db's ``_id`` called ``id``, in sort order (any order without one)."""
    out = [{("id" if k == "_id" else k): v for k, v in row.items()} for row in rows]
    if "sort" in params:
        return out
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def _normal(action: str, params: dict[str, Any], answer: Any) -> Any:
    if "error" in answer:
        return answer
    value = answer["answer"]
    if action == "find":
        return _rows(value, params)
    if action == "list":
        return {**value, "rows": _rows(value["rows"], params)}
    if action == "get" and isinstance(value, dict) and "key" not in value and value:
        return {k: _rows([v], {"sort": ""})[0] for k, v in value.items()}
    if action == "get":
        return _rows(value, {"sort": ""}) if isinstance(value, list) else _rows([value], {})[0]
    return value


async def _ours() -> list[Any]:
    """The answers of an aggregate's read actions, called through a broker."""
    events = EventStore("orderEventStore", stores.memory())
    orders = Aggregate("orders", stores.memory(fields=FIELDS), write_actions=True)

    class Orders(events.mixin(), orders.mixin(), Service):  # type: ignore[misc]
        name = "ordersService"

    out: list[Any] = []
    async with running_broker(Orders()) as broker:
        await broker.call("orders.insert", {"entities": ROWS})  # ids 1, 2, ... as the keys
        for action, params in CALLS:
            try:
                out.append({"answer": await broker.call(f"orders.{action}", params)})
            except MoleculerError as error:
                plain = error.to_dict()
                out.append({"error": {k: plain[k] for k in ("name", "code", "type", "data")}})
    return out


async def _reference(node_modules: Path, tmp_path: Path) -> list[Any]:
    script, data = tmp_path / "reference.js", tmp_path / "calls.json"
    script.write_text(REFERENCE)
    # An aggregate's rows carry the id of the event that last wrote them (null: inserted).
    rows = [{"_id": r["key"], **r, "eventId": None} for r in ROWS]
    data.write_text(json.dumps({"rows": rows, "calls": CALLS}))
    process = await asyncio.create_subprocess_exec(
        "node", str(script), str(data),
        env={**os.environ, "NODE_PATH": str(node_modules)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    answers: list[Any] = json.loads(out.decode().strip().splitlines()[-1])
    return answers


@pytest.fixture
def node_modules(node_dir: Path) -> Path:
    return node_dir / "node_modules"


async def test_read_actions_answer_as_moleculer_db_does(node_modules: Path, tmp_path: Path) -> None:
    reference, ours = await _reference(node_modules, tmp_path), await _ours()
    differences = []
    for (action, params), theirs, mine in zip(CALLS, reference, ours, strict=True):
        expected, got = _normal(action, params, theirs), _normal(action, params, mine)
        if json.loads(json.dumps(got)) != expected:
            differences.append(
                f"{action} {json.dumps(params)}:\n  moleculer-db {str(expected)[:300]}"
                f"\n  here {str(got)[:300]}"
            )
    assert not differences, f"{len(differences)} of {len(CALLS)} differ:\n" + "\n".join(
        differences[:10]
    )
