"""The aggregate as one batch of the projector sees it, before anything is written.

The projector runs a batch's transformations with no database transaction open. What they
read of their own aggregate is the committed table plus the effect of every earlier event of
the batch: a :class:`BatchView` holds those effects in memory (rows created, changed and
removed, with the ids the batch gave them) and answers reads by merging them into what the
table holds. Reads of the table are cached for the batch (only the projector writes the
aggregate, so the table does not change under it). At the end, :meth:`BatchView.changes` is
what the batch does to the table, written in one short transaction.

Each event's effects can be undone (:meth:`mark` / :meth:`undo`): a transformation that fails
discards only its own event's effects.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Final

from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.base import Adapter, Changes, unique_conflict
from moleculerpy_cqrs.stores.fields import ID, FieldType, Record, check_id, check_record
from moleculerpy_cqrs.stores.query import ALL, Compare, Condition, Query, matches, sort_key

LAST_ID_KEY: Final = "lastId"
_ABSENT: Final = object()


class IdCounter:
    """The last id the projector gave a row of its aggregate.

    Kept in the aggregate's meta with every batch, so ids are a function of the log: a
    restore brings the counter back with the rows, and a replay starts it again from 0.
    """

    def __init__(self) -> None:
        self.last: int | None = None  # None: not read yet (or to be read again)

    async def load(self, adapter: Adapter) -> int:
        if self.last is None:
            stored = int(await adapter.get_meta(LAST_ID_KEY) or 0)
            top = await adapter.find(Query(sort=((ID, True),), limit=1, fields=(ID,)))
            self.last = max(stored, top[0][ID] if top else 0)
        return self.last

    def forget(self) -> None:
        self.last = None


class BatchView:
    """Reads and writes of one batch over ``adapter`` (see the module docstring)."""

    def __init__(self, adapter: Adapter, ids: IdCounter) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.fields: dict[str, FieldType] = adapter.fields
        self._ids = ids
        self._last_id: int | None = None
        self._rows: dict[int, Record | None] = {}  # as the batch leaves them (None: removed)
        self._original: dict[int, Record | None] = {}  # as committed (None: made by the batch)
        self._changed: dict[int, set[str]] = {}  # committed rows: the fields the batch set
        self._undo: list[tuple[int, Any, Any, set[str] | None]] = []
        self._found: dict[Query, list[Record]] = {}
        self._counted: dict[Query, int] = {}
        self._got: dict[int, Record | None] = {}
        self._json = tuple(n for n, k in self.fields.items() if k == "json")
        self._displaced = 0  # committed rows the batch changed or removed
        self.event_marks: dict[int, int] = {}  # event id -> mark before its effects

    # ------------------------------------------------------------------ reads

    async def find(self, query: Query = ALL) -> list[Record]:
        if not self._rows:
            return [self._out(r, query.fields) for r in await self._committed(query)]
        limit = None if query.limit is None else query.offset + query.limit + self._displaced
        wide = Query(where=query.where, sort=query.sort, limit=limit)
        rows = [r for r in await self._committed(wide) if r[ID] not in self._rows]
        rows += [r for r in self._rows.values() if r is not None and matches(query.where, r)]
        rows.sort(key=sort_key(query.sort))
        end = None if query.limit is None else query.offset + query.limit
        return [self._out(r, query.fields) for r in rows[query.offset : end]]

    async def count(self, query: Query = ALL) -> int:
        counted = self._counted.get(query) if _hashable(query) else None
        if counted is None:
            counted = await self.adapter.count(query)
            if _hashable(query):
                self._counted[query] = counted
        where = query.where
        gone = sum(1 for o in self._original.values() if o is not None and matches(where, o))
        now = sum(1 for r in self._rows.values() if r is not None and matches(where, r))
        return counted - gone + now

    async def get(self, entity_id: Any) -> Record | None:
        row = await self._row(check_id(entity_id))
        return None if row is None else self._out(row)

    async def get_many(self, ids: Sequence[Any]) -> list[Record]:
        rows = [await self.get(i) for i in ids]
        return [r for r in rows if r is not None]

    # ------------------------------------------------------------------ writes

    async def create(self, record: Any) -> Record:
        checked = check_record(self.fields, _without_id(record))
        await self._refuse_duplicates(0, checked)
        last_id = self._last_id
        entity_id = await self._next_id()
        row = {ID: entity_id, **checked}
        self._set(entity_id, row, None, last_id)
        return row

    async def update(self, entity_id: Any, changes: Any) -> Record:
        checked = check_record(self.fields, _without_id(changes), partial=True)
        entity_id = check_id(entity_id)
        current = await self._row(entity_id)
        if current is None:
            raise InvalidInput(f"update: no row with id {entity_id!r} in {self.name}", field=ID)
        await self._refuse_duplicates(entity_id, checked)
        row = {**current, **checked}
        self._set(entity_id, row, set(checked), self._last_id)
        return row

    async def remove(self, entity_id: Any) -> None:
        entity_id = check_id(entity_id)
        if await self._row(entity_id) is not None:
            self._set(entity_id, None, None, self._last_id)

    async def remove_where(self, where: Condition | None) -> None:
        for row in await self.find(Query(where=where, fields=(ID,))):
            await self.remove(row[ID])

    # ------------------------------------------------------------------ one event at a time

    def mark(self) -> int:
        """A point to :meth:`undo` back to (before one event's effects)."""
        return len(self._undo)

    def begin_event(self, event_id: int) -> None:
        """Note where the effects of event ``event_id`` begin (its first binding)."""
        self.event_marks.setdefault(event_id, len(self._undo))

    def undo(self, mark: int) -> None:
        while len(self._undo) > mark:
            entity_id, rows_before, last_id_before, changed_before = self._undo.pop()
            self._last_id = last_id_before
            if rows_before is _ABSENT:
                del self._rows[entity_id]
                if self._original.pop(entity_id, None) is not None:
                    self._displaced -= 1
            else:
                self._rows[entity_id] = rows_before
            if changed_before is None:
                self._changed.pop(entity_id, None)
            else:
                self._changed[entity_id] = changed_before

    # ------------------------------------------------------------------ the outcome

    def changes(self) -> Changes:
        """What the batch does to the table (and the id counter, in meta)."""
        out = Changes()
        for entity_id, row in self._rows.items():
            if self._original[entity_id] is None:
                if row is not None:
                    out.inserts.append(row)
            elif row is None:
                out.deletes.append(entity_id)
            elif self._changed.get(entity_id):
                out.updates[entity_id] = {n: row[n] for n in self._changed[entity_id]}
        if self._last_id is not None:
            out.meta[LAST_ID_KEY] = self._last_id
        return out

    def written(self) -> None:
        """The changes were committed: the id counter moves on."""
        if self._last_id is not None:
            self._ids.last = self._last_id

    # ------------------------------------------------------------------ plumbing

    async def _next_id(self) -> int:
        if self._last_id is None:
            self._last_id = await self._ids.load(self.adapter)
        self._last_id += 1
        return self._last_id

    async def _refuse_duplicates(self, entity_id: int, changes: Record) -> None:
        """A unique field may not take a value another row holds: this event's effect fails
        here (dead-lettered, or halting), rather than the whole batch's write."""
        for name, unique in self.adapter.indexes.items():
            value = changes.get(name)
            if unique and value is not None:
                query = Query(where=Compare(name, "=", value), limit=2, fields=(ID,))
                if any(r[ID] != entity_id for r in await self.find(query)):
                    raise unique_conflict(self.name, name, value)

    async def _row(self, entity_id: int) -> Record | None:
        """The row as the batch sees it (not a copy: never hand it out)."""
        if entity_id in self._rows:
            return self._rows[entity_id]
        if entity_id not in self._got:
            self._got[entity_id] = await self.adapter.get(entity_id)
        return self._got[entity_id]

    def _set(
        self, entity_id: int, row: Record | None, fields: set[str] | None, last_id: int | None
    ) -> None:
        """Record ``row`` as the batch's version of ``entity_id``; ``last_id`` is the id
        counter before this change (undo puts it back)."""
        before = self._rows.get(entity_id, _ABSENT)
        changed = self._changed.get(entity_id)
        self._undo.append((entity_id, before, last_id, None if changed is None else set(changed)))
        if before is _ABSENT:
            original = self._got.get(entity_id)
            self._original[entity_id] = original
            if original is not None:
                self._displaced += 1
        self._rows[entity_id] = row
        if fields:
            self._changed.setdefault(entity_id, set()).update(fields)

    async def _committed(self, query: Query) -> list[Record]:
        if not _hashable(query):
            return await self.adapter.find(query)
        rows = self._found.get(query)
        if rows is None:
            rows = self._found[query] = await self.adapter.find(query)
            for row in rows:
                if query.fields is None:
                    self._got.setdefault(row[ID], row)
        return rows

    def _out(self, row: Record, names: tuple[str, ...] | None = None) -> Record:
        out = {n: row.get(n) for n in names} if names else dict(row)
        for name in self._json:
            if name in out and isinstance(out[name], dict | list):
                out[name] = copy.deepcopy(out[name])
        return out


def _hashable(query: Query) -> bool:
    try:
        hash(query)
    except TypeError:
        return False
    return True


def _without_id(record: Any) -> Any:
    if isinstance(record, dict) and ID in record:
        return {k: v for k, v in record.items() if k != ID}
    return record
