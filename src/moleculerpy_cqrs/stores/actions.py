"""The store actions a service gets from a store, moleculer-db compatible.

Each method takes an action's params, checks them completely before touching the store, and
answers what moleculer-db (and the Go store) answers. Bad params raise :class:`InvalidInput`
(422) and change nothing; a missing id raises :class:`EntityNotFound` (404).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from moleculerpy_cqrs.errors import Conflict, EntityNotFound, InvalidInput
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.fields import ID, MAX_INT, FieldType, Record, check_count, check_id
from moleculerpy_cqrs.stores.query import Query, parse_condition, parse_find, parse_projection

DEFAULT_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 100


class Readable(Protocol):
    """What the read actions need: an :class:`Adapter`, or a view of one (a projector's
    open batch)."""

    name: str
    fields: dict[str, FieldType]

    async def find(self, query: Query = ...) -> list[Record]: ...

    async def count(self, query: Query = ...) -> int: ...

    async def get(self, entity_id: Any) -> Record | None: ...

    async def get_many(self, ids: Sequence[Any]) -> list[Record]: ...


class StoreActions:
    """find / count / list / get / create / insert / update / remove over one adapter."""

    def __init__(self, adapter: Readable, *, max_page_size: int = MAX_PAGE_SIZE) -> None:
        self.adapter = adapter
        self.max_page_size = max_page_size

    @property
    def writable(self) -> Adapter:
        if not isinstance(self.adapter, Adapter):
            raise Conflict(
                f"{self.adapter.name} is being projected: a transformation answers the changes "
                "it wants made; it does not write its aggregate itself"
            )
        return self.adapter

    async def find(self, params: Mapping[str, Any]) -> list[Record]:
        return await self.adapter.find(parse_find(self.adapter.fields, _params(params)))

    async def count(self, params: Mapping[str, Any]) -> int:
        params = _params(params)
        extra = [k for k in params if k in ("sort", "limit", "offset", "fields")]
        if extra:
            raise InvalidInput(f"count does not take {extra[0]!r}", field=extra[0])
        return await self.adapter.count(parse_find(self.adapter.fields, params))

    async def list_page(self, params: Mapping[str, Any]) -> dict[str, Any]:
        params = _params(params)
        if "limit" in params or "offset" in params:
            raise InvalidInput("list pages with page and pageSize, not limit/offset")
        raw_size = params.get("pageSize", DEFAULT_PAGE_SIZE)
        size = check_count("pageSize", raw_size, minimum=1, maximum=self.max_page_size)
        # The page's offset must fit in the 64-bit integer every backend takes.
        page = check_count("page", params.get("page", 1), minimum=1, maximum=MAX_INT // size)
        base = parse_find(self.adapter.fields, params, extra=frozenset({"page", "pageSize"}))
        query = Query(
            where=base.where,
            sort=base.sort,
            limit=size,
            offset=(page - 1) * size,
            fields=base.fields,
        )
        total = await self.adapter.count(base)
        rows = await self.adapter.find(query)
        return {
            "rows": rows,
            "total": total,
            "page": page,
            "pageSize": size,
            "totalPages": math.ceil(total / size) if total else 0,
        }

    async def get(self, params: Mapping[str, Any]) -> Record | list[Record]:
        params = _params(params)
        _only(params, {"id", "fields"}, "get")
        if "id" not in params:
            raise InvalidInput("id field required!", field="id")
        projection = parse_projection(self.adapter.fields, params.get("fields"))
        raw = params["id"]
        if isinstance(raw, list):
            rows = await self.adapter.get_many(raw)
            return [_project(r, projection) for r in rows]
        row = await self.adapter.get(raw)
        if row is None:
            raise EntityNotFound(raw, store=self.adapter.name)
        return _project(row, projection)

    async def create(self, params: Mapping[str, Any]) -> Record:
        params = _params(params)
        if not params:
            raise InvalidInput("params cannot be empty!")
        if ID in params:
            raise InvalidInput("create assigns the id itself; use update to change a row", field=ID)
        return await self.writable.insert(params)

    async def insert(self, params: Mapping[str, Any]) -> Record | list[Record]:
        params = _params(params)
        _only(params, {"entity", "entities"}, "insert")
        if "entities" in params:
            entities = params["entities"]
            if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
                raise InvalidInput("entities must be a list of objects", field="entities")
            if any(ID in e for e in entities):
                raise InvalidInput("insert assigns ids itself", field=ID)
            return await self.writable.insert_many(entities)
        if "entity" in params:
            entity = params["entity"]
            if not isinstance(entity, dict) or not entity:
                raise InvalidInput("entity must be a non-empty object", field="entity")
            if ID in entity:
                raise InvalidInput("insert assigns ids itself", field=ID)
            return await self.writable.insert(entity)
        raise InvalidInput("insert needs entity (an object) or entities (a list)")

    async def update(self, params: Mapping[str, Any]) -> Record:
        params = dict(_params(params))
        if ID not in params:
            raise InvalidInput("id field required!", field="id")
        entity_id = check_id(params.pop(ID))
        if not params:
            raise InvalidInput("update needs at least one field to change")
        row = await self.writable.update(entity_id, params)
        if row is None:
            raise EntityNotFound(entity_id, store=self.adapter.name)
        return row

    async def remove(self, params: Mapping[str, Any]) -> Record:
        params = _params(params)
        _only(params, {"id"}, "remove")
        if ID not in params:
            raise InvalidInput("id field required!", field="id")
        row = await self.writable.remove(params[ID])
        if row is None:
            raise EntityNotFound(params[ID], store=self.adapter.name)
        return {**row, "deletedCount": 1}

    async def remove_where(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Remove every row matching ``query`` (used by transformations that remove)."""
        params = _params(params)
        _only(params, {"query"}, "remove_where")
        cond = parse_condition(self.adapter.fields, params.get("query"))
        return {"deletedCount": await self.writable.remove_many(Query(where=cond))}


def _params(params: Any) -> Mapping[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidInput(f"params must be an object, got {type(params).__name__}")
    return params


def _only(params: Mapping[str, Any], allowed: set[str], action: str) -> None:
    for key in params:
        if key not in allowed:
            raise InvalidInput(
                f"{action} does not take {key!r}; it takes {sorted(allowed)}", field=str(key)
            )


def _project(row: Record, fields: tuple[str, ...] | None) -> Record:
    return row if fields is None else {k: row.get(k) for k in fields}
