"""The narrow parts of the store contract, one per role core gives a table.

:class:`~moleculerpy_cqrs.stores.base.Adapter` (every backend) implements them all; core asks
each place for the narrowest one it needs, as ``eventsourcing`` splits its recorders by role
(``AggregateRecorder``, ``ApplicationRecorder``, ``ProcessRecorder``). A table may play
several roles: the event store's table is a :class:`Log` that the dispatcher also marks
(:class:`Table`) and keeps its position in (:class:`Checkpoints`).

- :class:`Log`: appends in commit order and reading after a position (the event store).
- :class:`Table`: a read model's rows: queries, single-row writes, and :meth:`Table.apply`,
  a projector batch in one transaction.
- :class:`Checkpoints`: a table's meta values (checkpoints, leases, versions), with the
  locking rule written on the class.
- :class:`Backups`: a consistent copy of a table and its meta, restore, and swapping a filled
  shadow table in.
- :class:`Lifecycle`: connecting, closing, comparing declarations, sibling tables.

The method contracts are written once, on :class:`~moleculerpy_cqrs.stores.base.Adapter`;
the conformance suite (:mod:`moleculerpy_cqrs.testing.conformance`) checks them on every
backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from moleculerpy_cqrs.errors import CqrsError
from moleculerpy_cqrs.stores.fields import FieldDeclaration, FieldSpec, FieldType, Record
from moleculerpy_cqrs.stores.query import ALL, Query


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a call per field to build
class CheckedRow:
    """A record checked and encoded by :meth:`Log.check_row`, ready to append; treat it as
    read-only."""

    adapter: Log
    record: Record
    """The checked record (every declared field, normalised): what the append answers."""
    json: Mapping[str, str]
    """The stored JSON text of each non-null json field."""
    values: tuple[Any, ...]
    """What the backend writes, one value per declared field in order."""


@dataclass(slots=True)
class Keyed:
    """One answer of :meth:`Log.append_keyed`: the row holding the key, and whether this
    append stored it (false: it was there before, or an earlier row of the batch holds it)."""

    row: Record
    stored: bool


@dataclass
class Changes:
    """Row changes for one table, written in one go by :meth:`Table.apply`.

    Values are already checked (:func:`~moleculerpy_cqrs.stores.fields.check_record`); ids
    are chosen by the caller, so a batch can refer to rows it has not written yet.
    """

    inserts: list[Record] = field(default_factory=list)  # whole rows; without ``id``: new ids
    updates: dict[int, Record] = field(default_factory=dict)  # id -> the fields to change
    deletes: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # key -> value (None deletes)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.updates or self.deletes or self.meta)


class MetaMoved(CqrsError):
    """:meth:`Table.apply` found a meta value other than the one it was told to expect."""

    def __init__(self, key: str, stored: int, expected: int) -> None:
        super().__init__(f"{key} is {stored}, expected {expected}")
        self.key, self.stored, self.expected = key, stored, expected


class Declared(Protocol):
    """What every role shares: a named table of declared fields, and its units of work."""

    name: str
    fields: dict[str, FieldType]
    specs: dict[str, FieldSpec]
    indexes: dict[str, bool]

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """A unit of work that calls from this task (and the tasks it starts) join, on this
        table and its siblings; an exception rolls all of it back."""
        ...


class Log(Declared, Protocol):
    """A table used as an append-only log: positions are ids, increasing in commit order."""

    def check_row(self, record: Mapping[str, Any]) -> CheckedRow: ...

    async def append(self, records: Sequence[Mapping[str, Any]]) -> list[Record]: ...

    async def append_checked(self, rows: Sequence[CheckedRow]) -> list[Record]: ...

    async def append_keyed(self, rows: Sequence[CheckedRow], key: str) -> list[Keyed]: ...

    async def read_after(self, position: int, limit: int) -> list[Record]: ...

    async def head(self) -> int: ...


class Table(Declared, Protocol):
    """A read model's rows: find by a query (through declared indexes where they help),
    write one row or many, and :meth:`apply` a projector's batch."""

    async def find(self, query: Query = ALL) -> list[Record]: ...

    async def count(self, query: Query = ALL) -> int: ...

    async def get(self, entity_id: Any) -> Record | None: ...

    async def get_many(self, ids: Sequence[Any]) -> list[Record]: ...

    async def insert(self, record: Mapping[str, Any]) -> Record: ...

    async def insert_many(self, records: Sequence[Mapping[str, Any]]) -> list[Record]: ...

    async def update(self, entity_id: Any, changes: Mapping[str, Any]) -> Record | None: ...

    async def update_many(self, query: Query, changes: Mapping[str, Any]) -> int: ...

    async def remove(self, entity_id: Any) -> Record | None: ...

    async def remove_many(self, query: Query) -> int: ...

    async def apply(
        self,
        changes: Changes,
        *,
        advance: tuple[str, int, int] | None = None,
        also: Sequence[tuple[Table, Changes]] = (),
    ) -> None: ...


class Checkpoints(Declared, Protocol):
    """A table's meta values: JSON under string keys, in the table's database, joining its
    transactions, backed up and restored with it.

    **The locking rule** (core relies on it; ``MetaCases`` checks it on every backend): every
    write to a table, of rows or of meta (:meth:`set_meta`), takes that table's write lock,
    and :meth:`get_meta_for_update` takes it before it reads; inside a transaction the lock
    is held until the transaction ends. So writers of one table are serialised, a value read
    with :meth:`get_meta_for_update` cannot change before the reader's commit, and a
    transaction that has written a checkpoint is never overtaken by another writer of the
    table. Readers never wait for the lock. (Memory and SQLite lock the whole database,
    PostgreSQL one table: both satisfy the rule.)
    """

    async def get_meta(self, key: str) -> Any: ...

    async def set_meta(self, key: str, value: Any) -> None: ...

    async def get_meta_for_update(self, key: str) -> Any: ...


class Backups(Declared, Protocol):
    """Copies of a table (rows, ids and meta) and atomic swaps of its contents."""

    async def backup(self, location: str) -> int: ...

    async def restore(self, location: str) -> None: ...

    async def replace_with(self, shadow: Self) -> None: ...

    async def drop(self) -> None: ...


class Lifecycle(Declared, Protocol):
    """Opening and closing a table, and tables beside it in the same database."""

    def declare_unique(self, field: str) -> None: ...

    async def connect(self) -> None: ...

    async def stored_fields(self) -> dict[str, str] | None: ...

    async def close(self) -> None: ...

    def where(self) -> str: ...

    def sibling(
        self, name: str, fields: Mapping[str, FieldDeclaration] | None = None
    ) -> Lifecycle: ...


class ReadModel(Table, Checkpoints, Protocol):
    """A projector's target: its rows, and the checkpoint :meth:`Table.apply` advances."""


class EventTable(Log, Table, Checkpoints, Protocol):
    """The event store's table as its dispatcher sees it: the log, whose rows it marks
    delivered, and its position kept in meta."""
