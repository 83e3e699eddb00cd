"""The projector: feeds one aggregate from the event log, exactly once per event.

It reads the events after its checkpoint a batch at a time and runs the transformation bound
to each event with no transaction open, applying each answer (create / update / remove) to the
batch's in-memory :class:`~.batch.BatchView`, which later transformations of the batch read.
Then the batch's changes, its dead letters and the new checkpoint are written in one short
transaction: a crash anywhere leaves the aggregate and its checkpoint in step. A transformation
that fails is retried (no transaction is open meanwhile); then that binding's effects for the
event are undone and the event goes to the dead letters (or, if so configured, the whole
event is undone and the projector halts there) while the rest of the batch goes on. Before
the transformations run, the rows keyed bindings will read are fetched in one query
(:mod:`.slices`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from moleculerpy_cqrs.core import remote
from moleculerpy_cqrs.core.batch import BatchView, EarlyRows, IdCounter
from moleculerpy_cqrs.core.joins import BatchToken, OpenBatches
from moleculerpy_cqrs.core.lease import Lease
from moleculerpy_cqrs.core.log import EventLog, Wakeup
from moleculerpy_cqrs.core.port import BatchCaller, BrokerPort, ManyCall, Outcome
from moleculerpy_cqrs.core.records import EventType, delivered, now_ms
from moleculerpy_cqrs.core.slices import key_field, prefetch_keys, read_keys_early
from moleculerpy_cqrs.core.states import ProjectorState
from moleculerpy_cqrs.core.upcast import UPCAST_ERROR
from moleculerpy_cqrs.errors import InvalidInput
from moleculerpy_cqrs.stores.fields import ID, Record
from moleculerpy_cqrs.stores.ports import Changes, MetaMoved, ReadModel, Table
from moleculerpy_cqrs.stores.query import ALL, In, Query, parse_condition

CHECKPOINT_KEY: Final = "checkpoint"
LEASE_KEY: Final = "projector.lease"
CONCURRENCY: Final = 16
BATCH_SIZE: Final = 1000  # events per batch; a batch is one short transaction
_PLAIN_KEYS: Final = frozenset({str, int, float, bool, type(None)})  # hashable: no ABC check
LINGER: Final = 0.005  # after a wake-up from idle, so that one batch takes several commits
PIPELINE_SECONDS: Final = 0.5  # a step's batches overlap their writes for this long at most
WARN_AFTER: Final = 3.0  # seconds a projector waits for its transformations before it warns
Kind = Literal["create", "create_many", "update", "remove"]
Transform = str | Callable[[dict[str, Any]], Awaitable[Any]]
Key = str | Callable[[dict[str, Any]], Hashable]
_KEYLESS: Final = object()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Binding:
    """``aggregate.on(event).<kind>(transform)``."""

    event: str
    kind: Kind
    transform: Transform
    key: Key | None = None
    key_field: str | None = None  # the aggregate field keys are looked up by (core/slices.py)

    def key_of(self, event: Record) -> Any:
        """The event's key (a payload field, or what the key function answers)."""
        if self.key is None:
            return _KEYLESS
        if isinstance(self.key, str):
            payload = event.get("payload")
            value = payload.get(self.key) if isinstance(payload, dict) else None
        else:
            value = self.key(delivered(event, 1))
        if type(value) in _PLAIN_KEYS or isinstance(value, Hashable):
            return value
        return repr(value)

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
    def __init__(self, position: int, failure: TransformFailed, checkpoint: int) -> None:
        self.position = position
        self.failure = failure
        self.checkpoint = checkpoint  # the events before the bad one were applied


@dataclass
class ProjectorStats:
    applied: int = 0
    batches: int = 0
    dead_letters: int = 0
    store_reads: int = 0  # reads of the aggregate's store made by batches (prefetches too)
    overlapped: int = 0  # batches transformed while the write of the one before was under way
    stale: int = 0
    sent_again: int = 0  # calls to other nodes sent again (answers dropped, requests failed)
    last_error: str | None = None
    halted_at: int | None = None
    started: float = field(default_factory=time.monotonic)


class Projector:
    def __init__(
        self,
        name: str,
        adapter: ReadModel,
        dead_letters: Table,
        source: EventLog,
        bindings: list[Binding],
        port: BrokerPort,
        *,
        batch_size: int = BATCH_SIZE,
        attempts: int = 3,
        retry_delay: float = 0.01,
        on_error: Literal["dead_letter", "halt"] = "dead_letter",
        lease: Lease | None = None,
        concurrency: int = CONCURRENCY,
        batches: OpenBatches | None = None,
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.batches = batches or OpenBatches(name, "node")
        self.ids = IdCounter()
        self.lease = lease
        self.standby = False
        self.adapter = adapter
        self.dead_letters = dead_letters
        self.source = source
        self.port = port
        self.batch_size = batch_size
        self.pipeline_seconds = PIPELINE_SECONDS
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.on_error = on_error
        self._bindings: dict[str, list[Binding]] = {}
        for b in bindings:
            self._bindings.setdefault(b.event, []).append(b)
        self.checkpoint = 0
        self.waiting_for: list[str] = []  # transformations not served anywhere yet
        self.stats = ProjectorStats()
        self._wakeup = Wakeup()
        self._gate = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._resume = asyncio.Event()
        self._progress = asyncio.Condition()
        self._halted = asyncio.Event()
        # Answers whether this node may project the table (its version against the table's),
        # rebuilding the table first when this node's version is newer; run on taking the
        # lease (see Maintenance.ensure_version).
        self.version_gate: Callable[[], Awaitable[bool]] | None = None
        self.outdated = False
        self.rebuilding = False
        self._version_checked = False  # the table is of this node's version (after a rebuild)
        # Serial requests to other nodes: their size, and the reads they answer there.
        self._chunk = remote.ChunkSizer()
        self._reads = remote.ReadSet()
        # The transformation actions' callers, found for the batch whose token this is.
        self._callers_for: BatchToken | None = None
        self._callers: dict[str, BatchCaller] = {}

    # ------------------------------------------------------------------ control

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def state(self) -> ProjectorState:
        if not self.running:
            return ProjectorState.STOPPED
        if self.outdated:
            return ProjectorState.OUTDATED
        if self.rebuilding:
            return ProjectorState.REBUILDING
        if self.waiting_for:
            return ProjectorState.WAITING
        if self.stats.halted_at is not None:
            return ProjectorState.HALTED
        if self.standby:
            return ProjectorState.STANDBY
        if self._gate.locked() and getattr(self, "_paused", False):
            return ProjectorState.PAUSED
        return ProjectorState.RUNNING

    async def _wait_for_transformations(self) -> None:
        """Wait until every transformation action is served somewhere; meanwhile ``state``
        says so, and a warning names the missing ones every ``WARN_AFTER`` seconds."""
        missing = [a for a in self.transforms() if not self.port.is_available(a)]
        if not missing:
            return
        self.waiting_for = missing
        waiter = asyncio.ensure_future(self.port.wait_for_actions(missing))
        try:
            while not (await asyncio.wait({waiter}, timeout=WARN_AFTER))[0]:
                still = [a for a in missing if not self.port.is_available(a)]
                self.waiting_for = still
                log.warning(
                    "projector %s cannot start: no node serves the transformation(s) %s "
                    "(a misspelled action name, or their service is not running yet)",
                    self.name,
                    ", ".join(still),
                )
            waiter.result()
        finally:
            waiter.cancel()
            self.waiting_for = []

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
            await self._progress.wait_for(
                lambda: self.checkpoint >= position and self._version_checked
            )
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
        self.ids.forget()
        self.checkpoint = int(await self.adapter.get_meta(CHECKPOINT_KEY) or 0)
        await self._advanced()
        return self.checkpoint

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        await self._wait_for_transformations()
        await self.reload_checkpoint()
        if self.lease is None and not await self._version_allows():
            return await self._stand_outdated()
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
                        allowed = await self._version_allows()
                    except asyncio.CancelledError:
                        raise
                    except Exception as error:  # a failed rebuild: try again later
                        failures += 1
                        self.stats.last_error = f"{type(error).__name__}: {error}"
                        log.exception("projector %s: rebuild failed, retrying", self.name)
                        await self.lease.release()
                        await asyncio.sleep(min(0.05 * 2**failures, 5.0))
                        continue
                    if not allowed:
                        return await self._stand_outdated()
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
                self.checkpoint = halt.checkpoint
                await self._advanced()
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
                if failures == 1:  # once per outage, not once per retry
                    log.exception("projector %s: batch failed, retrying", self.name)
                else:
                    log.debug("projector %s: batch failed again: %s", self.name, error)
                await asyncio.sleep(min(0.05 * 2**failures, 5.0))
                continue
            if progressed:
                await asyncio.sleep(0)  # let others in between batches, whatever the backend
            else:
                await self._wakeup.wait()
                await asyncio.sleep(LINGER)  # let a few more commits join the next batch

    async def _version_allows(self) -> bool:
        allowed = self.version_gate is None or await self.version_gate()
        if allowed and not self._version_checked:
            self._version_checked = True
            await self._advanced()
        return allowed

    async def _stand_outdated(self) -> None:
        """The table was built by newer transformations: leave it to the nodes running them
        (reads go on), until this node is stopped."""
        self.outdated = True
        if self.lease is not None:
            await self.lease.release()
        await asyncio.Event().wait()

    async def _step(self) -> bool:
        """Apply the batches after the checkpoint, pipelined: while one batch's write is under
        way, the next batch's transformations run on a view opened after it (they see its
        effects through that view, whether the write has landed or not). A batch is written
        only once the one before it has landed (its checkpoint compare-and-set expects it), and
        every write has landed when the step ends, so between steps (snapshots, dead-letter
        retries, leases) nothing is in flight. A step pipelines for ``pipeline_seconds`` at
        most (and a quarter of the lease's time), then lets others in."""
        events = await self.source.read_after(self.checkpoint, self.batch_size)
        if not events:
            return False
        seconds = self.pipeline_seconds
        if self.lease is not None:
            seconds = min(seconds, self.lease.ttl / 4)
        until = time.monotonic() + seconds
        writing: _Writing | None = None
        ahead: asyncio.Future[_Ahead] | None = None
        read = _Ahead(events, self._units(events), {})
        try:
            while read.events:
                after = None if writing is None else writing.batch.view
                expected = self.checkpoint if writing is None else writing.batch.last
                view = BatchView(self.adapter, self.ids, after=after)
                # The next batch's events, and the rows its keys name, are read while this
                # one's transformations run.
                ahead = asyncio.ensure_future(
                    self._read_ahead(int(read.events[-1]["id"]), writing, view)
                )
                batch = await self._prepare(
                    self.adapter, self.dead_letters, read.events, expected, self.ids, view=view,
                    units=read.units, early=read.early,
                )  # fmt: skip
                if writing is not None:
                    self.stats.overlapped += 1
                    landing, writing = writing, None
                    await self._landed(landing)
                    batch.view.rebase()
                writing = self._start_write(batch)
                if batch.halted is not None or time.monotonic() > until:
                    break
                read, ahead = await ahead, None
            last, writing = writing, None
            assert last is not None
            await self._landed(last)
        except BaseException:
            if writing is not None:  # it lands (or fails) before anything else happens
                with suppress(Exception):
                    await self._landed(writing)
            raise
        finally:
            if ahead is not None:  # not needed after all (halted, time to let others in, failed)
                _drop(ahead)
        return True

    async def _read_ahead(self, position: int, writing: _Writing | None, view: BatchView) -> _Ahead:
        """The events after ``position``, and the table's rows their keyed bindings will look
        up, read before their batch begins: ``view``'s batch (being transformed) and the one
        before it (``writing``, if its write has not landed when the rows are read) may change
        those rows, so they are laid over them when the batch takes them (:class:`EarlyRows`)."""
        events = await self.source.read_after(position, self.batch_size)
        units = self._units(events)

        def missed() -> list[BatchView]:
            unlanded = writing is not None and not writing.task.done()
            return [writing.batch.view, view] if writing is not None and unlanded else [view]

        early = await read_keys_early(self.adapter, units, missed) if units else {}
        return _Ahead(events, units, early)

    def _units(self, events: list[Record]) -> list[Unit]:
        """Each of ``events`` with each binding it feeds, in log order."""
        return [(e, b) for e in events for b in self._relevant(e)]

    def _start_write(self, batch: _Batch) -> _Writing:
        batch.view.writing = True
        return _Writing(batch, asyncio.ensure_future(self._write(batch)))

    async def _landed(self, writing: _Writing) -> None:
        self.checkpoint = await writing.task
        self.stats.batches += 1
        await self._advanced()

    async def apply_batch(
        self,
        target: ReadModel,
        dead_letters: Table,
        events: list[Record],
        expected: int,
        ids: IdCounter,
    ) -> int:
        """Apply ``events`` to ``target``, moving its checkpoint from ``expected``; answers
        the new checkpoint.

        The transformations run first, with no transaction open, against a
        :class:`BatchView`; then the batch's changes, its dead letters and the checkpoint are
        written in one transaction. Raises :class:`StaleCheckpoint` (and writes nothing) when
        the stored checkpoint is not ``expected``: two nodes running one aggregate never both
        apply an event.
        """
        batch = await self._prepare(target, dead_letters, events, expected, ids)
        batch.view.writing = True
        return await self._write(batch)

    async def _prepare(
        self,
        target: ReadModel,
        dead_letters: Table,
        events: list[Record],
        expected: int,
        ids: IdCounter,
        *,
        view: BatchView | None = None,
        units: list[Unit] | None = None,
        early: Mapping[str, EarlyRows] | None = None,
    ) -> _Batch:
        """Run the transformations of ``events`` (no transaction open) on ``view`` (a new one
        if not given); answers what :meth:`_write` writes. ``units`` and ``early``: their
        units and the rows their keys name, made already (:meth:`_read_ahead`)."""
        if view is None:
            view = BatchView(target, ids)
        if units is None:
            units = self._units(events)
        await prefetch_keys(view, units, early)  # the rows keyed bindings will read, in one query
        with self.batches.open(view) as token:
            failures = await self._transform_all(view, units, token, len(events))
        halted = next((i for i, f in enumerate(failures) if f and self.on_error == "halt"), None)
        dead: list[Record] = [_unreadable(e) for e in events if UPCAST_ERROR in e]
        errors: list[tuple[Record, TransformFailed]] = []
        last = int(events[-1]["id"])
        for i, failure in enumerate(failures):
            if failure is None:
                continue
            event = units[i][0]
            if halted is not None:
                # Its other bindings' effects go too: the event is applied whole, or not yet.
                view.undo(view.event_marks[event["id"]])
                last = _before(events, event["id"], expected)
                break
            dead.append(_dead_letter(event, failure))
            errors.append((event, failure))
        return _Batch(
            target, dead_letters, ids, view, units, failures, halted, dead, errors, expected, last
        )

    async def _write(self, batch: _Batch) -> int:
        """Write a prepared batch (changes, dead letters, checkpoint) in one transaction; then
        count and report it. Answers the new checkpoint; raises :class:`_Halt` after writing
        the events before a halting one."""
        view, ids, dead, failures = batch.view, batch.ids, batch.dead, batch.failures
        also = [(batch.dead_letters, Changes(inserts=dead))] if dead else []
        await asyncio.sleep(0)  # a backend that never suspends (memory) still lets others in
        try:
            await batch.target.apply(
                view.changes(), advance=(CHECKPOINT_KEY, batch.expected, batch.last), also=also
            )
        except MetaMoved as moved:
            ids.forget()
            raise StaleCheckpoint(moved.stored, batch.expected) from None
        except BaseException:
            ids.forget()  # the ids this batch counted on may be taken: read them again
            raise
        view.written()
        self.stats.store_reads += view.store_reads
        self.stats.applied += sum(1 for f in failures if f is None)
        self.stats.dead_letters += len(dead)
        for letter in dead:
            if letter["kind"] == UPCAST_KIND:
                log.warning(
                    "%s: event %s (%s) dead-lettered: it could not be upcast: %s; list them "
                    "with `cqrs dead-letters %s`",
                    self.name, letter["eventId"], letter["event"], letter["error"], self.name,
                )  # fmt: skip
        for event, failed in batch.errors:
            await self._report(event, failed)
        if batch.halted is not None:
            failure = failures[batch.halted]
            assert failure is not None
            raise _Halt(batch.units[batch.halted][0]["id"], failure, batch.last)
        return batch.last

    def _relevant(self, event: Record) -> list[Binding]:
        if event.get("eventType") != EventType.COMMAND or UPCAST_ERROR in event:
            return []
        return self._bindings.get(event["event"], [])

    async def _transform_all(
        self, view: BatchView, units: list[Unit], token: BatchToken, size: int
    ) -> list[TransformFailed | None]:
        """Run every unit's transformation and apply its answer to ``view``, in log order
        unless bindings declare keys; answers each unit's failure (None: applied). A batch
        whose transformations other nodes serve, many calls at once, goes there in requests
        one after another (its keys then only choose the rows sent along)."""
        bindings = {b for _, b in units}
        if not any(b.key is not None for b in bindings):
            return await self._transform_serially(view, units, token, size)
        if all(self._batch_node(b) is not None for b in bindings):
            return await self._transform_elsewhere(view, units, token, size)
        return await KeyedRun(self, view, units, token, size).run()

    async def _transform_serially(
        self, view: BatchView, units: list[Unit], token: BatchToken, size: int
    ) -> list[TransformFailed | None]:
        """One unit after another; runs of units whose transformation another node serves
        go there several at a time (see core/remote.py)."""
        if all(self._batch_node(b) is None for b in {b for _, b in units}):
            return await self._transform_locally(view, units, token, size)
        return await self._transform_elsewhere(view, units, token, size)

    async def _transform_elsewhere(
        self, view: BatchView, units: list[Unit], token: BatchToken, size: int
    ) -> list[TransformFailed | None]:
        """The units in log order; runs of units another node serves go there in serial
        requests, several out at once (:class:`~.remote.Pipeline`). Each answer is applied
        only if the reads its call made answer the same now (the first of a session's first
        request read the batch as it is); else it and the answers after it are dropped and
        their units sent again."""
        pipe = remote.Pipeline(self.port, view, self._reads, self._chunk, self.batches, token)
        nodes: dict[Binding, str | None] = {}  # one node per binding (the balancer picks it)

        def node_of(binding: Binding) -> str | None:
            if binding not in nodes:
                nodes[binding] = self._batch_node(binding)
            return nodes[binding]

        failures: list[TransformFailed | None] = []
        sent = 0  # the units before this one are applied or out
        try:
            while len(failures) < len(units):
                while sent < len(units) and (node := node_of(units[sent][1])) is not None:
                    if not pipe.takes(node):
                        break
                    end = sent + 1
                    while end < len(units) and end - sent < pipe.size():
                        if node_of(units[end][1]) != node:
                            break
                        end += 1
                    calls = [
                        await self._many_call_of(pipe, u, token, size) for u in units[sent:end]
                    ]
                    await pipe.send(node, sent, calls)
                    sent = end
                if not pipe.out:  # served here (or by no node that takes many): on its own
                    event, binding = units[sent]
                    view.begin_event(event["id"])
                    failures.append(await self._unit(view, event, binding, token, size, None))
                    sent += 1
                    if failures[-1] is not None and self.on_error == "halt":
                        break
                    continue
                start, head, answers, failed = await pipe.answers()
                assert start == len(failures)
                if failed:
                    nodes.clear()  # that node may be gone: ask the balancer again
                taken = 0
                for first, its_reads in answers:
                    if head and taken == 0:  # it read the batch as it is
                        self._reads.note(its_reads)
                    elif not await self._reads.still_true(view, its_reads):
                        break
                    event, binding = units[len(failures)]
                    view.begin_event(event["id"])
                    failures.append(await self._unit(view, event, binding, token, size, first))
                    taken += 1
                    if failures[-1] is not None and self.on_error == "halt":
                        break
                if failures and failures[-1] is not None and self.on_error == "halt":
                    break
                self._chunk.answered(pipe.asked, taken)  # a failed request: all unanswered
                if taken < pipe.asked:  # cut short, failed, or answered too few
                    self.stats.sent_again += sent - len(failures)
                    pipe.reset()  # the answers out were made on what is no longer so
                    sent = len(failures)
        finally:
            await pipe.close()
        return failures + [None] * (len(units) - len(failures))

    async def _many_call_of(
        self, pipe: remote.Pipeline, unit: Unit, token: BatchToken, size: int
    ) -> ManyCall:
        """A unit's call, with its key's rows for a binding that changes them (a create adds
        rows: its key's rows only grow, and its transformation seldom reads them)."""
        event, binding = unit
        rows = None
        if binding.key is not None and binding.kind in ("update", "remove"):
            field = key_field(binding, pipe.view.fields)
            rows = await pipe.rows_for(field, binding.key_of(event))
        return self._many_call(event, binding, token, size, rows)

    async def _transform_locally(
        self, view: BatchView, units: list[Unit], token: BatchToken, size: int
    ) -> list[TransformFailed | None]:
        """One unit after another, each called where the broker sends it (no other node takes
        many calls of this batch's actions): no request bookkeeping per event."""
        failures: list[TransformFailed | None] = []
        for event, binding in units:
            view.begin_event(event["id"])
            failure = await self._unit(view, event, binding, token, size, None)
            failures.append(failure)
            if failure is not None and self.on_error == "halt":
                return failures + [None] * (len(units) - len(failures))
        return failures

    def _batch_node(self, binding: Binding) -> str | None:
        """The other node that serves ``binding``'s action and takes many calls at once."""
        if not isinstance(binding.transform, str):
            return None
        return self.port.batch_node(binding.transform)

    def _many_call(
        self, event: Record, binding: Binding, token: BatchToken, size: int, rows: Any = None
    ) -> ManyCall:
        assert isinstance(binding.transform, str)
        meta = {**(event.get("meta") or {}), **token.meta()}
        return ManyCall(binding.transform, delivered(event, size), meta, rows, binding.kind)

    async def _unit(
        self,
        view: BatchView,
        event: Record,
        binding: Binding,
        token: BatchToken,
        size: int,
        first: Outcome | None,
    ) -> TransformFailed | None:
        """Transform one event (``first``: the outcome of a first try made already) and
        apply the answer to ``view``, retrying both; a failure undoes this event's effects."""
        shaped: dict[str, Any] | None = None
        for attempt in range(1, self.attempts + 1):
            mark = view.mark()
            try:
                if first is not None:
                    (answered, result), first = first, None
                    if not answered:
                        raise result
                else:
                    if shaped is None:
                        shaped = delivered(event, size)
                    result = await self._transform(binding, shaped, event.get("meta") or {}, token)
            except Exception as error:
                failure = TransformFailed(binding, "transform_error", error, attempt)
            else:
                try:
                    await apply_result(view, binding.kind, result, event["id"])
                    return None
                except Exception as error:
                    view.undo(mark)
                    failure = TransformFailed(binding, "error", error, attempt)
            if attempt == self.attempts:
                return failure
            del failure
            await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _transform(
        self, binding: Binding, event: dict[str, Any], meta: Mapping[str, Any], token: BatchToken
    ) -> Any:
        if isinstance(binding.transform, str):
            call_meta = {**meta, **token.meta()}
            return await self._caller(binding.transform, token)(event, call_meta)
        return await binding.transform(event)

    def _caller(self, action: str, token: BatchToken) -> BatchCaller:
        """The function that calls ``action`` for ``token``'s batch, found once per batch
        (:meth:`BrokerPort.batch_caller`)."""
        if self._callers_for is not token:
            self._callers_for, self._callers = token, {}
        caller = self._callers.get(action)
        if caller is None:
            caller = self._callers[action] = self.port.batch_caller(action)
        return caller

    async def _report(self, event: Record, failure: TransformFailed) -> None:
        kind = "create" if failure.binding.kind == "create_many" else failure.binding.kind
        self.stats.last_error = str(failure)
        binding = failure.binding
        log.warning(
            "%s: event %s (%s) dead-lettered: on(%r).%s(%r) failed after %d attempt(s): "
            "%s: %s; list them with `cqrs dead-letters %s`",
            self.name, event["id"], event["event"], binding.event, binding.kind,
            binding.handler_name, failure.attempts, type(failure.error).__name__, failure.error,
            self.name,
        )  # fmt: skip
        try:
            await self.port.emit(
                f"{self.name}.{kind}.{failure.stage}",
                {"error": str(failure.error), "event": delivered(event, 1)},
            )
        except Exception:
            log.exception("projector %s: could not emit the error event", self.name)

    # ------------------------------------------------------------------ dead letters

    async def retry_dead_letters(self, ids: list[int] | None = None) -> dict[str, Any]:
        """Apply dead-lettered events again, each written with its removal from the dead
        letters in one transaction. Each is read from the log again, so it is retried in
        its current shape (upcasters added since apply)."""
        query = ALL if ids is None else Query(where=In(ID, tuple(ids)))
        rows = await self.dead_letters.find(query)
        retried: list[int] = []
        failed: list[dict[str, Any]] = []
        async with self._gate:
            for row in rows:
                try:
                    units = await self._units_of(row)
                except LookupError as missing:
                    failed.append({"id": row[ID], "error": str(missing)})
                    continue
                view = BatchView(self.adapter, self.ids)
                failure: TransformFailed | str | None = None
                with self.batches.open(view) as token:
                    for event, binding in units:
                        if UPCAST_ERROR in event:
                            failure = str(event[UPCAST_ERROR])
                            break
                        assert binding is not None
                        failure = await self._unit(view, event, binding, token, 1, None)
                        if failure is not None:
                            break
                if failure is None:
                    try:
                        await self.adapter.apply(
                            view.changes(), also=[(self.dead_letters, Changes(deletes=[row[ID]]))]
                        )
                    except BaseException:
                        self.ids.forget()
                        raise
                    view.written()
                    retried.append(row[ID])
                    continue
                error = (
                    failure
                    if isinstance(failure, str)
                    else f"{type(failure.error).__name__}: {failure.error}"
                )
                await self.dead_letters.update(
                    row[ID],
                    {
                        "attempts": int(row["attempts"] or 0) + 1,
                        "error": error[:4000],
                        "updated": now_ms(),
                    },
                )
                failed.append({"id": row[ID], "error": str(failure)})
        self.stats.dead_letters = await self.dead_letters.count()
        if self.stats.halted_at is not None:
            self.resume_after_halt()
        return {"retried": len(retried), "failed": failed, "remaining": self.stats.dead_letters}

    async def _units_of(self, dead: Record) -> list[tuple[Record, Binding | None]]:
        """What retrying a dead letter runs: its event read from the log again (current
        name, version, pieces), and the binding it failed in — or, for an event that could
        not be upcast, every binding of every piece (``(event, None)``: still unreadable)."""
        stored_id = int(dead["eventId"])
        record = dead["record"] if isinstance(dead.get("record"), dict) else {}
        read = [e for e in await self.source.read_after(stored_id - 1, 1) if e["id"] == stored_id]
        if not read:  # not in the log (a log that was reset): the event as dead-lettered
            read = [record]
        if any(UPCAST_ERROR in e for e in read):
            return [(read[0], None)]
        if dead["kind"] == UPCAST_KIND:
            return [(e, b) for e in read for b in self._relevant(e)]
        part = record.get("part")
        pieces = [e for e in read if e.get("part") == part] if len(read) > 1 else read
        for event in pieces:
            for binding in self._relevant(event):
                if binding.handler_name == dead["handler"]:
                    return [(event, binding)]
        raise LookupError("no binding for this event any more")


Unit = tuple[Record, Binding]


@dataclass
class _Batch:
    """A batch whose transformations have run: what :meth:`Projector._write` writes."""

    target: ReadModel
    dead_letters: Table
    ids: IdCounter
    view: BatchView
    units: list[Unit]
    failures: list[TransformFailed | None]
    halted: int | None  # the unit the projector halts at (on_error="halt")
    dead: list[Record]
    errors: list[tuple[Record, TransformFailed]]
    expected: int  # the checkpoint the write moves from
    last: int  # ... and to


@dataclass
class _Ahead:
    """The next batch, read while one is transformed (:meth:`Projector._read_ahead`)."""

    events: list[Record]
    units: list[Unit]
    early: dict[str, EarlyRows]


@dataclass
class _Writing:
    batch: _Batch
    task: asyncio.Future[int]


class _Slots:
    """At most ``size`` holders at once: ``asyncio.Semaphore``'s job without the check it makes
    on every acquire (whether any waiter is still waiting, walking them); a free slot is taken
    at once, and a released one is handed to the longest waiter."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot, but cancelled before taking it: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class KeyedRun:
    """One batch whose bindings declare keys.

    Transformations of events with different keys run concurrently (at most the projector's
    ``concurrency`` at once); one waits for the last earlier event of its key (and for the
    last earlier event of a binding without a key) to be applied before it starts, so it sees
    that event's effects. Answers are applied to the view in log order all the same, so the
    ids rows get stay a function of the log.
    """

    def __init__(
        self, projector: Projector, view: BatchView, units: list[Unit], token: BatchToken, size: int
    ) -> None:
        self.p = projector
        self.view = view
        self.units = units
        self.token = token
        self.size = size
        self.applied = 0  # units before this one have been applied (a prefix: log order)
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}  # unit -> who waits for it
        self.failures: list[TransformFailed | None] = [None] * len(units)
        self.halted = False
        self.slots = _Slots(max(projector.concurrency, 1))
        self.remote = remote.KeyedCalls(projector.port, view.fields)
        self.local: set[Binding] = set()  # bindings no other node serves, in this batch

    def _dependencies(self) -> list[int]:
        deps: list[int] = []
        last_of: dict[Any, int] = {}
        barrier = -1
        for i, (event, binding) in enumerate(self.units):
            key = binding.key_of(event)
            if key is _KEYLESS:
                deps.append(i - 1)
                barrier = i
            else:
                deps.append(max(last_of.get(key, -1), barrier))
                last_of[key] = i
        return deps

    async def run(self) -> list[TransformFailed | None]:
        # Eager tasks: a unit whose dependencies are met and whose transformation never waits
        # (its reads answered from the batch's prefetched rows) runs to its end as its task is
        # made, without a trip through the event loop; one that waits goes on concurrently.
        loop = asyncio.get_running_loop()
        tasks = [
            asyncio.Task(self._one(i, dep), loop=loop, eager_start=True)
            for i, dep in enumerate(self._dependencies())
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.remote.close()
        return self.failures

    async def _first_try(self, event: Record, binding: Binding) -> Outcome:
        """The unit's first call: in a request with others when another node serves it
        (with its key's rows when the key is a field), else on its own."""
        # Only "no other node" is kept for the batch: a node is picked per event, so calls are
        # balanced across the nodes that serve the action (and a dead one's are taken over).
        node = None if binding in self.local else self.p._batch_node(binding)
        if node is None:
            self.local.add(binding)
        if node is not None:
            rows = None
            # The rows of its key, for a binding that changes them (a create adds rows: its
            # key's rows only grow, and its transformation seldom reads them).
            if isinstance(binding.key, str) and binding.kind in ("update", "remove"):
                payload = event.get("payload")
                value = payload.get(binding.key) if isinstance(payload, dict) else None
                rows = await remote.key_rows(self.view, binding.key, value)
            call = self.p._many_call(event, binding, self.token, self.size, rows)
            return await self.remote.call(node, call)
        async with self.slots:
            meta = event.get("meta") or {}
            try:
                shaped = delivered(event, self.size)
                return (True, await self.p._transform(binding, shaped, meta, self.token))
            except Exception as error:
                return (False, error)

    async def _one(self, i: int, dep: int) -> None:
        event, binding = self.units[i]
        if dep >= self.applied:
            await self._until_applied(dep)
        first: Outcome | None = None
        if not self.halted:
            first = await self._first_try(event, binding)
        if i > self.applied:
            await self._until_applied(i - 1)
        if not self.halted:
            self.view.begin_event(event["id"])
            failure = await self.p._unit(self.view, event, binding, self.token, self.size, first)
            self.failures[i] = failure
            if failure is not None and self.p.on_error == "halt":
                self.halted = True
        # Unit i is applied after unit i - 1 (it waited above): the applied units stay a prefix.
        self.applied = i + 1
        for waiter in self._waiting.pop(i, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _until_applied(self, i: int) -> None:
        """Until unit ``i`` has been applied (a future per waiter, as ``asyncio.Event`` has:
        one waiter cancelled leaves the others waiting)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(i, []).append(waiter)
        await waiter


def _drop(future: asyncio.Future[Any]) -> None:
    """Cancel ``future``, or take its outcome if it has one (so no error goes unretrieved)."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


async def apply_result(view: BatchView, kind: Kind, result: Any, event_id: int) -> None:
    """Apply a transformation's answer to the batch (None means: nothing to do)."""
    if result is None:
        return
    if kind == "create_many":
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise InvalidInput("a create_many transformation must answer a list of objects")
        for record in result:
            await view.create(_stamp(view, record, event_id))
        return
    if not isinstance(result, dict):
        raise InvalidInput(f"a {kind} transformation must answer an object or None")
    if kind == "create":
        await view.create(_stamp(view, result, event_id))
    elif kind == "update":
        if result.get(ID) is None:
            await view.create(_stamp(view, result, event_id))
        else:
            await view.update(result[ID], _stamp(view, result, event_id))
    elif kind == "remove":
        if result.get(ID) is not None:
            ids = result[ID] if isinstance(result[ID], list) else [result[ID]]
            for entity_id in ids:
                await view.remove(entity_id)
        elif "query" in result:
            await view.remove_where(parse_condition(view.fields, result["query"]))
        else:
            raise InvalidInput("a remove transformation must answer {id} or {query}")


def _stamp(view: BatchView, record: dict[str, Any], event_id: int) -> dict[str, Any]:
    if "eventId" in view.fields and "eventId" not in record:
        return {**record, "eventId": event_id}
    return record


def _before(events: list[Record], position: int, expected: int) -> int:
    """The position of the event before ``position`` in ``events`` (``expected`` if none)."""
    earlier = [e["id"] for e in events if e["id"] < position]
    return earlier[-1] if earlier else expected


UPCAST_KIND: Final = "upcast"  # the dead letters' kind of an event no upcaster could read


def _unreadable(event: Record) -> Record:
    """The dead letter of an event that could not be upcast (kept in its stored form)."""
    now = now_ms()
    return {
        "eventId": event["id"],
        "event": event["event"],
        "handler": "(upcaster)",
        "kind": UPCAST_KIND,
        "error": str(event[UPCAST_ERROR])[:4000],
        "attempts": 1,
        "created": now,
        "updated": now,
        "record": {k: v for k, v in event.items() if k != UPCAST_ERROR},
    }


def _dead_letter(event: Record, failure: TransformFailed) -> Record:
    now = now_ms()
    return {
        "eventId": event["id"],
        "event": event["event"],
        "handler": failure.binding.handler_name,
        "kind": failure.binding.kind,
        "error": f"{type(failure.error).__name__}: {failure.error}"[:4000],
        "attempts": failure.attempts,
        "created": now,
        "updated": now,
        "record": dict(event),
    }
