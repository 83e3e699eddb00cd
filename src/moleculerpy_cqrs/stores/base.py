"""The store contract: one :class:`Adapter` per table, async, for every backend.

The public methods check their input (field names, value types, ids) and then call the
backend's protected methods, so a backend only does I/O and never sees unchecked values.
Everything a backend must guarantee is written on the abstract methods; the conformance suite
in :mod:`moleculerpy_cqrs.testing.conformance` checks it.

Transactions: ``async with adapter.transaction():`` opens a unit of work. Calls made inside it
from the same task, or from tasks and broker calls it starts in this process (a
``contextvars.ContextVar`` carries it), join it; a nested ``transaction()`` joins the outer one.
An exception rolls back everything. Outside the transaction, readers see only committed data
and writers wait until it ends. Sibling tables (:meth:`Adapter.sibling`) share it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

from moleculerpy_cqrs.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    StoreError,
)
from moleculerpy_cqrs.stores.encoding import encode_json
from moleculerpy_cqrs.stores.fields import (
    ID,
    FieldDeclaration,
    FieldSpec,
    FieldType,
    Record,
    check_id,
    check_record,
    declare_specs,
)
from moleculerpy_cqrs.stores.ports import (
    Backups,
    Changes,
    CheckedRow,
    Checkpoints,
    Keyed,
    Lifecycle,
    Log,
    MetaMoved,
    Table,
)
from moleculerpy_cqrs.stores.query import ALL, Query


class StoreFactory(Protocol):
    """The seed's factory shape: ``(name, cqrs_fields, settings) -> Adapter``.

    ``cqrs_fields`` are the columns the toolkit itself needs (merged with the user's fields);
    ``settings`` are free-form options for the backend.
    """

    def __call__(
        self,
        name: str,
        cqrs_fields: Mapping[str, FieldDeclaration] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Adapter: ...


class Adapter(Log, Table, Checkpoints, Backups, Lifecycle, ABC):
    """One table of declared fields plus the implicit integer primary key ``id``: every port
    of :mod:`~moleculerpy_cqrs.stores.ports` at once, which is what a backend implements."""

    def __init__(self, name: str, fields: Mapping[str, FieldDeclaration] | None = None) -> None:
        if not name.isidentifier() or not name.isascii():
            raise InvalidInput(f"store name {name!r} must be an identifier")
        self.name = name
        self.specs: dict[str, FieldSpec] = declare_specs(fields)
        """Each declared field as declared: its type and index flags (pass it to
        :meth:`sibling` for a table of the same shape, indexes included)."""
        self.fields: dict[str, FieldType] = {n: s.type for n, s in self.specs.items()}
        self.indexes: dict[str, bool] = {n: s.unique for n, s in self.specs.items() if s.index}
        """The indexed fields, each with whether it is unique. Every backend keeps an index
        for them (created at :meth:`connect`, kept through restore and :meth:`replace_with`);
        a unique field refuses a second row with the same non-null value with
        :func:`unique_conflict`, and the write changes nothing."""
        self._json_fields = tuple(n for n, k in self.fields.items() if k == "json")

    def declare_unique(self, field: str) -> None:
        """Make the values of the string field ``field`` unique in this table (any number of
        rows may hold NULL): call it before :meth:`connect`, which then creates a unique
        index on it (on an existing table too). :meth:`append_keyed` looks keys up through
        that index, and an insert or update that would store a value twice is refused."""
        if self.fields.get(field) != "string":
            raise ConfigurationError(
                f"store {self.name!r}: a unique field must be a declared string field, "
                f"not {field!r}"
            )
        self.specs[field] = dataclasses.replace(self.specs[field], index=True, unique=True)
        self.indexes[field] = True

    # ------------------------------------------------------------------ lifecycle

    @abstractmethod
    async def connect(self) -> None:
        """Open connections and create the table (and the meta table) if missing.

        Idempotent: connecting twice, or connecting to an existing table, is fine. On an
        existing table, declared fields it lacks are added as columns (old rows read them as
        null) and the declared indexes are made to match; a column's type is never changed
        (compare with :meth:`stored_fields` first to refuse such a change).
        """

    @abstractmethod
    async def stored_fields(self) -> dict[str, str] | None:
        """The fields the table holds now, name -> type (``id`` left out); None when the table
        does not exist yet. May be called before :meth:`connect` (a database it opens for the
        look is closed again), which lets a caller compare a declaration with the table before
        :meth:`connect` adds the columns declared since.

        Types are the declared type names the table was made with where the backend keeps
        them (SQLite records them in its meta table; PostgreSQL's column types say them
        exactly). For a SQLite table made before the record existed, a column's type is the
        declared one if that is stored as the column's type, else the column's own.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release every connection, thread and task; idempotent. Siblings close with it."""

    def where(self) -> str:
        """Where the table lives, for people (``cqrs run`` prints it); never a password."""
        return f"{type(self).__name__} table {self.name}"

    async def __aenter__(self) -> Adapter:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    def sibling(self, name: str, fields: Mapping[str, FieldDeclaration] | None = None) -> Adapter:
        """Another table in the same database, sharing connections and transactions.

        Used for dead letters and shadow tables. It must be connected before use (which
        creates its table); closing it does not close the parent.
        """

    @abstractmethod
    async def drop(self) -> None:
        """Remove the table and its meta entries (joins a current transaction)."""

    # ------------------------------------------------------------------ reads

    async def find(self, query: Query = ALL) -> list[Record]:
        return await self._find(query)

    async def count(self, query: Query = ALL) -> int:
        return await self._count(query)

    async def get(self, entity_id: Any) -> Record | None:
        return await self._get(check_id(entity_id))

    async def get_many(self, ids: Sequence[Any]) -> list[Record]:
        """The rows with these ids, in the order asked; missing ids are left out."""
        checked = [check_id(i) for i in ids]
        return await self._get_many(checked) if checked else []

    @abstractmethod
    async def _find(self, query: Query) -> list[Record]:
        """Rows matching ``query.where`` in ``query.sort`` order (ascending puts NULLs first,
        descending last; ``id`` ascending breaks ties), after ``offset``, at most ``limit``,
        with only ``query.fields`` when given. Values come back as the type written."""

    @abstractmethod
    async def _count(self, query: Query) -> int:
        """How many rows match ``query.where`` (sort, limit, offset, fields ignored)."""

    @abstractmethod
    async def _get(self, entity_id: int) -> Record | None: ...

    @abstractmethod
    async def _get_many(self, ids: list[int]) -> list[Record]: ...

    # ------------------------------------------------------------------ writes

    async def insert(self, record: Mapping[str, Any]) -> Record:
        """Store one record; answers it as stored, with its new ``id``."""
        return (await self._insert_many([check_record(self.fields, record)]))[0]

    async def insert_many(self, records: Sequence[Mapping[str, Any]]) -> list[Record]:
        """Store records all-or-nothing (one transaction); answers them with their ids."""
        if not isinstance(records, Sequence) or isinstance(records, str | bytes):
            raise InvalidInput("insert_many takes a list of records")
        checked = [check_record(self.fields, r) for r in records]
        return await self._insert_many(checked) if checked else []

    async def update(self, entity_id: Any, changes: Mapping[str, Any]) -> Record | None:
        """Change the given fields of one row; answers the row re-read, None if missing."""
        checked = check_record(self.fields, changes, partial=True)
        return await self._update(check_id(entity_id), checked)

    async def update_many(self, query: Query, changes: Mapping[str, Any]) -> int:
        """Change the given fields of every row matching ``query.where``; answers how many."""
        checked = check_record(self.fields, changes, partial=True)
        if not checked:
            raise InvalidInput("update_many needs at least one field to change")
        return await self._update_many(query, checked)

    async def remove(self, entity_id: Any) -> Record | None:
        """Delete one row; answers the row as it was, None if missing."""
        return await self._remove(check_id(entity_id))

    async def remove_many(self, query: Query) -> int:
        """Delete every row matching ``query.where`` (all rows for ``ALL``); answers how many."""
        return await self._remove_many(query)

    @abstractmethod
    async def _insert_many(self, records: list[Record]) -> list[Record]: ...

    @abstractmethod
    async def _update(self, entity_id: int, changes: Record) -> Record | None: ...

    @abstractmethod
    async def _update_many(self, query: Query, changes: Record) -> int: ...

    @abstractmethod
    async def _remove(self, entity_id: int) -> Record | None: ...

    @abstractmethod
    async def _remove_many(self, query: Query) -> int: ...

    async def apply(
        self,
        changes: Changes,
        *,
        advance: tuple[str, int, int] | None = None,
        also: Sequence[tuple[Table, Changes]] = (),
    ) -> None:
        """Write ``changes`` (and those of sibling tables in ``also``) in one transaction,
        joining an enclosing one: inserts, then updates, then deletes, then meta.

        ``advance=(key, old, new)`` moves the integer meta value ``key`` from ``old`` to
        ``new`` (a missing key reads as 0); if it is not ``old`` under the table's write lock,
        :class:`MetaMoved` is raised and nothing is written. After inserts with explicit ids,
        ids this table hands out itself are past them. This is the projector's bulk path: one
        round trip to the database where the backend can manage it.
        """
        work: list[tuple[Adapter, Changes]] = [(self, changes)]
        for sibling, sibling_changes in also:
            self._check_sibling(sibling)
            work.append((cast(Adapter, sibling), sibling_changes))
        await self._apply(work, advance)

    @abstractmethod
    def _check_sibling(self, other: Table) -> None:
        """Raise :class:`ConfigurationError` unless ``other`` shares this table's database
        and transactions (a sibling)."""

    async def _apply(
        self, work: list[tuple[Adapter, Changes]], advance: tuple[str, int, int] | None
    ) -> None:
        """A generic :meth:`apply` through the other protected methods; backends that can do
        it in fewer round trips override it."""
        async with self.transaction():
            if advance is not None:
                key, old, _ = advance
                stored = int(await self.get_meta_for_update(key) or 0)
                if stored != old:
                    raise MetaMoved(key, stored, old)
            for adapter, changes in work:
                await adapter._apply_rows(changes)
                for name, value in changes.meta.items():
                    await adapter.set_meta(name, value)
            if advance is not None:
                await self.set_meta(advance[0], advance[2])

    async def _apply_rows(self, changes: Changes) -> None:
        """Inserts with their ids, updates, deletes (inside a transaction)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement apply()")

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """A unit of work (see the module docstring): joins an enclosing one, rolls back on
        error, isolates uncommitted changes from outside readers."""

    # ------------------------------------------------------------------ event log

    async def append(self, records: Sequence[Mapping[str, Any]]) -> list[Record]:
        """Append a batch to this table used as a log; answers the rows with their positions.

        Positions are the ids: unique and strictly increasing in commit order, so a reader
        that has seen position ``p`` never later sees a new row with a position below ``p``
        commit (no "gap" problem, also with concurrent writers on a server database).
        The batch is one transaction, all-or-nothing; joins a current transaction.
        """
        rows = [self.check_row(r) for r in records]
        return await self.append_checked(rows) if rows else []

    def check_row(self, record: Mapping[str, Any]) -> CheckedRow:
        """Check a record for :meth:`append_checked` and encode it for this backend, once.

        Raises :class:`InvalidInput` as :meth:`append` would. The answer's ``json`` holds the
        compact JSON text of each non-null json field (what is stored: callers may measure
        it), and ``values`` what the backend's driver is given.
        """
        checked = check_record(self.fields, record)
        texts = self._json_texts(checked)
        return CheckedRow(self, checked, texts, self._encode_row(checked, texts))

    def _json_texts(self, record: Record) -> dict[str, str]:
        """The stored text of each non-null json field of a checked record."""
        return {n: encode_json(v) for n in self._json_fields if (v := record[n]) is not None}

    async def append_checked(self, rows: Sequence[CheckedRow]) -> list[Record]:
        """:meth:`append` for rows made by this adapter's :meth:`check_row`: no record is
        checked or encoded again (a group committer checks each event once, on its way in,
        and appends many in one call)."""
        for row in rows:
            if row.adapter is not self:
                raise ConfigurationError(
                    f"append_checked: a row checked by store {row.adapter.name!r} was given "
                    f"to {self.name!r}; check rows with the adapter that appends them"
                )
        return await self._append(list(rows)) if rows else []

    async def append_keyed(self, rows: Sequence[CheckedRow], key: str) -> list[Keyed]:
        """:meth:`append_checked` where the unique field ``key`` (see :meth:`declare_unique`)
        holds an idempotency key: a row whose key is already stored, or held by an earlier
        row of ``rows``, is not stored. Each answer is the row that holds the row's key: the
        row itself with its new ``id`` (``stored`` true), or the one stored before (``stored``
        false, as read back). Rows without a key are appended as usual. One transaction, or
        the current one; a concurrent append of the same key (another connection or node)
        is waited for, never stored twice and never an error. The lookup uses the index."""
        if self.indexes.get(key) is not True:
            raise ConfigurationError(
                f"append_keyed: {key!r} is not a unique field of store {self.name!r}"
            )
        for row in rows:
            if row.adapter is not self:
                raise ConfigurationError(
                    f"append_keyed: a row checked by store {row.adapter.name!r} was given "
                    f"to {self.name!r}; check rows with the adapter that appends them"
                )
        return await self._append_keyed(list(rows), key) if rows else []

    @abstractmethod
    async def _append_keyed(self, rows: list[CheckedRow], key: str) -> list[Keyed]:
        """:meth:`append_keyed` for checked rows (see there); ids as in :meth:`_append`."""

    def _encode_row(self, record: Record, json_texts: Mapping[str, str]) -> tuple[Any, ...]:
        """The values a checked record is written with, one per declared field in order.

        ``json_texts`` holds the encoded JSON of the record's non-null json fields (from
        :meth:`_json_texts`); a backend storing JSON as text uses it instead of encoding
        again. By default, the values as they are (for backends that keep Python objects).
        """
        return tuple(record[n] for n in self.fields)

    @abstractmethod
    async def _append(self, rows: list[CheckedRow]) -> list[Record]:
        """Insert ``rows`` (from this adapter's :meth:`check_row`) in one transaction, or in
        the current one, in order; answer each ``row.record`` with its new ``id``.

        Ids are the positions of :meth:`append`: strictly increasing in list order and in
        commit order across writers. One call is one unit of work on the database (one
        hand-off to a driver thread, one statement batch where the driver allows).
        """

    @abstractmethod
    async def read_after(self, position: int, limit: int) -> list[Record]:
        """Committed rows with ``id > position`` in id order, at most ``limit``."""

    @abstractmethod
    async def head(self) -> int:
        """The highest committed id, 0 when the table is empty."""

    # ------------------------------------------------------------------ meta (checkpoints)

    @abstractmethod
    async def get_meta(self, key: str) -> Any:
        """A JSON value kept for this table under ``key`` (None if unset).

        Meta lives in the same database and joins transactions, so a checkpoint can be saved
        atomically with the rows it accounts for. It is backed up and restored with the table.
        """

    @abstractmethod
    async def set_meta(self, key: str, value: Any) -> None:
        """Set (or with None, delete) a meta value; joins a current transaction."""

    @abstractmethod
    async def get_meta_for_update(self, key: str) -> Any:
        """:meth:`get_meta` after taking this table's write lock, held until the current
        transaction ends: call it inside :meth:`transaction` to read, decide and write a meta
        value (a lease, a checkpoint) with no other writer of the table in between, as
        ``SELECT ... FOR UPDATE`` does. Any write to the table (rows or meta) waits for that
        lock too, so writers of one table are serialised; readers never wait for it."""

    # ------------------------------------------------------------------ backup

    @abstractmethod
    async def backup(self, location: str) -> int:
        """Write a consistent copy of the table (rows with their ids, and its meta) into the
        directory ``location`` (created if missing); answers the bytes written. The table
        stays readable and writable meanwhile."""

    @abstractmethod
    async def restore(self, location: str) -> None:
        """Replace the table's rows and meta with the backup in ``location``, atomically:
        a reader sees the old table or the restored one, never a mix or an empty table.
        A missing or damaged backup raises and changes nothing."""

    async def replace_with(self, shadow: Adapter) -> None:
        """Atomically make this table hold what the sibling ``shadow`` holds (rows, ids and
        meta); ``shadow`` is left empty. Readers see old or new, never a mix. ``shadow``
        must be another table of this database with the same fields (ConfigurationError)."""
        self._check_sibling(shadow)
        if shadow.name == self.name or shadow.fields != self.fields:
            raise ConfigurationError(
                f"replace_with: {shadow.name!r} must be another table of {self.name!r}'s "
                "database with the same fields"
            )
        await self._replace_with(shadow)

    @abstractmethod
    async def _replace_with(self, shadow: Adapter) -> None:
        """:meth:`replace_with`, ``shadow`` checked (a sibling of the same fields)."""


def rows_missing(store: str) -> StoreError:
    """The error of :meth:`Adapter.apply` when a row it was to update is not there: the whole
    batch is refused (the same on every backend)."""
    return StoreError(f"rows of {store!r} to update are missing", store=store)


def unique_conflict(store: str, field: str, value: Any = None) -> ConflictError:
    """The error of a write that would give a unique field a value another row holds (409):
    it names the store, the field and, when short enough to show, the value."""
    shown = value if isinstance(value, int | float | str) and len(repr(value)) <= 80 else None
    taken = f"{shown!r} is" if shown is not None else "the value is"
    return ConflictError(
        f"field {field!r} of store {store!r} is unique and {taken} already taken by another "
        "row; nothing was written",
        store=store,
        field=field,
        value=shown,
    )


def describe(adapter: Adapter) -> dict[str, Any]:
    """The declared fields as the user wrote them, with ``id`` (for status answers)."""
    return {ID: "integer", **adapter.fields}


__all__ = [
    "Adapter",
    "Changes",
    "CheckedRow",
    "Keyed",
    "MetaMoved",
    "StoreFactory",
    "describe",
    "encode_json",
    "rows_missing",
    "unique_conflict",
]
