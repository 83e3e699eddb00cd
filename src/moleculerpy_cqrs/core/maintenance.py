"""Snapshots, restores and replays of one aggregate, while appends and reads go on.

- ``snapshot``: records a snapshot-created event (eventType 1) in the event store, holds the
  projector between two batches, backs up the aggregate with its checkpoint (and its dead
  letters) through the store's own backup, and marks the event completed (2) or failed (3).
- ``restore``: refuses unknown, failed or unfinished snapshots; otherwise holds the projector,
  swaps the backup in atomically, and lets the projector catch up from the snapshot's
  checkpoint with every event stored since.
- ``replay``: rebuilds the aggregate from position 0 into a shadow table, in large batches,
  while the live table keeps serving reads and the live projector keeps running; then holds
  the projector for the last few events and swaps the shadow in atomically.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from moleculerpy_cqrs.core.batch import LAST_ID_KEY, IdCounter
from moleculerpy_cqrs.core.log import EventLog
from moleculerpy_cqrs.core.projector import CHECKPOINT_KEY, LEASE_KEY, Projector
from moleculerpy_cqrs.core.records import DEAD_LETTER_FIELDS, EventType
from moleculerpy_cqrs.core.snapshots import NO_BACKUP_ERROR, NOT_CONFIGURED_ERROR, SnapshotStrategy
from moleculerpy_cqrs.errors import Conflict, EntityNotFound, StoreError
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.query import ALL

REPLAY_BATCH: Final = 1000
HEARTBEAT_TTL: Final = 5.0
_SNAPSHOT_ID: Final = re.compile(r"snapshot_[0-9a-f]{16}")
_ALIVE: Final = "snapshot.taking."
SHADOW_SUFFIX: Final = "__shadow"
LEASE_KEYS: Final = (LEASE_KEY, f"{LEASE_KEY}.claim")
SNAPSHOT_STATES: Final = {
    EventType.SNAPSHOT_CREATED: "created",
    EventType.SNAPSHOT_COMPLETED: "completed",
    EventType.SNAPSHOT_FAILED: "failed",
}


@dataclass
class ReplayProgress:
    state: str = "idle"  # running, swapping, done, failed
    done: int = 0
    total: int = 0
    started: float = 0.0
    finished: float | None = None
    error: str | None = None
    events_per_second: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_t0")
        return out


class Maintenance:
    def __init__(
        self,
        name: str,
        adapter: Adapter,
        dead_letters: Adapter,
        projector: Projector,
        strategy: SnapshotStrategy,
        *,
        snapshots: bool,
        replay_batch_size: int = REPLAY_BATCH,
        node_id: str = "node",
        heartbeat_ttl: float = HEARTBEAT_TTL,
    ) -> None:
        self.name = name
        self.replay_batch_size = replay_batch_size
        self.adapter = adapter
        self.dead_letters = dead_letters
        self.projector = projector
        self.strategy = strategy
        self.snapshots_enabled = snapshots
        self.taker = f"{node_id}/{secrets.token_hex(4)}"
        self.taking: set[str] = set()  # snapshots this node is taking now
        self.heartbeat_ttl = heartbeat_ttl
        self.replay_progress = ReplayProgress()
        self.last_pause_ms: float | None = None

    # ------------------------------------------------------------------ snapshot

    async def snapshot(self) -> str:
        log = self._log()
        snapshot_id = "snapshot_" + secrets.token_hex(8)
        location = self.strategy.location(snapshot_id, self.name)
        async with self.projector.paused() as checkpoint:
            paused = time.perf_counter()
            payload: dict[str, Any] = {
                "snapshotId": snapshot_id,
                "aggregate": self.name,
                "checkpoint": checkpoint,
                "location": location,
            }
            payload["taker"] = self.taker
            self.taking.add(snapshot_id)
            heartbeat = asyncio.create_task(self._heartbeat(snapshot_id))
            try:
                created = await log.record_snapshot(self.name, payload)
            except BaseException:
                self.taking.discard(snapshot_id)
                await _stopped(heartbeat)
                raise
            try:
                if location is None:
                    raise StoreError(NO_BACKUP_ERROR, store=self.name)
                size = await self.adapter.backup(location)
                size += await self.dead_letters.backup(location)
            except asyncio.CancelledError:
                self.taking.discard(snapshot_id)  # as if the node died: its heartbeat stops
                await _stopped(heartbeat)
                raise
            except Exception as error:
                message = (
                    str(error)
                    if isinstance(error, StoreError) and str(error) == NO_BACKUP_ERROR
                    else "aggregate.snapshot action failed. We could not backup the aggregate. "
                    f"Error: {error}"
                )
                await _stopped(heartbeat)
                self.taking.discard(snapshot_id)
                await log.settle_snapshot(created["id"], payload, message)
                raise StoreError(message, store=self.name) from error
            finally:
                self.last_pause_ms = (time.perf_counter() - paused) * 1000
        await log.settle_snapshot(created["id"], {**payload, "size": size}, None)
        await _stopped(heartbeat)
        self.taking.discard(snapshot_id)
        await self.adapter.set_meta(_ALIVE + snapshot_id, None)
        return snapshot_id

    async def _heartbeat(self, snapshot_id: str) -> None:
        """Say, in the aggregate's meta, that this node is still taking the snapshot."""
        while True:
            until = time.time() + self.heartbeat_ttl
            await self.adapter.set_meta(_ALIVE + snapshot_id, {"taker": self.taker, "until": until})
            await asyncio.sleep(self.heartbeat_ttl / 3)

    async def _settle_interrupted(self, rows: list[dict[str, Any]]) -> None:
        """Mark failed every snapshot still "created" that no node is taking any more: not
        this one, and no heartbeat within ``heartbeat_ttl`` (so node clocks must agree to
        well within it)."""
        now = time.time()
        for row in rows:
            snapshot_id = row["payload"].get("snapshotId")
            if row["eventType"] != EventType.SNAPSHOT_CREATED or snapshot_id in self.taking:
                continue
            if now - row["created"] / 1000 < self.heartbeat_ttl:
                continue  # its heartbeat may not be written yet
            alive = await self.adapter.get_meta(_ALIVE + str(snapshot_id))
            if isinstance(alive, dict) and float(alive.get("until", 0)) > now:
                continue
            error = (
                f"interrupted: the node taking it ({row['payload'].get('taker', '?')}) stopped "
                "before it finished"
            )
            await self._log().settle_snapshot(row["id"], row["payload"], error)
            row["eventType"], row["error"] = int(EventType.SNAPSHOT_FAILED), error
            await self.adapter.set_meta(_ALIVE + str(snapshot_id), None)

    async def list_snapshots(self) -> list[dict[str, Any]]:
        out = []
        rows = await self._log().snapshots(self.name)
        await self._settle_interrupted(rows)
        for row in rows:
            p = row["payload"]
            out.append(
                {
                    "snapshotId": p.get("snapshotId"),
                    "status": SNAPSHOT_STATES.get(EventType(row["eventType"]), "?"),
                    "checkpoint": p.get("checkpoint"),
                    "size": p.get("size"),
                    "created": row["created"],
                    "updated": row["updated"],
                    "location": p.get("location"),
                    "error": row.get("error"),
                    "eventId": row["id"],
                }
            )
        return out

    # ------------------------------------------------------------------ restore

    async def restore(self, snapshot_id: str) -> dict[str, Any]:
        if not _SNAPSHOT_ID.fullmatch(snapshot_id):
            raise EntityNotFound(snapshot_id, store=f"snapshots of {self.name}")
        row = await self._find_snapshot(snapshot_id)
        kind = EventType(row["eventType"])
        if kind == EventType.SNAPSHOT_FAILED:
            raise Conflict(
                f"snapshot {snapshot_id} failed ({row.get('error')}); it cannot be restored",
                snapshotId=snapshot_id,
            )
        if kind != EventType.SNAPSHOT_COMPLETED:
            raise Conflict(
                f"snapshot {snapshot_id} never completed; it cannot be restored",
                snapshotId=snapshot_id,
            )
        # Where this aggregate's strategy keeps the snapshot, not what the event says: the
        # event store's actions can be called by anyone.
        location = self.strategy.location(snapshot_id, self.name)
        if not location:
            raise Conflict(f"snapshot {snapshot_id} has no backup location")
        async with self.projector.paused():
            paused = time.perf_counter()
            # One transaction: a crash between the two would re-apply events whose dead
            # letters the old table still holds.
            async with self.adapter.transaction():
                await self.adapter.restore(location)
                await self.dead_letters.restore(location)
                for key in LEASE_KEYS:  # whoever held the lease then does not hold it now
                    await self.adapter.set_meta(key, None)
            checkpoint = await self.projector.reload_checkpoint()
            self.last_pause_ms = (time.perf_counter() - paused) * 1000
        return {"snapshotId": snapshot_id, "checkpoint": checkpoint}

    # ------------------------------------------------------------------ replay

    async def replay(
        self, on_progress: Callable[[ReplayProgress], Any] | None = None
    ) -> dict[str, Any]:
        if self.replay_progress.state in ("running", "swapping"):
            raise Conflict(f"a replay of {self.name} is already running")
        progress = self.replay_progress = ReplayProgress(state="running", started=time.time())
        progress._t0 = time.perf_counter()
        shadow = self.adapter.sibling(self.name + SHADOW_SUFFIX, self.adapter.specs)
        shadow_dead = self.adapter.sibling(
            self.name + SHADOW_SUFFIX + "_deadletters", DEAD_LETTER_FIELDS
        )
        source = self.projector.source
        try:
            await shadow.connect()
            await shadow_dead.connect()
            async with shadow.transaction():  # leftovers of an interrupted replay
                await shadow.remove_many(ALL)
                await shadow_dead.remove_many(ALL)
                await shadow.set_meta(CHECKPOINT_KEY, None)
                await shadow.set_meta(LAST_ID_KEY, None)
            # Both phases stop at the head seen when they start: under a steady stream of
            # appends a replay still ends; the live projector applies what came after.
            progress.total = await source.head()
            position = await self._fill(
                shadow, shadow_dead, 0, progress.total, progress, on_progress
            )
            progress.state = "swapping"
            async with self.projector.paused():
                paused = time.perf_counter()
                head = await source.head()
                position = await self._fill(shadow, shadow_dead, position, head, progress, None)
                async with self.adapter.transaction():
                    await self.adapter.replace_with(shadow)
                    await self.dead_letters.replace_with(shadow_dead)
                await self.projector.reload_checkpoint()
                self.last_pause_ms = (time.perf_counter() - paused) * 1000
            progress.state = "done"
        except Exception as error:
            progress.state = "failed"
            progress.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            progress.finished = time.time()
            await shadow.close()
            await shadow_dead.close()
            if on_progress is not None:
                on_progress(progress)
        return progress.public()

    async def _fill(
        self,
        shadow: Adapter,
        shadow_dead: Adapter,
        position: int,
        until: int,
        progress: ReplayProgress,
        on_progress: Callable[[ReplayProgress], Any] | None,
    ) -> int:
        source = self.projector.source
        ids = IdCounter()
        while position < until:
            read = await source.read_after(position, self.replay_batch_size)
            events = [e for e in read if e["id"] <= until]
            if not events:
                break
            position = await self.projector.apply_batch(shadow, shadow_dead, events, position, ids)
            progress.done = position
            progress.total = max(progress.total, position)
            elapsed = time.perf_counter() - progress._t0
            progress.events_per_second = position / elapsed if elapsed else 0.0
            if on_progress is not None:
                on_progress(progress)
            await asyncio.sleep(0)  # a backend that never suspends must not starve appends
        return position

    def _log(self) -> EventLog:
        if not self.snapshots_enabled:
            raise Conflict(NOT_CONFIGURED_ERROR)
        return self.projector.source

    async def _find_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        for row in await self._log().snapshots(self.name):
            if row["payload"].get("snapshotId") == snapshot_id:
                await self._settle_interrupted([row])
                return row
        raise EntityNotFound(snapshot_id, store=f"snapshots of {self.name}")


async def _stopped(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end, so no heartbeat write is still in flight when
    the snapshot's outcome (or its heartbeat's removal) is written."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
