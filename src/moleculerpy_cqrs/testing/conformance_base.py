"""What every conformance case class shares: the :class:`AdapterCase` hook, its helpers and
the sample rows (see :mod:`moleculerpy_cqrs.testing.conformance`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest_asyncio

from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.fields import Declarations
from moleculerpy_cqrs.stores.query import (
    parse_find,
)

ITEM_FIELDS: dict[str, str] = {
    "name": "string",
    "qty": "integer",
    "price": "float",
    "active": "boolean",
    "data": "json",
    "at": "datetime",
}
LOG_FIELDS: dict[str, str] = {"event": "string", "payload": "json"}
T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)

# Indexes 0..5; the tests name rows by index because backends number them differently.
ROWS: list[dict[str, Any]] = [
    {"name": "apple", "qty": 3, "price": 1.5, "active": True, "at": T0, "data": {"k": 1}},
    {"name": "Banana", "qty": 10, "price": None, "active": False, "at": T0 + DAY},
    {"name": None, "qty": None, "price": 2.0, "active": None, "at": None},
    {"name": "cherry pie", "qty": 0, "price": 0.5, "active": True, "at": T0 + 2 * DAY},
    {"name": "100%_real\\deal", "qty": -5, "price": 3.25, "active": False, "at": T0 - DAY},
    {"name": "apple", "qty": 7, "price": 1.5, "active": None, "at": T0 + 3 * DAY, "data": []},
]

HOSTILE_VALUES = [
    "'); DROP TABLE items; --",
    "Robert'); DROP TABLE students;--",
    '"; DELETE FROM items; --',
    "' OR '1'='1",
    "1; SELECT * FROM sqlite_master",
    "-- comment",
    "/* block */",
    "SELECT",
    "NULL",
    "%",
    "_",
    "\\",
    "\\'",
    "$1",
    "?",
    ":name",
    "`backtick`",
    "[bracket]",
    "*",
]
HOSTILE_NAMES = [
    "id; DROP TABLE items; --",
    '"name"',
    "a b",
    "name--",
    "name'",
    "",
    "1name",
    "n\u0430me",  # a Cyrillic a
    "name)",
    "*",
]


class Boom(Exception):
    """Raised by tests to roll a transaction back."""


def outside[T](coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``coro`` as a task outside every transaction (in a fresh context)."""
    return asyncio.create_task(coro, context=contextvars.Context())


async def promptly[T](awaitable: Coroutine[Any, Any, T] | asyncio.Task[T]) -> T:
    """Await something that must not wait for a writer: a backend that blocks it fails the
    test instead of hanging it."""
    async with asyncio.timeout(10):
        return await awaitable


@asynccontextmanager
async def doomed(adapter: Adapter) -> AsyncIterator[None]:
    """A transaction that ends by raising, so everything done in it must roll back."""
    with suppress(Boom):
        async with adapter.transaction():
            yield
            raise Boom


def files_under(location: str) -> list[Path]:
    return [p for p in Path(location).rglob("*") if p.is_file()]


class AdapterCase:
    """The hook and the helpers every case class shares."""

    #: True where a read outside a transaction waits for an open transaction to end (a
    #: backend without MVCC, e.g. in-memory SQLite); otherwise it must answer at once.
    readers_wait_for_writers: ClassVar[bool] = False
    #: Whether rows outlive closing every adapter of the table (False for a database that
    #: lives only while an adapter of it is open).
    survives_close: ClassVar[bool] = True

    tmp_path: Path

    async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
        """A new, unconnected adapter for table ``name`` in this test's database.

        Asking again for the same name gives another adapter of the same table. Each test
        starts with an empty database (``self.tmp_path`` is the test's own directory).
        """
        raise NotImplementedError

    def tmp_location(self) -> str:
        """A directory path, not yet created, for a backup."""
        self._locations += 1
        return str(self.tmp_path / f"backup-{self._locations}")

    @pytest_asyncio.fixture(autouse=True)
    async def _conformance_adapters(self, tmp_path: Path) -> AsyncIterator[None]:
        self.tmp_path = tmp_path
        self._opened: list[Adapter] = []
        self._locations = 0
        yield
        for adapter in reversed(self._opened):
            await adapter.close()

    async def open(self, name: str = "items", fields: Declarations = ITEM_FIELDS) -> Adapter:
        adapter = await self.make_adapter(name, fields)
        self._opened.append(adapter)
        await adapter.connect()
        return adapter

    async def open_sibling(
        self, parent: Adapter, name: str, fields: Declarations = LOG_FIELDS
    ) -> Adapter:
        adapter = parent.sibling(name, fields)
        self._opened.append(adapter)
        await adapter.connect()
        return adapter

    async def seeded(self) -> tuple[Adapter, list[int]]:
        adapter = await self.open()
        rows = await adapter.insert_many(ROWS)
        return adapter, [r["id"] for r in rows]

    @staticmethod
    async def found(adapter: Adapter, ids: list[int], **params: Any) -> list[int]:
        """Which seeded rows ``find`` answers (as indexes into ``ids``), in its order."""
        rows = await adapter.find(parse_find(adapter.fields, params))
        return [ids.index(r["id"]) for r in rows]

    @staticmethod
    async def let_others_run(adapter: Adapter) -> None:
        """Give other tasks many chances to run, with a round trip to the backend between."""
        for _ in range(3):
            await asyncio.sleep(0)
        await adapter.count()
        for _ in range(3):
            await asyncio.sleep(0)
