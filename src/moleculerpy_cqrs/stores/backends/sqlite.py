"""SQLite, the embedded default: stdlib ``sqlite3`` in WAL mode, one thread per connection.

Every adapter of one database in this process shares one :class:`_Database`: a writer
connection for all writes and transactions (an ``asyncio.Lock`` serialises units of work; a
context variable marks the current transaction so joined calls don't take the lock again) and
a reader connection for reads outside a transaction, which WAL keeps to committed data. An
in-memory database has no WAL, so it has the writer only and outside reads wait for the lock;
it lives while any adapter of it is open.

Durability: ``synchronous=FULL`` (the default) fsyncs the WAL on every commit, so an
acknowledged write survives a power cut. ``synchronous="NORMAL"`` writes the WAL before the
commit returns but syncs it only at checkpoints: it survives ``kill -9`` (the data is in the
OS page cache) but may lose the last commits on a power cut or OS crash. FULL is the default
because the event store acknowledges an append as durable; NORMAL is an option for read models.
Measured on an ext4/virtio VM: one append commit takes about 0.7 ms with FULL and 0.3 ms with
NORMAL (batches of 100 rows: about 30 us a row either way); both kept every acknowledged append
across ``kill -9`` (``test_acknowledged_appends_survive_kill_9``). Options: ``synchronous``
and ``busy_timeout`` (ms to wait for another process's write lock; default 10 s).

LIKE is compiled to GLOB with the pattern translated (:func:`glob_pattern`): GLOB is always
case-sensitive, whereas ``PRAGMA case_sensitive_like`` is deprecated and per connection.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Final, cast
from urllib.request import pathname2url

from moleculerpy_cqrs.errors import ConfigurationError, ConflictError, CqrsError, StoreError
from moleculerpy_cqrs.stores.backup_files import (
    BackupFiles,
    Manifest,
    damaged,
    file_sha256,
    fsync_path,
    read_manifest,
    write_manifest,
)
from moleculerpy_cqrs.stores.base import (
    Adapter,
    Changes,
    CheckedRow,
    Keyed,
    MetaMoved,
    rows_missing,
    unique_conflict,
)
from moleculerpy_cqrs.stores.encoding import decode_json, decode_json_many, encode_json
from moleculerpy_cqrs.stores.fields import (
    ID,
    Declarations,
    FieldType,
    Record,
    check_meta,
)
from moleculerpy_cqrs.stores.ports import Table
from moleculerpy_cqrs.stores.query import Compare, In, Query, fold_case
from moleculerpy_cqrs.stores.registry import Registry, SharedDatabase
from moleculerpy_cqrs.stores.sql import (
    Compiler,
    Dialect,
    index_name,
    index_statements,
    is_own_index,
    quote,
    quote_index,
)
from moleculerpy_cqrs.stores.transactions import Joinable, Unit

type Job[T] = Callable[[sqlite3.Connection], T]

_META: Final = "cqrs_meta"
_SUFFIXES: Final = (".db", ".sqlite", ".sqlite3")
_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_SQL_TYPES: Final[dict[FieldType, str]] = {
    "string": "TEXT",
    "integer": "INTEGER",
    "float": "REAL",
    "boolean": "INTEGER",
    "json": "TEXT",
    "datetime": "TEXT",
}
_DECODERS: Final[dict[FieldType, Callable[[Any], Any] | None]] = {
    "string": None,
    "integer": None,
    "float": float,
    "boolean": bool,
    "json": decode_json,
    "datetime": datetime.fromisoformat,
}
_ID_CHUNK: Final = 500
_KEYS_PER_SELECT: Final = 500
_RESTORE_BATCH: Final = 5000
_FIELDS_KEY: Final = "$fields"  # meta: the declared type of each column, as made
_COLUMN_KINDS: Final[dict[str, FieldType]] = {
    "TEXT": "string",
    "INTEGER": "integer",
    "REAL": "float",
}
_UNIQUE_FAILED: Final = re.compile(r"UNIQUE constraint failed: (\w+)\.(\w+)$")


def glob_pattern(like: str) -> str:
    """A LIKE pattern (``%``, ``_``, ``\\`` escapes; a trailing ``\\`` is literal) as GLOB."""
    out: list[str] = []
    chars = iter(like)
    for ch in chars:
        if ch == "\\":
            out.append(_glob_literal(next(chars, "\\")))
        elif ch == "%":
            out.append("*")
        elif ch == "_":
            out.append("?")
        else:
            out.append(_glob_literal(ch))
    return "".join(out)


def _glob_literal(ch: str) -> str:
    return f"[{ch}]" if ch in "*?[" else ch


def _unique_violation(error: sqlite3.IntegrityError) -> tuple[str, str] | None:
    """(table, field) of a UNIQUE constraint that refused a write, None for other errors."""
    found = _UNIQUE_FAILED.match(str(error))
    return None if found is None else (found.group(1), found.group(2))


def _write_rows(
    table: str,
    columns: tuple[str, ...],
    statement: _RowsStatement,
    rows: Sequence[Sequence[Any]],
    conn: sqlite3.Connection,
) -> int:
    """Write ``rows`` (each the parameters of ``statement``'s one-row form) with as few
    statements as the parameter limit allows: answers how many rows they changed.

    One statement for many rows, not ``executemany``: sqlite3 lets go of the GIL around each
    step of a statement, and a thread that wants it back waits for the busy event-loop thread
    to give it up (up to ``sys.getswitchinterval()``, 5 ms, a time). ``executemany`` steps once
    per row, so while the loop was busy a 1,000-row write took seconds (measured: 2.6-11 s
    against 10 ms alone); one statement steps once. A statement refused by a unique index (it
    leaves nothing behind) is run again row by row, which names the value
    (:func:`_executemany_unique`)."""
    if not rows:
        return 0
    width = len(rows[0])
    if width == 0:
        return _executemany_unique(table, columns, statement.one, list(rows), conn).rowcount
    per = max(1, min(_ROWS_PER_STATEMENT, conn.getlimit(_VARIABLE_LIMIT) // width))
    changed = 0
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        sql = statement.many(width, len(chunk))
        try:
            cursor = conn.execute(sql, [value for row in chunk for value in row])
        except sqlite3.IntegrityError:
            cursor = _executemany_unique(table, columns, statement.one, list(chunk), conn)
        changed += cursor.rowcount
    return changed


_ONE_STEP_ROWS: Final = 20_000  # rows a read takes in one step at most (one JSON text)


def _by_id(row: Record) -> Any:
    return row[ID]


_ROWS_PER_STATEMENT: Final = 500  # rows bound to one statement (its text is cached per count)
_VARIABLE_LIMIT: Final = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER


@dataclass(frozen=True, slots=True)
class _RowsStatement:
    """An INSERT (``VALUES (?, ...)``) or an update by id (``UPDATE t SET a = ?, ... WHERE id
    = ?``) of one row, and the same for many rows in one statement."""

    one: str
    head: str  # before the rows' VALUES list
    tail: str = ""  # after it

    @staticmethod
    def insert(one: str) -> _RowsStatement:
        head, _, _ = one.rpartition(" VALUES ")
        return _RowsStatement(one, head + " VALUES ")

    @staticmethod
    def update(table: str, names: tuple[str, ...], one: str) -> _RowsStatement:
        """``one``, :meth:`Compiler.update_by_id` of ``names`` (the values, then the id, per
        row, as :meth:`Compiler.grouped_updates` binds them)."""
        sets = ", ".join(f"{quote(n)} = v.column{i + 1}" for i, n in enumerate(names))
        head = f"UPDATE {table} SET {sets} FROM (VALUES "
        return _RowsStatement(one, head, f") AS v WHERE {table}.id = v.column{len(names) + 1}")

    def many(self, width: int, count: int) -> str:
        return _rows_sql(self.head, self.tail, width, count)


@lru_cache(maxsize=256)
def _rows_sql(head: str, tail: str, width: int, count: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return head + ", ".join([row] * count) + tail


def _executemany_unique(
    table: str,
    columns: tuple[str, ...],
    sql: str,
    rows: list[Any],
    conn: sqlite3.Connection,
) -> sqlite3.Cursor:
    """``executemany``; a row refused by a unique index raises :func:`unique_conflict` with
    its value (found on the error path only: the rows before it each made one change)."""
    before = conn.total_changes
    try:
        return conn.executemany(sql, rows)
    except sqlite3.IntegrityError as e:
        clash = _unique_violation(e)
        if clash is None or clash[1] not in columns:
            raise
        done = conn.total_changes - before
        value = rows[done][columns.index(clash[1])] if done < len(rows) else None
        raise unique_conflict(*clash, value) from e


def _encode(kind: FieldType | None, value: Any) -> Any:
    if value is None:
        return None
    if kind == "boolean":
        return int(value)
    if kind == "json":
        return encode_json(value)
    if kind == "datetime":
        # A fixed width (microseconds always, UTC offset) so text order is time order.
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


class _Dialect(Dialect):
    def encode(self, kind: FieldType | None, value: Any) -> Any:
        return _encode(kind, value)

    def like(self, column: str, negate: bool) -> str:
        return f"{column} {'NOT ' if negate else ''}GLOB ?"

    def like_pattern(self, pattern: str) -> str:
        return glob_pattern(pattern)

    def contains_ci(self, column: str) -> str:
        # SQLite's lower() folds ASCII only: every connection gets query.fold_case instead.
        return f"{_FOLD_CASE}({column}) LIKE ? ESCAPE '\\'"

    def json_contains(self, column: str, value: str | int | float | bool) -> tuple[str, list[Any]]:
        # json_each walks an array's elements, or a scalar itself; never an object's values.
        # Its type column tells true from 1 and "1" from 1 (the types are a fixed choice).
        params: list[Any] = [] if isinstance(value, bool) else [value]
        if isinstance(value, bool):
            test = f"type = '{'true' if value else 'false'}'"
        elif isinstance(value, str):
            test = "type = 'text' AND value = ?"
        else:
            test = "type IN ('integer', 'real') AND value = ?"
        return (
            f"json_type({column}) <> 'object' AND EXISTS (SELECT 1 FROM json_each({column}) "
            f"WHERE {test})",
            params,
        )


_DIALECT: Final = _Dialect()


def _call[T](store: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` (on a worker thread), translating driver and I/O errors: the one place."""
    try:
        return fn(*args)
    except sqlite3.IntegrityError as e:
        if (clash := _unique_violation(e)) is not None:
            raise unique_conflict(*clash) from e
        raise StoreError(f"SQLite failed for store {store!r}: {e}", store=store) from e
    except sqlite3.Error as e:
        raise StoreError(f"SQLite failed for store {store!r}: {e}", store=store) from e
    except OSError as e:
        raise StoreError(f"I/O failed for store {store!r}: {e}", store=store) from e


@dataclass(frozen=True)
class _Options:
    synchronous: str = "FULL"
    busy_timeout: int = 10_000  # ms; only other processes can make us wait for the file lock

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> _Options:
        # Other keys are left alone: the factory also hands over the owning service's settings.
        synchronous = str(raw.get("synchronous", cls.synchronous)).upper()
        if synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
        busy = raw.get("busy_timeout", cls.busy_timeout)
        if not isinstance(busy, int) or isinstance(busy, bool) or busy < 0:
            raise ConfigurationError("busy_timeout must be a non-negative number of ms")
        return cls(synchronous, busy)


_FOLD_CASE: Final = "cqrs_fold_case"


def _fold_case_or_null(value: object) -> str | None:
    return fold_case(value) if isinstance(value, str) else None


def _connect(target: str, uri: bool, options: _Options, reader: bool) -> sqlite3.Connection:
    if not uri and target != ":memory:":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        target, uri=uri, isolation_level=None, timeout=options.busy_timeout / 1000
    )
    try:
        # Pragmas take no parameters; the value is one of a fixed set of names.
        conn.execute(f"PRAGMA synchronous = {options.synchronous}")
        conn.create_function(_FOLD_CASE, 1, _fold_case_or_null, deterministic=True)
        if reader:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


class _Connection:
    """One sqlite3 connection, used only by its own thread (as aiosqlite does).

    Jobs reach the thread through a queue and come back with ``call_soon_threadsafe``:
    measured here, a round trip costs a third of ``run_in_executor``'s (18-35 us against
    56-137 us), whose futures are chained across threads. With one caller, that hand-off is
    most of what an append pays beside its fsync.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self, opener: Callable[[], sqlite3.Connection], store: str) -> None:
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name=f"cqrs-sqlite-{self._label}", daemon=True
        )
        self._thread.start()
        self._conn = await self._submit(_call, store, opener)

    async def run[T](self, job: Job[T], store: str) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"store {store!r} is closed", store=store)
        return await self._submit(_call, store, job, conn)

    def _submit[T](self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(loop, future, fn, args))
        return future

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            if conn is not None:
                await self._submit(conn.close)
        finally:
            self._jobs.put(None)
            thread.join()  # its queue is empty: it ends at once


@dataclass(frozen=True, slots=True)
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """A connection's thread: run jobs in order until told to stop."""
    while (job := jobs.get()) is not None:
        try:
            outcome: tuple[Any, BaseException | None] = (job.fn(*job.args), None)
        except BaseException as error:  # handed to the awaiting task, as an executor does
            outcome = (None, error)
        with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            job.loop.call_soon_threadsafe(_settle, job.future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled; the job ran all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Database(SharedDatabase, Joinable[Unit]):
    """The connections, lock and transactions shared by every adapter of one file."""

    def __init__(self, key: str, target: str, uri: bool, options: _Options) -> None:
        super().__init__(key)
        self.target, self.uri, self.options = target, uri, options
        self.lock = asyncio.Lock()
        self.writer = _Connection("writer")
        self.reader: _Connection | None = None
        self.restoring: dict[str, asyncio.Lock] = {}

    async def _open(self, store: str) -> None:
        await self.writer.open(partial(_connect, self.target, self.uri, self.options, False), store)
        mode = await self.writer.run(_journal_wal, store)
        if mode == "wal":
            self.reader = _Connection("reader")
            await self.reader.open(
                partial(_connect, self.target, self.uri, self.options, True), store
            )

    async def _close(self) -> None:
        for connection in (self.reader, self.writer):
            if connection is not None:
                await connection.close()


def _journal_wal(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()


_DATABASES: Final[Registry[_Database]] = Registry()


def _resolve(location: str, name: str, memory_key: str) -> tuple[str, str, bool]:
    """(registry key, what sqlite3.connect gets, whether that is a URI)."""
    if location == ":memory:":
        return f"memory:{memory_key}", ":memory:", False
    if location.startswith("file:"):
        return location, location, True
    path = Path(location)
    if path.suffix.lower() not in _SUFFIXES:
        path = path / f"{name}.sqlite3"
    target = os.path.realpath(path)
    return target, target, False


class SqliteAdapter(Adapter):
    def __init__(
        self,
        name: str,
        fields: Declarations | None = None,
        *,
        location: str,
        memory_key: str,
        options: Mapping[str, Any],
        parent: SqliteAdapter | None = None,
    ) -> None:
        super().__init__(name, fields)
        if name == _META or name.lower().startswith("sqlite_"):
            raise ConfigurationError(f"store name {name!r} is reserved by the SQLite backend")
        self._location = location
        self._memory_key = memory_key
        self._options = _Options.parse(options)
        self._parent = parent
        self._siblings: list[SqliteAdapter] = []
        self._database: _Database | None = None
        self._closed = False
        self._sql = Compiler(name, self.fields, _DIALECT)
        self._insert_sql = self._sql.insert(list(self.fields))
        # Fields whose values the driver takes other than as checked (text and numbers pass).
        self._converted = [
            (i, n, k)
            for i, (n, k) in enumerate(self.fields.items())
            if k in ("json", "boolean", "datetime")
        ]
        self._columns = (ID, *self.fields)
        self._field_names = tuple(self.fields)
        self._decoders: dict[str, Callable[[Any], Any] | None] = {
            ID: None,
            **{n: _DECODERS[k] for n, k in self.fields.items()},
        }

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        await self._open_database()
        await self._write(partial(_create_table, self.name, self.fields, self.indexes))

    async def stored_fields(self) -> dict[str, str] | None:
        opened = self._database is None
        await self._open_database()
        try:
            return await self._read(partial(_stored_fields, self.name, self.fields))
        finally:
            # Opened only for this look: nothing stays open (a refused start never closes).
            database = self._database
            if opened and database is not None and self._parent is None:
                self._database = None
                await _DATABASES.release(database)

    async def _open_database(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed", store=self.name)
        if self._database is None:
            if self._parent is not None:
                self._database = self._parent._db()
            else:
                key, target, uri = _resolve(self._location, self.name, self._memory_key)
                options = self._options
                database = await _DATABASES.acquire(
                    key, partial(_Database, key, target, uri, options), self.name
                )
                if self._database is None:
                    self._database = database
                else:  # a concurrent connect() won
                    await _DATABASES.release(database)

    def where(self) -> str:
        _, target, uri = _resolve(self._location, self.name, self._memory_key)
        if target == ":memory:":
            return f"SQLite in this process's memory, table {self.name}"
        return f"SQLite {target.split('?')[0] if uri else target}, table {self.name}"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sibling in self._siblings:
            sibling._closed = True
        database, self._database = self._database, None
        if database is not None and self._parent is None:
            await _DATABASES.release(database)

    def sibling(self, name: str, fields: Declarations | None = None) -> SqliteAdapter:
        root = self._parent or self
        adapter = SqliteAdapter(
            name,
            fields,
            location=self._location,
            memory_key=self._memory_key,
            options={},
            parent=root,
        )
        root._siblings.append(adapter)
        return adapter

    async def drop(self) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(f"DROP TABLE IF EXISTS {quote(self.name)}")
            conn.execute(f"DELETE FROM {_META} WHERE tbl = ?", (self.name,))

        await self._write(job)

    def transaction(self) -> AbstractAsyncContextManager[None]:
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        database = self._db()
        if database.current() is not None:
            yield
            return
        async with database.lock:
            await database.writer.run(_begin, self.name)
            ok = False
            try:
                with database.joined(Unit()):
                    yield
                ok = True
            finally:
                await database.writer.run(_commit if ok else _rollback, self.name)

    # ------------------------------------------------------------------ reads

    async def _find(self, query: Query) -> list[Record]:
        return await self._read(partial(self._select_rows, query))

    def _select_rows(self, query: Query, conn: sqlite3.Connection) -> list[Record]:
        """The rows ``query`` selects, read in one step when they can be (:meth:`_fetch_one_step`):
        a query in id order (no sort asked) of ``id`` and columns without a ``float`` one, at most
        :data:`_ONE_STEP_ROWS` rows (or found to be, for a query without a limit)."""
        names = query.fields or self._columns
        one_step = (
            not query.sort and ID in names and not any(self.fields.get(n) == "float" for n in names)
        )
        if one_step and query.limit is not None and query.limit <= _ONE_STEP_ROWS:
            sql, params = self._sql.select(query)
            return self._fetch_one_step(sql, params, names, conn)
        if one_step and query.limit is None and not query.offset:
            capped = Query(where=query.where, limit=_ONE_STEP_ROWS + 1, fields=query.fields)
            sql, params = self._sql.select(capped)
            rows = self._fetch_one_step(sql, params, names, conn)
            if len(rows) <= _ONE_STEP_ROWS:
                return rows
        sql, params = self._sql.select(query)
        return self._fetch(sql, params, names, conn)

    async def _count(self, query: Query) -> int:
        sql, params = self._sql.count(query)
        row = await self._read(partial(_fetchone, sql, params))
        return int(row[0])

    async def _get(self, entity_id: int) -> Record | None:
        rows = await self._get_many([entity_id])
        return rows[0] if rows else None

    async def _get_many(self, ids: list[int]) -> list[Record]:
        unique = list(dict.fromkeys(ids))
        chunks = [unique[i : i + _ID_CHUNK] for i in range(0, len(unique), _ID_CHUNK)]
        selects = [self._sql.select(Query(where=In(ID, tuple(c)))) for c in chunks]

        def job(conn: sqlite3.Connection) -> list[Record]:
            return [r for sql, params in selects for r in self._fetch(sql, params, None, conn)]

        found = {r[ID]: r for r in await self._read(job)}
        return [dict(found[i]) for i in ids if i in found]

    async def read_after(self, position: int, limit: int) -> list[Record]:
        query = Query(where=Compare(ID, ">", position), limit=max(limit, 0))
        return await self._read(partial(self._select_rows, query))

    async def head(self) -> int:
        row = await self._read(partial(_fetchone, f"SELECT max(id) FROM {self._sql.table}", []))
        return int(row[0] or 0)

    # ------------------------------------------------------------------ writes

    async def _insert_many(self, records: list[Record]) -> list[Record]:
        values = [self._encode_row(r, self._json_texts(r)) for r in records]
        first = await self._write(
            partial(_insert_rows, self.name, self._field_names, self._insert_sql, values)
        )
        return [{ID: first + i, **r} for i, r in enumerate(records)]

    def _encode_row(self, record: Record, json_texts: Mapping[str, str]) -> tuple[Any, ...]:
        values = [record[n] for n in self.fields]
        for i, name, kind in self._converted:
            values[i] = json_texts.get(name) if kind == "json" else _encode(kind, values[i])
        return tuple(values)

    async def _append(self, rows: list[CheckedRow]) -> list[Record]:
        # One writer at a time (BEGIN IMMEDIATE or the joined transaction): id order is
        # commit order, so a reader can never see a later id before an earlier one.
        values = [r.values for r in rows]
        first = await self._write(
            partial(_insert_rows, self.name, self._field_names, self._insert_sql, values)
        )
        return [{ID: first + i, **r.record} for i, r in enumerate(rows)]

    async def _append_keyed(self, rows: list[CheckedRow], key: str) -> list[Keyed]:
        # In the writer's transaction (no other writer of the file runs meanwhile). A key is
        # seldom a repeat: the rows are first inserted as a plain append inserts them, under a
        # savepoint; only when the unique index refuses one are the batch's keys looked up
        # (through the index) and the rows whose key is new inserted again. One row needs no
        # savepoint: a refused statement leaves nothing behind.
        column = list(self.fields).index(key)
        savepoint = len(rows) > 1

        def job(conn: sqlite3.Connection) -> list[Keyed]:
            if savepoint:
                conn.execute("SAVEPOINT cqrs_keyed")
            try:
                first = _insert_rows(
                    self.name, self._field_names, self._insert_sql, [r.values for r in rows], conn
                )
            except BaseException as error:
                if savepoint:
                    conn.execute("ROLLBACK TO cqrs_keyed")
                    conn.execute("RELEASE cqrs_keyed")
                if isinstance(error, ConflictError):  # a key held already (or another unique
                    return self._append_new_keys(rows, column, key, conn)  # field: raised again)
                raise
            if savepoint:
                conn.execute("RELEASE cqrs_keyed")
            return [Keyed({ID: first + i, **r.record}, True) for i, r in enumerate(rows)]

        return await self._write(job)

    def _append_new_keys(
        self, rows: list[CheckedRow], column: int, key: str, conn: sqlite3.Connection
    ) -> list[Keyed]:
        """The rows whose key no row holds yet, inserted; each answered with its key's row."""
        keys = list({v for r in rows if (v := r.values[column]) is not None})
        held: dict[str, Record] = {}
        for start in range(0, len(keys), _KEYS_PER_SELECT):
            chunk = keys[start : start + _KEYS_PER_SELECT]
            sql = self._holders_sql(key, len(chunk))
            held.update((r[key], r) for r in self._fetch(sql, chunk, None, conn))
        fresh: list[int] = []
        first_of: dict[str, int] = {}
        for i, row in enumerate(rows):
            value = row.values[column]
            if value is None or (value not in held and value not in first_of):
                fresh.append(i)
                if value is not None:
                    first_of[value] = i
        first = (
            _insert_rows(
                self.name,
                self._field_names,
                self._insert_sql,
                [rows[i].values for i in fresh],
                conn,
            )
            if fresh
            else 0
        )
        new = {i: {ID: first + n, **rows[i].record} for n, i in enumerate(fresh)}
        out: list[Keyed] = []
        for i, row in enumerate(rows):
            if i in new:
                out.append(Keyed(new[i], True))
            else:
                value = row.values[column]
                out.append(Keyed(held[value] if value in held else new[first_of[value]], False))
        return out

    def _holders_sql(self, key: str, count: int) -> str:
        """The rows holding any of ``count`` values of the unique field ``key`` (by index)."""
        columns = ", ".join(quote(c) for c in self._columns)
        marks = ", ".join("?" * count)
        return f"SELECT {columns} FROM {self._sql.table} WHERE {quote(key)} IN ({marks})"

    async def _update(self, entity_id: int, changes: Record) -> Record | None:
        if not changes:
            return await self._get(entity_id)
        by_id = Query(where=Compare(ID, "=", entity_id))
        update, params = self._sql.update(by_id, changes)
        select, select_params = self._sql.select(by_id)

        def job(conn: sqlite3.Connection) -> Record | None:
            if conn.execute(update, params).rowcount == 0:
                return None
            return self._fetch(select, select_params, None, conn)[0]

        return await self._with_value(self._write(job), changes)

    async def _update_many(self, query: Query, changes: Record) -> int:
        sql, params = self._sql.update(query, changes)
        return await self._with_value(self._write(partial(_rowcount, sql, params)), changes)

    async def _with_value[T](self, write: Awaitable[T], changes: Record) -> T:
        """``write``, its unique conflict told with the value the changes gave the field."""
        try:
            return await write
        except ConflictError as e:
            field = e.data.get("field") if isinstance(e.data, dict) else None
            if field in changes and e.data.get("value") is None:
                raise unique_conflict(self.name, field, changes[field]) from e.__cause__
            raise

    async def _remove(self, entity_id: int) -> Record | None:
        sql, params = self._sql.delete(Query(where=Compare(ID, "=", entity_id)))
        sql += " RETURNING " + ", ".join(quote(c) for c in self._columns)
        rows = await self._write(partial(self._fetch, sql, params, None))
        return rows[0] if rows else None

    async def _remove_many(self, query: Query) -> int:
        sql, params = self._sql.delete(query)
        return await self._write(partial(_rowcount, sql, params))

    async def _apply(
        self, work: list[tuple[Adapter, Changes]], advance: tuple[str, int, int] | None
    ) -> None:
        # Everything in one job on the writer's thread: one round trip, one commit.
        jobs = [cast(SqliteAdapter, adapter)._rows_job(changes) for adapter, changes in work]
        table = self.name

        def job(conn: sqlite3.Connection) -> None:
            if advance is not None:
                key, old, _ = advance
                row = conn.execute(
                    f"SELECT value FROM {_META} WHERE tbl = ? AND key = ?", (table, key)
                ).fetchone()
                stored = int(decode_json(row[0]) or 0) if row else 0
                if stored != old:
                    raise MetaMoved(key, stored, old)
            for rows_job in jobs:
                rows_job(conn)
            if advance is not None:
                _set_meta(table, advance[0], encode_json(advance[2]), conn)

        await self._write(job)

    def _check_sibling(self, other: Table) -> None:
        if not isinstance(other, SqliteAdapter) or other._db() is not self._db():
            raise ConfigurationError(f"{other.name!r} is not a table of {self.name!r}'s database")

    def _rows_job(self, changes: Changes) -> Job[None]:
        # An id of None makes SQLite choose one (INTEGER PRIMARY KEY).
        inserts = self._sql.row_params(changes.inserts)
        insert = _RowsStatement.insert(self._sql.insert(list(self._columns))) if inserts else None
        insert_columns = self._columns
        updates = [
            (names, _RowsStatement.update(self._sql.table, names, one), rows)
            for names, one, rows in self._sql.grouped_updates(changes.updates)
        ]
        deletes = changes.deletes
        metas = [(k, check_meta(k, v)) for k, v in changes.meta.items()]
        table, quoted = self.name, self._sql.table

        def job(conn: sqlite3.Connection) -> None:
            if insert is not None:
                _write_rows(table, insert_columns, insert, inserts, conn)
            for names, update, rows in updates:
                if _write_rows(table, names, update, rows, conn) != len(rows):
                    raise rows_missing(table)
            for start in range(0, len(deletes), _ID_CHUNK):
                chunk = deletes[start : start + _ID_CHUNK]
                marks = ", ".join("?" * len(chunk))
                conn.execute(f"DELETE FROM {quoted} WHERE id IN ({marks})", chunk)
            for key, text in metas:
                _set_meta(table, key, text, conn)

        return job

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> Any:
        check_meta(key, None)
        sql = f"SELECT value FROM {_META} WHERE tbl = ? AND key = ?"
        row = await self._read(partial(_fetchone, sql, [self.name, key]))
        return None if row is None else decode_json(row[0])

    async def set_meta(self, key: str, value: Any) -> None:
        text = check_meta(key, value)
        await self._write(partial(_set_meta, self.name, key, text))

    async def get_meta_for_update(self, key: str) -> Any:
        check_meta(key, None)
        sql = f"SELECT value FROM {_META} WHERE tbl = ? AND key = ?"
        # On the writer: its transaction (BEGIN IMMEDIATE) holds the database's write lock.
        row = await self._write(partial(_fetchone, sql, [self.name, key]))
        return None if row is None else decode_json(row[0])

    # ------------------------------------------------------------------ backup

    async def backup(self, location: str) -> int:
        database = self._db()
        job = partial(_backup, self.name, self.fields, BackupFiles.of(location, self.name))
        if database.current() is not None:
            return await database.writer.run(job, self.name)
        if database.reader is None:
            async with database.lock:
                return await database.writer.run(job, self.name)
        # A connection of its own, so the copy blocks neither readers nor writers.
        opener = partial(_connect, database.target, database.uri, database.options, True)
        return await asyncio.to_thread(_call, self.name, _with_connection, opener, job)

    async def restore(self, location: str) -> None:
        files, saved = await asyncio.to_thread(
            read_manifest, location, self.name, self.fields, "sqlite"
        )
        await asyncio.to_thread(_call, self.name, _inspect, location, files, saved)
        source = files.rows
        shadow = f"{self.name}__restoring"
        names = [ID, *saved.fields]
        insert = Compiler(shadow, saved.fields, _DIALECT).insert(names)
        database = self._db()
        if database.current() is None:  # inside a transaction, its lock already serialises
            async with database.restoring.setdefault(self.name, asyncio.Lock()):
                await self._fill_and_swap(source, saved, shadow, names, insert)
        else:
            await self._fill_and_swap(source, saved, shadow, names, insert)

    async def _fill_and_swap(
        self, source: Path, saved: Manifest, shadow: str, names: list[str], insert: str
    ) -> None:
        try:
            await self._write(partial(_recreate_table, shadow, self.fields))
            # Copied in batches of their own so other writers to this file never stall long.
            after = 0
            while batch := await asyncio.to_thread(
                _call, self.name, _read_rows, source, names, after
            ):
                await self._write(partial(_executemany, insert, batch))
                after = batch[-1][0]
            await self._write(partial(_swap_in, self.name, shadow, saved, self.indexes))
        except BaseException:
            with suppress(CqrsError):
                await self._write(partial(_drop_table, shadow))
            raise

    async def _replace_with(self, other: Adapter) -> None:
        shadow = cast(SqliteAdapter, other)

        def job(conn: sqlite3.Connection) -> None:
            seq = max(_seq(conn, self.name), _seq(conn, shadow.name))
            conn.execute(f"DROP TABLE {quote(self.name)}")
            conn.execute(f"ALTER TABLE {quote(shadow.name)} RENAME TO {quote(self.name)}")
            conn.execute(f"DELETE FROM {_META} WHERE tbl = ?", (self.name,))
            conn.execute(f"UPDATE {_META} SET tbl = ? WHERE tbl = ?", (self.name, shadow.name))
            _sync_indexes(self.name, self.indexes, conn)  # the shadow's names go, ours come
            _create_table(shadow.name, shadow.fields, shadow.indexes, conn)
            _set_seq(conn, self.name, seq)

        await self._write(job)

    # ------------------------------------------------------------------ plumbing

    def _db(self) -> _Database:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed", store=self.name)
        if self._database is None:
            raise StoreError(f"store {self.name!r} is not connected", store=self.name)
        return self._database

    async def _read[T](self, job: Job[T]) -> T:
        database = self._db()
        if database.current() is not None:
            return await database.writer.run(job, self.name)
        if database.reader is not None:
            return await database.reader.run(job, self.name)
        async with database.lock:
            return await database.writer.run(job, self.name)

    async def _write[T](self, job: Job[T]) -> T:
        database = self._db()
        if database.current() is not None:
            return await database.writer.run(job, self.name)
        async with database.lock:
            return await database.writer.run(partial(_atomically, job), self.name)

    def _fetch_one_step(
        self, sql: str, params: list[Any], names: tuple[str, ...], conn: sqlite3.Connection
    ) -> list[Record]:
        """The rows of ``sql`` (in id order; ``id`` and no ``float`` column among ``names``) as
        one JSON array made by SQLite in a single step, sorted by id here (an aggregate's input
        order is not promised). sqlite3 lets go of the GIL around every step, once per row for
        ``fetchall``, and a reader thread waits for the busy event loop to give it back each
        time (up to 5 ms): measured, 1,000 rows took 0.6-9.6 s that way while another thread
        ran Python, 2 ms alone. Integers and text come back exact in JSON (floats would not:
        SQLite writes them with 15 digits)."""
        columns = ", ".join(quote(n) for n in names)
        wrapped = f"SELECT json_group_array(json_array({columns})) FROM ({sql})"
        (text,) = conn.execute(wrapped, params).fetchone()
        rows = [dict(zip(names, row, strict=True)) for row in decode_json(text)]
        rows.sort(key=_by_id)
        return self._decoded(rows, names)

    def _fetch(
        self,
        sql: str,
        params: list[Any],
        names: tuple[str, ...] | None,
        conn: sqlite3.Connection,
    ) -> list[Record]:
        names = names or self._columns
        rows = [dict(zip(names, row, strict=True)) for row in conn.execute(sql, params).fetchall()]
        return self._decoded(rows, names)

    def _decoded(self, rows: list[Record], names: tuple[str, ...]) -> list[Record]:
        """``rows`` of stored values with each column's values decoded (in place)."""
        if not rows:
            return rows
        for name in names:
            decoder = self._decoders[name]
            if decoder is decode_json:  # a column's documents in one parse
                stored = [r for r in rows if r[name] is not None]
                values = decode_json_many([r[name] for r in stored])
                for row, value in zip(stored, values, strict=True):
                    row[name] = value
            elif decoder is not None:
                for row in rows:
                    if row[name] is not None:
                        row[name] = decoder(row[name])
        return rows


# ---------------------------------------------------------------------- jobs (worker threads)


def _begin(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:  # left behind by a failed rollback; never build on it
        conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _atomically[T](job: Job[T], conn: sqlite3.Connection) -> T:
    _begin(conn)
    try:
        result = job(conn)
    except BaseException:
        _rollback(conn)
        raise
    _commit(conn)
    return result


def _fetchone(sql: str, params: list[Any], conn: sqlite3.Connection) -> Any:
    return conn.execute(sql, params).fetchone()


def _rowcount(sql: str, params: list[Any], conn: sqlite3.Connection) -> int:
    return int(conn.execute(sql, params).rowcount)


def _executemany(sql: str, rows: list[tuple[Any, ...]], conn: sqlite3.Connection) -> None:
    conn.executemany(sql, rows)


def _insert_rows(
    table: str,
    columns: tuple[str, ...],
    sql: str,
    rows: list[tuple[Any, ...]],
    conn: sqlite3.Connection,
) -> int:
    """Insert ``rows`` of ``columns`` (inside the writer's transaction); answers the first
    new id.

    The ids are consecutive: AUTOINCREMENT gives each new row one more than the largest id
    the table ever had, and no other connection writes until this transaction ends.
    """
    _write_rows(table, columns, _RowsStatement.insert(sql), rows, conn)
    (last,) = conn.execute("SELECT last_insert_rowid()").fetchone()
    return int(last) - len(rows) + 1


def _set_meta(table: str, key: str, text: str | None, conn: sqlite3.Connection) -> None:
    if text is None:
        conn.execute(f"DELETE FROM {_META} WHERE tbl = ? AND key = ?", (table, key))
    else:
        conn.execute(
            f"INSERT INTO {_META} (tbl, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (tbl, key) DO UPDATE SET value = excluded.value",
            (table, key, text),
        )


def _table_sql(table: str, fields: Mapping[str, FieldType]) -> str:
    columns = [f"{quote(ID)} INTEGER PRIMARY KEY AUTOINCREMENT"]
    columns += [f"{quote(n)} {_SQL_TYPES[k]}" for n, k in fields.items()]
    return f"CREATE TABLE IF NOT EXISTS {quote(table)} ({', '.join(columns)})"


def _create_table(
    table: str,
    fields: Mapping[str, FieldType],
    indexes: Mapping[str, bool],
    conn: sqlite3.Connection,
    *,
    record: bool = True,
) -> None:
    """Create ``table`` (and the meta table) if missing, add declared columns it lacks, give it
    its declared indexes. With ``record``, the columns' declared types are kept in its meta
    (:func:`_stored_fields` reads them)."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_META} (tbl TEXT NOT NULL, key TEXT NOT NULL, "
        "value TEXT NOT NULL, PRIMARY KEY (tbl, key)) WITHOUT ROWID"
    )
    have = {r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))}
    conn.execute(_table_sql(table, fields))
    added = {n: k for n, k in fields.items() if n not in have}
    if have:
        for name, kind in added.items():  # a field declared since the table was made
            conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(name)} {_SQL_TYPES[kind]}")
    if record and added:
        row = conn.execute(
            f"SELECT value FROM {_META} WHERE tbl = ? AND key = ?", (table, _FIELDS_KEY)
        ).fetchone()
        if row is not None or not have:  # a table made before the record keeps none
            kinds = {**(decode_json(row[0]) if row else {}), **added}
            _set_meta(table, _FIELDS_KEY, encode_json(kinds), conn)
    _sync_indexes(table, indexes, conn)


def _stored_fields(
    table: str, declared: Mapping[str, FieldType], conn: sqlite3.Connection
) -> dict[str, str] | None:
    columns = conn.execute("SELECT name, type FROM pragma_table_info(?)", (table,)).fetchall()
    if not columns:
        return None
    recorded: dict[str, str] = {}
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (_META,)).fetchone():
        row = conn.execute(
            f"SELECT value FROM {_META} WHERE tbl = ? AND key = ?", (table, _FIELDS_KEY)
        ).fetchone()
        recorded = decode_json(row[0]) if row else {}
    out: dict[str, str] = {}
    for name, column_type in columns:
        if name == ID:
            continue
        kind = declared.get(name)
        if name in recorded:
            out[name] = recorded[name]
        elif kind is not None and _SQL_TYPES[kind] == column_type.upper():
            out[name] = kind
        else:
            out[name] = _COLUMN_KINDS.get(column_type.upper(), column_type.lower())
    return out


def _sync_indexes(table: str, indexes: Mapping[str, bool], conn: sqlite3.Connection) -> None:
    """Give ``table`` exactly the declared indexes of ours (by name): one no longer declared
    (or whose unique flag changed) is dropped, a missing one is built."""
    wanted = {index_name(table, field, unique) for field, unique in indexes.items()}
    have = conn.execute("SELECT name FROM pragma_index_list(?) WHERE origin = 'c'", (table,))
    for (name,) in have.fetchall():
        if is_own_index(name) and quote_index(name) not in wanted:
            conn.execute(f"DROP INDEX {quote_index(name)}")
    for statement in index_statements(table, quote(table), indexes):
        conn.execute(statement)


def _drop_table(table: str, conn: sqlite3.Connection) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {quote(table)}")


def _recreate_table(table: str, fields: Mapping[str, FieldType], conn: sqlite3.Connection) -> None:
    """``table`` new and empty, without indexes (they are built once it is filled)."""
    _drop_table(table, conn)
    _create_table(table, fields, {}, conn, record=False)


def _seq(conn: sqlite3.Connection, table: str) -> int:
    """The last id handed out (AUTOINCREMENT's memory), so ids are never reused."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    top = conn.execute(f"SELECT max(id) FROM {quote(table)}").fetchone()
    return max(int(row[0]) if row else 0, int(top[0] or 0))


def _set_seq(conn: sqlite3.Connection, table: str, seq: int) -> None:
    if conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (seq, table)).rowcount:
        return
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, seq))


def _with_connection[T](opener: Callable[[], sqlite3.Connection], job: Job[T]) -> T:
    conn = opener()
    try:
        return job(conn)
    finally:
        conn.close()


def _backup(
    table: str, fields: Mapping[str, FieldType], files: BackupFiles, conn: sqlite3.Connection
) -> int:
    """Back ``table`` and its meta, read in one transaction of ``conn``, up into ``files``:
    the rows as a SQLite file of one table, ``cqrs_rows`` (SQLite's own bulk copy)."""
    files.rows.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.rows.with_name(files.rows.name + ".tmp")
    tmp.unlink(missing_ok=True)
    names = [ID, *fields]
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        # No journal: a half-written file is never renamed into place; it is synced below.
        out.execute("PRAGMA journal_mode = OFF")
        out.execute("PRAGMA synchronous = OFF")
        out.execute("BEGIN")
        out.execute(_table_sql("cqrs_rows", fields))
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            cursor = conn.execute(
                f"SELECT {', '.join(quote(n) for n in names)} FROM {quote(table)} ORDER BY id"
            )
            out.executemany(Compiler("cqrs_rows", fields, _DIALECT).insert(names), cursor)
            meta = conn.execute(f"SELECT key, value FROM {_META} WHERE tbl = ?", (table,))
            meta_texts = dict(meta.fetchall())
            seq = _seq(conn, table)
        finally:
            if own:
                conn.execute("COMMIT")
        count = out.execute("SELECT count(*) FROM cqrs_rows").fetchone()[0]
        out.execute("COMMIT")
    finally:
        out.close()
    fsync_path(tmp)
    os.replace(tmp, files.rows)
    manifest = Manifest(
        rows_format="sqlite",
        table=table,
        fields=dict(fields),
        sequence=seq,
        meta=meta_texts,
        rows=count,
        size=files.rows.stat().st_size,
        sha256=file_sha256(files.rows),
    )
    return manifest.size + write_manifest(files, manifest)


def _open_backup(source: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{pathname2url(str(source.absolute()))}?mode=ro", uri=True)


def _inspect(location: str, files: BackupFiles, saved: Manifest) -> None:
    """Check that the rows file is the whole one its manifest describes, before changing
    anything."""
    try:
        if file_sha256(files.rows) != saved.sha256:
            raise ValueError("its rows do not match its manifest")
        conn = _open_backup(files.rows)
        try:
            if conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                raise ValueError("it fails SQLite's integrity check")
            count = conn.execute("SELECT count(*) FROM cqrs_rows").fetchone()[0]
        finally:
            conn.close()
        if count != saved.rows:
            raise ValueError(f"it holds {count} rows of {saved.rows}")
    except (sqlite3.DatabaseError, ValueError) as e:
        raise damaged(saved.table, location, str(e)) from e


def _read_rows(source: Path, names: list[str], after: int) -> list[tuple[Any, ...]]:
    conn = _open_backup(source)
    try:
        columns = ", ".join(quote(n) for n in names)
        sql = f"SELECT {columns} FROM cqrs_rows WHERE id > ? ORDER BY id LIMIT ?"
        return conn.execute(sql, (after, _RESTORE_BATCH)).fetchall()
    finally:
        conn.close()


def _swap_in(
    table: str,
    shadow: str,
    saved: Manifest,
    indexes: Mapping[str, bool],
    conn: sqlite3.Connection,
) -> None:
    (count,) = conn.execute(f"SELECT count(*) FROM {quote(shadow)}").fetchone()
    if count != saved.rows:
        raise StoreError(f"the backup of {table!r} changed while it was restored", store=table)
    seq = max(_seq(conn, table), _seq(conn, shadow), saved.sequence)
    conn.execute(f"DROP TABLE {quote(table)}")
    conn.execute(f"ALTER TABLE {quote(shadow)} RENAME TO {quote(table)}")
    _sync_indexes(table, indexes, conn)
    conn.execute(f"DELETE FROM {_META} WHERE tbl = ?", (table,))
    conn.executemany(
        f"INSERT INTO {_META} (tbl, key, value) VALUES (?, ?, ?)",
        [(table, key, text) for key, text in saved.meta.items()],
    )
    _set_seq(conn, table, seq)


__all__ = ["SqliteAdapter", "glob_pattern"]
