"""Conformance cases for the query features moleculer-db users write (issue 18): ``$exists``,
``$not``, ``$in`` holding null, membership in a json array, ``search`` in an integer field,
``{}`` (every row) inside ``$and``, ``$or`` and ``$not``.

Every backend answers them alike, as moleculer-db's MemoryAdapter (NeDB) does on rows that
hold every field (see the README's table for where NULL makes the two differ).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.query import parse_find
from moleculerpy_cqrs.testing.conformance_base import AdapterCase

MDB_FIELDS: dict[str, str] = {
    "name": "string",
    "n": "integer",
    "price": "float",
    "tags": "json",
}
# Indexes 0..6; the cases name rows by index.
MDB_ROWS: list[dict[str, Any]] = [
    {"name": "green apple", "n": 12, "price": 1.5, "tags": ["green", "fruit", 1]},
    {"name": "Banana", "n": -5, "price": None, "tags": ["yellow", "fruit", True]},
    {"name": None, "n": None, "price": 2.0, "tags": None},
    {"name": "kiwi", "n": 120, "price": 0.5, "tags": "green"},
    {"name": "lime", "n": 7, "price": 3.0, "tags": {"green": "green"}},
    {"name": "olive", "n": 0, "price": 1.0, "tags": [["green"], 1.0, "1"]},
    {"name": "plum", "n": 31, "price": 4.0, "tags": []},
]


class MoleculerDbQueryCases(AdapterCase):
    async def mdb_seeded(self) -> tuple[Adapter, list[int]]:
        adapter = await self.open("mdbitems", MDB_FIELDS)
        rows = await adapter.insert_many(MDB_ROWS)
        return adapter, [r["id"] for r in rows]

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"query": {"name": {"$exists": True}}}, [0, 1, 3, 4, 5, 6]),
            ({"query": {"name": {"$exists": False}}}, [2]),
            ({"query": {"tags": {"$exists": True}}}, [0, 1, 3, 4, 5, 6]),
            ({"query": {"$not": {"n": {"$gt": 10}}}}, [1, 2, 4, 5]),
            ({"query": {"$not": {"price": {"$lt": 2}}}}, [1, 2, 4, 6]),
            ({"query": {"$not": {"$or": [{"n": 7}, {"name": "kiwi"}]}}}, [0, 1, 2, 5, 6]),
            ({"query": {"$not": {"$not": {"n": {"$gt": 10}}}}}, [0, 3, 6]),
            ({"query": {"$and": [{"$not": {"n": 7}}, {"n": {"$lt": 20}}]}}, [0, 1, 5]),
            ({"query": {"name": {"$in": ["kiwi", None]}}}, [2, 3]),
            ({"query": {"name": {"$in": [None]}}}, [2]),
            ({"query": {"n": {"$in": [7, None, 0]}}}, [2, 4, 5]),
            ({"query": {"name": {"$nin": ["kiwi", None]}}}, [0, 1, 4, 5, 6]),
            ({"query": {"name": {"$nin": [None]}}}, [0, 1, 3, 4, 5, 6]),
            ({"tags": "green"}, [0, 3]),
            ({"query": {"tags": "fruit"}}, [0, 1]),
            ({"query": {"tags": {"$eq": "green"}}}, [0, 3]),
            ({"query": {"tags": 1}}, [0, 5]),
            ({"query": {"tags": 1.0}}, [0, 5]),
            ({"query": {"tags": "1"}}, [5]),
            ({"query": {"tags": True}}, [1]),
            ({"query": {"tags": False}}, []),
            ({"query": {"tags": {"$in": ["yellow", "green"]}}}, [0, 1, 3]),
            ({"query": {"tags": {"$in": ["yellow", None]}}}, [1, 2]),
            ({"query": {"tags": {"$in": []}}}, []),
            ({"query": {"$not": {"tags": "green"}}}, [1, 2, 4, 5, 6]),
            ({"query": {"$or": [{}, {"n": 7}]}}, [0, 1, 2, 3, 4, 5, 6]),
            ({"query": {"$and": [{}, {"n": 7}]}}, [4]),
            ({"query": {"$not": {}}}, []),
            ({"query": {"$not": {"$and": [{}]}}, "n": 7}, []),
            ({"search": "12", "searchFields": "n"}, [0, 3]),
            ({"search": "-", "searchFields": ["n", "name"]}, [1]),
            ({"search": "0", "searchFields": "n"}, [3, 5]),
            ({"search": "LIME", "searchFields": "name n"}, [4]),
        ],
    )
    async def test_moleculer_db_operator(self, params: dict[str, Any], expected: list[int]) -> None:
        a, ids = await self.mdb_seeded()
        query = parse_find(a.fields, params)
        rows = await a.find(query)
        assert sorted(ids.index(r["id"]) for r in rows) == expected
        assert await a.count(query) == len(expected)

    @pytest.mark.parametrize(
        ("query", "says"),
        [
            ({"n": {"$not": {"$gt": 3}}}, "$not takes a whole query"),
            ({"name": {"$regex": "^a"}}, "not supported"),
            ({"tags": {"$size": 2}}, "not supported"),
            ({"tags": {"$elemMatch": {"a": 1}}}, "not supported"),
            ({"$where": "1"}, "not supported"),
            ({"$nor": [{"n": 1}]}, "not supported"),
            ({"name": {"$exists": 1}}, "true or false"),
            ({"tags": {"$ne": "green"}}, "negate with"),
            ({"tags": {"$nin": ["green"]}}, "negate with"),
            ({"tags": {"$gt": 1}}, "negate with"),
            ({"tags": ["green"]}, "membership takes a string, number or boolean"),
            ({"tags": {"$in": [["green"]]}}, "membership takes a string, number or boolean"),
        ],
    )
    async def test_unsupported_forms_are_refused_saying_why(
        self, query: dict[str, Any], says: str
    ) -> None:
        a, _ = await self.mdb_seeded()
        with pytest.raises(InvalidInput, match=re.escape(says)):
            parse_find(a.fields, {"query": query})

    @pytest.mark.parametrize("field", ["price", "tags"])
    async def test_search_refuses_fields_whose_text_differs(self, field: str) -> None:
        a, _ = await self.mdb_seeded()
        with pytest.raises(InvalidInput, match="string or integer fields"):
            parse_find(a.fields, {"search": "1", "searchFields": field})


__all__ = ["MDB_FIELDS", "MDB_ROWS", "MoleculerDbQueryCases"]
