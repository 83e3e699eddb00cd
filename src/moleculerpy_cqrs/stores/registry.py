"""Databases shared by every adapter of this process that names the same one.

Two adapters of one SQLite file or one PostgreSQL schema must share connections, the write
lock and transactions (siblings write in one unit of work), so a backend keeps its open
databases in a :class:`Registry` and counts who holds each: the last :meth:`Registry.release`
closes it. Each event loop has its own set, as a lock, a pool or a pending open may never be
shared between loops; a loop that is gone takes its set with it.
"""

from __future__ import annotations

import asyncio
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable


class SharedDatabase(ABC):
    """A database held by one or more adapters; opened once, however many ask at once."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.refs = 0
        self._opening: asyncio.Future[None] | None = None

    async def ready(self, store: str) -> None:
        """Open it, or wait for the open under way (``store`` names the asking table in
        errors). A caller cancelled meanwhile does not cancel the open others wait for."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open(store))
        await asyncio.shield(self._opening)

    async def close(self) -> None:
        if self._opening is not None:
            await asyncio.wait([self._opening])  # an open still under way must finish first
        await self._close()

    @abstractmethod
    async def _open(self, store: str) -> None: ...

    @abstractmethod
    async def _close(self) -> None:
        """Release everything, also after a failed or partial open."""


class Registry[D: SharedDatabase]:
    """The open databases of one backend, per event loop, by key."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, D]] = (
            weakref.WeakKeyDictionary()
        )

    def __len__(self) -> int:
        """How many databases are open, in every loop (tests check that none outlives its
        adapters)."""
        return sum(len(databases) for databases in self._loops.values())

    async def acquire(self, key: Hashable, make: Callable[[], D], store: str) -> D:
        """The database ``key`` of this loop (``make`` makes it if none is open), ready."""
        databases = self._loops.setdefault(asyncio.get_running_loop(), {})
        database = databases.get(key)
        if database is None:
            database = databases[key] = make()
        database.refs += 1
        try:
            await database.ready(store)
        except BaseException:
            await self.release(database)
            raise
        return database

    async def release(self, database: D) -> None:
        """One holder fewer; the last one closes it."""
        database.refs -= 1
        if database.refs == 0:
            databases = self._loops.get(asyncio.get_running_loop(), {})
            if databases.get(database.key) is database:
                del databases[database.key]
            await database.close()
