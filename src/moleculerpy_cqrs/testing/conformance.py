"""The conformance suite that every store backend passes: memory, SQLite, PostgreSQL, yours.

Subclass :class:`AdapterConformance` (or some of the ``...Cases`` classes) in a module named
``test_*.py`` and implement :meth:`AdapterCase.make_adapter`::

    class TestMyStore(AdapterConformance):
        async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
            return MyAdapter(name, fields, dsn=...)

The classes are not named ``Test*``, so pytest collects them only through a subclass. They
need pytest, pytest-asyncio and hypothesis (the ``test`` extra). Queries are built the way the
service layer builds them, with :func:`parse_find`, or as AST nodes where that is clearer; the
expected answers follow the reference semantics in :mod:`moleculerpy_cqrs.stores.query`.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moleculerpy_cqrs.errors import ConfigurationError, ConflictError, CqrsError, InvalidInput
from moleculerpy_cqrs.stores.base import Adapter, CheckedRow, Keyed
from moleculerpy_cqrs.stores.fields import Record
from moleculerpy_cqrs.stores.query import (
    ALL,
    And,
    Between,
    Compare,
    CompareOp,
    Condition,
    In,
    IsNull,
    Like,
    Or,
    Query,
    Search,
    escape_like,
    matches,
    parse_find,
    sort_key,
)
from moleculerpy_cqrs.testing.conformance_apply import ApplyCases
from moleculerpy_cqrs.testing.conformance_base import (
    DAY,
    HOSTILE_NAMES,
    HOSTILE_VALUES,
    ITEM_FIELDS,
    LOG_FIELDS,
    T0,
    AdapterCase,
    Boom,
    doomed,
    files_under,
    outside,
    promptly,
)
from moleculerpy_cqrs.testing.conformance_indexes import IndexCases, SchemaCases
from moleculerpy_cqrs.testing.conformance_mdb import MoleculerDbQueryCases
from moleculerpy_cqrs.testing.conformance_meta import MetaCases

KEYED_FIELDS: dict[str, str] = {"event": "string", "key": "string", "n": "integer"}


class CrudCases(AdapterCase):
    async def test_insert_answers_the_stored_row_with_a_new_id(self) -> None:
        a = await self.open()
        row = await a.insert({"name": "x", "qty": 1})
        assert row == {"id": row["id"], **dict.fromkeys(ITEM_FIELDS), "name": "x", "qty": 1}
        assert await a.get(row["id"]) == row

    async def test_insert_many_answers_rows_in_order_with_increasing_ids(self) -> None:
        a = await self.open()
        rows = await a.insert_many([{"name": str(i)} for i in range(5)])
        assert [r["name"] for r in rows] == ["0", "1", "2", "3", "4"]
        assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})
        assert await a.insert_many([]) == []
        assert await a.count() == 5

    async def test_insert_many_is_all_or_nothing(self) -> None:
        a = await self.open()
        with pytest.raises(InvalidInput):
            await a.insert_many([{"name": "ok"}, {"qty": "not a number"}])
        assert await a.count() == 0

    async def test_get_answers_none_for_a_missing_id(self) -> None:
        a = await self.open()
        assert await a.get(12345) is None

    async def test_get_accepts_an_id_given_as_digits(self) -> None:
        a = await self.open()
        row = await a.insert({"name": "x"})
        assert await a.get(str(row["id"])) == row

    async def test_get_many_keeps_the_asked_order_and_skips_missing_ids(self) -> None:
        a, ids = await self.seeded()
        rows = await a.get_many([ids[3], 999_999, ids[0], ids[5]])
        assert [r["id"] for r in rows] == [ids[3], ids[0], ids[5]]
        assert await a.get_many([]) == []

    async def test_update_answers_the_row_read_again(self) -> None:
        a, ids = await self.seeded()
        row = await a.update(ids[0], {"qty": 4, "name": None})
        assert row == await a.get(ids[0])
        assert row is not None
        assert (row["qty"], row["name"], row["price"]) == (4, None, 1.5)

    async def test_update_of_a_missing_id_answers_none_and_changes_nothing(self) -> None:
        a, _ = await self.seeded()
        before = await a.find()
        assert await a.update(999_999, {"qty": 1}) is None
        assert await a.find() == before

    async def test_update_without_changes_answers_the_row(self) -> None:
        a, ids = await self.seeded()
        assert await a.update(ids[1], {}) == await a.get(ids[1])
        assert await a.update(999_999, {}) is None

    async def test_update_many_changes_only_matching_rows(self) -> None:
        a, ids = await self.seeded()
        changed = await a.update_many(parse_find(a.fields, {"name": "apple"}), {"qty": 100})
        assert changed == 2
        assert await self.found(a, ids, qty=100) == [0, 5]
        assert (await a.get(ids[1]) or {})["qty"] == 10

    async def test_update_many_needs_a_change(self) -> None:
        a, _ = await self.seeded()
        with pytest.raises(InvalidInput):
            await a.update_many(ALL, {})

    async def test_remove_answers_the_old_row_and_deletes_it(self) -> None:
        a, ids = await self.seeded()
        old = await a.get(ids[2])
        assert await a.remove(ids[2]) == old
        assert await a.get(ids[2]) is None
        assert await a.remove(ids[2]) is None
        assert await a.count() == 5

    async def test_remove_many_answers_how_many(self) -> None:
        a, ids = await self.seeded()
        assert await a.remove_many(parse_find(a.fields, {"query": {"qty": {">": 3}}})) == 2
        assert sorted(await self.found(a, ids)) == [0, 2, 3, 4]
        assert await a.remove_many(ALL) == 4
        assert await a.count() == 0

    async def test_ids_are_not_reused_after_a_remove(self) -> None:
        a = await self.open()
        rows = await a.insert_many([{"name": "a"}, {"name": "b"}])
        await a.remove(rows[1]["id"])
        again = await a.insert({"name": "c"})
        assert again["id"] > rows[1]["id"]

    async def test_count_with_and_without_a_query(self) -> None:
        a, _ = await self.seeded()
        assert await a.count() == 6
        assert await a.count(parse_find(a.fields, {"active": True})) == 2

    async def test_unknown_fields_are_refused(self) -> None:
        a = await self.open()
        with pytest.raises(InvalidInput, match="unknown field 'colour'"):
            await a.insert({"colour": "red"})
        with pytest.raises(InvalidInput):
            await a.insert({"id": 5})
        assert await a.count() == 0

    async def test_returned_records_are_copies(self) -> None:
        a = await self.open()
        row = await a.insert({"data": {"list": [1]}})
        fetched = await a.get(row["id"])
        assert fetched is not None
        fetched["data"]["list"].append(2)
        row["data"]["list"].append(3)
        assert (await a.get(row["id"]) or {})["data"] == {"list": [1]}

    async def test_connect_twice_is_fine(self) -> None:
        a = await self.open()
        await a.insert({"name": "x"})
        await a.connect()
        assert await a.count() == 1

    async def test_rows_outlive_the_adapter_as_documented(self) -> None:
        a = await self.open()
        await a.insert({"name": "kept"})
        await a.close()
        b = await self.open()
        names = [r["name"] for r in await b.find()]
        assert names == (["kept"] if self.survives_close else [])

    async def test_close_is_idempotent_and_a_closed_adapter_refuses_work(self) -> None:
        a = await self.open()
        await a.close()
        await a.close()
        with pytest.raises(CqrsError):
            await a.insert({"name": "late"})


class QueryCases(AdapterCase):
    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"qty": 3}, [0]),
            ({"query": {"qty": {"=": 3}}}, [0]),
            ({"query": {"qty": {"$eq": 3}}}, [0]),
            ({"query": {"qty": {"!=": 3}}}, [1, 3, 4, 5]),
            ({"query": {"qty": {"<>": 3}}}, [1, 3, 4, 5]),
            ({"query": {"qty": {"$ne": 3}}}, [1, 3, 4, 5]),
            ({"query": {"qty": {">": 3}}}, [1, 5]),
            ({"query": {"qty": {"$gte": 3}}}, [0, 1, 5]),
            ({"query": {"qty": {"<": 3}}}, [3, 4]),
            ({"query": {"qty": {"lte": 3}}}, [0, 3, 4]),
            ({"query": {"qty": {"$gt": 3, "$lt": 10}}}, [5]),
            ({"query": {"qty": {"in": [3, 10, 99]}}}, [0, 1]),
            ({"query": {"qty": {"$in": []}}}, []),
            ({"query": {"qty": {"not in": [3, 10]}}}, [3, 4, 5]),
            ({"query": {"qty": {"$nin": []}}}, [0, 1, 3, 4, 5]),
            ({"query": {"qty": {"between": [0, 7]}}}, [0, 3, 5]),
            ({"query": {"qty": {"not between": [0, 7]}}}, [1, 4]),
            ({"qty": None}, [2]),
            ({"query": {"qty": {"!=": None}}}, [0, 1, 3, 4, 5]),
            ({"query": {"price": {">": 1}}}, [0, 2, 4, 5]),
            ({"price": 1.5}, [0, 5]),
            ({"active": True}, [0, 3]),
            ({"query": {"active": {"!=": True}}}, [1, 4]),
            ({"query": {"active": {"in": [False]}}}, [1, 4]),
            ({"name": "apple"}, [0, 5]),
            ({"query": {"name": {"!=": "apple"}}}, [1, 3, 4]),
            ({"query": {"name": {"<": "b"}}}, [0, 1, 4, 5]),
            ({"query": {"name": {"between": ["a", "c"]}}}, [0, 5]),
            ({"query": {"at": {">": "2024-01-02T00:00:00+00:00"}}}, [3, 5]),
            ({"query": {"at": {"between": ["2024-01-01", "2024-01-02"]}}}, [0, 1]),
            ({"at": "2024-01-01T09:00:00+09:00"}, [0]),
            ({"query": {"data": None}}, [1, 2, 3, 4]),
            ({"query": {"data": {"!=": None}}}, [0, 5]),
        ],
    )
    async def test_operator(self, params: dict[str, Any], expected: list[int]) -> None:
        a, ids = await self.seeded()
        assert sorted(await self.found(a, ids, **params)) == expected
        assert await a.count(parse_find(a.fields, params)) == len(expected)

    @pytest.mark.parametrize(
        "query",
        [
            {"qty": {"!=": 3}},
            {"qty": {"not in": [3]}},
            {"qty": {"not between": [100, 200]}},
            {"name": {"not like": "zzz%"}},
            {"price": {"<": 100}},
            {"active": {"!=": True}},
            {"at": {"not between": ["1990-01-01", "1990-01-02"]}},
        ],
    )
    async def test_a_comparison_with_null_never_matches(self, query: dict[str, Any]) -> None:
        a, _ = await self.seeded()
        null_row = await a.insert(dict.fromkeys(ITEM_FIELDS))
        hits = await a.find(parse_find(a.fields, {"query": query}))
        assert null_row["id"] not in {r["id"] for r in hits}

    async def test_id_filters(self) -> None:
        a, ids = await self.seeded()
        assert await self.found(a, ids, id=ids[4]) == [4]
        assert sorted(await self.found(a, ids, query={"id": {"in": [ids[1], ids[3]]}})) == [1, 3]
        assert await self.found(a, ids, query={"id": {">": ids[4]}}) == [5]

    async def test_top_level_fields_and_query_are_anded(self) -> None:
        a, ids = await self.seeded()
        assert await self.found(a, ids, name="apple", query={"qty": {">": 5}}) == [5]

    async def test_or_and_nest(self) -> None:
        a, ids = await self.seeded()
        query = {"or": [{"qty": {">": 5}}, {"and": [{"active": True}, {"price": {"<": 1}}]}]}
        assert sorted(await self.found(a, ids, query=query)) == [1, 3, 5]
        dollar = {"$or": [{"qty": {"$gt": 5}}, {"$and": [{"active": True}, {"price": 0.5}]}]}
        assert sorted(await self.found(a, ids, query=dollar)) == [1, 3, 5]

    async def test_precedence_follows_the_tree(self) -> None:
        a, ids = await self.seeded()
        active, three = Compare("active", "=", True), Compare("qty", "=", 3)
        ten = Compare("qty", "=", 10)
        left = await a.find(Query(where=Or((And((active, three)), ten))))
        right = await a.find(Query(where=And((active, Or((three, ten))))))
        assert sorted(ids.index(r["id"]) for r in left) == [0, 1]
        assert [ids.index(r["id"]) for r in right] == [0]
        beside = {"active": True, "or": [{"qty": 3}, {"qty": 10}]}
        assert await self.found(a, ids, query=beside) == [0]

    async def test_deep_nesting(self) -> None:
        a, ids = await self.seeded()
        cond: Condition = Compare("qty", "=", 7)
        for level in range(20):
            cond = Or((cond, IsNull("at"))) if level % 2 else And((cond, IsNull("data", True)))
        found = await a.find(Query(where=cond))
        assert sorted(ids.index(r["id"]) for r in found) == [2, 5]

    LIKE_NAMES: ClassVar[list[str | None]] = [
        "abc", "aXc", "ac", "abbc", "ABC", "a%c", "a_c", "a\\c", "a*c", "a?c",
        "a[b]c", "a\nc", "a😀c", "日本c", "a\\", None,
    ]  # fmt: skip

    @pytest.mark.parametrize(
        ("pattern", "expected"),
        [
            ("a_c", ["abc", "aXc", "a%c", "a_c", "a\\c", "a*c", "a?c", "a\nc", "a😀c"]),
            ("a%c", ["abc", "aXc", "ac", "abbc", "a%c", "a_c", "a\\c", "a*c", "a?c",
                     "a[b]c", "a\nc", "a😀c"]),
            ("a\\%c", ["a%c"]),
            ("a\\_c", ["a_c"]),
            ("a\\\\c", ["a\\c"]),
            ("a\\", ["a\\"]),
            ("A%", ["ABC"]),
            ("abc", ["abc"]),
            ("a*c", ["a*c"]),
            ("a?c", ["a?c"]),
            ("a[b]c", ["a[b]c"]),
            ("__", ["ac", "a\\"]),
            ("%c", ["abc", "aXc", "ac", "abbc", "a%c", "a_c", "a\\c", "a*c", "a?c",
                    "a[b]c", "a\nc", "a😀c", "日本c"]),
            ("%", [n for n in LIKE_NAMES if n is not None]),
            ("", []),
        ],
    )  # fmt: skip
    async def test_like(self, pattern: str, expected: list[str]) -> None:
        a = await self.open()
        await a.insert_many([{"name": n} for n in self.LIKE_NAMES])
        hits = await a.find(parse_find(a.fields, {"query": {"name": {"like": pattern}}}))
        assert sorted(r["name"] for r in hits) == sorted(expected)
        rest = await a.find(parse_find(a.fields, {"query": {"name": {"not like": pattern}}}))
        everything = [n for n in self.LIKE_NAMES if n is not None]
        assert sorted(r["name"] for r in rest) == sorted(n for n in everything if n not in expected)

    SEARCH_ROWS: ClassVar[list[dict[str, Any]]] = [
        {"name": "Hello World", "event": "greeting"},
        {"name": "100% sure", "event": "pct"},
        {"name": "snake_case", "event": "under"},
        {"name": "Straße", "event": "x"},
        {"name": "ÉCOLE", "event": "é"},
        {"name": None, "event": "HELLO again"},
        {"name": "back\\slash", "event": None},
        # search ignores case as moleculer-db (JavaScript's toLowerCase) does, beyond ASCII
        {"name": "Émile Zola", "event": None},
        {"name": "São Paulo", "event": None},
        {"name": "İstanbul", "event": None},
        {"name": "ΟΔΟΣ", "event": None},
    ]

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"search": "hello"}, [0, 5]),
            ({"search": "HeLLo", "searchFields": ["name"]}, [0]),
            ({"search": "hello", "searchFields": "event"}, [5]),
            ({"search": "%"}, [1]),
            ({"search": "_"}, [2]),
            ({"search": "e_c"}, [2]),
            ({"search": "\\"}, [6]),
            ({"search": "strasse"}, []),
            ({"search": "STRAßE"}, [3]),
            ({"search": "école"}, [4]),
            ({"search": "ÉCOle"}, [4]),
            ({"search": "é"}, [4, 7]),
            ({"search": "émile"}, [7]),
            ({"search": "SÃO"}, [8]),
            ({"search": "İSTANBUL"}, [9]),  # "İ" lowercases to "i" and a combining dot
            ({"search": "istanbul"}, []),
            ({"search": "οδος"}, [10]),  # a final "Σ" lowercases to "ς"
            ({"search": "ΟΔΟΣ"}, [10]),
            ({"search": "οδοσ"}, []),
            ({"search": ""}, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            ({"search": "o", "query": {"event": {"like": "g%"}}}, [0]),
        ],
    )
    async def test_search(self, params: dict[str, Any], expected: list[int]) -> None:
        a = await self.open("notes", {"name": "string", "event": "string", "n": "integer"})
        ids = [r["id"] for r in await a.insert_many(self.SEARCH_ROWS)]
        assert sorted(await self.found(a, ids, **params)) == expected

    @pytest.mark.parametrize(
        ("sort", "expected"),
        [
            ("qty", [2, 4, 3, 0, 5, 1]),
            ("-qty", [1, 5, 0, 3, 4, 2]),
            ("name", [2, 4, 1, 0, 5, 3]),
            ("-name", [3, 0, 5, 1, 4, 2]),
            (["name", "-qty"], [2, 4, 1, 5, 0, 3]),
            ("name,-qty", [2, 4, 1, 5, 0, 3]),
            ("-price name", [4, 2, 0, 5, 3, 1]),
            ("active", [2, 5, 1, 4, 0, 3]),
            ("-at", [5, 3, 1, 0, 4, 2]),
            ("-id", [5, 4, 3, 2, 1, 0]),
            ("", [0, 1, 2, 3, 4, 5]),
        ],
    )
    async def test_sort(self, sort: str | list[str], expected: list[int]) -> None:
        a, ids = await self.seeded()
        assert await self.found(a, ids, sort=sort) == expected

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"limit": 2}, [2, 4]),
            ({"limit": 2, "offset": 2}, [3, 0]),
            ({"offset": 4}, [5, 1]),
            ({"offset": "1", "limit": "1"}, [4]),
            ({"limit": 0}, [2, 4, 3, 0, 5, 1]),  # no limit, as moleculer-db reads 0
            ({"offset": 100}, []),
            ({"limit": 100}, [2, 4, 3, 0, 5, 1]),
        ],
    )
    async def test_limit_and_offset(self, params: dict[str, Any], expected: list[int]) -> None:
        a, ids = await self.seeded()
        assert await self.found(a, ids, sort="qty", **params) == expected
        assert await a.count(parse_find(a.fields, params)) == 6

    async def test_fields_projection(self) -> None:
        a, ids = await self.seeded()
        rows = await a.find(parse_find(a.fields, {"fields": ["name", "qty"], "sort": "-qty"}))
        assert rows[0] == {"name": "Banana", "qty": 10}
        rows = await a.find(parse_find(a.fields, {"fields": "id at", "query": {"qty": 3}}))
        assert rows == [{"id": ids[0], "at": T0}]
        rows = await a.find(parse_find(a.fields, {"fields": [], "limit": 1}))
        assert set(rows[0]) == {"id", *ITEM_FIELDS}

    async def test_update_and_remove_many_keep_null_semantics(self) -> None:
        a, ids = await self.seeded()
        not_three = parse_find(a.fields, {"query": {"qty": {"!=": 3}}})
        assert await a.update_many(not_three, {"price": 9.0}) == 4
        assert (await a.get(ids[2]) or {})["price"] == 2.0
        not_a = parse_find(a.fields, {"query": {"name": {"not like": "a%"}}})
        assert await a.remove_many(not_a) == 3
        assert sorted(await self.found(a, ids)) == [0, 2, 5]


TYPED_FIELDS: dict[str, str] = {
    "s": "string",
    "i": "integer",
    "f": "float",
    "b": "boolean",
    "j": "json",
    "d": "datetime",
}
ROUND_TRIPS: list[tuple[str, Any, Any]] = [
    ("s", "", ""),
    ("s", "plain", "plain"),
    ("s", "ünïcödé ß 日本語", "ünïcödé ß 日本語"),
    ("s", "emoji 😀👍🏽🏳️‍🌈", "emoji 😀👍🏽🏳️‍🌈"),
    ("s", "new\nline\ttab\r\n", "new\nline\ttab\r\n"),
    ("i", 0, 0),
    ("i", -1, -1),
    ("i", 2**63 - 1, 2**63 - 1),
    ("i", -(2**63), -(2**63)),
    ("i", -(2**63 - 1), -(2**63 - 1)),
    ("i", 3.0, 3),
    ("f", 0.1, 0.1),
    ("f", -2.5, -2.5),
    ("f", 1e308, 1e308),
    ("f", 5e-324, 5e-324),
    ("f", 3, 3.0),
    ("b", True, True),
    ("b", False, False),
    ("j", {}, {}),
    ("j", [], []),
    ("j", {"a": 1, "b": [1, "two", 3.5, True, None]}, {"a": 1, "b": [1, "two", 3.5, True, None]}),
    ("j", {"n": {"l": [{"x": [1, {"y": None}]}]}}, {"n": {"l": [{"x": [1, {"y": None}]}]}}),
    ("j", {"ü": "日本 😀", "q": "'\""}, {"ü": "日本 😀", "q": "'\""}),
    ("j", "just a string", "just a string"),
    ("j", 42, 42),
    ("j", 2.5, 2.5),
    ("j", False, False),
    ("j", 2**70, 2**70),
    ("d", T0, T0),
    ("d", T0 + timedelta(microseconds=123456), T0 + timedelta(microseconds=123456)),
    ("d", datetime(2024, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))), T0),
    ("d", datetime(2024, 1, 1), T0),
    ("d", "2024-01-01T02:00:00.5+02:00", T0 + timedelta(microseconds=500_000)),
    ("d", datetime(1, 1, 1, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC)),
    ("d", datetime.max.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)),
]
BAD_VALUES: list[tuple[str, Any]] = [
    ("s", 5),
    ("s", "nul \x00 inside"),
    ("s", "lone \ud800 surrogate"),
    ("i", "3"),
    ("i", True),
    ("i", 2**63),
    ("i", -(2**63) - 1),
    ("i", 1e20),
    ("i", 1.5),
    ("f", float("nan")),
    ("f", float("inf")),
    ("f", "1.5"),
    ("b", 1),
    ("b", "true"),
    ("j", {1: "int key"}),
    ("j", (1, 2)),
    ("j", {"a": float("nan")}),
    ("j", {"a": {1, 2}}),
    ("j", ["\x00"]),
    ("d", "not a date"),
    ("d", 1234),
]


class TypeCases(AdapterCase):
    @pytest.mark.parametrize(("field", "value", "expected"), ROUND_TRIPS)
    async def test_round_trip(self, field: str, value: Any, expected: Any) -> None:
        a = await self.open("typed", TYPED_FIELDS)
        row = await a.insert({field: value})
        for got in (row[field], (await a.get(row["id"]) or {})[field], (await a.find())[0][field]):
            assert got == expected
            assert type(got) is type(expected)
            if isinstance(got, datetime):
                assert got.utcoffset() == timedelta(0)
        if field != "j":
            hits = await a.find(parse_find(a.fields, {field: value}))
            assert [r["id"] for r in hits] == [row["id"]]

    @pytest.mark.parametrize(("field", "value"), BAD_VALUES)
    async def test_bad_values_are_refused(self, field: str, value: Any) -> None:
        a = await self.open("typed", TYPED_FIELDS)
        kept = await a.insert({"s": "kept"})
        with pytest.raises(InvalidInput):
            await a.insert({field: value})
        with pytest.raises(InvalidInput):
            await a.update(kept["id"], {field: value})
        assert await a.find() == [kept]

    async def test_large_payloads(self) -> None:
        a = await self.open()
        big_text = "x😀" * (5 * 1024 * 1024 // 5)
        big_json = {"rows": [f"payload-{i:08d}" for i in range(270_000)]}
        row = await a.insert({"name": big_text, "data": big_json, "qty": 1})
        got = await a.get(row["id"])
        assert got is not None
        assert got["name"] == big_text
        assert got["data"] == big_json
        small = await a.find(parse_find(a.fields, {"fields": ["qty"], "qty": 1}))
        assert small == [{"qty": 1}]


class TransactionCases(AdapterCase):
    async def test_commit_makes_every_change_visible(self) -> None:
        a, ids = await self.seeded()
        async with a.transaction():
            await a.insert({"name": "new"})
            await a.update(ids[0], {"qty": 99})
            await a.remove(ids[1])
        assert await a.count() == 6
        assert (await a.get(ids[0]) or {})["qty"] == 99
        assert await a.get(ids[1]) is None

    async def test_an_exception_rolls_everything_back(self) -> None:
        a, ids = await self.seeded()
        before = await a.find()
        async with doomed(a):
            await a.insert({"name": "new"})
            await a.update(ids[0], {"qty": 99})
            await a.remove(ids[1])
            await a.update_many(ALL, {"name": "all"})
            assert await a.count() == 6
        assert await a.find() == before

    async def test_reads_inside_see_the_transactions_own_writes(self) -> None:
        a = await self.open()
        async with a.transaction():
            row = await a.insert({"name": "mine"})
            assert await a.get(row["id"]) == row
            assert await a.find() == [row]
            assert await a.count() == 1
            assert await a.head() == row["id"]

    async def test_a_nested_transaction_joins_the_outer_one(self) -> None:
        a = await self.open()
        async with doomed(a):
            await a.insert({"name": "outer"})
            async with a.transaction():
                await a.insert({"name": "inner"})
            assert await a.count() == 2
        assert await a.count() == 0

    async def test_an_outside_reader_never_sees_uncommitted_rows(self) -> None:
        a = await self.open()
        async with a.transaction():
            async with a.transaction():
                await a.insert({"name": "uncommitted"})
            reader = outside(a.find())
            if self.readers_wait_for_writers:
                await self.let_others_run(a)
                assert not reader.done()
            else:
                assert await promptly(reader) == []
        committed = await a.find()
        assert len(committed) == 1
        if self.readers_wait_for_writers:
            assert await reader == committed

    async def test_an_outside_reader_never_sees_rolled_back_rows(self) -> None:
        a = await self.open()
        async with doomed(a):
            await a.insert({"name": "doomed"})
            reader = outside(a.count())
            await self.let_others_run(a)
        assert await reader == 0

    async def test_an_outside_writer_waits_for_the_commit(self) -> None:
        a = await self.open()
        async with a.transaction():
            first = await a.insert({"name": "inside"})
            writer = outside(a.insert({"name": "outside"}))
            await self.let_others_run(a)
            assert not writer.done()
        second = await writer
        assert second["id"] > first["id"]
        assert sorted(r["name"] for r in await a.find()) == ["inside", "outside"]

    async def test_an_outside_writer_is_not_rolled_back_with_the_transaction(self) -> None:
        a = await self.open()
        async with doomed(a):
            await a.insert({"name": "inside"})
            writer = outside(a.insert({"name": "outside"}))
            await self.let_others_run(a)
        await writer
        assert [r["name"] for r in await a.find()] == ["outside"]

    async def test_tasks_started_inside_join_the_transaction(self) -> None:
        a = await self.open()
        async with doomed(a):
            await asyncio.gather(*(a.insert({"qty": i}) for i in range(5)))
            assert await a.count() == 5
        assert await a.count() == 0

    async def test_a_task_that_outlives_its_transaction_does_not_join_a_later_one(self) -> None:
        a = await self.open()
        go = asyncio.Event()

        async def later() -> Record:
            await go.wait()
            return await a.insert({"name": "later"})

        async with a.transaction():
            task = asyncio.create_task(later())
        async with doomed(a):
            await a.insert({"name": "doomed"})
            go.set()
            await self.let_others_run(a)
            assert not task.done()
        await task
        assert [r["name"] for r in await a.find()] == ["later"]

    async def test_cancelling_a_transaction_rolls_it_back_and_frees_the_store(self) -> None:
        a = await self.open()
        inside = asyncio.Event()

        async def work() -> None:
            async with a.transaction():
                await a.insert({"name": "cancelled"})
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await a.count() == 0
        await a.insert({"name": "after"})
        assert await a.count() == 1

    async def test_siblings_share_the_transaction(self) -> None:
        items = await self.open()
        log = await self.open_sibling(items, "items_log")
        async with doomed(items):
            await items.insert({"name": "x"})
            await log.append([{"event": "x"}])
            await log.set_meta("checkpoint", 1)
        assert (await items.count(), await log.count()) == (0, 0)
        assert await log.get_meta("checkpoint") is None
        async with log.transaction():
            await items.insert({"name": "y"})
            await log.append([{"event": "y"}])
        assert (await items.count(), await log.count()) == (1, 1)

    async def test_siblings_hold_their_own_rows(self) -> None:
        items = await self.open()
        log = await self.open_sibling(items, "items_log")
        await items.insert_many([{"name": "a"}, {"name": "b"}])
        await log.append([{"event": "e", "payload": {"n": 1}}])
        assert [r["event"] for r in await log.find()] == ["e"]
        assert [r["name"] for r in await items.find()] == ["a", "b"]
        await log.remove_many(ALL)
        assert await items.count() == 2


class EventLogCases(AdapterCase):
    async def test_append_answers_rows_with_increasing_positions(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        first = await log.append([{"event": "a"}, {"event": "b", "payload": {"x": 1}}])
        second = await log.append([{"event": "c"}])
        positions = [r["id"] for r in first + second]
        assert positions == sorted(set(positions))
        assert first[1] == {"id": positions[1], "event": "b", "payload": {"x": 1}}
        assert await log.append([]) == []

    async def test_head_and_read_after(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        assert await log.head() == 0
        assert await log.read_after(0, 10) == []
        rows = await log.append([{"event": str(i)} for i in range(5)])
        assert await log.head() == rows[-1]["id"]
        assert await log.read_after(0, 2) == rows[:2]
        assert await log.read_after(rows[1]["id"], 100) == rows[2:]
        assert await log.read_after(rows[-1]["id"], 10) == []

    async def test_append_checks_every_record_first(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        with pytest.raises(InvalidInput):
            await log.append([{"event": "ok"}, {"event": 5}])
        assert await log.head() == 0

    async def test_append_joins_a_transaction(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        async with doomed(log):
            await log.append([{"event": "doomed"}])
            if not self.readers_wait_for_writers:
                assert await promptly(outside(log.read_after(0, 10))) == []
                assert await promptly(outside(log.head())) == 0
        assert await log.head() == 0

    async def test_concurrent_appenders_get_unique_positions(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        appended = await asyncio.gather(*(self._appender(log, w) for w in range(20)))
        rows = [r for batch in appended for r in batch]
        positions = [r["id"] for r in rows]
        assert len(set(positions)) == len(positions) == 20 * 19
        assert await log.head() == max(positions)
        read = await log.read_after(0, 10_000)
        assert [r["id"] for r in read] == sorted(positions)
        assert {r["id"]: r for r in read} == {r["id"]: r for r in rows}

    async def test_a_tailing_reader_misses_nothing(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        writers = asyncio.gather(*(self._appender(log, w) for w in range(10)))
        seen: list[int] = []
        position = 0
        while True:
            finished = writers.done()  # before the read: an empty read after it is final
            rows = await log.read_after(position, 7)
            seen += [r["id"] for r in rows]
            if rows:
                position = rows[-1]["id"]
            elif finished:
                break
            await asyncio.sleep(0)
        appended = sorted(r["id"] for batch in await writers for r in batch)
        assert seen == appended

    async def test_append_checked_takes_rows_checked_and_encoded_once(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        payload = {"ü": [1, 2.5, None, True], "b": {"c": "é"}}
        rows = [log.check_row({"event": "a", "payload": payload}), log.check_row({"event": "b"})]
        assert rows[0].json == {"payload": '{"ü":[1,2.5,null,true],"b":{"c":"é"}}'}
        assert rows[1].json == {}
        appended = await log.append_checked(rows)
        assert appended == [
            {"id": appended[0]["id"], "event": "a", "payload": payload},
            {"id": appended[1]["id"], "event": "b", "payload": None},
        ]
        assert appended[0]["id"] < appended[1]["id"]
        assert await log.read_after(0, 10) == appended
        assert await log.append_checked([]) == []

    @pytest.mark.parametrize("copies", [1, 50])  # a backend may write large batches otherwise
    async def test_append_checked_keeps_every_field_type(self, copies: int) -> None:
        log = await self.open("typed_log", ITEM_FIELDS)
        at = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        text = 'tab\t, newline\n, quote" \' backslash\\ {"x":1} \\N é 😀'
        full = {"name": text, "qty": 2**40, "price": 0.1, "active": False, "data": [text, 1e300]}
        records: list[dict[str, Any]] = [
            {**full, "at": at},
            {"active": True},
            {"qty": -(2**63), "data": {text: None}},
        ]
        appended = await log.append_checked([log.check_row(r) for r in records * copies])
        assert [r["id"] for r in appended] == sorted({r["id"] for r in appended})
        assert await log.read_after(0, 1000) == appended
        empty = dict.fromkeys(ITEM_FIELDS)
        assert appended[1] == {**empty, "id": appended[1]["id"], "active": True}
        assert (appended[0]["name"], appended[0]["at"]) == (text, at)

    async def test_check_row_refuses_what_append_refuses(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        for bad in ({"event": 5}, {"nope": 1}, {"payload": {"x": float("nan")}}, {"payload": (1,)}):
            with pytest.raises(InvalidInput):
                log.check_row(bad)
        assert await log.head() == 0

    async def test_append_checked_refuses_rows_checked_by_another_table(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        other = await self.open("other_log", LOG_FIELDS)
        with pytest.raises(CqrsError, match="check rows with the adapter that appends them"):
            await log.append_checked([log.check_row({"event": "a"}), other.check_row({})])
        assert (await log.head(), await other.head()) == (0, 0)

    async def test_append_checked_joins_a_transaction(self) -> None:
        log = await self.open("log", LOG_FIELDS)
        async with doomed(log):
            await log.append_checked([log.check_row({"event": "doomed"})])
        assert await log.head() == 0
        async with log.transaction():
            (row,) = await log.append_checked([log.check_row({"event": "kept"})])
            assert await log.read_after(0, 10) == [row]
        assert await log.head() == row["id"]

    @staticmethod
    async def _appender(log: Adapter, writer: int) -> list[Record]:
        out: list[Record] = []
        for i in range(10):
            batch = await log.append([{"event": f"{writer}.{i}.{k}"} for k in range(1 + i % 3)])
            assert [r["id"] for r in batch] == sorted(r["id"] for r in batch)
            out += batch
        return out


class BackupCases(AdapterCase):
    async def _changed_after_backup(self) -> tuple[Adapter, str, list[Record]]:
        a, ids = await self.seeded()
        await a.set_meta("checkpoint", {"position": 42})
        rows = await a.find()
        location = self.tmp_location()
        assert await a.backup(location) > 0
        self.handed_out = [r["id"] for r in await a.insert_many([{"name": "a"}, {"name": "b"}])]
        await a.update(ids[0], {"qty": -1})
        await a.remove(ids[1])
        await a.set_meta("checkpoint", {"position": 50})
        await a.set_meta("later", True)
        return a, location, rows

    async def test_restore_gives_back_rows_ids_and_meta(self) -> None:
        a, location, rows = await self._changed_after_backup()
        await a.restore(location)
        assert await a.find() == rows
        assert await a.get_meta("checkpoint") == {"position": 42}
        assert await a.get_meta("later") is None

    async def test_inserts_after_a_restore_get_ids_never_handed_out(self) -> None:
        a, location, rows = await self._changed_after_backup()
        await a.restore(location)
        new = await a.insert({"name": "new"})
        assert new["id"] > max(self.handed_out)
        assert await a.count() == len(rows) + 1

    async def test_restore_of_an_empty_backup_empties_the_table(self) -> None:
        a = await self.open()
        location = self.tmp_location()
        await a.backup(location)
        await a.insert({"name": "x"})
        await a.restore(location)
        assert await a.count() == 0

    async def test_backup_creates_missing_directories(self) -> None:
        a, _ = await self.seeded()
        location = str(Path(self.tmp_location()) / "deeper" / "still")
        await a.backup(location)
        await a.remove_many(ALL)
        await a.restore(location)
        assert await a.count() == 6

    async def test_restore_from_a_missing_location_raises_and_changes_nothing(self) -> None:
        a, location, _ = await self._changed_after_backup()
        before = await a.find()
        with pytest.raises(CqrsError):
            await a.restore(str(Path(location).parent / "nowhere"))
        assert await a.find() == before
        assert await a.get_meta("later") is True

    @pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
    async def test_restore_from_a_damaged_backup_raises_and_changes_nothing(
        self, damage: str
    ) -> None:
        a, location, _ = await self._changed_after_backup()
        before = await a.find()
        files = files_under(location)
        assert files
        for path in files:
            data = path.read_bytes()
            cut = {"garbage": b"not a backup " * 100, "truncate": data[: len(data) // 2]}
            path.write_bytes(cut.get(damage, b""))
        with pytest.raises(CqrsError):
            await a.restore(location)
        assert await a.find() == before
        assert await a.get_meta("later") is True
        assert await a.count() == len(before)

    async def test_a_backup_holds_only_committed_rows(self) -> None:
        a, _ = await self.seeded()
        location = self.tmp_location()
        async with doomed(a):
            await a.insert({"name": "uncommitted"})
            backup = outside(a.backup(location))
            if not self.readers_wait_for_writers:
                await promptly(backup)
        await backup
        await a.remove_many(ALL)
        await a.restore(location)
        assert await a.count() == 6

    async def test_typed_values_survive_backup_and_restore(self) -> None:
        a = await self.open("typed", TYPED_FIELDS)
        for field, value, _ in ROUND_TRIPS:
            await a.insert({field: value})
        rows = await a.find()
        location = self.tmp_location()
        await a.backup(location)
        await a.remove_many(ALL)
        await a.restore(location)
        assert await a.find() == rows

    async def test_replace_with_a_shadow(self) -> None:
        a, ids = await self.seeded()
        await a.set_meta("old", 1)
        shadow = await self.open_sibling(a, "items_shadow", ITEM_FIELDS)
        new_rows = await shadow.insert_many([{"name": "s1"}, {"name": "s2", "qty": 2}])
        await shadow.set_meta("checkpoint", 7)
        await a.replace_with(shadow)
        assert await a.find() == new_rows
        assert (await a.get_meta("checkpoint"), await a.get_meta("old")) == (7, None)
        assert (await shadow.count(), await shadow.get_meta("checkpoint")) == (0, None)
        fresh = await a.insert({"name": "fresh"})
        assert fresh["id"] > max(ids + [r["id"] for r in new_rows])  # ids are never reused
        await shadow.insert({"name": "refill"})
        assert await shadow.count() == 1

    async def test_replace_with_rolls_back_with_its_transaction(self) -> None:
        a, _ = await self.seeded()
        rows = await a.find()
        shadow = await self.open_sibling(a, "items_shadow", ITEM_FIELDS)
        await shadow.insert({"name": "s"})
        async with doomed(a):
            await a.replace_with(shadow)
        assert await a.find() == rows
        assert await shadow.count() == 1

    async def test_replace_with_a_table_of_other_fields_is_refused(self) -> None:
        a, _ = await self.seeded()
        other = await self.open_sibling(a, "items_log")
        await other.append([{"event": "x"}])
        with pytest.raises(CqrsError):
            await a.replace_with(other)
        assert await a.count() == 6

    async def test_drop_removes_rows_and_meta(self) -> None:
        a, _ = await self.seeded()
        await a.set_meta("k", 1)
        await a.drop()
        with pytest.raises(CqrsError):
            await a.count()
        again = await self.open()
        assert (await again.count(), await again.get_meta("k")) == (0, None)

    async def test_drop_rolls_back_with_its_transaction(self) -> None:
        a, _ = await self.seeded()
        await a.set_meta("k", 1)
        async with doomed(a):
            await a.drop()
        assert (await a.count(), await a.get_meta("k")) == (6, 1)


class HostileInputCases(AdapterCase):
    @pytest.mark.parametrize("value", HOSTILE_VALUES)
    async def test_hostile_values_are_stored_verbatim(self, value: str) -> None:
        a = await self.open()
        await a.insert({"name": "neighbour"})
        row = await a.insert({"name": value, "data": {value: [value]}})
        assert await a.get(row["id"]) == row
        for params in (
            {"name": value},
            {"query": {"name": {"like": escape_like(value)}}},
            {"query": {"name": {"in": [value]}}},
            {"search": value, "searchFields": ["name"]},
        ):
            hits = await a.find(parse_find(a.fields, params))
            assert [r["id"] for r in hits] == [row["id"]], params
        await a.set_meta(value, value)
        assert await a.get_meta(value) == value
        assert await a.count() == 2

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    async def test_hostile_field_names_are_refused_everywhere(self, name: str) -> None:
        a, ids = await self.seeded()
        before = await a.find()
        attempts: list[Any] = [
            lambda: a.insert({name: "x"}),
            lambda: a.insert_many([{"name": "ok"}, {name: "x"}]),
            lambda: a.update(ids[0], {name: "x"}),
            lambda: a.update_many(ALL, {name: "x"}),
            lambda: a.append([{name: "x"}]),
        ]
        for attempt in attempts:
            with pytest.raises(InvalidInput):
                await attempt()
        for params in (
            {name: "x"},
            {"query": {name: "x"}},
            {"query": {"or": [{"qty": 1}, {name: {">": 1}}]}},
            {"query": {"name": {name: "x"}}},
            {"sort": name or "-"},
            {"sort": ["qty", f"-{name}"]},
            {"fields": [name]},
            {"search": "x", "searchFields": [name]},
        ):
            with pytest.raises(InvalidInput):
                parse_find(a.fields, params)
        assert await a.find() == before

    @pytest.mark.parametrize(
        "entity_id", ["1 OR 1=1", "1; DROP TABLE items", -1, 0, True, None, 1.5, "", 2**63]
    )
    async def test_hostile_ids_are_refused(self, entity_id: Any) -> None:
        a, _ = await self.seeded()
        for attempt in (a.get, a.remove, lambda i: a.update(i, {"qty": 1})):
            with pytest.raises(InvalidInput):
                await attempt(entity_id)
        with pytest.raises(InvalidInput):
            await a.get_many([entity_id])
        assert await a.count() == 6

    async def test_hostile_table_and_field_declarations_are_refused(self) -> None:
        with pytest.raises(InvalidInput):
            await self.make_adapter("items; DROP TABLE x", ITEM_FIELDS)
        with pytest.raises(CqrsError):
            await self.make_adapter("items", {"a; DROP TABLE x": "string"})
        with pytest.raises(CqrsError):
            await self.make_adapter("items", {'"q"': "string"})


_TEXT = st.text(alphabet="aAb_%\\é ", max_size=4)
_INT = st.integers(-3, 3)
_FLOAT = st.sampled_from([-1.5, 0.0, 0.5, 2.0, 2.5])
_DATE = st.sampled_from([T0 - DAY, T0, T0 + DAY, T0 + timedelta(microseconds=1)])
_ORDERED: dict[str, st.SearchStrategy[Any]] = {"s": _TEXT, "i": _INT, "f": _FLOAT, "d": _DATE}
_VALUES: dict[str, st.SearchStrategy[Any]] = {**_ORDERED, "b": st.booleans()}
PROPERTY_FIELDS: dict[str, str] = {
    "s": "string",
    "i": "integer",
    "f": "float",
    "b": "boolean",
    "d": "datetime",
}
_OPS: list[CompareOp] = ["=", "!=", "<", "<=", ">", ">="]
_RECORDS = st.lists(
    st.fixed_dictionaries({n: st.none() | v for n, v in _VALUES.items()}), max_size=12
)


@st.composite
def _leaf(draw: st.DrawFn) -> Condition:
    kind = draw(st.sampled_from(["compare", "equal", "like", "in", "between", "null", "search"]))
    if kind == "compare":
        name = draw(st.sampled_from(sorted(_ORDERED)))
        op = draw(st.sampled_from(_OPS))
        return Compare(name, op, draw(_ORDERED[name]))
    if kind == "equal":
        return Compare("b", draw(st.sampled_from(["=", "!="])), draw(st.booleans()))
    if kind == "like":
        return Like("s", draw(_TEXT), draw(st.booleans()))
    if kind == "search":
        return Search(draw(st.text(alphabet="aAb_%\\é", max_size=3)), ("s",))
    name = draw(st.sampled_from(sorted(_VALUES)))
    if kind == "null":
        return IsNull(name, draw(st.booleans()))
    if kind == "in":
        values = draw(st.lists(_VALUES[name], max_size=3))
        return In(name, tuple(values), draw(st.booleans()))
    name = draw(st.sampled_from(sorted(_ORDERED)))
    low, high = draw(_ORDERED[name]), draw(_ORDERED[name])
    return Between(name, low, high, draw(st.booleans()))


def _combine(children: st.SearchStrategy[Condition]) -> st.SearchStrategy[Condition]:
    items = st.lists(children, min_size=1, max_size=3).map(tuple)
    return st.one_of(items.map(And), items.map(Or))


_QUERIES = st.builds(
    Query,
    where=st.none() | st.recursive(_leaf(), _combine, max_leaves=6),
    sort=st.lists(
        st.tuples(st.sampled_from([*PROPERTY_FIELDS, "id"]), st.booleans()), max_size=3
    ).map(tuple),
    limit=st.none() | st.integers(0, 6),
    offset=st.integers(0, 4),
)


class PropertyCases(AdapterCase):
    # One function serves every backend's subclass (differing executors), and the fixture's
    # adapter is meant to be shared by the examples: it is emptied at the start of each.
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
            HealthCheck.too_slow,
        ],
    )
    @given(records=_RECORDS, query=_QUERIES)
    async def test_queries_agree_with_the_reference_semantics(
        self, records: list[dict[str, Any]], query: Query
    ) -> None:
        if not hasattr(self, "_property_adapter"):
            self._property_adapter = await self.open("props", PROPERTY_FIELDS)
        a = self._property_adapter
        await a.remove_many(ALL)
        stored = await a.insert_many(records)
        matching = [r for r in stored if matches(query.where, r)]
        expected = sorted(matching, key=sort_key(query.sort))
        end = None if query.limit is None else query.offset + query.limit
        assert await a.find(query) == expected[query.offset : end]
        assert await a.count(query) == len(matching)
        assert await a.remove_many(query) == len(matching)
        assert await a.count() == len(stored) - len(matching)


class UniqueKeyCases(AdapterCase):
    """A unique field (:meth:`Adapter.declare_unique`) and :meth:`Adapter.append_keyed`."""

    async def open_keyed(self, name: str = "keyed") -> Adapter:
        adapter = await self.make_adapter(name, KEYED_FIELDS)
        adapter.declare_unique("key")
        self._opened.append(adapter)
        await adapter.connect()
        return adapter

    @staticmethod
    def rows(adapter: Adapter, *keys: str | None) -> list[CheckedRow]:
        return [adapter.check_row({"event": f"e{i}", "key": k}) for i, k in enumerate(keys)]

    async def test_a_key_is_stored_once_and_a_repeat_answers_its_holder(self) -> None:
        a = await self.open_keyed()
        (first,) = await a.append_keyed(self.rows(a, "k1"), "key")
        assert first.stored
        assert first.row["key"] == "k1"
        (again,) = await a.append_keyed(self.rows(a, "k1"), "key")
        assert not again.stored
        assert again.row == first.row
        assert await a.count() == 1

    async def test_one_batch_stores_a_key_once_and_rows_without_keys_as_usual(self) -> None:
        a = await self.open_keyed()
        (held,) = await a.append_keyed(self.rows(a, "old"), "key")
        answers = await a.append_keyed(self.rows(a, "k", None, "k", "old", None, "j"), "key")
        assert [x.stored for x in answers] == [True, True, False, False, True, True]
        assert answers[2].row == answers[0].row
        assert answers[3].row == held.row
        new = [x.row for x in answers if x.stored]
        assert [r["event"] for r in new] == ["e0", "e1", "e4", "e5"]
        ids = [r["id"] for r in new]
        assert ids == sorted(ids)
        assert ids[0] > held.row["id"]
        assert await a.read_after(held.row["id"], 10) == new

    async def test_concurrent_appenders_of_the_same_keys_store_each_once(self) -> None:
        adapters = [await self.open_keyed() for _ in range(3)]
        keys = [f"k{i}" for i in range(8)]

        async def append(adapter: Adapter, turn: int) -> list[Keyed]:
            rotated = keys[turn:] + keys[:turn]
            return await adapter.append_keyed(self.rows(adapter, *rotated), "key")

        answers = await asyncio.gather(*(append(a, i) for i, a in enumerate(adapters)))
        stored = await adapters[0].find()
        assert sorted(r["key"] for r in stored) == keys
        holders = {r["key"]: r["id"] for r in stored}
        for batch in answers:
            assert all(holders[x.row["key"]] == x.row["id"] for x in batch)
        assert sum(x.stored for batch in answers for x in batch) == len(keys)

    async def test_inserting_or_updating_to_a_held_value_is_refused(self) -> None:
        a = await self.open_keyed()
        one = await a.insert({"event": "a", "key": "k"})
        other = await a.insert({"event": "b", "key": "j"})
        with pytest.raises(ConflictError):
            await a.insert({"event": "c", "key": "k"})
        with pytest.raises(ConflictError):
            await a.update(other["id"], {"key": "k"})
        assert await a.find() == [one, other]
        await a.insert_many([{"event": "n"}, {"event": "m", "key": None}])  # NULLs: any number
        assert await a.count() == 4

    async def test_append_keyed_joins_a_transaction_and_rolls_back_with_it(self) -> None:
        a = await self.open_keyed()
        with suppress(Boom):
            async with a.transaction():
                (x,) = await a.append_keyed(self.rows(a, "k"), "key")
                assert x.stored
                (y,) = await a.append_keyed(self.rows(a, "k"), "key")
                assert not y.stored
                assert y.row["id"] == x.row["id"]
                raise Boom
        assert await a.count() == 0
        (z,) = await a.append_keyed(self.rows(a, "k"), "key")
        assert z.stored

    async def test_the_index_is_made_on_an_existing_table(self) -> None:
        plain = await self.open("keyed", KEYED_FIELDS)
        await plain.insert_many([{"event": "a", "key": "k"}, {"event": "b"}])
        a = await self.open_keyed()
        (x,) = await a.append_keyed(self.rows(a, "k"), "key")
        assert not x.stored
        assert x.row["event"] == "a"
        with pytest.raises(ConflictError):
            await a.insert({"event": "c", "key": "k"})

    async def test_keys_stay_unique_after_a_restore(self) -> None:
        a = await self.open_keyed()
        await a.append_keyed(self.rows(a, "k"), "key")
        location = self.tmp_location()
        await a.backup(location)
        await a.append_keyed(self.rows(a, "later"), "key")
        await a.restore(location)
        (x,) = await a.append_keyed(self.rows(a, "k"), "key")
        assert not x.stored
        (y,) = await a.append_keyed(self.rows(a, "later"), "key")
        assert y.stored
        with pytest.raises(ConflictError):
            await a.insert({"event": "c", "key": "k"})

    async def test_a_keyed_batch_refused_by_another_unique_field_stores_nothing(self) -> None:
        # A keyed append may try a plain insert first: a refusal by another unique field
        # must still reach the caller (not be taken for a held key), with nothing stored.
        a = await self.make_adapter(
            "keyed", {**KEYED_FIELDS, "event": {"type": "string", "unique": True}}
        )
        a.declare_unique("key")
        self._opened.append(a)
        await a.connect()
        (held,) = await a.append_keyed(self.rows(a, "k0"), "key")  # event "e0"
        with pytest.raises(ConflictError) as refused:
            await a.append_keyed(self.rows(a, "k1", "k0"), "key")  # "e0" again, then a repeat
        assert refused.value.data["field"] == "event"
        with pytest.raises(ConflictError):
            await a.append_keyed(self.rows(a, "k2"), "key")  # event "e0" once more
        assert await a.find() == [held.row]

    async def test_only_declared_string_fields_can_be_unique(self) -> None:
        a = await self.make_adapter("keyed", KEYED_FIELDS)
        self._opened.append(a)
        with pytest.raises(ConfigurationError):
            a.declare_unique("n")
        with pytest.raises(ConfigurationError):
            a.declare_unique("nope")
        await a.connect()
        with pytest.raises(ConfigurationError):
            await a.append_keyed([a.check_row({"event": "x"})], "key")


class AdapterConformance(
    CrudCases,
    ApplyCases,
    IndexCases,
    SchemaCases,
    QueryCases,
    TypeCases,
    TransactionCases,
    EventLogCases,
    MetaCases,
    BackupCases,
    HostileInputCases,
    PropertyCases,
    UniqueKeyCases,
    MoleculerDbQueryCases,
):
    """Every case: subclass this and implement :meth:`AdapterCase.make_adapter`."""


__all__ = [
    "HOSTILE_NAMES",
    "HOSTILE_VALUES",
    "ITEM_FIELDS",
    "LOG_FIELDS",
    "AdapterCase",
    "AdapterConformance",
    "ApplyCases",
    "BackupCases",
    "CrudCases",
    "EventLogCases",
    "HostileInputCases",
    "IndexCases",
    "MetaCases",
    "PropertyCases",
    "QueryCases",
    "SchemaCases",
    "TransactionCases",
    "TypeCases",
    "UniqueKeyCases",
]
