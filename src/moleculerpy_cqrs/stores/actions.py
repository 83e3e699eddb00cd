"""The store actions a service gets from a store, moleculer-db compatible.

Each method takes an action's params, checks them completely before touching the store, and
answers what moleculer-db (and the Go store) answers. Bad params raise :class:`InvalidInput`
(422) and change nothing; a missing id raises :class:`EntityNotFound` (404).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from moleculerpy_cqrs.errors import Conflict, EntityNotFound, InvalidInput
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.fields import ID, MAX_INT, FieldType, Record, check_count, check_id
from moleculerpy_cqrs.stores.populate import Populator, requested
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
    """find / count / list / get / create / insert / update / remove over one adapter.

    ``populator``: the ``populates`` rules and how to call their services (the broker layer
    gives them); without it, ``populate`` is refused, saying that no rule is declared."""

    def __init__(
        self,
        adapter: Readable,
        *,
        max_page_size: int = MAX_PAGE_SIZE,
        populator: Populator | None = None,
    ) -> None:
        self.adapter = adapter
        self.max_page_size = max_page_size
        self.populator = populator

    @property
    def writable(self) -> Adapter:
        if not isinstance(self.adapter, Adapter):
            raise Conflict(
                f"{self.adapter.name} is being projected: a transformation answers the changes "
                "it wants made; it does not write its aggregate itself"
            )
        return self.adapter

    async def find(self, params: Mapping[str, Any]) -> list[Record]:
        params = _params(params)
        shape = self._shape(params)
        query = parse_find(self.adapter.fields, shape.unshaped(params), extra=_ROW_OPTIONS)
        return await shape.apply(self, await self.adapter.find(query))

    async def count(self, params: Mapping[str, Any]) -> int:
        params = _params(params)
        # moleculer-db's count drops paging (and never sorts or shapes rows): so does this.
        params = {k: v for k, v in params.items() if k not in _COUNT_DROPS}
        return await self.adapter.count(parse_find(self.adapter.fields, params))

    async def list_page(self, params: Mapping[str, Any]) -> dict[str, Any]:
        params = _params(params)
        shape = self._shape(params)
        # moleculer-db computes limit and offset from page and pageSize, over any given.
        params = {k: v for k, v in params.items() if k not in ("limit", "offset")}
        size = _page_size(params.get("pageSize"), self.max_page_size)
        # The page's offset must fit in the 64-bit integer every backend takes.
        page = check_count("page", params.get("page", 1), minimum=1, maximum=MAX_INT // size)
        base = parse_find(
            self.adapter.fields,
            shape.unshaped(params),
            extra=_ROW_OPTIONS | {"page", "pageSize"},
        )
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
            "rows": await shape.apply(self, rows),
            "total": total,
            "page": page,
            "pageSize": size,
            "totalPages": math.ceil(total / size) if total else 0,
        }

    async def get(self, params: Mapping[str, Any]) -> Record | list[Record] | dict[str, Record]:
        params = _params(params)
        _only(params, {"id", "fields", "excludeFields", "mapping", "populate"}, "get")
        if "id" not in params:
            raise InvalidInput("id field required!", field="id")
        shape = self._shape(params, always=True)
        mapping = params.get("mapping", False)
        if not isinstance(mapping, bool):
            raise InvalidInput("mapping must be true or false", field="mapping", got=mapping)
        raw = params["id"]
        if isinstance(raw, list):
            rows = await self.adapter.get_many(raw)
            ids = [row[ID] for row in rows]
            shaped = await shape.apply(self, rows)
            if not mapping:
                return shaped
            # moleculer-db's mapping: an object keyed by id (JSON keys are text), which is how
            # its populate fetches related rows from another service.
            return {str(i): out for i, out in zip(ids, shaped, strict=True)}
        row = await self.adapter.get(raw)
        if row is None:
            raise EntityNotFound(raw, store=self.adapter.name)
        entity_id = row[ID]
        out = (await shape.apply(self, [row]))[0]
        return {str(entity_id): out} if mapping else out

    def _shape(self, params: Mapping[str, Any], *, always: bool = False) -> _Shape:
        """moleculer-db's row options, checked: ``populate``, then ``fields``, then
        ``excludeFields``, in its order. ``fields`` goes to the query unless rows are
        populated first (or ``always``: ``get`` projects its rows itself)."""
        rules = self.populator.rules if self.populator is not None else {}
        wanted = requested(rules, params.get("populate"))
        known = self.adapter.fields
        if rules:  # a rule's key may be named in fields and excludeFields too
            known = {**known, **{k: known.get(k, "json") for k in rules}}
        projection = exclusion = None
        if wanted or always:
            projection = parse_projection(known, params.get("fields"))
        raw = params.get("excludeFields")
        if raw is not None:
            exclusion = frozenset(parse_projection(known, raw) or ())
        return _Shape(wanted, projection, exclusion, own=bool(wanted) or always)

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


_ROW_OPTIONS: Final = frozenset({"excludeFields", "populate"})
_COUNT_DROPS: Final = frozenset(
    {"limit", "offset", "sort", "fields", "excludeFields", "populate", "page", "pageSize"}
)


@dataclass(frozen=True, slots=True)
class _Shape:
    populate: Mapping[str, list[str]]
    fields: tuple[str, ...] | None
    exclude: frozenset[str] | None
    own: bool  # fields are applied here, after populate, not by the query

    def unshaped(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """The params for the query: without ``fields`` when they are applied here."""
        return {k: v for k, v in params.items() if k != "fields"} if self.own else params

    async def apply(self, actions: StoreActions, rows: list[Record]) -> list[Record]:
        if self.populate:
            assert actions.populator is not None
            rows = [dict(r) for r in rows]
            await actions.populator.populate(rows, self.populate)
        if self.own:
            rows = [_project(r, self.fields) for r in rows]
        return _exclude(rows, self.exclude or frozenset())


def _page_size(raw: Any, maximum: int) -> int:
    """``pageSize`` as moleculer-db reads it: a whole number (or text of ASCII digits) from 0;
    0 or none is the default size, and a size above the maximum is the maximum."""
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 1000:
        raw = int(raw)
    if raw is None or raw == "":
        raw = 0
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise InvalidInput(
            f"pageSize must be a non-negative integer (ASCII digits; 0 is the default "
            f"{DEFAULT_PAGE_SIZE}, above {maximum} is {maximum}), got {raw!r}",
            field="pageSize",
            got=raw,
        )
    return min(raw or DEFAULT_PAGE_SIZE, maximum)


def _exclude(rows: list[Record], excluded: frozenset[str]) -> list[Record]:
    if not excluded:
        return rows
    return [{k: v for k, v in row.items() if k not in excluded} for row in rows]


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
