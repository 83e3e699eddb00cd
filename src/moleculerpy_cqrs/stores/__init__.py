"""Store adapters and the factories that make them.

``stores.memory()``, ``stores.sqlite(path_or_uri, fields=...)`` and ``stores.postgres(dsn,
fields=...)`` answer a factory of the seed's shape ``(name, cqrs_fields, settings) -> Adapter``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moleculerpy_cqrs.stores.base import Adapter, StoreFactory
from moleculerpy_cqrs.stores.fields import (
    FieldDeclaration,
    FieldSpec,
    FieldType,
    Record,
    declare_specs,
)
from moleculerpy_cqrs.stores.query import Query, parse_find


def memory(fields: Mapping[str, FieldDeclaration] | None = None) -> StoreFactory:
    """Tables in this process's memory; they live as long as the factory (the reference)."""
    from moleculerpy_cqrs.stores.backends.memory import MemoryDatabase

    database = MemoryDatabase()
    return _factory(fields, lambda name, all_fields, settings: database.adapter(name, all_fields))


def sqlite(
    path_or_uri: str | Path = "data",
    fields: Mapping[str, FieldDeclaration] | None = None,
    **options: Any,
) -> StoreFactory:
    """SQLite, the embedded default (WAL, stdlib ``sqlite3``).

    ``path_or_uri`` is a folder (one database file per store name inside it: ``data`` gives
    ``data/<name>.sqlite3``), a file ending in ``.db``/``.sqlite``/``.sqlite3`` (every store in
    that one file), ``":memory:"`` (a private in-memory database per factory), or a
    ``file:`` URI. ``options``: ``synchronous`` (``"FULL"``, the default, or ``"NORMAL"``),
    ``busy_timeout`` (ms).
    """
    from moleculerpy_cqrs.stores.backends.sqlite import SqliteAdapter

    location = str(path_or_uri)
    memory_key = f"cqrs-mem-{uuid.uuid4().hex}"
    return _factory(
        fields,
        lambda name, all_fields, settings: SqliteAdapter(
            name,
            all_fields,
            location=location,
            memory_key=memory_key,
            options={**options, **settings},
        ),
    )


def postgres(
    dsn: str,
    fields: Mapping[str, FieldDeclaration] | None = None,
    **options: Any,
) -> StoreFactory:
    """PostgreSQL through psycopg 3 with a connection pool; one table per store name.

    ``options``: ``schema`` (default ``public``), ``min_size``/``max_size`` of the pool,
    ``timeout``.
    """
    from moleculerpy_cqrs.stores.backends.postgres import PostgresAdapter  # psycopg: on demand

    return _factory(
        fields,
        lambda name, all_fields, settings: PostgresAdapter(
            name, all_fields, dsn=dsn, options={**options, **settings}
        ),
    )


def with_fields(factory: StoreFactory, fields: Mapping[str, FieldDeclaration]) -> StoreFactory:
    """The same stores with more declared fields (the Go README's ``storeFactory(fields)``)."""
    return _factory(fields, factory)


def _factory(
    fields: Mapping[str, FieldDeclaration] | None,
    make: Callable[[str, dict[str, FieldSpec], dict[str, Any]], Adapter],
) -> StoreFactory:
    """A factory of the seed's shape that adds ``fields`` to the toolkit's own. A field is a
    type name or a spec with index flags (``{"type": "string", "unique": True}``)."""
    user_fields = declare_specs(fields)

    def factory(
        name: str,
        cqrs_fields: Mapping[str, FieldDeclaration] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Adapter:
        return make(name, {**declare_specs(cqrs_fields), **user_fields}, dict(settings or {}))

    return factory


__all__ = [
    "Adapter",
    "FieldDeclaration",
    "FieldSpec",
    "FieldType",
    "Query",
    "Record",
    "StoreFactory",
    "memory",
    "parse_find",
    "postgres",
    "sqlite",
    "with_fields",
]
