"""Letting a transformation's reads join the projector's open batch.

The projector applies a batch of events in one transaction. A transformation that reads its
aggregate (``profileSummaryAggregate.find``) must see the batch's earlier changes, which are
not committed yet, and during a replay it must read the table being rebuilt, not the live one.
In-process, the adapter's transaction travels in a ContextVar by itself; across nodes only
``meta`` travels. So the projector registers its open batch (the context of its transaction
and the table it writes) under a token sent in ``meta``, and the aggregate's store actions
run against that table, in that context, when they see a live token.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from moleculerpy_cqrs.stores.base import Adapter

META_KEY: Final = "$cqrsTx"


@dataclass(frozen=True)
class _Batch:
    context: contextvars.Context
    target: Adapter


_open: dict[str, _Batch] = {}


@contextmanager
def shared_transaction(target: Adapter) -> Iterator[str]:
    """Register the current context (inside an open transaction on ``target``)."""
    token = secrets.token_hex(8)
    _open[token] = _Batch(contextvars.copy_context(), target)
    try:
        yield token
    finally:
        del _open[token]


async def run_joined[T](meta: Any, default: Adapter, work: Callable[[Adapter], Awaitable[T]]) -> T:
    """Run ``work`` on the table and in the transaction that ``meta`` names, if that batch is
    open on this node and writes to a table of ``default``'s aggregate; else on ``default``."""
    token = meta.get(META_KEY) if isinstance(meta, dict) else None
    batch = _open.get(token) if isinstance(token, str) else None
    if batch is None or not _same_aggregate(batch.target, default):
        return await work(default)

    async def call() -> T:
        return await work(batch.target)

    return await asyncio.create_task(call(), context=batch.context.copy())


def _same_aggregate(target: Adapter, default: Adapter) -> bool:
    # The live table, or its shadow during a replay (named "<aggregate>__shadow").
    return target.name in (default.name, f"{default.name}__shadow")
