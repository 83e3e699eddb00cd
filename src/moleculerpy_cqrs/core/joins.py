"""Letting a transformation's reads join the projector's open batch.

The projector applies a batch of events in one transaction. A transformation that reads its
aggregate (``profileSummaryAggregate.find``) must see the batch's earlier changes, which are
not committed yet. In-process, the adapter's transaction travels in a ContextVar and joins by
itself. Across nodes only ``meta`` travels, so the projector registers the context of its
open transaction under a token sent in ``meta``; the aggregate's read actions run in that
context when they see a live token.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

META_KEY: Final = "$cqrsTx"

_open: dict[str, contextvars.Context] = {}


@contextmanager
def shared_transaction() -> Iterator[str]:
    """Register the current context (inside an open transaction); answers its token."""
    token = secrets.token_hex(8)
    _open[token] = contextvars.copy_context()
    try:
        yield token
    finally:
        del _open[token]


async def run_joined[T](meta: Any, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` inside the transaction named by ``meta``, if it is open on this node."""
    token = meta.get(META_KEY) if isinstance(meta, dict) else None
    context = _open.get(token) if isinstance(token, str) else None
    if context is None:
        return await work()

    async def call() -> T:
        return await work()

    return await asyncio.create_task(call(), context=context.copy())
