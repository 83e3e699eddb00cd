"""The aggregate as one batch of the projector sees it, before anything is written.

The projector runs a batch's transformations with no database transaction open. What they
read of their own aggregate is the committed table plus the effect of every earlier event of
the batch: a :class:`BatchView` holds those effects in memory (rows created, changed and
removed, with the ids the batch gave them) and answers reads by merging them into what the
table holds. Reads of the table are cached for the batch (only the projector writes the
aggregate, so the table does not change under it). At the end, :meth:`BatchView.changes` is
what the batch does to the table, written in one short transaction.

Each binding's effects can be undone (:meth:`mark` / :meth:`undo`): a transformation that
fails discards only its own effects (and, when the projector halts, the view is taken back to
the start of the event, see :attr:`BatchView.event_marks`).

Lookups cost the same whatever the batch size and the table size:

- The overlay keeps its own index (:class:`_OverlayIndex`, per field, value -> ids), built for a
  field the first time a read filters on it by equality or ``in``, and kept up to date by every
  later change and undo. Such a read tests only the rows the index names.
- :meth:`BatchView.prefetch` reads, in one query, every committed row whose ``field`` holds
  one of ``values`` (the keys of a batch's events, known before its transformations run). Reads
  pinned to those keys (equality or ``in`` on that field) are then answered from these rows
  and the overlay, with no round trip to the store.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Final

from moleculerpy_cqrs.errors import ConflictError, InvalidInput
from moleculerpy_cqrs.stores.base import unique_conflict
from moleculerpy_cqrs.stores.fields import (
    ID,
    FieldType,
    Record,
    check_id,
    check_record,
    check_value,
)
from moleculerpy_cqrs.stores.ports import Changes, ReadModel
from moleculerpy_cqrs.stores.query import (
    ALL,
    And,
    Compare,
    Condition,
    In,
    Or,
    Query,
    matches,
    sort_key,
)

LAST_ID_KEY: Final = "lastId"
_KEY_TYPES: Final = frozenset({str, int, float})  # values find_by_key takes (not bool, null)
PREFETCH_CHUNK: Final = 10_000  # values per prefetch query (far below every backend's limit)
_ABSENT: Final = object()


class _OverlayIndex:
    """Ids of a set of rows by the value of a field, for the fields reads have asked about.

    A field's map is built from ``rows`` on its first lookup and kept up to date by
    :meth:`moved` afterwards, so a lookup never walks every row. ``json`` fields are never
    indexed (they only take null checks); ``id`` needs no index (rows are keyed by it).
    """

    def __init__(self, rows: dict[int, Record | None], fields: dict[str, FieldType]) -> None:
        self._rows = rows
        self._indexable = frozenset(n for n, k in fields.items() if k != "json")
        self._by: dict[str, dict[Any, set[int]]] = {}

    def moved(self, entity_id: int, before: Record | None, after: Record | None) -> None:
        """``entity_id``'s row went from ``before`` to ``after`` (None: no row)."""
        for name, values in self._by.items():
            old = None if before is None else before.get(name)
            new = None if after is None else after.get(name)
            if old == new:  # None (no row, or no value) is never indexed
                continue
            if old is not None:
                ids = values.get(old)
                if ids is not None:
                    ids.discard(entity_id)
                    if not ids:
                        del values[old]
            if new is not None:
                values.setdefault(new, set()).add(entity_id)

    def candidates(self, where: Condition | None) -> Iterable[int] | None:
        """Ids of every row that may match ``where`` (a superset); None: every row may."""
        match where:
            case Compare(name, "=", value):
                return self._equal(name, (value,))
            case In(name, values, False):
                return self._equal(name, values)
            case And(items):
                best: Iterable[int] | None = None
                for item in items:
                    found = self.candidates(item)
                    if found is not None and (best is None or _size(found) < _size(best)):
                        best = found
                return best
            case Or(items):
                union: set[int] = set()
                for item in items:
                    found = self.candidates(item)
                    if found is None:
                        return None
                    union.update(found)
                return union
        return None

    def equal(self, name: str, value: Any) -> Iterable[int] | None:
        """Ids of every row whose ``name`` equals ``value``; None if ``name`` is not indexable."""
        return self._equal(name, (value,))

    def _equal(self, name: str, values: tuple[Any, ...]) -> Iterable[int] | None:
        if name == ID:
            return [v for v in dict.fromkeys(values) if v in self._rows]
        if name not in self._indexable:
            return None
        by = self._by.get(name)
        if by is None:
            by = self._by[name] = {}
            for entity_id, row in self._rows.items():
                if row is not None and row.get(name) is not None:
                    by.setdefault(row[name], set()).add(entity_id)
        if len(values) == 1:
            return by.get(values[0], ())
        out: set[int] = set()
        for value in values:
            out.update(by.get(value, ()))
        return out


def _size(ids: Iterable[int]) -> int:
    return len(ids) if isinstance(ids, set | list | tuple) else 0


def _matching(
    rows: dict[int, Record | None], index: _OverlayIndex, where: Condition | None
) -> list[Record]:
    """The rows of ``rows`` (not None) that match ``where``, found through ``index``."""
    ids = index.candidates(where)
    if ids is None:
        return [r for r in rows.values() if r is not None and matches(where, r)]
    if _exact(where):  # the index answered exactly these rows: no need to test each
        found = (rows.get(entity_id) for entity_id in ids)
        return [row for row in found if row is not None]
    out = []
    for entity_id in ids:
        row = rows.get(entity_id)
        if row is not None and matches(where, row):
            out.append(row)
    return out


def _exact(where: Condition | None) -> bool:
    """Whether the overlay index's candidates for ``where`` are exactly its matches: an
    equality or a plain ``in`` on one field (the index keys rows by the value itself, and
    ``matches`` tests these with ``==`` as a dict lookup does)."""
    match where:
        case Compare(_, "=", _) | In(_, _, False):
            return True
    return False


def checked_values(fields: dict[str, FieldType], field: str, values: Iterable[Any]) -> list[Any]:
    """``values`` as ``field`` holds them (checked), without repeats; a value not valid for
    the field is left out (a read for it would be refused anyway)."""
    kind = fields.get(field)
    if kind is None or kind == "json":
        raise InvalidInput(f"cannot prefetch by {field!r}: not a declared field", field=field)
    wanted: dict[Any, None] = {}
    for value in values:
        try:
            checked = check_value(field, kind, value)
        except (InvalidInput, TypeError):
            continue
        if checked is not None:
            wanted[checked] = None
    return list(wanted)


class EarlyRows:
    """The table's rows for a later batch's keys, read while the batches before it were
    still being transformed or written (the projector reads them beside the next batch's
    events, so the read does not wait in line).

    The read may miss the effects of ``over`` — the views of the batches whose writes had not
    landed when it began, in log order. :meth:`as_seen` lays each of them over the rows read,
    as a read through the chain of views would have answered: a row one of them touched is
    replaced by its version there (or dropped), and its rows holding a key are added. A view
    whose write landed before the read began is not in ``over``; one that landed during the
    read is laid over again, which changes nothing (its rows are the table's now)."""

    def __init__(
        self,
        field: str,
        values: Iterable[Any],
        rows: list[Record],
        over: list[BatchView],
        reads: int,
    ) -> None:
        self.field = field
        self.values = frozenset(values)
        self._rows = rows
        self._over = over
        self.reads = reads  # queries it took

    def as_seen(self, values: Iterable[Any]) -> list[Record]:
        """The rows holding one of ``values`` (all read here), as the last view in ``over``
        sees the table."""
        wanted = tuple(v for v in values if v in self.values)
        if not wanted:
            return []
        chosen = frozenset(wanted)
        rows = [r for r in self._rows if r[self.field] in chosen]
        where = In(self.field, wanted)
        for view in self._over:
            rows = view.laid_over(rows, where)
        return sorted((dict(r) for r in rows), key=_by_id)


class IdCounter:
    """The last id the projector gave a row of its aggregate.

    Kept in the aggregate's meta with every batch, so ids are a function of the log: a
    restore brings the counter back with the rows, and a replay starts it again from 0.
    """

    def __init__(self) -> None:
        self.last: int | None = None  # None: not read yet (or to be read again)

    async def load(self, adapter: ReadModel) -> int:
        if self.last is None:
            stored = int(await adapter.get_meta(LAST_ID_KEY) or 0)
            top = await adapter.find(Query(sort=((ID, True),), limit=1, fields=(ID,)))
            self.last = max(stored, top[0][ID] if top else 0)
        return self.last

    def forget(self) -> None:
        self.last = None


class BatchView:
    """Reads and writes of one batch over ``adapter`` (see the module docstring)."""

    def __init__(
        self, adapter: ReadModel, ids: IdCounter, *, after: BatchView | None = None
    ) -> None:
        self.adapter = adapter
        # Where committed rows are read: the table, or the batch before this one while its
        # write may still be under way (the projector's pipeline; see :meth:`rebase`).
        self._source: ReadModel | BatchView = adapter if after is None else after
        self._after = after
        self.writing = False  # set once this batch's write has started (see count)
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
        self._now = _OverlayIndex(self._rows, self.fields)
        self._was = _OverlayIndex(self._original, self.fields)
        # field -> value -> the committed rows holding it (see prefetch)
        self._prefetched: dict[str, dict[Any, list[Record]]] = {}
        self.store_reads = 0  # round trips to the store for reads (prefetches included)
        self._unique = tuple(name for name, unique in adapter.indexes.items() if unique)
        self.event_marks: dict[int, int] = {}  # event id -> mark before its effects

    # ------------------------------------------------------------------ reads

    async def find(self, query: Query = ALL) -> list[Record]:
        where = query.where
        pinned = self._pinned(where)
        if pinned is not None:  # prefetched: no round trip, and no query to build
            changed = self._rows
            rows = [r for r in pinned if r[ID] not in changed and matches(where, r)]
            if changed:
                rows += _matching(changed, self._now, where)
            return self._page(rows, query)
        if not self._rows:
            return [self._out(r, query.fields) for r in await self._committed(query)]
        limit = None if query.limit is None else query.offset + query.limit + self._displaced
        wide = Query(where=where, sort=query.sort, limit=limit)
        return self._page(self.laid_over(await self._committed(wide), where), query)

    def laid_over(self, rows: Iterable[Record], where: Condition | None) -> list[Record]:
        """``rows`` — rows matching ``where`` as the table held them before this batch — as
        the batch leaves them: a row it touched is replaced by its version there, if that still
        matches (not a copy: never hand it out), and its other matching rows are added."""
        changed = self._rows
        return [r for r in rows if r[ID] not in changed] + _matching(changed, self._now, where)

    def find_by_key(self, params: Any) -> list[Record] | None:
        """``find {field: value}`` (a transformation looking up its row by a key) when the
        batch prefetched that value of that field: answered from the prefetched rows and the
        overlay's index, as :meth:`find` would answer the parsed query. None for any other
        params, which take the general way (parsing, checking, :meth:`find`)."""
        if type(params) is not dict or len(params) != 1:
            return None
        ((name, value),) = params.items()
        known = self._prefetched.get(name)
        if known is None or type(value) not in _KEY_TYPES:
            return None
        try:
            checked = check_value(name, self.fields[name], value)
        except (InvalidInput, TypeError):
            return None  # the general way refuses it, with its own message
        held = known.get(checked)
        if held is None:
            return None
        changed = self._rows
        rows = [r for r in held if r[ID] not in changed] if changed else list(held)
        if changed:
            for entity_id in self._now.equal(name, checked) or ():
                row = changed.get(entity_id)
                if row is not None:
                    rows.append(row)
        if len(rows) > 1:
            rows.sort(key=_by_id)
        return [self._out(r) for r in rows]

    def _page(self, rows: list[Record], query: Query) -> list[Record]:
        """``rows`` (every match) sorted, paged and projected as the database would."""
        if len(rows) > 1:
            rows.sort(key=sort_key(query.sort))
        end = None if query.limit is None else query.offset + query.limit
        if query.offset or end is not None:
            rows = rows[query.offset : end]
        return [self._out(r, query.fields) for r in rows]

    async def count(self, query: Query = ALL) -> int:
        pinned = self._pinned(query.where)
        counted: int | None = None
        if pinned is not None:
            counted = sum(1 for r in pinned if matches(query.where, r))
        elif self.writing and self._rows:
            # The table may hold this batch's changes already, or not yet: count the rows it
            # did not touch (the same either way), then the batch's own.
            untouched = In(ID, tuple(self._rows), True)
            where = untouched if query.where is None else And((query.where, untouched))
            self.store_reads += 1
            counted = await self._source.count(Query(where=where))
            return counted + len(_matching(self._rows, self._now, query.where))
        else:
            counted = self._counted.get(query) if _hashable(query) else None
            if counted is None:
                counted = await self._source.count(query)
                self.store_reads += 1
                if _hashable(query):
                    self._counted[query] = counted
        gone = len(_matching(self._original, self._was, query.where))
        now = len(_matching(self._rows, self._now, query.where))
        return counted - gone + now

    async def get(self, entity_id: Any) -> Record | None:
        row = await self._row(check_id(entity_id))
        return None if row is None else self._out(row)

    async def get_many(self, ids: Sequence[Any]) -> list[Record]:
        rows = [await self.get(i) for i in ids]
        return [r for r in rows if r is not None]

    async def prefetch(
        self, field: str, values: Iterable[Any], early: EarlyRows | None = None
    ) -> None:
        """Read every committed row whose ``field`` holds one of ``values``, a few thousand
        values per query, so that later reads pinned to them (``{field: v}``, or ``in``)
        need no round trip. Values that are not valid for the field are left out (a read
        for them would be refused anyway). The values ``early`` read already (for this
        field) are taken from it instead (:meth:`EarlyRows.as_seen`)."""
        known = self._prefetched.setdefault(field, {})
        keys = [v for v in checked_values(self.fields, field, values) if v not in known]
        if early is not None and early.field == field:
            covered = early.values
            self._take(field, [v for v in keys if v in covered], early.as_seen(keys))
            keys = [v for v in keys if v not in covered]
            self.store_reads += early.reads
        for start in range(0, len(keys), PREFETCH_CHUNK):
            chunk = tuple(keys[start : start + PREFETCH_CHUNK])
            self._take(field, chunk, await self._source.find(Query(where=In(field, chunk))))
            self.store_reads += 1

    def _take(self, field: str, values: Iterable[Any], rows: Iterable[Record]) -> None:
        """``rows``: every committed row whose ``field`` holds one of ``values``."""
        known = self._prefetched[field]
        for value in values:
            known[value] = []
        for row in rows:
            known.setdefault(row[field], []).append(row)
            self._got.setdefault(row[ID], row)

    # ------------------------------------------------------------------ writes

    async def create(self, record: Any) -> Record:
        checked = check_record(self.fields, _without_id(record))
        await self._check_unique(None, checked, self._unique)
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
        row = {**current, **checked}
        moved = [n for n in self._unique if n in checked and checked[n] != current.get(n)]
        await self._check_unique(entity_id, row, moved)
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
            now = self._rows[entity_id]
            if rows_before is _ABSENT:
                del self._rows[entity_id]
                self._now.moved(entity_id, now, None)
                original = self._original.pop(entity_id, None)
                if original is not None:
                    self._was.moved(entity_id, original, None)
                    self._displaced -= 1
            else:
                self._rows[entity_id] = rows_before
                self._now.moved(entity_id, now, rows_before)
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

    def rebase(self) -> None:
        """The batch this view was opened after is written: read the table from now on.

        What this view read through that batch is what the table holds now, so its caches
        and the rows it holds as committed stay true."""
        self._source = self.adapter
        self._after = None

    def latest_id(self) -> int | None:
        """The last id given to a row by this batch or an unwritten one before it."""
        if self._last_id is not None:
            return self._last_id
        return None if self._after is None else self._after.latest_id()

    # ------------------------------------------------------------------ plumbing

    async def _next_id(self) -> int:
        if self._last_id is None:
            inherited = None if self._after is None else self._after.latest_id()
            self._last_id = (
                inherited if inherited is not None else await self._ids.load(self.adapter)
            )
        self._last_id += 1
        return self._last_id

    async def _row(self, entity_id: int) -> Record | None:
        """The row as the batch sees it (not a copy: never hand it out)."""
        if entity_id in self._rows:
            return self._rows[entity_id]
        if entity_id not in self._got:
            self._got[entity_id] = await self._source.get(entity_id)
            self.store_reads += 1
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
                self._was.moved(entity_id, None, original)
                self._displaced += 1
        self._now.moved(entity_id, self._rows.get(entity_id), row)
        self._rows[entity_id] = row
        if fields:
            self._changed.setdefault(entity_id, set()).update(fields)

    async def _check_unique(self, entity_id: int | None, row: Record, names: Sequence[str]) -> None:
        """Refuse (409, naming the field) a row that would give a unique field a value another
        row holds — in the table or in the batch — so that this event fails alone, before the
        batch's write could.

        The write applies inserts, then updates, then deletes, so a value that a committed row
        held when the batch began stays taken for the whole batch even if the batch changes or
        removes that row: otherwise the write could meet both rows at once. Lookups go through
        the overlay's indexes (and the prefetched rows, when the field is a key field), else one
        indexed read of the table, cached for the batch."""
        for name in names:
            value = row.get(name)
            if value is None:
                continue
            where = Compare(name, "=", value)
            holders = await self.find(Query(where=where, fields=(ID,), limit=2))
            if any(h[ID] != entity_id for h in holders):
                raise unique_conflict(self.name, name, value)
            for held in _matching(self._original, self._was, where):
                if held[ID] != entity_id:
                    raise ConflictError(
                        f"field {name!r} of store {self.name!r} is unique, and row "
                        f"{held[ID]} held this value when the batch began: it is free only once "
                        "the batch is written (retry the dead letter then)",
                        store=self.name,
                        field=name,
                    )

    def _pinned(self, where: Condition | None) -> list[Record] | None:
        """The prefetched committed rows that hold every row matching ``where``, when
        ``where`` pins a prefetched field to prefetched values; else None."""
        match where:
            case Compare(name, "=", value) if name in self._prefetched:
                return self._prefetched[name].get(value)
            case In(name, values, False) if name in self._prefetched:
                known = self._prefetched[name]
                out: list[Record] = []
                for value in dict.fromkeys(values):
                    rows = known.get(value)
                    if rows is None:
                        return None
                    out += rows
                return out
            case And(items):
                for item in items:
                    pinned = self._pinned(item)
                    if pinned is not None:
                        return pinned
        return None

    async def _committed(self, query: Query) -> list[Record]:
        pinned = self._pinned(query.where)
        if pinned is not None:
            held = [r for r in pinned if matches(query.where, r)]
            held.sort(key=sort_key(query.sort))
            end = None if query.limit is None else query.offset + query.limit
            return held[query.offset : end]
        if not _hashable(query):
            self.store_reads += 1
            return await self._source.find(query)
        rows = self._found.get(query)
        if rows is None:
            self.store_reads += 1
            rows = self._found[query] = await self._source.find(query)
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


def _by_id(row: Record) -> Any:
    return row[ID]


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
