"""Group commit: concurrent appends share one transaction.

Appends queue up while a write is in flight; the next write takes everything queued (up to
``max_batch``) in one transaction. Under load this amortises the commit (the fsync) over many
events; with one writer it costs nothing. Every caller gets its row once it is durable.

Rows may carry an idempotency key (the unique field ``key_field``): a batch holding any goes
through :meth:`~moleculerpy_cqrs.stores.ports.Log.append_keyed`, which stores a key once and
answers every row with the row that holds its key. Batches are written one after another, so a
repeat queued behind the batch writing its key finds it stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from moleculerpy_cqrs.stores.fields import Record
from moleculerpy_cqrs.stores.ports import CheckedRow, Keyed, Log

MAX_BATCH: Final = 1000


class GroupCommitter:
    def __init__(
        self,
        adapter: Log,
        on_commit: Callable[[list[Record]], None],
        *,
        max_batch: int = MAX_BATCH,
        key_field: str | None = None,
    ) -> None:
        self._adapter = adapter
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._key_field = key_field
        self._queue: list[tuple[CheckedRow, asyncio.Future[Keyed]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0
        self.appended = 0

    async def append(self, row: CheckedRow) -> Record:
        """Append one row checked by the adapter; answers it with its position once
        committed."""
        return (await self.append_keyed(row)).row

    async def append_keyed(self, row: CheckedRow) -> Keyed:
        """:meth:`append` for a row that may hold a key in ``key_field``: answers the row that
        holds it once committed, and whether this call stored it."""
        future: asyncio.Future[Keyed] = asyncio.get_running_loop().create_future()
        self._queue.append((row, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="cqrs-group-commit")
        return await future

    async def close(self) -> None:
        """Wait for what is queued to be written."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._write(batch)

    async def _write(self, batch: list[tuple[CheckedRow, asyncio.Future[Keyed]]]) -> None:
        key = self._key_field
        rows = [row for row, _ in batch]
        try:
            if key is not None and any(row.record.get(key) is not None for row in rows):
                answers = await self._adapter.append_keyed(rows, key)
            else:
                answers = [Keyed(r, True) for r in await self._adapter.append_checked(rows)]
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            # One bad record must not fail its neighbours: write them one by one.
            for item in batch:
                await self._write([item])
            return
        stored = [a.row for a in answers if a.stored]
        self.batches += 1
        self.appended += len(stored)
        for (_, future), keyed in zip(batch, answers, strict=True):
            _settle(future, keyed=keyed)
        if stored:
            self._on_commit(stored)


def _settle(
    future: asyncio.Future[Keyed], *, keyed: Keyed | None = None, error: Exception | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert keyed is not None
        future.set_result(keyed)
