"""PostgreSQL backend: psycopg 3 async, one connection pool per event loop, DSN and schema.

Every adapter (and sibling) on the same database and schema in one event loop shares one pool
and its transactions; the pool closes with the last adapter. Tables are
``id bigint PRIMARY KEY DEFAULT nextval(<name>$seq)`` plus the declared columns; the sequence
is a separate object so a restored or replayed table can be swapped in by renaming.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, cast

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from moleculerpy_cqrs.errors import (
    ConfigurationError,
    ConflictError,
    InvalidInput,
    StoreError,
)
from moleculerpy_cqrs.stores.backup_files import (
    CHUNK,
    BackupFiles,
    Manifest,
    RowsWriter,
    damaged,
    read_manifest,
    write_manifest,
)
from moleculerpy_cqrs.stores.base import (
    Adapter,
    Changes,
    CheckedRow,
    Keyed,
    rows_missing,
    unique_conflict,
)
from moleculerpy_cqrs.stores.encoding import decode_json, encode_json
from moleculerpy_cqrs.stores.fields import ID, Declarations, FieldType, Record, check_meta
from moleculerpy_cqrs.stores.ports import Table
from moleculerpy_cqrs.stores.query import Compare, Query
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

Conn = psycopg.AsyncConnection[Any]

META_TABLE: Final = "cqrs_meta"
_MAX_IDENTIFIER: Final = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
_OPTIONS: Final = frozenset({"schema", "min_size", "max_size", "timeout"})

_COLUMN_TYPES: Final[dict[FieldType, str]] = {
    # COLLATE "C" compares code points, as the reference (Python str) does.
    "string": 'text COLLATE "C"',
    "integer": "bigint",
    "float": "double precision",
    "boolean": "boolean",
    "json": "json",  # json, not jsonb: keeps the document as written (key order, numbers)
    "datetime": "timestamptz",
}
# A column's type (format_type) as the declared type it is made for: one to one.
_KINDS: Final[dict[str, FieldType]] = {
    "text": "string",
    "bigint": "integer",
    "double precision": "float",
    "boolean": "boolean",
    "json": "json",
    "timestamp with time zone": "datetime",
}
# The element type an ``in`` list is bound as (json is never compared by value).
_ARRAY_TYPES: Final[dict[FieldType, str]] = {
    "string": "text",
    "integer": "bigint",
    "float": "float8",
    "boolean": "boolean",
    "json": "text",
    "datetime": "timestamptz",
}
# From this many rows on, a batch goes by COPY. Measured (2 cores, local server, one
# transaction a batch, client CPU): 64 rows 0.43 ms as one JSON document, 0.39-0.45 ms by
# COPY; 256 rows 1.05 and 0.65 ms; 1000 rows 3.4 and 1.6 ms. COPY takes three more round
# trips (ids, then the copy), which cost small group commits more than they save.
_COPY_FROM: Final = 128
# A batch of a few rows travels as one JSON document, a row an object of its non-null values
# (json_to_recordset makes a JSON null or a missing key SQL NULL, and keeps a json value's
# text as written). Measured: 64 rows cost the client 0.33 ms so against 0.87 ms as one
# array per column (psycopg builds arrays value by value in Python).
_RECORD_TYPES: Final[dict[FieldType, str]] = {
    "string": "text",
    "integer": "bigint",
    "float": "double precision",
    "boolean": "boolean",
    "json": "json",
    "datetime": "timestamptz",
}
_TO_JSON: Final[dict[FieldType, Callable[[Any], str]]] = {
    "string": encode_json,
    "integer": str,
    "float": float.__repr__,  # finite (checked): JSON, and read back exactly by PostgreSQL
    "boolean": lambda value: "true" if value else "false",
    "json": str,  # already the JSON text
    "datetime": lambda value: encode_json(value.isoformat()),
}
_INTERNAL_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_LOCK: Final = "SELECT pg_advisory_xact_lock(%s)"
# The column as the server shows it: quoted when not all lower case (idempotencyKey).
_UNIQUE_DETAIL: Final = re.compile(
    r'Key \((\w+|"(?:[^"]|"")+")\)=\((.*)\) already exists\.?$', re.DOTALL
)
_INDEXES_OF: Final = (
    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = to_regclass(%s)"
)


class _PgDialect(Dialect):
    placeholder = "%s"

    def encode(self, kind: FieldType | None, value: Any) -> Any:
        # json goes as text of unknown type; the server casts it to the column's json.
        return encode_json(value) if kind == "json" and value is not None else value

    def like(self, column: str, negate: bool) -> str:
        return f"{column} {'NOT ' if negate else ''}LIKE %s ESCAPE '\\'"

    def in_list(self, column: str, kind: FieldType | None, negate: bool, count: int) -> str:
        # One array parameter: an IN of placeholders stops at 65,535 bound parameters.
        array = "bigint" if kind is None else _ARRAY_TYPES[kind]
        if negate:
            return f"{column} <> ALL(%s::{array}[])"
        return f"{column} = ANY(%s::{array}[])"

    def in_params(self, kind: FieldType | None, values: list[Any]) -> list[Any]:
        return [values]

    def contains_ci(self, column: str) -> str:
        # lower() follows the column's collation: under "C" it folds ASCII only, under libc
        # locales one character at a time. ICU's root locale maps as query.fold_case does.
        return f"lower({column} COLLATE \"und-x-icu\") LIKE %s ESCAPE '\\'"

    def json_contains(self, column: str, value: str | int | float | bool) -> tuple[str, list[Any]]:
        # jsonb containment: an array holds the element (a scalar in it, not in a nested
        # array or an object), and JSON equality (1 is 1.0, true is not 1) for a scalar.
        element = encode_json(value)
        return (
            f"{column}::jsonb @> %s::jsonb OR {column}::jsonb = %s::jsonb",
            [f"[{element}]", element],
        )


_DIALECT: Final = _PgDialect()


def _internal(table: str, tag: str) -> str:
    """The quoted name of an object that belongs to ``table`` (its sequence, index, shadow).

    ``$`` cannot appear in a store name, so these never collide with a store's table.
    """
    name = f"{table}${tag}"
    if len(name) > _MAX_IDENTIFIER:
        digest = hashlib.blake2b(table.encode(), digest_size=6).hexdigest()
        name = f"{table[: _MAX_IDENTIFIER - len(tag) - 14]}${digest}${tag}"
    if not _INTERNAL_NAME.fullmatch(name):
        raise ValueError(f"not an identifier: {name!r}")
    return f'"{name}"'


def _lock_key(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _q(sql: str) -> bytes:
    # psycopg types queries as LiteralString; ours are composed only of quoted identifiers
    # and placeholders, never of values.
    return sql.encode()


# ---------------------------------------------------------------------- shared pools


class _Tx(Unit):
    __slots__ = ("conn", "locked")

    def __init__(self, conn: Conn) -> None:
        super().__init__()
        self.conn = conn
        self.locked: set[int] = set()  # the write locks this transaction holds


class _Database(SharedDatabase, Joinable[_Tx]):
    """One pool, shared by every adapter on it (and so are its transactions)."""

    def __init__(self, key: tuple[str, str], dsn: str, options: Mapping[str, Any]) -> None:
        super().__init__(key)
        self.schema = key[1]
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            min_size=options.get("min_size", 1),
            max_size=max(options.get("max_size", 10), options.get("min_size", 1)),
            timeout=float(options.get("timeout", 30.0)),
            kwargs={"autocommit": True},
            configure=_configure,
            open=False,
            name=f"cqrs-{self.schema}",
        )

    async def _open(self, store: str) -> None:
        await self.pool.open(wait=True)
        meta = f"{quote(self.schema)}.{quote(META_TABLE)}"
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT to_regclass(%s)", [meta])
            if (await cur.fetchone()) == (None,):
                async with conn.transaction():
                    # Concurrent CREATE ... IF NOT EXISTS can still clash: serialise.
                    await conn.execute(_LOCK, [_lock_key("ddl", self.schema)])
                    await conn.execute(_q(f"CREATE SCHEMA IF NOT EXISTS {quote(self.schema)}"))
                    await conn.execute(
                        _q(
                            f"CREATE TABLE IF NOT EXISTS {meta} ("
                            'tbl text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL, '
                            "value json NOT NULL, PRIMARY KEY (tbl, key))"
                        )
                    )

    async def _close(self) -> None:
        await self.pool.close()


_DATABASES: Final[Registry[_Database]] = Registry()


async def _configure(conn: Conn) -> None:
    # UTC datetimes, ISO text and exact floats in COPY output (backups).
    await conn.execute(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3"
    )


# ---------------------------------------------------------------------- the adapter


class PostgresAdapter(Adapter):
    def __init__(
        self,
        name: str,
        fields: Declarations | None = None,
        *,
        dsn: str,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, fields)
        options = dict(options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown PostgreSQL store option {unknown[0]!r}; use {sorted(_OPTIONS)}"
            )
        for size in ("min_size", "max_size"):
            value = options.get(size, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"PostgreSQL store option {size} must be an integer >= 1")
        timeout = options.get("timeout", 1.0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigurationError("PostgreSQL store option timeout must be seconds > 0")
        schema = str(options.get("schema", "public"))
        for what, ident in (("store name", name), ("schema", schema)):
            if not ident.isidentifier() or not ident.isascii():
                raise ConfigurationError(f"{what} {ident!r} must be an identifier")
            if len(ident) > _MAX_IDENTIFIER:
                raise ConfigurationError(
                    f"{what} {ident!r} is longer than PostgreSQL's {_MAX_IDENTIFIER} characters"
                )
        if name == META_TABLE:
            raise ConfigurationError(f"{META_TABLE!r} is reserved for the stores' meta table")
        self.dsn = dsn
        self.schema = schema
        self._options = options
        self._table = f"{quote(schema)}.{quote(name)}"
        self._seq = f"{quote(schema)}.{_internal(name, 'seq')}"
        self._pkey = _internal(name, "pkey")
        self._write_key = _lock_key("write", schema, name)
        self._meta = f"{quote(schema)}.{quote(META_TABLE)}"
        self._compiler = Compiler(name, self.fields, _DIALECT)
        self._compiler.table = self._table
        self._columns = ", ".join(quote(c) for c in self._compiler.columns)
        self._json_columns = [(i, n) for i, (n, k) in enumerate(self.fields.items()) if k == "json"]
        self._record_keys = [encode_json(n) + ":" for n in self.fields]
        self._record_encoders = [_TO_JSON[k] for k in self.fields.values()]
        self._insert_sql = (self._bulk_insert_sql(lock=False), self._bulk_insert_sql(lock=True))
        self._ids_sql = (self._ids_sql_for(lock=False), self._ids_sql_for(lock=True))
        names = "".join(f", {quote(n)}" for n in self.fields)
        self._keyed_sql: dict[tuple[str, bool], bytes] = {}
        self._copy_sql = _q(f"COPY {self._table} ({quote(ID)}{names}) FROM STDIN")
        self._datetimes = frozenset(n for n, k in self.fields.items() if k == "datetime")
        self._db: _Database | None = None
        self._closed = False
        self._siblings: list[PostgresAdapter] = []
        self._parent: PostgresAdapter | None = None

    # ------------------------------------------------------------------ lifecycle

    def where(self) -> str:
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.ProgrammingError:
            info = {}
        server = f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}"
        database = info.get("dbname") or info.get("user") or ""
        return f"PostgreSQL {server}/{database}, table {self.schema}.{self.name}"

    async def connect(self) -> None:
        await self._open_pool()
        try:
            await self._create_table()
        except psycopg.Error as e:
            raise self._error(e) from e

    async def _open_pool(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed", store=self.name)
        try:
            if self._db is None:
                key = (self.dsn, self.schema)
                make = partial(_Database, key, self.dsn, self._options)
                db = await _DATABASES.acquire(key, make, self.name)
                if self._db is None:
                    self._db = db
                else:  # a concurrent connect() won
                    await _DATABASES.release(db)
        except psycopg.Error as e:
            raise self._error(e) from e

    async def stored_fields(self) -> dict[str, str] | None:
        opened = self._db is None
        await self._open_pool()
        try:
            async with self._session() as conn:
                cur = await conn.execute(
                    "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                    "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
                    [self._table],
                )
                columns = await cur.fetchall()
        finally:
            # Opened only for this look: nothing stays open (a refused start never closes).
            db = self._db
            if opened and db is not None:
                self._db = None
                await _DATABASES.release(db)
        if not columns:
            return None
        return {name: _KINDS.get(sql_type, sql_type) for name, sql_type in columns if name != ID}

    async def _create_table(self) -> None:
        db = self._require()
        async with db.pool.connection() as conn:
            if await self._missing_columns(conn) == [] and await self._indexes_in_place(conn):
                return  # the usual case: nothing to create, no lock needed
            async with conn.transaction():
                await conn.execute(_LOCK, [_lock_key("ddl", self.schema)])
                missing = await self._missing_columns(conn)
                if missing is None:
                    await conn.execute(_q(f"CREATE SEQUENCE IF NOT EXISTS {self._seq}"))
                    await conn.execute(_q(self._create_sql(self._table, self._pkey)))
                else:
                    for column in missing:
                        await conn.execute(
                            _q(
                                f"ALTER TABLE {self._table} ADD COLUMN {quote(column)} "
                                f"{_COLUMN_TYPES[self.fields[column]]}"
                            )
                        )
                await self._sync_indexes(conn)

    async def _own_indexes(self, conn: Conn) -> set[str]:
        """The quoted names of this table's indexes of ours (see :func:`index_name`)."""
        cur = await conn.execute(_INDEXES_OF, [self._table])
        return {quote_index(row[0]) for row in await cur.fetchall() if is_own_index(row[0])}

    def _wanted_indexes(self, table: str | None = None) -> set[str]:
        return {index_name(table or self.name, f, u) for f, u in self.indexes.items()}

    async def _indexes_in_place(self, conn: Conn) -> bool:
        return await self._own_indexes(conn) == self._wanted_indexes()

    async def _sync_indexes(self, conn: Conn, renamed_from: str | None = None) -> None:
        """Give this table exactly its declared indexes: those of the table ``renamed_from``
        (now this one) are renamed to this table's names, ours no longer declared (or whose
        unique flag changed) are dropped, missing ones are built. Under the DDL lock."""
        schema = quote(self.schema)
        if renamed_from is not None:
            for field, unique in self.indexes.items():
                old, new = (
                    index_name(renamed_from, field, unique),
                    index_name(self.name, field, unique),
                )
                await conn.execute(_q(f"ALTER INDEX IF EXISTS {schema}.{old} RENAME TO {new}"))
        wanted = self._wanted_indexes()
        for name in await self._own_indexes(conn) - wanted:
            await conn.execute(_q(f"DROP INDEX {schema}.{name}"))
        for statement in index_statements(self.name, self._table, self.indexes):
            await conn.execute(_q(statement))

    async def _missing_columns(self, conn: Conn) -> list[str] | None:
        """Declared columns the table lacks; None when the table does not exist."""
        cur = await conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped",
            [self._table],
        )
        have = {row[0] for row in await cur.fetchall()}
        if not have:
            return None
        return [name for name in self.fields if name not in have]

    def _create_sql(self, table: str, pkey: str) -> str:
        """CREATE TABLE for this store's columns under the qualified name ``table``, ids
        drawn from this store's sequence (a regclass literal made of quoted identifiers)."""
        columns = "".join(f", {quote(n)} {_COLUMN_TYPES[k]}" for n, k in self.fields.items())
        return (
            f"CREATE TABLE {table} ("
            f"{quote(ID)} bigint NOT NULL DEFAULT nextval('{self._seq}'::regclass){columns}, "
            f"CONSTRAINT {pkey} PRIMARY KEY ({quote(ID)}))"
        )

    def _bulk_insert_sql(self, *, lock: bool) -> bytes:
        """One INSERT of any number of rows given as one JSON document (see
        :meth:`_batch_document`): the same statement for every batch size, so the server
        keeps it prepared.

        Ids are drawn in the order of the rows (the scan's ordinality: volatile output
        expressions are computed after any sort), after the write lock is taken (every joined
        row needs the lock's row), so they are consecutive under it.
        """
        seq = f"nextval('{self._seq}'::regclass)"
        if not self.fields:
            source = 'generate_series(1, %s) WITH ORDINALITY AS u(n, "$ord")'
            names, picks = "", ""
        else:
            aliases = ", ".join(quote(n) for n in self.fields)
            types = ", ".join(f"{quote(n)} {_RECORD_TYPES[k]}" for n, k in self.fields.items())
            source = (
                f"ROWS FROM (json_to_recordset(%s::json) AS ({types})) "
                f'WITH ORDINALITY AS u({aliases}, "$ord")'
            )
            names = ", " + aliases
            picks = "".join(f", u.{quote(n)}" for n in self.fields)
        if lock:
            source += " CROSS JOIN (SELECT pg_advisory_xact_lock(%s)) AS l"
        return _q(
            f"INSERT INTO {self._table} ({quote(ID)}{names}) "
            f'SELECT {seq}{picks} FROM {source} ORDER BY u."$ord" RETURNING {quote(ID)}'
        )

    def _batch_document(self, rows: list[CheckedRow]) -> str:
        """The rows as one JSON array of objects, a key per non-null value."""
        keys, encoders = self._record_keys, self._record_encoders
        objects = "},{".join(
            ",".join(
                key + encode(value)
                for key, encode, value in zip(keys, encoders, row.values, strict=True)
                if value is not None
            )
            for row in rows
        )
        return "[{" + objects + "}]"

    def _ids_sql_for(self, *, lock: bool) -> bytes:
        """``%s`` new ids, increasing (drawn after the sort, after the lock)."""
        source = "generate_series(1, %s) AS g(n)"
        if lock:
            source += " CROSS JOIN (SELECT pg_advisory_xact_lock(%s)) AS l"
        return _q(f"SELECT nextval('{self._seq}'::regclass) FROM {source} ORDER BY g.n")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sibling in self._siblings:
            await sibling.close()
        db, self._db = self._db, None
        if db is not None:
            await _DATABASES.release(db)

    def sibling(self, name: str, fields: Declarations | None = None) -> PostgresAdapter:
        root = self._parent or self
        child = PostgresAdapter(name, fields, dsn=self.dsn, options=self._options)
        child._parent = root
        root._siblings.append(child)
        return child

    async def drop(self) -> None:
        async with self._session(write=True) as conn:
            await conn.execute(_q(f"DROP TABLE IF EXISTS {self._table}"))
            await conn.execute(_q(f"DROP SEQUENCE IF EXISTS {self._seq}"))
            await conn.execute(_q(f"DELETE FROM {self._meta} WHERE tbl = %s"), [self.name])

    def _require(self) -> _Database:
        if self._closed:
            raise StoreError(f"store {self.name!r} is closed", store=self.name)
        if self._db is None:
            raise StoreError(f"store {self.name!r} is not connected", store=self.name)
        return self._db

    # ------------------------------------------------------------------ the funnel

    @asynccontextmanager
    async def _session(self, *, write: bool = False, atomic: bool = False) -> AsyncIterator[Conn]:
        """The connection of the current transaction, else a pool connection; with ``write``
        or ``atomic``, in a transaction of its own. Driver errors become :class:`StoreError`
        here only.

        ``write`` takes this table's write lock, held until the transaction ends: writers of
        a table wait for one another's commit (the contract's "writers wait"), so ids are
        handed out in commit order and a reader past id p never sees a later commit below p
        (the gap problem). Readers never take it.
        """
        db = self._require()
        tx = db.current()
        try:
            if tx is not None:
                if write and self._write_key not in tx.locked:
                    await tx.conn.execute(_LOCK, [self._write_key])
                    tx.locked.add(self._write_key)
                yield tx.conn
            elif write or atomic:
                async with db.pool.connection() as conn, conn.transaction():
                    if write:
                        await conn.execute(_LOCK, [self._write_key])
                    yield conn
            else:
                async with db.pool.connection() as conn:
                    yield conn
        except psycopg.Error as e:
            raise self._error(e) from e

    def _error(self, e: psycopg.Error) -> StoreError | ConflictError:
        if isinstance(e, psycopg.errors.UniqueViolation):
            found = _UNIQUE_DETAIL.match(e.diag.message_detail or "")
            table = e.diag.table_name or self.name
            if found is not None:
                field, text = found.group(1), found.group(2)
                if field.startswith('"'):
                    field = field[1:-1].replace('""', '"')
                value: Any = (
                    int(text) if field == ID or self.fields.get(field) == "integer" else text
                )
                return unique_conflict(table, field, value)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # A declared unique field's value held twice is the caller's conflict (409); any
        # other constraint (an id chosen twice) stays a store error.
        constraint = e.diag.constraint_name or ""
        if isinstance(e, psycopg.errors.UniqueViolation) and "$unique_" in constraint:
            return ConflictError(
                f"PostgreSQL store {self.name!r}: a unique field's value is already held "
                f"({detail})",
                store=self.name,
            )
        return StoreError(f"PostgreSQL store {self.name!r}: {detail}", store=self.name)

    def transaction(self) -> AbstractAsyncContextManager[None]:
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        db = self._require()
        if db.current() is not None:
            yield  # join the enclosing unit of work
            return
        try:
            async with db.pool.connection() as conn:
                with db.joined(_Tx(conn)):
                    async with conn.transaction():
                        yield
                        if conn.info.transaction_status == TransactionStatus.INERROR:
                            # A statement failed and its error was caught: COMMIT would
                            # silently roll back, so say so.
                            raise StoreError(
                                "the transaction failed earlier and was rolled back",
                                store=self.name,
                            )
        except psycopg.Error as e:
            raise self._error(e) from e

    def _record(self, names: list[str], row: tuple[Any, ...]) -> Record:
        out = dict(zip(names, row, strict=True))
        for name in self._datetimes:
            value = out.get(name)
            if isinstance(value, datetime) and value.tzinfo is not UTC:
                out[name] = value.astimezone(UTC)
        return out

    async def _select(
        self, sql: str, params: list[Any], names: list[str], *, write: bool = False
    ) -> list[Record]:
        async with self._session(write=write) as conn:
            cur = await conn.execute(_q(sql), params)
            rows = await cur.fetchall()
        return [self._record(names, row) for row in rows]

    async def _scalar(self, sql: str, params: list[Any]) -> Any:
        async with self._session() as conn:
            cur = await conn.execute(_q(sql), params)
            row = await cur.fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ reads

    async def _find(self, query: Query) -> list[Record]:
        sql, params = self._compiler.select(query)
        return await self._select(sql, params, list(query.fields or self._compiler.columns))

    async def _count(self, query: Query) -> int:
        sql, params = self._compiler.count(query)
        return int(await self._scalar(sql, params))

    async def _get(self, entity_id: int) -> Record | None:
        rows = await self._select(
            f"SELECT {self._columns} FROM {self._table} WHERE id = %s",
            [entity_id],
            self._compiler.columns,
        )
        return rows[0] if rows else None

    async def _get_many(self, ids: list[int]) -> list[Record]:
        rows = await self._select(
            f"SELECT {self._columns} FROM {self._table} WHERE id = ANY(%s::bigint[])",
            [ids],
            self._compiler.columns,
        )
        by_id = {row[ID]: row for row in rows}
        return [by_id[i] for i in ids if i in by_id]

    # ------------------------------------------------------------------ writes

    async def _insert_many(self, records: list[Record]) -> list[Record]:
        rows = [self._checked_row(r) for r in records]
        async with self._session(write=True) as conn:
            return await self._insert_rows(conn, rows)

    def _checked_row(self, record: Record) -> CheckedRow:
        texts = self._json_texts(record)
        return CheckedRow(self, record, texts, self._encode_row(record, texts))

    def _encode_row(self, record: Record, json_texts: Mapping[str, str]) -> tuple[Any, ...]:
        values = [record[n] for n in self.fields]
        for i, name in self._json_columns:
            values[i] = json_texts.get(name)
        return tuple(values)

    async def _insert_rows(
        self, conn: Conn, rows: list[CheckedRow], *, lock: bool = False
    ) -> list[Record]:
        """Insert ``rows``; ``lock`` first takes the table's write lock (held until commit).

        A few rows go in one INSERT (one round trip: with ``lock``, a statement that is its
        own transaction commits in it); more go by COPY, which costs the client half the CPU
        per row (the INSERT's arrays are built in Python) but two more round trips, and with
        ``lock`` needs ``conn`` in a transaction.
        """
        if len(rows) < _COPY_FROM:
            params: list[Any] = [self._batch_document(rows) if self.fields else len(rows)]
            if lock:
                params.append(self._write_key)
            cur = await conn.execute(self._insert_sql[lock], params)
            ids = sorted(row[0] for row in await cur.fetchall())
        else:
            params = [len(rows), self._write_key] if lock else [len(rows)]
            cur = await conn.execute(self._ids_sql[lock], params)
            ids = sorted(row[0] for row in await cur.fetchall())
            async with conn.cursor() as copying, copying.copy(self._copy_sql) as copy:
                for position, row in zip(ids, rows, strict=True):
                    await copy.write_row((position, *row.values))
        return [{ID: i, **r.record} for i, r in zip(ids, rows, strict=True)]

    async def _update(self, entity_id: int, changes: Record) -> Record | None:
        if not changes:
            return await self._get(entity_id)
        sql, params = self._compiler.update(Query(where=Compare(ID, "=", entity_id)), changes)
        rows = await self._select(
            f"{sql} RETURNING {self._columns}", params, self._compiler.columns, write=True
        )
        return rows[0] if rows else None

    async def _update_many(self, query: Query, changes: Record) -> int:
        sql, params = self._compiler.update(query, changes)
        return await self._rowcount(sql, params, write=True)

    async def _remove(self, entity_id: int) -> Record | None:
        rows = await self._select(
            f"DELETE FROM {self._table} WHERE id = %s RETURNING {self._columns}",
            [entity_id],
            self._compiler.columns,
            write=True,
        )
        return rows[0] if rows else None

    async def _remove_many(self, query: Query) -> int:
        sql, params = self._compiler.delete(query)
        return await self._rowcount(sql, params, write=True)

    async def _rowcount(self, sql: str, params: list[Any], *, write: bool = False) -> int:
        async with self._session(write=write) as conn:
            cur = await conn.execute(_q(sql), params)
            return max(cur.rowcount, 0)

    def _check_sibling(self, other: Table) -> None:
        if not (
            isinstance(other, PostgresAdapter)
            and other._require() is self._require()
            and other.schema == self.schema
        ):
            raise ConfigurationError(f"{other.name!r} is not a table of {self.name!r}'s schema")

    async def _apply_rows(self, changes: Changes) -> None:
        async with self._session(write=True) as conn, conn.cursor() as cur:
            fresh = [row for row in changes.inserts if ID not in row]
            if fresh:
                await self._insert_rows(conn, [self.check_row(r) for r in fresh])
            chosen = [row for row in changes.inserts if ID in row]
            if chosen:
                rows = self._compiler.row_params(chosen)
                await cur.executemany(_q(self._compiler.insert(self._compiler.columns)), rows)
                await self._advance_sequence(conn, max(row[ID] for row in chosen))
            for _, sql, rows in self._compiler.grouped_updates(changes.updates):
                await cur.executemany(_q(sql), rows)
                if cur.rowcount != len(rows):  # as on every backend: the batch fails whole
                    raise rows_missing(self.name)
            if changes.deletes:
                await cur.execute(
                    _q(f"DELETE FROM {self._table} WHERE id = ANY(%s::bigint[])"),
                    [changes.deletes],
                )

    # ------------------------------------------------------------------ event log

    async def _append_keyed(self, rows: list[CheckedRow], key: str) -> list[Keyed]:
        # A key is seldom a repeat: outside a transaction the rows are first appended as a
        # plain append does (its own transaction, under the table's write lock, so a writer
        # of the same key on another connection has committed before). Only when the unique
        # index refuses a key (nothing was stored) are they written again the careful way.
        db = self._require()
        joined = db.current() is not None
        if not joined:
            try:
                return [Keyed(row, True) for row in await self._append(rows)]
            except ConflictError:
                pass  # a key held already (another unique field refuses the rows again below)
        # INSERT ... ON CONFLICT DO NOTHING: a key committed by another connection meanwhile,
        # or being committed (the insert waits for that transaction), stores nothing and is
        # no error. The holders of the keys not stored are read back after it (a statement
        # of its own: it sees what the other writer committed).
        column = list(self.fields).index(key)
        async with self._session(write=joined) as conn:
            params: list[Any] = [self._batch_document(rows)]
            if not joined:
                params.append(self._write_key)
            cur = await conn.execute(self._keyed_insert_sql(key, lock=not joined), params)
            inserted = sorted(await cur.fetchall())
        ids_of: dict[str, int] = {}
        plain_ids: list[int] = []
        for new_id, value in inserted:
            if value is None:
                plain_ids.append(new_id)
            else:
                ids_of[value] = new_id
        out: list[Keyed | None] = []
        missing: set[str] = set()
        taken: set[str] = set()
        plain = iter(plain_ids)
        for row in rows:
            value = row.values[column]
            if value is None:
                out.append(Keyed({ID: next(plain), **row.record}, True))
            elif value in ids_of:  # the first row with this key: the one stored
                out.append(Keyed({ID: ids_of.pop(value), **row.record}, True))
                taken.add(value)
            else:
                out.append(None)
                if value not in taken:
                    missing.add(value)
        held: dict[str, Record] = {}
        if missing:
            found = await self._select(
                self._holders_sql(key), [sorted(missing)], self._compiler.columns
            )
            held = {r[key]: r for r in found}
        first_of: dict[str, Record] = {}
        answers: list[Keyed] = []
        for row, answer in zip(rows, out, strict=True):
            value = row.values[column]
            if answer is not None:
                if value is not None and value not in first_of:
                    first_of[value] = answer.row
                answers.append(answer)
            elif value in held:
                answers.append(Keyed(held[value], False))
            elif value in first_of:  # an earlier row of this batch stored it
                answers.append(Keyed(first_of[value], False))
            else:
                raise StoreError(
                    f"PostgreSQL store {self.name!r}: the holder of key {value!r} vanished",
                    store=self.name,
                )
        return answers

    def _holders_sql(self, key: str) -> str:
        """The rows holding any value of an array of the unique field ``key`` (by index)."""
        return f"SELECT {self._columns} FROM {self._table} WHERE {quote(key)} = ANY(%s)"

    def _keyed_insert_sql(self, key: str, *, lock: bool) -> bytes:
        cached = self._keyed_sql.get((key, lock))
        if cached is None:
            plain = self._bulk_insert_sql(lock=lock).decode()
            head, _, _ = plain.rpartition(" RETURNING ")
            cached = _q(
                f"{head} ON CONFLICT ({quote(key)}) WHERE {quote(key)} IS NOT NULL DO NOTHING "
                f"RETURNING {quote(ID)}, {quote(key)}"
            )
            self._keyed_sql[key, lock] = cached
        return cached

    async def _append(self, rows: list[CheckedRow]) -> list[Record]:
        db = self._require()
        if db.current() is not None:
            async with self._session(write=True) as conn:
                return await self._insert_rows(conn, rows)
        # A few rows: one statement that is its own transaction (lock, insert, commit in one
        # round trip). More: a transaction around the lock, the ids and the COPY.
        async with self._session(atomic=len(rows) >= _COPY_FROM) as conn:
            return await self._insert_rows(conn, rows, lock=True)

    async def read_after(self, position: int, limit: int) -> list[Record]:
        return await self._select(
            f"SELECT {self._columns} FROM {self._table} WHERE id > %s ORDER BY id LIMIT %s",
            [position, max(limit, 0)],
            self._compiler.columns,
        )

    async def head(self) -> int:
        return int(await self._scalar(f"SELECT coalesce(max(id), 0) FROM {self._table}", []))

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> Any:
        check_meta(key, None)
        return await self._scalar(
            f"SELECT value FROM {self._meta} WHERE tbl = %s AND key = %s", [self.name, key]
        )

    async def get_meta_for_update(self, key: str) -> Any:
        check_meta(key, None)
        async with self._session(write=True) as conn:  # takes the table's write lock
            cur = await conn.execute(
                _q(f"SELECT value FROM {self._meta} WHERE tbl = %s AND key = %s"), [self.name, key]
            )
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def set_meta(self, key: str, value: Any) -> None:
        text = check_meta(key, value)
        if text is None:
            sql = f"DELETE FROM {self._meta} WHERE tbl = %s AND key = %s"
            params: list[Any] = [self.name, key]
        else:
            sql = (
                f"INSERT INTO {self._meta} (tbl, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value"
            )
            params = [self.name, key, text]
        # A meta write is a write of this table: it takes the table's write lock, so a
        # checkpoint read after it in the same transaction cannot be overtaken.
        await self._rowcount(sql, params, write=True)

    # ------------------------------------------------------------------ backup

    async def backup(self, location: str) -> int:
        files = BackupFiles.of(location, self.name)
        rows = RowsWriter(files.rows)
        await asyncio.to_thread(rows.open)
        try:
            async with self._snapshot() as conn:
                sql = f"COPY (SELECT {self._columns} FROM {self._table} ORDER BY id) TO STDOUT"
                async with conn.cursor() as cur, cur.copy(_q(sql)) as copy:
                    async for chunk in copy:
                        if rows.add(chunk):
                            await asyncio.to_thread(rows.flush)
                cur = await conn.execute(
                    _q(f"SELECT key, value::text FROM {self._meta} WHERE tbl = %s ORDER BY key"),
                    [self.name],
                )
                meta = dict(await cur.fetchall())
                sequence = await _sequence_value(conn, self._seq)
            await asyncio.to_thread(rows.finish)
        except BaseException:
            await asyncio.to_thread(rows.abort)
            raise
        manifest = Manifest(
            rows_format="pg-copy-text",
            table=self.name,
            fields=dict(self.fields),
            sequence=sequence,
            meta=meta,
            rows=rows.count,
            size=rows.size,
            sha256=rows.hasher.hexdigest(),
        )
        return rows.size + await asyncio.to_thread(write_manifest, files, manifest)

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Conn]:
        """A connection seeing one consistent state: the current transaction's, else a new
        REPEATABLE READ transaction (which blocks no writer)."""
        db = self._require()
        if db.current() is not None:
            async with self._session() as conn:
                yield conn
            return
        try:
            async with db.pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn
        except psycopg.Error as e:
            raise self._error(e) from e

    async def restore(self, location: str) -> None:
        files, manifest = await asyncio.to_thread(
            read_manifest, location, self.name, self.fields, "pg-copy-text"
        )
        try:
            meta = [(self.name, k, check_meta(k, decode_json(v))) for k, v in manifest.meta.items()]
        except InvalidInput as e:
            raise damaged(self.name, location, f"its meta is not valid: {e}") from e
        shadow = f"{quote(self.schema)}.{_internal(self.name, 'restore')}"
        shadow_pkey = _internal(self.name, "restore$pkey")
        source = await asyncio.to_thread(files.rows.open, "rb")
        try:
            async with self._session(atomic=True) as conn:
                # The shadow fills while readers and writers use the table; only the swap
                # at the end takes its lock.
                await self._lock_ddl(conn)
                await conn.execute(_q(f"DROP TABLE IF EXISTS {shadow}"))
                await conn.execute(_q(self._create_sql(shadow, shadow_pkey)))
                hasher = hashlib.sha256()
                names = ", ".join(quote(c) for c in (ID, *manifest.fields))
                async with conn.cursor() as cur:
                    async with cur.copy(_q(f"COPY {shadow} ({names}) FROM STDIN")) as copy:
                        while chunk := await asyncio.to_thread(source.read, CHUNK):
                            hasher.update(chunk)
                            await copy.write(chunk)
                    loaded = cur.rowcount
                if hasher.hexdigest() != manifest.sha256 or loaded != manifest.rows:
                    raise damaged(self.name, location, "its rows do not match its manifest")
                # Built before the swap, so readers wait only for the renames.
                shadow_name = f"{self.name}$restore"
                for statement in index_statements(shadow_name, shadow, self.indexes):
                    await conn.execute(_q(statement))
                await conn.execute(_q(f"ANALYZE {shadow}"))  # see analyze()
                await self._swap(conn, shadow, shadow_pkey)
                await self._sync_indexes(conn, renamed_from=shadow_name)
                await self._advance_sequence(conn, manifest.sequence)
                await conn.execute(_q(f"DELETE FROM {self._meta} WHERE tbl = %s"), [self.name])
                if meta:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            _q(f"INSERT INTO {self._meta} (tbl, key, value) VALUES (%s, %s, %s)"),
                            meta,
                        )
        finally:
            await asyncio.to_thread(source.close)

    async def analyze(self) -> None:
        """Gather the planner's statistics of this table now (PostgreSQL's ``ANALYZE``).

        Without them — a table filled in bulk moments ago, before autovacuum has looked at it
        — the planner takes ``field = ANY(...)`` of a thousand keys (a batch's prefetch) to
        match most of the table and scans it (measured: 150-230 ms a batch at 1,000,000 rows,
        against a few ms through the index). A restore and a replay's swap analyze the new
        table before it takes the old one's place (its statistics go with it); call this after
        filling a table in bulk by other means."""
        async with self._session() as conn:
            await conn.execute(_q(f"ANALYZE {self._table}"))

    async def _replace_with(self, other: Adapter) -> None:
        shadow = cast(PostgresAdapter, other)
        await shadow.analyze()  # before the lock: readers wait only for the swap
        async with self._session(atomic=True) as conn:
            await self._lock_ddl(conn)
            await conn.execute(
                _q(f"LOCK TABLE {self._table}, {shadow._table} IN ACCESS EXCLUSIVE MODE")
            )
            await self._swap(conn, shadow._table, shadow._pkey)
            await self._sync_indexes(conn, renamed_from=shadow.name)
            await conn.execute(
                _q(
                    f"ALTER TABLE {self._table} ALTER COLUMN {quote(ID)} "
                    f"SET DEFAULT nextval('{self._seq}'::regclass)"
                )
            )
            await self._advance_sequence(conn, await _sequence_value(conn, shadow._seq))
            await conn.execute(_q(shadow._create_sql(shadow._table, shadow._pkey)))
            for statement in index_statements(shadow.name, shadow._table, shadow.indexes):
                await conn.execute(_q(statement))
            await conn.execute(_q(f"DELETE FROM {self._meta} WHERE tbl = %s"), [self.name])
            await conn.execute(
                _q(f"UPDATE {self._meta} SET tbl = %s WHERE tbl = %s"), [self.name, shadow.name]
            )

    async def _lock_ddl(self, conn: Conn) -> None:
        await conn.execute(_LOCK, [_lock_key("ddl", self.schema)])

    async def _swap(self, conn: Conn, source: str, source_pkey: str) -> None:
        """Drop this table and rename ``source`` (and its primary key index) into its place.
        Readers wait on the lock for the moment it takes, then read the new table."""
        schema = quote(self.schema)
        await conn.execute(_q(f"DROP TABLE {self._table}"))
        await conn.execute(_q(f"ALTER TABLE {source} RENAME TO {quote(self.name)}"))
        await conn.execute(_q(f"ALTER INDEX {schema}.{source_pkey} RENAME TO {self._pkey}"))

    async def _advance_sequence(self, conn: Conn, at_least: int) -> None:
        """Ids never go back: the next id is past every id this table or its source used."""
        await conn.execute(
            _q(
                "SELECT setval(%s::regclass, greatest(v, 1), v > 0) FROM (SELECT greatest("
                f"%s, %s, (SELECT coalesce(max(id), 0) FROM {self._table})) AS v) AS s"
            ),
            [self._seq, await _sequence_value(conn, self._seq), at_least],
        )


# ---------------------------------------------------------------------- helpers


async def _one(cur: psycopg.AsyncCursor[Any]) -> tuple[Any, ...]:
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def _sequence_value(conn: Conn, seq: str) -> int:
    cur = await conn.execute("SELECT coalesce(pg_sequence_last_value(%s::regclass), 0)", [seq])
    row = await cur.fetchone()
    return int(row[0]) if row else 0
