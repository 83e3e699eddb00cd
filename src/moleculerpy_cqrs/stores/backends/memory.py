"""The reference backend: tables in this process's memory, queried with :func:`matches`.

A transaction collects its changes in an overlay per table and applies them on commit, so
outside readers (who read the committed tables without waiting) never see them. One
``asyncio.Lock`` per database serialises units of work; a context variable carries the
current transaction so calls from the same task and the tasks it starts join it.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import hashlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

from moleculerpy_cqrs.errors import ConfigurationError, InvalidInput, StoreError
from moleculerpy_cqrs.stores.backup_files import (
    BackupFiles,
    Manifest,
    damaged,
    json_lines,
    parse_json_lines,
    read_manifest,
    write_backup,
)
from moleculerpy_cqrs.stores.base import (
    Adapter,
    Changes,
    CheckedRow,
    Keyed,
    rows_missing,
    unique_conflict,
)
from moleculerpy_cqrs.stores.encoding import decode_json, plain_value
from moleculerpy_cqrs.stores.fields import (
    ID,
    Declarations,
    Record,
    check_meta,
)
from moleculerpy_cqrs.stores.ports import Table
from moleculerpy_cqrs.stores.query import And, Compare, Condition, In, Query, matches, sort_key
from moleculerpy_cqrs.stores.transactions import Joinable, Unit


class _Data:
    """A committed table: rows in id order, the last id handed out, meta as JSON text, and an
    index (value -> ids) per indexed field."""

    __slots__ = ("fields", "ids", "indexes", "meta", "rows", "seq", "unique")

    def __init__(
        self,
        rows: dict[int, Record] | None = None,
        seq: int = 0,
        meta: dict[str, str] | None = None,
    ) -> None:
        self.rows = rows if rows is not None else {}
        self.ids = list(self.rows)
        self.seq = max(seq, self.ids[-1] if self.ids else 0)
        self.meta = meta if meta is not None else {}
        self.indexes: dict[str, dict[Any, set[int]]] = {}
        self.unique: dict[str, bool] = {}
        self.fields: dict[str, str] = {}  # the declared type of each field, as first declared

    def ensure_indexes(self, table: str, declared: Mapping[str, bool]) -> None:
        """Index exactly the ``declared`` fields (name -> unique), building missing indexes."""
        for name in [n for n in self.indexes if n not in declared]:
            del self.indexes[name], self.unique[name]
        for name, unique in declared.items():
            if name in self.indexes and self.unique[name] == unique:
                continue
            index: dict[Any, set[int]] = {}
            for entity_id, row in self.rows.items():
                value = row.get(name)
                if value is None:
                    continue
                holders = index.setdefault(value, set())
                if unique and holders:
                    raise unique_conflict(table, name, value)
                holders.add(entity_id)
            self.indexes[name], self.unique[name] = index, unique

    def reindex(self, entity_id: int, old: Record | None, new: Record | None) -> None:
        for name, index in self.indexes.items():
            before = None if old is None else old.get(name)
            after = None if new is None else new.get(name)
            if before == after and old is not None and new is not None:
                continue
            if before is not None:
                holders = index.get(before)
                if holders is not None:
                    holders.discard(entity_id)
                    if not holders:
                        del index[before]
            if after is not None:
                index.setdefault(after, set()).add(entity_id)


class _Work:
    """A table as one unit of work sees it: the committed data plus its own changes."""

    __slots__ = ("base", "changes", "dropped", "index", "meta", "name", "replaced", "seq")

    def __init__(self, name: str, base: _Data | None) -> None:
        self.name = name
        self.base = base if base is not None else _Data()
        self.dropped = base is None
        self.changes: dict[int, Record | None] = {}
        # The changed rows' values of each indexed field (value -> ids), beside the base's.
        self.index: dict[str, dict[Any, set[int]]] = {}
        self.meta: dict[str, str | None] = {}
        self.seq = self.base.seq
        self.replaced = False

    def lookup(self, name: str, values: tuple[Any, ...]) -> list[Record] | None:
        """The rows whose indexed field ``name`` holds one of ``values``, in id order; None
        if ``name`` is not indexed."""
        base = self._live().indexes.get(name)
        if base is None:
            return None
        changed = self.index.get(name, {})
        ids: set[int] = set()
        for value in values:
            if value is None:
                continue
            ids.update(i for i in base.get(value, ()) if i not in self.changes)
            ids.update(changed.get(value, ()))
        return [row for i in sorted(ids) if (row := self.get(i)) is not None]

    def _holders(self, name: str, value: Any) -> set[int]:
        base = self.base.indexes[name].get(value, ())
        return {i for i in base if i not in self.changes} | self.index.get(name, {}).get(
            value, set()
        )

    def _change(self, entity_id: int, row: Record | None) -> None:
        """Record a change, refusing a value a unique field already has in another row."""
        indexes = self.base.indexes
        if indexes:
            if row is not None:
                for name, unique in self.base.unique.items():
                    value = row.get(name)
                    if unique and value is not None and self._holders(name, value) - {entity_id}:
                        raise unique_conflict(self.name, name, value)
            old = self.changes.get(entity_id)
            for name in indexes:
                changed = self.index.setdefault(name, {})
                if old is not None and (before := old.get(name)) is not None:
                    changed.get(before, set()).discard(entity_id)
                if row is not None and (after := row.get(name)) is not None:
                    changed.setdefault(after, set()).add(entity_id)
        self.changes[entity_id] = row

    def _live(self) -> _Data:
        if self.dropped:
            raise StoreError(f"table {self.name!r} does not exist", store=self.name)
        return self.base

    def scan(self) -> Iterator[Record]:
        base = self._live().rows
        if not self.changes:
            yield from base.values()
            return
        for entity_id, row in base.items():
            if entity_id in self.changes:
                changed = self.changes[entity_id]
                if changed is not None:
                    yield changed
            else:
                yield row
        for entity_id, changed in self.changes.items():
            if changed is not None and entity_id not in base:
                yield changed

    def get(self, entity_id: int) -> Record | None:
        if entity_id in self.changes:
            return self.changes[entity_id]
        return self._live().rows.get(entity_id)

    def after(self, position: int, limit: int) -> list[Record]:
        data = self._live()
        if self.changes:
            return [r for r in self.scan() if r[ID] > position][:limit]
        start = bisect.bisect_right(data.ids, position)
        return [data.rows[i] for i in data.ids[start : start + limit]]

    def head(self) -> int:
        if self.changes:
            return max((r[ID] for r in self.scan()), default=0)
        ids = self._live().ids
        return ids[-1] if ids else 0

    def insert(self, record: Record) -> Record:
        self._live()
        row = {ID: self.seq + 1, **record}
        self._change(self.seq + 1, row)
        self.seq += 1
        return row

    def put(self, row: Record) -> None:
        self._change(row[ID], row)
        self.seq = max(self.seq, row[ID])

    def delete(self, entity_id: int) -> None:
        self._change(entity_id, None)

    def get_meta(self, key: str) -> str | None:
        if key in self.meta:
            return self.meta[key]
        return self._live().meta.get(key)

    def all_meta(self) -> dict[str, str]:
        merged: dict[str, str | None] = {**self._live().meta, **self.meta}
        return {k: v for k, v in merged.items() if v is not None}

    def set_meta(self, key: str, text: str | None) -> None:
        self._live()
        self.meta[key] = text

    def replace(self, data: _Data) -> None:
        self.base, self.changes, self.meta, self.index = data, {}, {}, {}
        self.seq = max(self.seq, data.seq)
        self.replaced, self.dropped = True, False

    def drop(self) -> None:
        self.base, self.changes, self.meta, self.index = _Data(), {}, {}, {}
        self.replaced, self.dropped = False, True

    def commit(self, tables: dict[str, _Data]) -> None:
        if self.dropped:
            tables.pop(self.name, None)
            return
        data = self.base
        deleted: set[int] = set()
        for entity_id, row in self.changes.items():
            if data.indexes:
                data.reindex(entity_id, data.rows.get(entity_id), row)
            if row is None:
                if data.rows.pop(entity_id, None) is not None:
                    deleted.add(entity_id)
            elif entity_id in data.rows:
                data.rows[entity_id] = row
            else:
                data.rows[entity_id] = row
                if data.ids and entity_id < data.ids[-1]:  # an id chosen by the caller
                    bisect.insort(data.ids, entity_id)
                else:
                    data.ids.append(entity_id)
        if deleted:
            data.ids = [i for i in data.ids if i not in deleted]
        data.seq = self.seq
        for key, text in self.meta.items():
            if text is None:
                data.meta.pop(key, None)
            else:
                data.meta[key] = text
        if self.replaced:
            tables[self.name] = data


class _Transaction(Unit):
    __slots__ = ("database", "works")

    def __init__(self, database: MemoryDatabase) -> None:
        super().__init__()
        self.database = database
        self.works: dict[str, _Work] = {}

    def work(self, name: str) -> _Work:
        work = self.works.get(name)
        if work is None:
            work = self.works[name] = _Work(name, self.database.tables.get(name))
        return work

    def commit(self) -> None:
        for work in self.works.values():
            work.commit(self.database.tables)


class MemoryDatabase(Joinable[_Transaction]):
    """Tables that live as long as this object; ``adapter(name)`` twice shares one table."""

    def __init__(self) -> None:
        self.tables: dict[str, _Data] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def lock(self) -> asyncio.Lock:
        # The tables may outlive an event loop (a factory made at import time, used by one
        # test after another); an asyncio.Lock may not.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock

    def adapter(self, name: str, fields: Declarations | None = None) -> MemoryAdapter:
        return MemoryAdapter(self, name, fields)

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[_Transaction]:
        """The current transaction, or a new one committed at the end (under the lock)."""
        tx = self.current()
        if tx is not None:
            yield tx
            return
        async with self.lock:
            tx = _Transaction(self)
            yield tx
            tx.commit()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        if self.current() is not None:
            yield
            return
        async with self.lock:
            with self.joined(_Transaction(self)) as tx:
                yield
            tx.commit()


class MemoryAdapter(Adapter):
    def __init__(
        self,
        database: MemoryDatabase,
        name: str,
        fields: Declarations | None = None,
        *,
        parent: MemoryAdapter | None = None,
    ) -> None:
        super().__init__(name, fields)
        self._database = database
        self._parent = parent
        self._siblings: list[MemoryAdapter] = []
        self._closed = False
        self._json = frozenset(n for n, k in self.fields.items() if k == "json")

    # ------------------------------------------------------------------ lifecycle

    def where(self) -> str:
        return f"memory of this process (gone when it stops), table {self.name}"

    async def connect(self) -> None:
        self._open()
        data = self._database.tables.setdefault(self.name, _Data())
        data.fields = {**self.fields, **data.fields}  # a new field is added; none changes type
        data.ensure_indexes(self.name, self.indexes)

    async def stored_fields(self) -> dict[str, str] | None:
        self._open()
        data = self._database.tables.get(self.name)
        return None if data is None else dict(data.fields)

    async def close(self) -> None:
        self._closed = True
        for sibling in self._siblings:
            sibling._closed = True

    def sibling(self, name: str, fields: Declarations | None = None) -> MemoryAdapter:
        root = self._parent or self
        adapter = MemoryAdapter(self._database, name, fields, parent=root)
        root._siblings.append(adapter)
        return adapter

    async def drop(self) -> None:
        async with self._unit() as tx:
            tx.work(self.name).drop()

    def transaction(self) -> AbstractAsyncContextManager[None]:
        self._open()
        return self._database.transaction()

    # ------------------------------------------------------------------ reads

    async def _find(self, query: Query) -> list[Record]:
        rows = [r for r in _candidates(self._view(), query.where) if matches(query.where, r)]
        rows.sort(key=sort_key(query.sort))
        end = None if query.limit is None else query.offset + query.limit
        return [self._out(r, query.fields) for r in rows[query.offset : end]]

    async def _count(self, query: Query) -> int:
        return sum(1 for r in _candidates(self._view(), query.where) if matches(query.where, r))

    async def _get(self, entity_id: int) -> Record | None:
        row = self._view().get(entity_id)
        return None if row is None else self._out(row)

    async def _get_many(self, ids: list[int]) -> list[Record]:
        view = self._view()
        rows = (view.get(i) for i in ids)
        return [self._out(r) for r in rows if r is not None]

    async def read_after(self, position: int, limit: int) -> list[Record]:
        return [self._out(r) for r in self._view().after(position, max(limit, 0))]

    async def head(self) -> int:
        return self._view().head()

    # ------------------------------------------------------------------ writes

    async def _insert_many(self, records: list[Record]) -> list[Record]:
        async with self._unit() as tx:
            work = tx.work(self.name)
            return [self._out(work.insert(self._own(r))) for r in records]

    async def _append(self, rows: list[CheckedRow]) -> list[Record]:
        return await self._insert_many([r.record for r in rows])

    async def _append_keyed(self, rows: list[CheckedRow], key: str) -> list[Keyed]:
        async with self._unit() as tx:
            work = tx.work(self.name)
            out: list[Keyed] = []
            for row in rows:
                value = row.record[key]
                held = [] if value is None else work.lookup(key, (value,)) or []
                if held:
                    out.append(Keyed(self._out(held[0]), False))
                else:
                    out.append(Keyed(self._out(work.insert(self._own(row.record))), True))
            return out

    def _check_sibling(self, other: Table) -> None:
        if not isinstance(other, MemoryAdapter) or other._database is not self._database:
            raise ConfigurationError(f"{other.name!r} is not a table of {self.name!r}'s database")

    async def _apply_rows(self, changes: Changes) -> None:
        async with self._unit() as tx:
            work = tx.work(self.name)
            for row in changes.inserts:
                if ID in row:
                    if work.get(row[ID]) is not None:  # as a primary key refuses it
                        raise unique_conflict(self.name, ID, row[ID])
                    work.put(self._own(row))
                else:
                    work.insert(self._own(row))
            for entity_id, fields in changes.updates.items():
                current = work.get(entity_id)
                if current is None:
                    raise rows_missing(self.name)
                work.put({**current, **self._own(fields)})
            for entity_id in changes.deletes:
                work.delete(entity_id)

    async def _update(self, entity_id: int, changes: Record) -> Record | None:
        async with self._unit() as tx:
            work = tx.work(self.name)
            row = work.get(entity_id)
            if row is None:
                return None
            if changes:
                row = {**row, **self._own(changes)}
                work.put(row)
            return self._out(row)

    async def _update_many(self, query: Query, changes: Record) -> int:
        async with self._unit() as tx:
            work = tx.work(self.name)
            hits = [r for r in _candidates(work, query.where) if matches(query.where, r)]
            for row in hits:
                work.put({**row, **self._own(changes)})
            return len(hits)

    async def _remove(self, entity_id: int) -> Record | None:
        async with self._unit() as tx:
            work = tx.work(self.name)
            row = work.get(entity_id)
            if row is not None:
                work.delete(entity_id)
            return None if row is None else self._out(row)

    async def _remove_many(self, query: Query) -> int:
        async with self._unit() as tx:
            work = tx.work(self.name)
            hits = [r[ID] for r in _candidates(work, query.where) if matches(query.where, r)]
            for entity_id in hits:
                work.delete(entity_id)
            return len(hits)

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> Any:
        check_meta(key, None)
        text = self._view().get_meta(key)
        return None if text is None else decode_json(text)

    async def get_meta_for_update(self, key: str) -> Any:
        check_meta(key, None)
        async with self._unit() as tx:  # a transaction holds the database's lock
            text = tx.work(self.name).get_meta(key)
        return None if text is None else decode_json(text)

    async def set_meta(self, key: str, value: Any) -> None:
        text = check_meta(key, value)
        async with self._unit() as tx:
            tx.work(self.name).set_meta(key, text)

    # ------------------------------------------------------------------ backup

    async def backup(self, location: str) -> int:
        view = self._view()
        kinds = self.fields.items()
        rows = [[r[ID], *[plain_value(k, r.get(n)) for n, k in kinds]] for r in view.scan()]
        data = json_lines(rows)
        manifest = Manifest(
            rows_format="json-lines",
            table=self.name,
            fields=dict(self.fields),
            sequence=view.seq,
            meta=view.all_meta(),
            rows=len(rows),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        files = BackupFiles.of(location, self.name)
        return await asyncio.to_thread(write_backup, files, data, manifest)

    async def restore(self, location: str) -> None:
        files, manifest = await asyncio.to_thread(
            read_manifest, location, self.name, self.fields, "json-lines"
        )
        try:
            raw = await asyncio.to_thread(files.rows.read_bytes)
            names = list(manifest.fields)
            rows = {
                values[0]: {ID: values[0], **dict(zip(names, values[1:], strict=True))}
                for values in parse_json_lines(raw, manifest, self.fields)
            }
        except (OSError, ValueError, InvalidInput) as e:
            raise damaged(self.name, location, str(e)) from e
        data = _Data(rows, manifest.sequence, dict(manifest.meta))
        data.fields = dict(self.fields)
        data.ensure_indexes(self.name, self.indexes)
        async with self._unit() as tx:
            tx.work(self.name).replace(data)

    async def _replace_with(self, other: Adapter) -> None:
        shadow = cast(MemoryAdapter, other)
        shadow._open()
        async with self._unit() as tx:
            source, target = tx.work(shadow.name), tx.work(self.name)
            rows = {r[ID]: r for r in source.scan()}
            data = _Data(rows, max(target.seq, source.seq), source.all_meta())
            data.fields = dict(self.fields)
            data.ensure_indexes(self.name, self.indexes)
            target.replace(data)
            emptied = _Data(seq=source.seq)
            emptied.fields = dict(shadow.fields)
            emptied.ensure_indexes(shadow.name, shadow.indexes)
            source.replace(emptied)

    # ------------------------------------------------------------------ helpers

    def _open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed", store=self.name)

    def _view(self) -> _Work:
        self._open()
        tx = self._database.current()
        if tx is not None:
            return tx.work(self.name)
        return _Work(self.name, self._database.tables.get(self.name))

    @asynccontextmanager
    async def _unit(self) -> AsyncIterator[_Transaction]:
        self._open()
        async with self._database.unit() as tx:
            yield tx

    def _own(self, record: Record) -> Record:
        """A copy the caller cannot change from outside (json values are mutable)."""
        return {k: copy.deepcopy(v) if k in self._json else v for k, v in record.items()}

    def _out(self, row: Record, names: tuple[str, ...] | None = None) -> Record:
        out = {n: row.get(n) for n in (names or (ID, *self.fields))}
        return self._own(out) if self._json else out


def _candidates(work: _Work, where: Condition | None) -> Iterator[Record]:
    """The rows that can match: looked up by id when ``where`` pins the ids, else all rows.

    ``matches`` still decides; this only spares a scan of the table (the dispatcher marks
    events by id on every batch).
    """
    ids = _pinned_ids(where)
    if ids is None:
        found = _looked_up(work, where)
        if found is None:
            yield from work.scan()
        else:
            yield from found
        return
    for entity_id in sorted(set(ids)):
        row = work.get(entity_id)
        if row is not None:
            yield row


def _looked_up(work: _Work, where: Condition | None) -> list[Record] | None:
    """The rows an index of ``work`` finds for an equality or ``in`` that ``where`` requires
    (None when no such index helps)."""
    match where:
        case Compare(field, "=", value):
            return work.lookup(field, (value,))
        case In(field, values, False):
            return work.lookup(field, values)
        case And(items):
            for item in items:
                found = _looked_up(work, item)
                if found is not None:
                    return found
    return None


def _pinned_ids(where: Condition | None) -> tuple[Any, ...] | None:
    match where:
        case In(field, values, False) if field == ID:
            return values
        case Compare(field, "=", value) if field == ID:
            return (value,)
        case And(items):
            for item in items:
                ids = _pinned_ids(item)
                if ids is not None:
                    return ids
    return None
