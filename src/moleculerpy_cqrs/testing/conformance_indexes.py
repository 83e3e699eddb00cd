"""Conformance cases for declared indexes and unique fields (part of
:class:`~moleculerpy_cqrs.testing.conformance.AdapterConformance`).

Whether a backend's query planner actually uses an index is its own test (a query plan is
backend-specific); these cases check what every backend must answer alike: lookups through an
index agree with the reference semantics, also inside a transaction, and a unique field refuses
a duplicate everywhere a row is written, with a 409 that names the field, changing nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from moleculerpy_cqrs.errors import ConflictError
from moleculerpy_cqrs.stores.base import Adapter, Changes
from moleculerpy_cqrs.stores.fields import Declarations
from moleculerpy_cqrs.stores.query import Query, matches, parse_find
from moleculerpy_cqrs.testing.conformance_base import DAY, T0, AdapterCase, doomed

INDEXED_FIELDS: Declarations = {
    "sku": {"type": "string", "unique": True},
    "owner": {"type": "string", "index": True},
    "n": {"type": "integer", "index": True},
    "at": {"type": "datetime", "index": True},
    "note": "string",
}
INDEXED_ROWS: list[dict[str, Any]] = [
    {"sku": "a-1", "owner": "ann", "n": 1, "at": T0},
    {"sku": "a-2", "owner": "bob", "n": 2, "at": T0 + DAY},
    {"sku": "a-3", "owner": "ann", "n": 3, "at": None},
    {"sku": None, "owner": None, "n": None, "at": T0 + 2 * DAY},
    {"sku": None, "owner": "cy", "n": 2, "at": T0 - DAY},
]
LOOKUPS: list[dict[str, Any]] = [
    {"owner": "ann"},
    {"owner": "nobody"},
    {"sku": "a-2"},
    {"n": 2},
    {"query": {"owner": {"in": ["bob", "cy", "zed"]}}},
    {"query": {"sku": {"in": ["a-1", "a-3"]}}},
    {"query": {"n": {">=": 2}}},
    {"query": {"n": {"between": [1, 2]}}},
    {"query": {"at": {">": T0.isoformat()}}},
    {"owner": "ann", "query": {"n": {">": 1}}},
    {"query": {"$or": [{"owner": "bob"}, {"sku": "a-1"}]}},
]


class IndexCases(AdapterCase):
    async def indexed(self, name: str = "things") -> tuple[Adapter, list[dict[str, Any]]]:
        adapter = await self.open(name, INDEXED_FIELDS)
        return adapter, await adapter.insert_many(INDEXED_ROWS)

    @staticmethod
    async def agrees(adapter: Adapter, rows: list[dict[str, Any]]) -> None:
        for params in LOOKUPS:
            query = parse_find(adapter.fields, params)
            expected = sorted(r["id"] for r in rows if matches(query.where, r))
            assert [r["id"] for r in await adapter.find(query)] == expected, params
            assert await adapter.count(query) == len(expected), params

    @staticmethod
    def conflict_of(error: pytest.ExceptionInfo[ConflictError], field: str, value: Any) -> None:
        assert error.value.code == 409
        assert error.value.data["field"] == field
        assert error.value.data["value"] == value
        assert repr(field) in str(error.value)
        assert repr(value) in str(error.value)

    async def test_lookups_through_indexes_agree_with_the_reference(self) -> None:
        a, rows = await self.indexed()
        await self.agrees(a, rows)

    async def test_lookups_inside_a_transaction_see_its_own_writes(self) -> None:
        a, rows = await self.indexed()
        async with doomed(a):
            moved = await a.update(rows[0]["id"], {"owner": "bob", "sku": "b-1", "n": 9})
            added = await a.insert({"sku": "a-1", "owner": "ann", "n": 2})
            await a.remove(rows[1]["id"])
            now = [moved, rows[2], rows[3], rows[4], added]
            await self.agrees(a, [r for r in now if r is not None])
        await self.agrees(a, rows)  # rolled back: the indexes hold the committed rows again

    async def test_a_unique_field_refuses_a_duplicate_insert(self) -> None:
        a, rows = await self.indexed()
        with pytest.raises(ConflictError) as error:
            await a.insert({"sku": "a-2", "owner": "dan"})
        self.conflict_of(error, "sku", "a-2")
        with pytest.raises(ConflictError) as error:
            await a.insert_many([{"sku": "new"}, {"sku": "b-9"}, {"sku": "b-9"}])
        self.conflict_of(error, "sku", "b-9")
        assert await a.find() == rows

    async def test_a_unique_field_refuses_a_duplicate_update(self) -> None:
        a, rows = await self.indexed()
        with pytest.raises(ConflictError) as error:
            await a.update(rows[0]["id"], {"sku": "a-3", "note": "x"})
        self.conflict_of(error, "sku", "a-3")
        with pytest.raises(ConflictError):
            await a.update_many(parse_find(a.fields, {"owner": "ann"}), {"sku": "same"})
        assert await a.find() == rows

    async def test_a_unique_field_refuses_a_duplicate_apply_and_nothing_is_written(self) -> None:
        a, rows = await self.indexed()
        await a.set_meta("checkpoint", 5)
        cases = [
            Changes(inserts=[{"id": 100, **dict.fromkeys(a.fields), "sku": "a-1"}]),
            Changes(updates={rows[1]["id"]: {"sku": "a-3"}}),
            Changes(inserts=[{**dict.fromkeys(a.fields), "sku": "z"}] * 2),
        ]
        for changes in cases:
            changes.meta["other"] = 1
            with pytest.raises(ConflictError) as error:
                await a.apply(changes, advance=("checkpoint", 5, 6))
            assert error.value.data["field"] == "sku"
        assert await a.find() == rows
        assert (await a.get_meta("checkpoint"), await a.get_meta("other")) == (5, None)

    async def test_a_unique_field_refuses_a_duplicate_append(self) -> None:
        log = await self.open("log", {"event": "string", "key": {"type": "string", "unique": True}})
        first = await log.append([{"event": "a", "key": "k1"}])
        with pytest.raises(ConflictError) as error:
            await log.append([{"event": "b", "key": "k2"}, {"event": "c", "key": "k1"}])
        self.conflict_of(error, "key", "k1")
        with pytest.raises(ConflictError):
            await log.append_checked([log.check_row({"event": "d", "key": "k1"})])
        assert await log.read_after(0, 10) == first
        assert await log.head() == first[0]["id"]

    async def test_a_unique_field_allows_many_nulls_and_a_freed_value_again(self) -> None:
        a, rows = await self.indexed()
        await a.insert_many([{"owner": "x"}, {"owner": "y"}])
        await a.remove(rows[0]["id"])
        again = await a.insert({"sku": "a-1"})
        async with a.transaction():  # moved within one transaction: free, then taken
            await a.update(rows[1]["id"], {"sku": "gone"})
            await a.insert({"sku": "a-2"})
        assert await a.count(parse_find(a.fields, {"sku": "a-1"})) == 1
        assert [r["id"] for r in await a.find(parse_find(a.fields, {"sku": "a-1"}))] == [
            again["id"]
        ]

    async def test_a_conflict_inside_a_transaction_rolls_it_back(self) -> None:
        a, rows = await self.indexed()

        async def both() -> None:
            async with a.transaction():
                await a.insert({"sku": "fresh"})
                await a.insert({"sku": "a-1"})

        with pytest.raises(ConflictError):
            await both()
        assert await a.find() == rows

    async def test_indexes_are_created_for_an_existing_table_and_follow_the_declaration(
        self,
    ) -> None:
        plain = {n: "string" if n != "n" else "integer" for n in ("sku", "owner", "n", "note")}
        first = await self.open("things", plain)
        await first.insert_many([{"sku": "s"}, {"sku": "t"}])
        later = await self.open("things", INDEXED_FIELDS)
        with pytest.raises(ConflictError):
            await later.insert({"sku": "s"})
        relaxed = await self.open("things", {**INDEXED_FIELDS, "sku": {"type": "string"}})
        await relaxed.insert({"sku": "s"})  # no longer unique: the index is gone
        assert await relaxed.count(parse_find(relaxed.fields, {"sku": "s"})) == 2

    async def test_restore_keeps_indexes(self) -> None:
        a, rows = await self.indexed()
        location = self.tmp_location()
        await a.backup(location)
        await a.insert({"sku": "later"})
        await a.restore(location)
        await self.agrees(a, rows)
        with pytest.raises(ConflictError):
            await a.insert({"sku": "a-1"})
        await a.insert({"sku": "later"})

    async def test_replace_with_keeps_indexes_on_both_tables(self) -> None:
        a, _ = await self.indexed()
        shadow = await self.open_sibling(a, "things_shadow", a.specs)
        new_rows = await shadow.insert_many(INDEXED_ROWS[1:])
        with pytest.raises(ConflictError):
            await shadow.insert({"sku": "a-2"})
        async with a.transaction():
            await a.replace_with(shadow)
        await self.agrees(a, new_rows)
        with pytest.raises(ConflictError):
            await a.insert({"sku": "a-3"})
        await shadow.insert({"sku": "a-3"})
        with pytest.raises(ConflictError):
            await shadow.insert({"sku": "a-3"})
        await self.agrees(shadow, await shadow.find(Query()))
