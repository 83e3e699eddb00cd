"""The projector: feeds one aggregate from the event log, exactly once per event.

It reads the events after its checkpoint a batch at a time, runs the transformation bound to
each event, applies the answer (create / update / remove) and saves the new checkpoint in the
same transaction as the changes: a crash anywhere leaves the aggregate and its checkpoint in
step. A transformation that fails is retried; then the event goes to the dead letters (or the
projector halts, if so configured) and the rest goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from moleculerpy_cqrs.core import joins
from moleculerpy_cqrs.core.lease import Lease
from moleculerpy_cqrs.core.log import LogSource, Wakeup
from moleculerpy_cqrs.core.port import BrokerPort
from moleculerpy_cqrs.core.records import EventType, delivered, now_ms
from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.base import Adapter
from moleculerpy_cqrs.stores.fields import ID, Record
from moleculerpy_cqrs.stores.query import ALL, In, Query, parse_condition

CHECKPOINT_KEY: Final = "checkpoint"
CLAIM_KEY: Final = "projector"
LEASE_KEY: Final = "projector.lease"
Kind = Literal["create", "create_many", "update", "remove"]
Transform = str | Callable[[dict[str, Any]], Awaitable[Any]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Binding:
    """``aggregate.on(event).<kind>(transform)``."""

    event: str
    kind: Kind
    transform: Transform

    @property
    def handler_name(self) -> str:
        t = self.transform
        return t if isinstance(t, str) else getattr(t, "__qualname__", repr(t))


class TransformFailed(Exception):
    def __init__(self, binding: Binding, stage: str, error: BaseException, attempts: int):
        self.binding = binding
        self.stage = stage  # "transform_error" or "error"
        self.error = error
        self.attempts = attempts
        super().__init__(f"{binding.handler_name} {stage}: {type(error).__name__}: {error}")


class StaleCheckpoint(Exception):
    """Another projector of the same aggregate (on another node) moved the checkpoint."""

    def __init__(self, stored: int, expected: int) -> None:
        super().__init__(f"checkpoint is {stored}, this projector expected {expected}")
        self.stored = stored


class _Halt(Exception):
    def __init__(self, position: int, failure: TransformFailed) -> None:
        self.position = position
        self.failure = failure


@dataclass
class ProjectorStats:
    applied: int = 0
    batches: int = 0
    dead_letters: int = 0
    stale: int = 0
    last_error: str | None = None
    halted_at: int | None = None
    started: float = field(default_factory=time.monotonic)


class Projector:
    def __init__(
        self,
        name: str,
        adapter: Adapter,
        dead_letters: Adapter,
        source: LogSource,
        bindings: list[Binding],
        port: BrokerPort,
        *,
        batch_size: int = 100,
        attempts: int = 3,
        retry_delay: float = 0.01,
        on_error: Literal["dead_letter", "halt"] = "dead_letter",
        lease: Lease | None = None,
    ) -> None:
        self.name = name
        self.lease = lease
        self.standby = False
        self.adapter = adapter
        self.dead_letters = dead_letters
        self.source = source
        self.port = port
        self.batch_size = batch_size
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.on_error = on_error
        self._bindings: dict[str, list[Binding]] = {}
        for b in bindings:
            self._bindings.setdefault(b.event, []).append(b)
        self.checkpoint = 0
        self.stats = ProjectorStats()
        self._wakeup = Wakeup()
        self._gate = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._resume = asyncio.Event()
        self._progress = asyncio.Condition()
        self._halted = asyncio.Event()

    # ------------------------------------------------------------------ control

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def state(self) -> str:
        if not self.running:
            return "stopped"
        if self.stats.halted_at is not None:
            return "halted"
        if self.standby:
            return "standby"
        if self._gate.locked() and getattr(self, "_paused", False):
            return "paused"
        return "running"

    def transforms(self) -> list[str]:
        return sorted(
            {
                b.transform
                for bs in self._bindings.values()
                for b in bs
                if isinstance(b.transform, str)
            }
        )

    def start(self) -> None:
        if self.running:
            return
        self._unsubscribe = self.source.subscribe(self._wakeup.wake)
        self._wakeup.wake()
        self._task = asyncio.create_task(self._run(), name=f"cqrs-projector-{self.name}")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            if self.lease is not None:
                try:
                    await self.lease.release()
                except Exception:
                    log.exception("projector %s: could not release its lease", self.name)

    def wake(self) -> None:
        self._wakeup.wake()

    def resume_after_halt(self) -> None:
        self.stats.halted_at = None
        self._resume.set()

    @asynccontextmanager
    async def paused(self) -> Any:
        """Hold the projector between two batches (for snapshots); reads go on."""
        async with self._gate:
            self._paused = True
            try:
                yield self.checkpoint
            finally:
                self._paused = False
        self._wakeup.wake()

    async def wait_until(self, position: int) -> int:
        """Wait until every event up to ``position`` has been applied (or dead-lettered)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.checkpoint >= position)
        return self.checkpoint

    async def wait_halted(self) -> int:
        """Wait until the projector halts on a bad event (``on_error="halt"``)."""
        await self._halted.wait()
        assert self.stats.halted_at is not None
        return self.stats.halted_at

    async def _advanced(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    async def reload_checkpoint(self) -> int:
        self.checkpoint = int(await self.adapter.get_meta(CHECKPOINT_KEY) or 0)
        await self._advanced()
        return self.checkpoint

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        await self.port.wait_for_actions(self.transforms())
        await self.reload_checkpoint()
        failures = 0
        while True:
            self._wakeup.arm()
            if self.lease is not None:
                grant = await self.lease.acquire()
                self.standby = not grant.held
                if not grant.held:  # another node projects: wait for its lease to end
                    await asyncio.sleep(grant.retry_in + 0.01)
                    continue
                if grant.fresh:
                    await self.reload_checkpoint()
            try:
                async with self._gate:
                    progressed = await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except StaleCheckpoint as stale:
                self.stats.stale += 1
                log.info("projector %s: %s; catching up from there", self.name, stale)
                await self.reload_checkpoint()
                continue
            except _Halt as halt:
                self.stats.halted_at = halt.position
                self.stats.last_error = str(halt.failure)
                log.error(
                    "projector %s halted at event %s: %s", self.name, halt.position, halt.failure
                )
                self._resume.clear()
                self._halted.set()
                await self._resume.wait()
                self._halted.clear()
                continue
            except Exception as error:  # store failure: back off and try again
                failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                log.exception("projector %s: batch failed, retrying", self.name)
                await asyncio.sleep(min(0.05 * 2**failures, 5.0))
                continue
            if progressed:
                await asyncio.sleep(0)  # let others in between batches, whatever the backend
            else:
                await self._wakeup.wait()

    async def _step(self) -> bool:
        events = await self.source.read_after(self.checkpoint, self.batch_size)
        if not events:
            return False
        await self.apply_batch(self.adapter, self.dead_letters, events, self.checkpoint)
        self.checkpoint = events[-1]["id"]
        self.stats.batches += 1
        await self._advanced()
        return True

    async def apply_batch(
        self, target: Adapter, dead_letters: Adapter, events: list[Record], expected: int
    ) -> None:
        """Apply ``events`` to ``target`` and move its checkpoint from ``expected``, in one
        transaction. Raises :class:`StaleCheckpoint` (and changes nothing) when the stored
        checkpoint is not ``expected``: two nodes running one aggregate never both apply an
        event."""
        errors: list[tuple[Record, TransformFailed]] = []
        async with target.transaction():
            # The claim is a write: it takes the table's write lock first, so the checkpoint
            # read next cannot change before this transaction ends.
            await target.set_meta(CLAIM_KEY, {"at": events[0]["id"]})
            stored = int(await target.get_meta(CHECKPOINT_KEY) or 0)
            if stored != expected:
                raise StaleCheckpoint(stored, expected)
            with joins.shared_transaction(target) as token:
                for event in events:
                    for binding in self._relevant(event):
                        try:
                            await self._apply_with_retries(
                                target, binding, event, token, len(events)
                            )
                        except TransformFailed as failure:
                            if self.on_error == "halt":
                                raise _Halt(event["id"], failure) from None
                            await self._dead_letter(dead_letters, event, failure)
                            errors.append((event, failure))
            await target.set_meta(CHECKPOINT_KEY, events[-1]["id"])
        for event, failed in errors:
            await self._report(event, failed)

    def _relevant(self, event: Record) -> list[Binding]:
        if event.get("eventType") != EventType.COMMAND:
            return []
        return self._bindings.get(event["event"], [])

    async def _apply_with_retries(
        self, target: Adapter, binding: Binding, event: Record, token: str, batch: int
    ) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                await self.apply_one(target, binding, event, token, batch)
                self.stats.applied += 1
                return
            except TransformFailed as failure:
                if attempt == self.attempts:
                    failure.attempts = attempt
                    raise
                del failure
                await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))

    async def apply_one(
        self, target: Adapter, binding: Binding, event: Record, token: str, batch: int
    ) -> None:
        shaped = delivered(event, batch)
        try:
            result = await self._transform(binding, shaped, event.get("meta") or {}, token)
        except Exception as error:
            raise TransformFailed(binding, "transform_error", error, 1) from error
        try:
            await apply_result(target, binding.kind, result, event["id"])
        except Exception as error:
            raise TransformFailed(binding, "error", error, 1) from error

    async def _transform(
        self, binding: Binding, event: dict[str, Any], meta: Mapping[str, Any], token: str
    ) -> Any:
        if isinstance(binding.transform, str):
            call_meta = {**meta, joins.META_KEY: token, "$cqrsAggregate": self.name}
            return await self.port.call(binding.transform, event, call_meta)
        return await binding.transform(event)

    async def _dead_letter(self, dead: Adapter, event: Record, failure: TransformFailed) -> None:
        now = now_ms()
        await dead.insert(
            {
                "eventId": event["id"],
                "event": event["event"],
                "handler": failure.binding.handler_name,
                "kind": failure.binding.kind,
                "error": f"{type(failure.error).__name__}: {failure.error}"[:4000],
                "attempts": failure.attempts,
                "created": now,
                "updated": now,
                "record": {k: v for k, v in event.items()},
            }
        )
        self.stats.dead_letters += 1

    async def _report(self, event: Record, failure: TransformFailed) -> None:
        kind = "create" if failure.binding.kind == "create_many" else failure.binding.kind
        self.stats.last_error = str(failure)
        try:
            await self.port.emit(
                f"{self.name}.{kind}.{failure.stage}",
                {"error": str(failure.error), "event": delivered(event, 1)},
            )
        except Exception:
            log.exception("projector %s: could not emit the error event", self.name)

    # ------------------------------------------------------------------ dead letters

    async def retry_dead_letters(self, ids: list[int] | None = None) -> dict[str, Any]:
        """Apply dead-lettered events again, each in its own transaction with its removal."""
        query = ALL if ids is None else Query(where=In(ID, tuple(ids)))
        rows = await self.dead_letters.find(query)
        retried: list[int] = []
        failed: list[dict[str, Any]] = []
        bindings = {(b.event, b.handler_name): b for bs in self._bindings.values() for b in bs}
        async with self._gate:
            for row in rows:
                binding = bindings.get((row["event"], row["handler"]))
                if binding is None:
                    failed.append({"id": row[ID], "error": "no binding for this event any more"})
                    continue
                try:
                    async with self.adapter.transaction():
                        with joins.shared_transaction(self.adapter) as token:
                            await self.apply_one(self.adapter, binding, row["record"], token, 1)
                            await self.dead_letters.remove(row[ID])
                    retried.append(row[ID])
                except TransformFailed as failure:
                    await self.dead_letters.update(
                        row[ID],
                        {
                            "attempts": int(row["attempts"] or 0) + 1,
                            "error": f"{type(failure.error).__name__}: {failure.error}"[:4000],
                            "updated": now_ms(),
                        },
                    )
                    failed.append({"id": row[ID], "error": str(failure)})
        self.stats.dead_letters = await self.dead_letters.count()
        if self.stats.halted_at is not None:
            self.resume_after_halt()
        return {"retried": len(retried), "failed": failed, "remaining": self.stats.dead_letters}


async def apply_result(target: Adapter, kind: Kind, result: Any, event_id: int) -> None:
    """Apply a transformation's answer to the aggregate (None means: nothing to do)."""
    if result is None:
        return
    if kind == "create_many":
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise InvalidInput("a create_many transformation must answer a list of objects")
        await target.insert_many([_stamp(target, r, event_id) for r in result])
        return
    if not isinstance(result, dict):
        raise InvalidInput(f"a {kind} transformation must answer an object or None")
    if kind == "create":
        await target.insert(_stamp(target, _without_id(result), event_id))
    elif kind == "update":
        if result.get(ID) is None:
            await target.insert(_stamp(target, _without_id(result), event_id))
        else:
            changes = _stamp(target, _without_id(result), event_id)
            if await target.update(result[ID], changes) is None:
                raise InvalidInput(f"update: no row with id {result[ID]!r} in {target.name}")
    elif kind == "remove":
        if result.get(ID) is not None:
            ids = result[ID] if isinstance(result[ID], list) else [result[ID]]
            for entity_id in ids:
                await target.remove(entity_id)
        elif "query" in result:
            await target.remove_many(Query(where=parse_condition(target.fields, result["query"])))
        else:
            raise InvalidInput("a remove transformation must answer {id} or {query}")


def _without_id(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != ID}


def _stamp(target: Adapter, record: dict[str, Any], event_id: int) -> dict[str, Any]:
    if "eventId" in target.fields and "eventId" not in record:
        return {**record, "eventId": event_id}
    return record
