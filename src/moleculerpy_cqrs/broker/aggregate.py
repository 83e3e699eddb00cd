"""``Aggregate``: a read model fed from the event log through transformations."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping
from typing import Any, Literal

from moleculerpy import Context, Service, ServiceBroker, action, event

from moleculerpy_cqrs.broker import compat, names
from moleculerpy_cqrs.broker.bindings import unproduced
from moleculerpy_cqrs.broker.log import event_log, local_event_stores
from moleculerpy_cqrs.broker.mixin_base import CqrsMixin
from moleculerpy_cqrs.broker.port import MoleculerPort
from moleculerpy_cqrs.broker.store_service import ReadActions, WriteActions, params_of
from moleculerpy_cqrs.core.aggregate import AggregateRuntime
from moleculerpy_cqrs.core.eventstore import until_ready
from moleculerpy_cqrs.core.joins import OpenBatches
from moleculerpy_cqrs.core.lease import DEFAULT_TTL
from moleculerpy_cqrs.core.log import EventLog, Listeners
from moleculerpy_cqrs.core.maintenance import Maintenance, ReplayProgress
from moleculerpy_cqrs.core.projector import BATCH_SIZE, CONCURRENCY, Binding, Key, Kind, Transform
from moleculerpy_cqrs.core.records import AGGREGATE_FIELDS
from moleculerpy_cqrs.core.snapshots import NoSnapshot, SnapshotStrategy
from moleculerpy_cqrs.errors import ConfigurationError, Conflict, InvalidInput
from moleculerpy_cqrs.stores.actions import StoreActions
from moleculerpy_cqrs.stores.base import Adapter, StoreFactory
from moleculerpy_cqrs.stores.fields import check_id
from moleculerpy_cqrs.stores.populate import PopulateRule, declare_populates

log = logging.getLogger(__name__)


class On:
    """``aggregate.on(event)``: say what the event does to the aggregate.

    The optional ``key`` (a payload field's name, or a function of the event) lets events
    with different keys transform concurrently; events with the same key, and every event of
    a binding without a key, keep the log's order (see docs/architecture.md).
    """

    def __init__(self, aggregate: Aggregate, event_name: str) -> None:
        self._aggregate = aggregate
        self._event = event_name

    def create(
        self, transform: Transform, *, key: Key | None = None, key_field: str | None = None
    ) -> Binding:
        """Create the record the transformation answers (with ``eventId``)."""
        return self._bind("create", transform, key, key_field)

    def create_many(
        self, transform: Transform, *, key: Key | None = None, key_field: str | None = None
    ) -> Binding:
        """Create each record of the list the transformation answers."""
        return self._bind("create_many", transform, key, key_field)

    def update(
        self, transform: Transform, *, key: Key | None = None, key_field: str | None = None
    ) -> Binding:
        """Update the record with the answered ``id``; create it when there is no ``id``."""
        return self._bind("update", transform, key, key_field)

    def remove(
        self, transform: Transform, *, key: Key | None = None, key_field: str | None = None
    ) -> Binding:
        """Remove the record(s) with the answered ``id`` (or ids), or matching ``query``."""
        return self._bind("remove", transform, key, key_field)

    def _bind(
        self, kind: Kind, transform: Transform, key: Key | None, key_field: str | None
    ) -> Binding:
        if not (isinstance(transform, str) or callable(transform)):
            raise ConfigurationError("a transformation is an action name or an async callable")
        if key is not None and not (isinstance(key, str) or callable(key)):
            raise ConfigurationError("a key is a payload field's name or a function of the event")
        if key_field is not None and (key is None or not isinstance(key_field, str)):
            raise ConfigurationError("key_field names an aggregate field, and needs a key")
        binding = Binding(self._event, kind, transform, key, key_field)
        self._aggregate.bindings.append(binding)
        return binding


class Aggregate:
    """A read model named ``name`` in a store made by ``store_factory``.

    ``snapshot`` is :data:`NoSnapshot` or :class:`StoreBackup`; ``.snapshot(event_store)``
    names the event store it is fed from (needed when the broker runs more than one).
    ``on_error``: ``"dead_letter"`` (default: the bad event is set aside, the rest goes on)
    or ``"halt"`` (the projector stops at it until ``retryDeadLetters``).
    ``batch_size``: events per projector transaction; ``replay_batch_size``: events per
    transaction of a replay (where the log and the aggregate share one database lock, as in
    one memory database or one SQLite file, appends wait for each such transaction).
    ``lease_ttl``: when several nodes serve this aggregate on one database, one projects and
    the others take over within this many seconds after it stops or dies. ``concurrency``:
    how many transformations of events with different keys run at once (bindings with a
    ``key`` only).
    ``write_actions``: serve moleculer-db's ``create``/``insert``/``update``/``remove`` as the
    Go library does. Off by default (they answer 405 ``ReadOnlyAggregateError``): rows written
    through them are not events, so a replay (and a restore's catch-up) drops them.
    ``version``: the version of the transformations (bump it when they change): a node with a
    higher version than the table was built with rebuilds it from the log into a shadow table,
    reads answering from the old one, and swaps it in; a node with a lower one does not
    project (a rolling deploy) and answers reads.
    ``populates``: moleculer-db's ``settings.populates`` rules (``{"author": "users.get"}``,
    ``{"author": {"action", "params", "field", "populate"}}``), which ``find``, ``list`` and
    ``get`` follow when asked with ``populate``.
    """

    def __init__(
        self,
        name: str,
        store_factory: StoreFactory,
        snapshot: SnapshotStrategy = NoSnapshot,
        *,
        batch_size: int = BATCH_SIZE,
        attempts: int = 3,
        on_error: Literal["dead_letter", "halt"] = "dead_letter",
        replay_batch_size: int = 1000,
        lease_ttl: float = DEFAULT_TTL,
        concurrency: int = CONCURRENCY,
        settings: Mapping[str, Any] | None = None,
        write_actions: bool = False,
        version: int = 1,
        populates: Mapping[str, Any] | None = None,
    ) -> None:
        if not name.isidentifier():
            raise ConfigurationError(f"aggregate name {name!r} must be an identifier")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError("concurrency must be an integer >= 1")
        self.concurrency = concurrency
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(f"version must be an integer from 1, got {version!r}")
        self.version = version
        if on_error not in ("dead_letter", "halt"):
            raise ConfigurationError("on_error is 'dead_letter' or 'halt'")
        self.name = name
        self.store_factory = store_factory
        self.snapshot_strategy = snapshot
        self.event_store_name: str | None = None
        self.batch_size = batch_size
        self.attempts = attempts
        self.on_error: Literal["dead_letter", "halt"] = on_error
        self.replay_batch_size = replay_batch_size
        self.lease_ttl = lease_ttl
        self.settings = dict(settings or {})
        self.write_actions = write_actions
        self.populates = dict(populates or {})
        self.bindings: list[Binding] = []
        self._runtimes: weakref.WeakKeyDictionary[ServiceBroker, AggregateRuntime] = (
            weakref.WeakKeyDictionary()
        )
        self._mixin: type | None = None

    def snapshot(self, event_store_name: str) -> Aggregate:
        """Name the event store this aggregate is fed from and snapshots into."""
        self.event_store_name = event_store_name
        return self

    def on(self, event_name: str) -> On:
        return On(self, event_name)

    def mixin(self) -> type:
        """A base class for the service that holds the transformations; it brings the
        ``<name>`` service (store actions, status, dead letters) up with it."""
        if self._mixin is None:
            self._mixin = type(f"{self.name}Mixin", (CqrsMixin,), {"_cqrs_component": self})
        return self._mixin

    def runtime(self, broker: ServiceBroker) -> AggregateRuntime:
        try:
            return self._runtimes[broker]
        except KeyError:
            raise ConfigurationError(
                f"aggregate {self.name!r} is not running on broker {broker.nodeID!r}"
            ) from None

    async def on_created(self, service: Any) -> None:
        broker: ServiceBroker = service.broker
        if broker in self._runtimes:
            return
        compat.install(broker)
        names.install_guard(broker)
        names.refuse_local_clash(
            broker, self.name, f"the aggregate {self.name!r} (of service {service.name!r})"
        )
        runtime = AggregateRuntime(
            self.name,
            lambda: self.store_factory(self.name, dict(AGGREGATE_FIELDS), self.settings),
            MoleculerPort(broker),
            self.bindings,
            batch_size=self.batch_size,
            attempts=self.attempts,
            on_error=self.on_error,
            snapshot=self.snapshot_strategy,
            snapshot_event_store=self.event_store_name,
            replay_batch_size=self.replay_batch_size,
            node_id=broker.nodeID,
            lease_ttl=self.lease_ttl,
            concurrency=self.concurrency,
            version=self.version,
        )
        # Here, not in started(): MoleculerPy logs an error of a started hook and goes on,
        # while one of a created hook fails broker.register, so the start is refused.
        await runtime.check_schema()
        try:
            populates = declare_populates(self.populates, runtime.adapter.fields)
        except ConfigurationError as error:
            raise ConfigurationError(f"aggregate {self.name!r}: {error}") from None
        self._runtimes[broker] = runtime
        compat.answer_batch_finds(broker, runtime.batches)
        service = _aggregate_service(self, runtime, self._event_store_for(broker), populates)
        await broker.register(service)

    async def on_started(self, service: Any) -> None:
        pass

    async def on_stopped(self, service: Any) -> None:
        pass

    def _event_store_for(self, broker: ServiceBroker) -> str:
        if self.event_store_name:
            return self.event_store_name
        local = list(local_event_stores(broker))
        if len(local) == 1:
            return local[0]
        raise ConfigurationError(
            f"aggregate {self.name!r} does not know its event store: call "
            f".snapshot('<eventStoreName>') on it (event stores here: {local or 'none'})"
        )


class AggregateServiceBase(ReadActions, WriteActions, Service):
    """The ``<aggregate>`` service: store actions, ``status``, ``snapshot``, ``snapshots``,
    ``restore``, ``replay``, ``deadLetters``, ``retryDeadLetters``, ``discardDeadLetters``,
    ``discardedDeadLetters``."""

    def __init__(
        self,
        name: str,
        runtime: AggregateRuntime,
        event_store: str,
        *,
        write_actions: bool,
        populates: Mapping[str, PopulateRule],
    ) -> None:
        super().__init__(name=name)
        names.mark(self, names.AGGREGATE)
        self.write_actions = write_actions
        self.populates = populates
        self.runtime = runtime
        self.port = runtime.port
        self.event_store = event_store
        self.remote_listeners = Listeners()
        self.starter: asyncio.Task[None] | None = None
        self.bindings_checked: asyncio.Task[None] | None = None
        self.replays: set[asyncio.Task[Any]] = set()

    @property
    def adapter(self) -> Adapter:
        return self.runtime.adapter

    def populate_rules(self) -> Mapping[str, PopulateRule]:
        rules: Mapping[str, PopulateRule] = self.populates
        return rules

    @property
    def batches(self) -> OpenBatches:
        return self.runtime.batches

    async def wait_ready(self) -> None:
        await until_ready(self.runtime.connected, self.name)

    async def started(self) -> None:
        await self.runtime.connect()
        self.starter = asyncio.create_task(self._start_projector(), name=f"cqrs-start-{self.name}")

    async def stopped(self) -> None:
        for task in list(self.replays):
            task.cancel()
        await asyncio.gather(*self.replays, return_exceptions=True)
        if self.starter is not None:
            self.starter.cancel()
            try:
                await self.starter
            except asyncio.CancelledError:
                pass
            self.starter = None
        if self.bindings_checked is not None:
            self.bindings_checked.cancel()
            await asyncio.gather(self.bindings_checked, return_exceptions=True)
            self.bindings_checked = None
        await self.runtime.stop()

    async def _start_projector(self) -> None:
        broker = self.broker
        assert broker is not None
        log_ = await event_log(broker, self.event_store, self.port, self.remote_listeners)
        self.runtime.start_projector(log_)
        self.bindings_checked = asyncio.create_task(
            self._check_bindings(log_), name=f"cqrs-check-{self.name}"
        )

    async def _check_bindings(self, source: EventLog) -> None:
        """Warn of bindings to events nobody produces (a check only, beside the projector)."""
        try:
            bound = [b.event for b in self.runtime.bindings]
            for line in await unproduced(self.name, bound, self.event_store, self.port, source):
                log.warning("%s", line)
        except Exception as error:
            log.debug("aggregate %s: bindings not checked: %s", self.name, error)

    def on_appended(self) -> None:
        # Another node appended to the log (a remote event store, or the same database
        # shared by several nodes): this projector would not hear of it otherwise.
        self.remote_listeners.notify()
        if self.runtime.projector is not None:
            self.runtime.projector.wake()

    @action(name="status")
    async def status_action(self, ctx: Context) -> dict[str, Any]:
        _no_params(ctx, "status")
        await self.wait_ready()
        return await self.runtime.status()

    def _maintenance(self) -> Maintenance:
        if self.runtime.maintenance is None:
            raise Conflict(f"{self.name} is not running yet (its projector has not started)")
        return self.runtime.maintenance

    @action(name="snapshot")
    async def snapshot_action(self, ctx: Context) -> str:
        """Back the aggregate up with its checkpoint; answers the snapshot id."""
        _no_params(ctx, "snapshot")
        return await self._maintenance().snapshot()

    @action(name="snapshots")
    async def snapshots_action(self, ctx: Context) -> list[dict[str, Any]]:
        """Every snapshot of this aggregate: status, checkpoint, size, time, location."""
        _no_params(ctx, "snapshots")
        return await self._maintenance().list_snapshots()

    @action(name="restore")
    async def restore_action(self, ctx: Context) -> dict[str, Any]:
        """Put a completed snapshot back (atomically) and catch up from its checkpoint."""
        return await self._maintenance().restore(_snapshot_id(ctx, required=True) or "")

    @action(name="replay")
    async def replay_action(self, ctx: Context) -> dict[str, Any]:
        """Rebuild from the log into a shadow table and swap it in (``wait`` to block until
        done), or with ``snapshotID`` restore that snapshot and catch up from it."""
        params = params_of(ctx)
        unknown = [k for k in params if k not in ("wait", "snapshotID", "snapshotId")]
        if unknown:
            raise InvalidInput(
                f"replay takes wait and snapshotID, not {unknown[0]!r}", field=unknown[0]
            )
        snapshot_id = _snapshot_id(ctx, required=False)
        maintenance = self._maintenance()
        maintenance.refuse_if_outdated()
        if snapshot_id is not None:
            restored = await maintenance.restore(snapshot_id)
            if params.get("wait"):
                await self.runtime.wait_caught_up()
            return {"state": "restored", **restored}
        if maintenance.replay_progress.state in ("running", "swapping"):
            raise Conflict(f"a replay of {self.name} is already running")
        task = asyncio.create_task(maintenance.replay(self._replay_progress))
        self.replays.add(task)
        task.add_done_callback(self._replay_done)
        if params.get("wait"):
            result: dict[str, Any] = await task
            return result
        await asyncio.sleep(0)  # let it start, so status shows it running
        return maintenance.replay_progress.public()

    def _replay_done(self, task: asyncio.Task[Any]) -> None:
        self.replays.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("replay of %s failed: %s", self.name, task.exception())

    def _replay_progress(self, progress: ReplayProgress) -> None:
        if self.port is not None and progress.state in ("running", "done", "failed"):
            payload = {"aggregate": self.name, **progress.public()}
            task = asyncio.create_task(self.port.broadcast(f"{self.name}.replay.progress", payload))
            self.replays.add(task)
            task.add_done_callback(self.replays.discard)

    @action(name="deadLetters")
    async def dead_letters_action(self, ctx: Context) -> Any:
        await self.wait_ready()
        store = StoreActions(self.runtime.dead_letters)
        return await store.list_page(params_of(ctx))

    @action(name="retryDeadLetters")
    async def retry_dead_letters_action(self, ctx: Context) -> dict[str, Any]:
        ids = _dead_letter_ids(ctx, "retryDeadLetters")
        projector = self.runtime.projector
        if projector is None:
            raise InvalidInput(f"the projector of {self.name!r} is not running yet")
        return await projector.retry_dead_letters(ids)

    @action(name="discardDeadLetters")
    async def discard_dead_letters_action(self, ctx: Context) -> dict[str, Any]:
        """Give up on dead letters (``ids``, or all): they move to the discarded list
        (``discardedDeadLetters``) with who discarded them (``meta.user``, else the calling
        node) and when; their events stay unapplied."""
        ids = _dead_letter_ids(ctx, "discardDeadLetters")
        await self.wait_ready()
        user = ctx.meta.get("user") if isinstance(ctx.meta, dict) else None
        by = str(user)[:200] if user else f"node {ctx.node_id or '?'}"
        return await self.runtime.discard_dead_letters(ids, by)

    @action(name="discardedDeadLetters")
    async def discarded_dead_letters_action(self, ctx: Context) -> Any:
        """The discarded dead letters, as ``deadLetters`` lists the live ones."""
        await self.wait_ready()
        return await StoreActions(self.runtime.discarded).list_page(params_of(ctx))


def _dead_letter_ids(ctx: Context, action_name: str) -> list[int] | None:
    params = params_of(ctx)
    unknown = [k for k in params if k != "ids"]
    if unknown:
        raise InvalidInput(f"{action_name} takes ids, not {unknown[0]!r}", field=unknown[0])
    ids = params.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise InvalidInput("ids must be a list of dead-letter ids", field="ids")
    return [check_id(i) for i in ids]  # 64-bit, as every store holds them


def _no_params(ctx: Context, action_name: str) -> None:
    params = params_of(ctx)
    if params:
        raise InvalidInput(f"{action_name} takes no parameters", field=next(iter(params)))


def _snapshot_id(ctx: Context, *, required: bool) -> str | None:
    params = params_of(ctx)
    value = params.get("snapshotID", params.get("snapshotId"))
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput("snapshotID (the id snapshot answered) is required", field="snapshotID")
    unknown = [k for k in params if k not in ("snapshotID", "snapshotId", "wait")]
    if unknown:
        raise InvalidInput(f"unexpected parameter {unknown[0]!r}", field=unknown[0])
    return value


def _aggregate_service(
    aggregate: Aggregate,
    runtime: AggregateRuntime,
    event_store: str,
    populates: Mapping[str, PopulateRule],
) -> AggregateServiceBase:
    @event(name=f"cqrs.{event_store}.appended")
    async def appended(service: AggregateServiceBase, ctx: Context) -> None:
        service.on_appended()

    klass = type(f"{aggregate.name}Service", (AggregateServiceBase,), {"cqrs_appended": appended})
    service: AggregateServiceBase = klass(
        aggregate.name,
        runtime,
        event_store,
        write_actions=aggregate.write_actions,
        populates=populates,
    )
    return service
