"""An aggregate at run time: its table, its dead letters and its projector."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, Final, Literal

from moleculerpy_cqrs.core.joins import OpenBatches
from moleculerpy_cqrs.core.lease import DEFAULT_TTL, Lease
from moleculerpy_cqrs.core.log import EventLog
from moleculerpy_cqrs.core.maintenance import Maintenance
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.core.projector import BATCH_SIZE, CONCURRENCY, LEASE_KEY, Binding, Projector
from moleculerpy_cqrs.core.records import DEAD_LETTER_FIELDS, now_ms
from moleculerpy_cqrs.core.slices import check_key_fields
from moleculerpy_cqrs.core.snapshots import NoSnapshot, SnapshotStrategy
from moleculerpy_cqrs.core.states import ProjectorState
from moleculerpy_cqrs.stores.base import Adapter, Changes
from moleculerpy_cqrs.stores.fields import ID
from moleculerpy_cqrs.stores.query import ALL, In, Query

DISCARDED_FIELDS: Final[dict[str, str]] = {
    **DEAD_LETTER_FIELDS,
    "deadLetterId": "integer",
    "discardedBy": "string",
    "discarded": "integer",
}
"""Columns of an aggregate's discarded dead letters (``<name>_discarded``): the dead letter as
it was, its id there, who discarded it and when (Unix milliseconds)."""


class AggregateRuntime:
    def __init__(
        self,
        name: str,
        make_adapter: Callable[[], Adapter],
        port: BrokerPort,
        bindings: list[Binding],
        *,
        batch_size: int = BATCH_SIZE,
        attempts: int = 3,
        on_error: Literal["dead_letter", "halt"] = "dead_letter",
        snapshot: SnapshotStrategy = NoSnapshot,
        snapshot_event_store: str | None = None,
        replay_batch_size: int = 1000,
        node_id: str = "node",
        lease_ttl: float = DEFAULT_TTL,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.node_id = node_id
        self.concurrency = concurrency
        self.batches = OpenBatches(name, node_id)
        self.lease_ttl = lease_ttl
        self.replay_batch_size = replay_batch_size
        self.name = name
        self.snapshot_strategy = snapshot
        self.snapshot_event_store = snapshot_event_store
        self.maintenance: Maintenance | None = None
        self.port = port
        self._make_adapter = make_adapter
        self._build()
        check_key_fields(bindings, self.adapter.fields)
        self.bindings = bindings
        self.batch_size = batch_size
        self.attempts = attempts
        self.on_error: Literal["dead_letter", "halt"] = on_error
        self.projector: Projector | None = None
        self.connected = asyncio.Event()
        self.projecting = asyncio.Event()

    def _build(self) -> None:
        """A fresh adapter (one is not reopened once closed) and its dead-letter siblings."""
        self.adapter = self._make_adapter()
        self.dead_letters = self.adapter.sibling(f"{self.name}_deadletters", DEAD_LETTER_FIELDS)
        self.discarded = self.adapter.sibling(f"{self.name}_discarded", DISCARDED_FIELDS)
        self.closed = False

    async def connect(self) -> None:
        if self.closed:
            self._build()
        await self.adapter.connect()
        await self.dead_letters.connect()
        await self.discarded.connect()
        self.connected.set()

    def start_projector(self, log: EventLog) -> Projector:
        self.projector = Projector(
            self.name,
            self.adapter,
            self.dead_letters,
            log,
            self.bindings,
            self.port,
            batch_size=self.batch_size,
            attempts=self.attempts,
            on_error=self.on_error,
            lease=Lease(self.adapter, LEASE_KEY, self.node_id, self.lease_ttl),
            concurrency=self.concurrency,
            batches=self.batches,
        )
        self.projector.start()
        self.maintenance = Maintenance(
            self.name,
            self.adapter,
            self.dead_letters,
            self.projector,
            self.snapshot_strategy,
            snapshots=self.snapshot_event_store is not None,
            replay_batch_size=self.replay_batch_size,
            node_id=self.node_id,
        )
        self.projecting.set()
        return self.projector

    async def wait_caught_up(self, position: int | None = None) -> int:
        """Wait until the projector has applied the log up to ``position`` (default: the
        head of the log when called); answers the checkpoint."""
        await self.projecting.wait()
        assert self.projector is not None
        target = await self.projector.source.head() if position is None else position
        return await self.projector.wait_until(target)

    async def stop(self) -> None:
        self.projecting.clear()
        if self.projector is not None:
            await self.projector.stop()
        await self.discarded.close()
        await self.dead_letters.close()
        await self.adapter.close()
        self.closed = True
        self.connected.clear()

    async def status(self) -> dict[str, Any]:
        p = self.projector
        checkpoint = p.checkpoint if p else int(await self.adapter.get_meta("checkpoint") or 0)
        head = await p.source.head() if p else None
        lag_events = max((head or 0) - checkpoint, 0)
        lag_seconds = 0.0
        if p and lag_events:
            nxt = await p.source.read_after(checkpoint, 1)
            if nxt:
                lag_seconds = max(now_ms() - int(nxt[0]["created"]), 0) / 1000
        return {
            "kind": "aggregate",
            "name": self.name,
            "eventStore": p.source.name if p else None,
            "state": str(p.state if p else ProjectorState.STOPPED),
            "waitingFor": list(p.waiting_for) if p else [],
            "checkpoint": checkpoint,
            "head": head,
            "lag": {"events": lag_events, "seconds": lag_seconds},
            "deadLetters": await self.dead_letters.count(),
            "discardedDeadLetters": await self.discarded.count(),
            "applied": p.stats.applied if p else 0,
            "haltedAt": p.stats.halted_at if p else None,
            "lastError": p.stats.last_error if p else None,
            "rows": await self.adapter.count(Query()),
            "replay": self.maintenance.replay_progress.public() if self.maintenance else None,
            "lastPauseMs": self.maintenance.last_pause_ms if self.maintenance else None,
            "lease": await p.lease.holder() if p and p.lease else None,
        }

    async def discard_dead_letters(self, ids: list[int] | None, by: str) -> dict[str, Any]:
        """Give up on dead letters (``ids``, or all): each moves, in one transaction, to the
        ``<name>_discarded`` table with who discarded it and when; its event stays unapplied."""
        async with AsyncExitStack() as stack:
            if self.projector is not None:
                await stack.enter_async_context(self.projector.paused())  # no retry meanwhile
            query = ALL if ids is None else Query(where=In(ID, tuple(ids)))
            rows = await self.dead_letters.find(query)
            when = now_ms()
            kept = [
                {
                    **{key: row.get(key) for key in DEAD_LETTER_FIELDS},
                    "deadLetterId": row[ID],
                    "discardedBy": by,
                    "discarded": when,
                }
                for row in rows
            ]
            if rows:
                await self.adapter.apply(
                    Changes(),
                    also=[
                        (self.dead_letters, Changes(deletes=[row[ID] for row in rows])),
                        (self.discarded, Changes(inserts=kept)),
                    ],
                )
            remaining = await self.dead_letters.count()
            if self.projector is not None:
                self.projector.stats.dead_letters = remaining
        found = {row[ID] for row in rows}
        missing = [i for i in ids or [] if i not in found]
        return {"discarded": len(rows), "missing": missing, "remaining": remaining, "by": by}
