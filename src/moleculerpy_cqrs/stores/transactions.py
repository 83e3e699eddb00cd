"""How calls join the current unit of work, the same on every backend.

A database that hands out transactions subclasses :class:`Joinable`; while
:meth:`Joinable.joined` holds, :meth:`Joinable.current` answers the transaction to every call
made from the same task and from the tasks it starts (a ``contextvars.ContextVar`` carries it,
one variable for all databases: ContextVars are meant to be made once, at module level). A
task that outlives the transaction sees it ended and does not join it, nor a later one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any


class Unit:
    """A transaction as a backend keeps it; ``active`` until it ends (committed or not)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = True


# Keyed by database; typed loosely so that looking up needs no cast (a call) on every read.
_CURRENT: ContextVar[Mapping[object, Any]] = ContextVar(
    "moleculerpy_cqrs_transaction", default=MappingProxyType({})
)


class Joinable[T: Unit]:
    """A database whose transactions the calls of this task (and its tasks) join."""

    __slots__ = ()

    def current(self) -> T | None:
        """The transaction this call joins, None outside one."""
        tx: T | None = _CURRENT.get().get(self)
        return tx if tx is not None and tx.active else None

    @contextmanager
    def joined(self, tx: T) -> Iterator[T]:
        """Make ``tx`` the current transaction of this database for the block (and for the
        tasks started in it); it is marked ended when the block is left, however."""
        token = _CURRENT.set({**_CURRENT.get(), self: tx})
        try:
            yield tx
        finally:
            tx.active = False
            _CURRENT.reset(token)
