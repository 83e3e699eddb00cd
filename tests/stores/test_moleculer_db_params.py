"""The read actions take moleculer-db's params as moleculer-db 0.8 reads them (issue 18).

Each case is what moleculer-db's ``sanitizeParams``, ``_count``, ``_list`` and ``_get`` do with
the params (and its MemoryAdapter with ``limit``), over the reference (memory) store.
"""

from __future__ import annotations

from typing import Any

import pytest

from moleculerpy_cqrs.errors import EntityNotFoundError, InvalidInput
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.backends.memory import MemoryDatabase

FIELDS = {"name": "string", "total": "integer", "note": "string"}
ROWS = 25


async def _actions() -> StoreActions:
    adapter = MemoryDatabase().adapter("orders", FIELDS)
    await adapter.connect()
    for n in range(ROWS):
        await adapter.insert({"name": f"n{n:02}", "total": n * 10, "note": "x" if n % 2 else None})
    return StoreActions(adapter)


async def test_find_limit_zero_is_no_limit() -> None:
    actions = await _actions()
    assert len(await actions.find({"limit": 0})) == ROWS
    assert len(await actions.find({"limit": "0", "offset": 20})) == ROWS - 20


@pytest.mark.parametrize(
    "query", ['{"total": {">": 200}}', '{"$or": [{"total": 210}, {"total": {"$gte": 220}}]}']
)
async def test_query_as_json_text_is_the_object(query: str) -> None:
    actions = await _actions()
    rows = await actions.find({"query": query, "sort": "total"})
    assert [r["total"] for r in rows] == [210, 220, 230, 240]
    assert await actions.count({"query": query}) == 4
    assert (await actions.list_page({"query": query}))["total"] == 4


@pytest.mark.parametrize(
    ("page_size", "expected"),
    [(0, 10), ("0", 10), (None, 10), ("", 10), (7, 7), ("7", 7), (500, 100), ("500", 100)],
)
async def test_list_page_size_defaults_and_caps(page_size: Any, expected: int) -> None:
    actions = await _actions()
    params = {} if page_size is None else {"pageSize": page_size}
    page = await actions.list_page(params)
    assert page["pageSize"] == expected
    assert len(page["rows"]) == min(expected, ROWS)
    assert page["totalPages"] == -(-ROWS // expected)


async def test_list_drops_limit_and_offset() -> None:
    actions = await _actions()
    page = await actions.list_page({"limit": 1, "offset": 3, "pageSize": 5, "sort": "total"})
    assert [r["total"] for r in page["rows"]] == [0, 10, 20, 30, 40]


async def test_count_drops_paging_sort_and_shape() -> None:
    actions = await _actions()
    params = {"limit": 1, "offset": 3, "sort": "-total", "fields": ["name"], "page": 2}
    assert await actions.count(params) == ROWS


async def test_exclude_fields_removes_them_after_fields() -> None:
    actions = await _actions()
    rows = await actions.find({"excludeFields": "note,total", "limit": 1, "sort": "total"})
    assert rows == [{"id": rows[0]["id"], "name": "n00"}]
    page = await actions.list_page({"excludeFields": ["name", "id"], "pageSize": 1})
    assert page["rows"] == [{"total": 0, "note": None}]
    one = await actions.get({"id": rows[0]["id"], "fields": "name total", "excludeFields": "total"})
    assert one == {"name": "n00"}


async def test_exclude_fields_names_declared_fields() -> None:
    actions = await _actions()
    with pytest.raises(InvalidInput, match="unknown field 'colour'"):
        await actions.find({"excludeFields": ["colour"]})


async def test_get_with_mapping_answers_an_object_keyed_by_id() -> None:
    actions = await _actions()
    first, second = await actions.find({"sort": "total", "limit": 2})
    mapped = await actions.get({"id": [second["id"], first["id"], 999], "mapping": True})
    assert mapped == {str(first["id"]): first, str(second["id"]): second}
    one = await actions.get({"id": first["id"], "mapping": True, "fields": ["name"]})
    assert one == {str(first["id"]): {"name": "n00"}}
    assert await actions.get({"id": [], "mapping": True}) == {}
    assert await actions.get({"id": [first["id"]], "mapping": False}) == [first]


async def test_isearch_is_search() -> None:
    actions = await _actions()
    assert await actions.count({"iSearch": "N1"}) == 10
    # as moleculer-db's SQL adapter: search, when given, wins
    assert await actions.count({"search": "n01", "iSearch": "N1"}) == 1


@pytest.mark.parametrize("populate", ["author", ["author"]])
async def test_populate_without_rules_is_refused_saying_why(populate: Any) -> None:
    actions = await _actions()
    for call in (actions.find, actions.list_page):
        with pytest.raises(InvalidInput, match=r"names no populate rule.*declares none"):
            await call({"populate": populate})
    with pytest.raises(InvalidInput, match="names no populate rule"):
        await actions.get({"id": 1, "populate": populate})
    assert len(await actions.find({"populate": [], "limit": 2})) == 2


def test_entity_not_found_is_shaped_as_moleculer_db_shapes_it() -> None:
    # moleculer-db: new MoleculerClientError("Entity not found", 404, null, { id })
    plain = EntityNotFoundError(7, store="orders").to_dict()
    assert (plain["name"], plain["code"], plain["type"], plain["data"]) == (
        "EntityNotFoundError",
        404,
        None,
        {"id": 7},
    )
    assert plain["message"].startswith("Entity not found")
    assert "orders" in plain["message"]
