"""``EventStore``: saves commands as events and dispatches them (the user's entry point)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from moleculerpy import Context, Service, ServiceBroker, action, event

from moleculerpy_cqrs.broker import compat, names
from moleculerpy_cqrs.broker.log import READ, RECORD_SNAPSHOT, SETTLE_SNAPSHOT, SNAPSHOTS
from moleculerpy_cqrs.broker.mixin_base import CqrsMixin
from moleculerpy_cqrs.broker.port import MoleculerPort
from moleculerpy_cqrs.broker.store_service import ReadActions, params_of
from moleculerpy_cqrs.broker.timings import Outcome, append_timings
from moleculerpy_cqrs.core.eventstore import MAX_PAYLOAD_BYTES, EventStoreRuntime, until_ready
from moleculerpy_cqrs.core.lease import DEFAULT_TTL
from moleculerpy_cqrs.core.records import (
    EVENT_FIELDS,
    EVENT_VERSION,
    IDEMPOTENCY_KEY,
    ORIGIN_KEY,
    answer,
)
from moleculerpy_cqrs.core.upcast import Upcaster, Upcasters
from moleculerpy_cqrs.errors import (
    ConfigurationError,
    ConflictError,
    CqrsError,
    InvalidInput,
    StoreError,
)
from moleculerpy_cqrs.stores.base import Adapter, StoreFactory
from moleculerpy_cqrs.stores.fields import (
    Declarations,
    Record,
    check_id,
    declare_fields,
    declare_specs,
)

ActionHandler = Callable[[Any, Context], Any]
KeyOf = Callable[[Context], Any]
"""Derives an idempotency key from a call's context (None: no key)."""


class EventStore:
    """An event store named ``name`` whose log lives in a store made by ``store_factory``.

    ``fields`` declares extra columns (the Go library's ``{"tag": "string"}``), filled by
    ``map_action(..., extras)``. Mix ``mixin()`` into the service that takes the commands.
    ``dispatch_batch_size`` (the Go library's ``dispatchBatchSize``, default 100 here where Go
    had 1: each batch costs two commits, and at 1 the dispatcher falls behind any sustained
    load) is how many stored events the dispatcher takes at a time; events are still emitted
    one by one, in order, as soon as they are stored.
    """

    def __init__(
        self,
        name: str,
        store_factory: StoreFactory,
        fields: Declarations | None = None,
        *,
        dispatch_batch_size: int = 100,
        dispatch_attempts: int = 5,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        lease_ttl: float = DEFAULT_TTL,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not name.isidentifier():
            raise ConfigurationError(f"event store name {name!r} must be an identifier")
        self.name = name
        self.store_factory = store_factory
        self.extra_fields = declare_fields(fields)
        # With their index flags, for the store ({"type": "string", "index": True}).
        self.extra_specs = declare_specs(fields)
        clash = set(self.extra_fields) & set(EVENT_FIELDS)
        if clash:
            raise ConfigurationError(f"extra fields {sorted(clash)} clash with the event columns")
        self.dispatch_batch_size = int(
            (settings or {}).get("dispatchBatchSize", dispatch_batch_size)
        )
        self.dispatch_attempts = dispatch_attempts
        self.max_payload_bytes = max_payload_bytes
        self.lease_ttl = lease_ttl
        self.settings = dict(settings or {})
        self._runtimes: weakref.WeakKeyDictionary[ServiceBroker, EventStoreRuntime] = (
            weakref.WeakKeyDictionary()
        )
        self._mixin: type | None = None
        self.upcasters = Upcasters(name)
        self.produces: set[str] = set()
        """The event names its ``map_action``s and ``map_event``s store (``status`` lists
        them; an aggregate bound to another name is warned about at start)."""

    # ------------------------------------------------------------------ user API

    def upcast(self, event_name: str, from_version: int, fn: Upcaster) -> None:
        """Read ``event_name`` stored at ``from_version`` as ``fn(payload)`` at
        ``from_version + 1``. ``fn`` answers the new payload, ``Upcasted(name, payload)`` to
        rename the event too, or a list of those to split it. Every reader of the log (the
        dispatcher, projectors, replays, the read actions) sees the result; stored rows never
        change. The chains are checked when the node starts."""
        self.upcasters.add(event_name, from_version, fn)

    def rename(self, old_name: str, new_name: str) -> None:
        """Read, dispatch and project events stored as ``old_name`` as ``new_name`` (at the
        version they were stored at; ``new_name``'s upcasters take them on from there)."""
        self.upcasters.rename(old_name, new_name)

    def mixin(self) -> type:
        """A base class for the service that takes the commands: it adds ``$startDispatch``
        and ``$stopDispatch`` and brings the ``<name>`` service up with it."""
        if self._mixin is None:
            self._mixin = _make_mixin(self)
        return self._mixin

    def map_action(
        self,
        action_name: str,
        event_name: str,
        extras: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        strict: bool = True,
        version: int = EVENT_VERSION,
        idempotency_key: KeyOf | None = None,
    ) -> ActionHandler:
        """An action that saves its params as ``event_name`` and answers the stored event.

        ``params`` is an optional MoleculerPy validation schema; with ``strict`` (the
        default when a schema is given) keys outside it are refused too. ``version`` is
        stamped on every event it stores: the current version of ``event_name``.

        A call with an idempotency key is stored at most once per key: ``ctx.meta``'s
        ``idempotencyKey``, or what ``idempotency_key(ctx)`` answers (say, a command id in
        the params; None: no key). A repeat with the same params is answered the event
        stored first; with other params, a 409 ``ConflictError``.
        """
        self.upcasters.declare(event_name, version)
        extras = dict(extras or {})
        unknown = [k for k in extras if k not in self.extra_fields]
        if unknown:
            raise ConfigurationError(
                f"map_action extras {unknown} are not declared fields of {self.name!r}"
            )
        store = self
        self.produces.add(event_name)
        allowed = set(params) if params and strict else None

        async def save(service: Any, ctx: Context, outcome: Outcome) -> dict[str, Any]:
            payload = ctx.params if ctx.params is not None else {}
            if not isinstance(payload, dict):
                raise InvalidInput("params must be an object")
            if allowed is not None:
                extra = sorted(set(payload) - allowed)
                if extra:
                    raise InvalidInput(
                        f"unknown parameter {extra[0]!r}; this action takes {sorted(allowed)}",
                        field=extra[0],
                    )
            runtime = store.runtime(service.broker)
            if idempotency_key is not None:
                key = idempotency_key(ctx)
            else:
                key = (ctx.meta or {}).get(IDEMPOTENCY_KEY)
            try:
                keyed = await runtime.append_once(
                    event_name,
                    payload,
                    extras=extras,
                    meta=ctx.meta,
                    version=version,
                    idempotency_key=key,
                )
            except CqrsError as error:
                if not isinstance(error, InvalidInput | ConflictError):
                    await runtime.port.emit(
                        f"{event_name}.failed", {"error": str(error), "event": event_name}
                    )
                raise
            except Exception as error:
                await runtime.port.emit(
                    f"{event_name}.failed", {"error": str(error), "event": event_name}
                )
                raise StoreError(
                    f"could not save {event_name}: {error}", store=store.name
                ) from error
            outcome.duplicate = not keyed.stored
            return answer(keyed.row, tuple(store.extra_fields))

        @action(name=action_name, params=dict(params) if params else None)
        async def handler(service: Any, ctx: Context) -> dict[str, Any]:
            timings = append_timings(service.broker)
            with timings.measure(store.name, f"{service.name}.{action_name}") as outcome:
                return await save(service, ctx, outcome)

        handler.__name__ = f"cqrs_map_action_{action_name}"
        return handler

    def map_event(
        self,
        origin_event: str,
        stored_event: str,
        *,
        version: int = EVENT_VERSION,
        idempotency_key: KeyOf | None = None,
    ) -> Callable[[Any, Context], Any]:
        """An event handler that saves every ``origin_event`` it hears as ``stored_event``
        (stamped ``version``, its current version).

        An event heard from one of the toolkit's event stores (its dispatcher delivers at
        least once) is keyed by its origin, ``<store>:<position>``: a redelivery stores
        nothing. For events from elsewhere, ``idempotency_key(ctx)`` may name a key (say, a
        message id the emitter puts in the payload or meta); None: stored as heard. A
        repeat is never refused: its first copy stands.
        """
        self.upcasters.declare(stored_event, version)
        store = self
        self.produces.add(stored_event)

        @event(name=origin_event)
        async def handler(service: Any, ctx: Context) -> None:
            payload = ctx.params if isinstance(ctx.params, dict) else {"value": ctx.params}
            meta = ctx.meta or {}
            key = idempotency_key(ctx) if idempotency_key is not None else None
            if key is None and isinstance(meta.get(ORIGIN_KEY), str):
                key = f"{ORIGIN_KEY}:{meta[ORIGIN_KEY]}"
            await store.runtime(service.broker).append(
                stored_event,
                payload,
                meta=meta,
                version=version,
                idempotency_key=key,
                compare=False,
            )

        handler.__name__ = f"cqrs_map_event_{origin_event}"
        return handler

    # ------------------------------------------------------------------ run time

    def runtime(self, broker: ServiceBroker) -> EventStoreRuntime:
        try:
            return self._runtimes[broker]
        except KeyError:
            raise ConfigurationError(
                f"event store {self.name!r} is not running on broker {broker.nodeID!r}: "
                "mix events.mixin() into one of its services"
            ) from None

    def runtime_or_none(self, broker: ServiceBroker) -> EventStoreRuntime | None:
        return self._runtimes.get(broker)

    async def on_created(self, service: Any) -> None:
        broker: ServiceBroker = service.broker
        if broker in self._runtimes:
            return
        self.upcasters.check()  # a broken chain stops the start, naming event and versions
        compat.install(broker)
        names.install_guard(broker)
        names.refuse_local_clash(
            broker, self.name, f"the event store {self.name!r} (of service {service.name!r})"
        )
        fields: Declarations = {**EVENT_FIELDS, **self.extra_specs}
        runtime = EventStoreRuntime(
            self.name,
            lambda: self.store_factory(self.name, fields, self.settings),
            MoleculerPort(broker),
            dispatch_batch_size=self.dispatch_batch_size,
            dispatch_attempts=self.dispatch_attempts,
            max_payload_bytes=self.max_payload_bytes,
            node_id=broker.nodeID,
            lease_ttl=self.lease_ttl,
            upcasters=self.upcasters,
        )
        # Here, not in started(): MoleculerPy logs an error of a started hook and goes on,
        # while one of a created hook fails broker.register, so the start is refused.
        await runtime.check_schema()
        self._runtimes[broker] = runtime
        await broker.register(_event_store_service(self.name, runtime, self.produces))

    async def on_started(self, service: Any) -> None:
        pass  # the <name> service starts the runtime

    async def on_stopped(self, service: Any) -> None:
        pass


class EventStoreService(ReadActions, Service):
    """The ``<eventStore>`` service: read-only store actions over the log, ``read``, ``status``.

    The log is append-only, so ``create``/``update``/``remove`` are not offered here: events
    enter through ``map_action``/``map_event`` only.
    """

    def __init__(
        self, name: str, runtime: EventStoreRuntime, produces: set[str] | None = None
    ) -> None:
        super().__init__(name=name)
        self.produces = produces if produces is not None else set()
        names.mark(self, names.EVENT_STORE)
        self.runtime = runtime
        self.port = runtime.port

    @property
    def adapter(self) -> Adapter:
        return self.runtime.adapter

    async def wait_ready(self) -> None:
        await until_ready(self.runtime.ready, self.name)

    async def started(self) -> None:
        if not self.runtime.started:
            await self.runtime.start()

    async def stopped(self) -> None:
        await self.runtime.stop()

    @action(name=READ)
    async def read_action(self, ctx: Context) -> dict[str, Any]:
        params = params_of(ctx)
        unknown = [k for k in params if k not in ("after", "limit", "raw")]
        if unknown:
            raise InvalidInput(
                f"read takes after, limit and raw, not {unknown[0]!r}", field=unknown[0]
            )
        after = params.get("after", 0)
        limit = params.get("limit", 100)
        for key, value, top in (("after", after, 2**63 - 1), ("limit", limit, 10_000)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise InvalidInput(f"{key} must be an integer from 0 to {top}", field=key)
        await self.wait_ready()
        return await self.runtime.read(after, limit, raw=_raw(params))

    async def _run(self, ctx: Context, action_name: str) -> Any:
        """The store actions over the log answer events as read now (see ``read``);
        ``raw: true`` answers them as stored."""
        params = params_of(ctx)
        raw = _raw(params)
        if "raw" in params:
            ctx.params = {k: v for k, v in params.items() if k != "raw"}
        found = await super()._run(ctx, action_name)
        if raw or not self.runtime.upcasters.active or action_name == "count":
            return found
        read = self.runtime.upcasters.read_all
        if isinstance(found, list):
            return read(found)
        if isinstance(found, dict) and isinstance(found.get("rows"), list):  # list's page
            return {**found, "rows": read(found["rows"])}
        if isinstance(found, dict):  # get with one id: a split event answers its pieces
            pieces = read([found])
            return pieces[0] if len(pieces) == 1 else pieces
        return found

    @action(name="status")
    async def status_action(self, ctx: Context) -> dict[str, Any]:
        if params_of(ctx):
            raise InvalidInput("status takes no parameters", field=next(iter(params_of(ctx))))
        await self.wait_ready()
        return {**await self.runtime.status(), "produces": sorted(self.produces)}

    @action(name=SNAPSHOTS)
    async def snapshots_action(self, ctx: Context) -> list[Record]:
        """For aggregates: the snapshot events stored as ``event`` (``<agg>.snapshot``)."""
        params = params_of(ctx)
        event_name = params.get("event")
        valid = isinstance(event_name, str) and event_name.endswith(".snapshot")
        if not valid or len(params) != 1:
            raise InvalidInput("snapshots takes event '<aggregate>.snapshot'", field="event")
        await self.wait_ready()
        return await self.runtime.snapshots(str(event_name))

    @action(name=RECORD_SNAPSHOT)
    async def record_snapshot_action(self, ctx: Context) -> dict[str, Any]:
        """For aggregates: store a snapshot-created event (eventType 1)."""
        params = params_of(ctx)
        event_name, payload = params.get("event"), params.get("payload")
        if not isinstance(event_name, str) or not event_name.endswith(".snapshot"):
            raise InvalidInput("recordSnapshot takes event '<aggregate>.snapshot'", field="event")
        if not isinstance(payload, dict):
            raise InvalidInput("recordSnapshot takes a payload object", field="payload")
        return await self.runtime.record_snapshot(event_name, payload)

    @action(name=SETTLE_SNAPSHOT)
    async def settle_snapshot_action(self, ctx: Context) -> dict[str, Any]:
        """For aggregates: mark a snapshot event completed (2) or failed (3)."""
        params = params_of(ctx)
        error = params.get("error")
        if not isinstance(params.get("payload"), dict) or not (
            error is None or isinstance(error, str)
        ):
            raise InvalidInput("settleSnapshot takes id, payload and error (a string or null)")
        return await self.runtime.settle_snapshot(
            check_id(params.get("id")), params["payload"], error
        )


def _raw(params: Mapping[str, Any]) -> bool:
    raw = params.get("raw", False)
    if not isinstance(raw, bool):
        raise InvalidInput("raw must be true or false", field="raw")
    return raw


def _event_store_service(
    name: str, runtime: EventStoreRuntime, produces: set[str]
) -> EventStoreService:
    @event(name=f"cqrs.{name}.appended")
    async def appended(service: EventStoreService, ctx: Context) -> None:
        # Another node appended to a shared log: a standby dispatcher must hear of it.
        service.runtime.dispatcher.wake()

    klass = type(f"{name}Service", (EventStoreService,), {"cqrs_appended": appended})
    service: EventStoreService = klass(name, runtime, produces)
    return service


def _make_mixin(store: EventStore) -> type:
    def runtime_of(service: Any) -> EventStoreRuntime:
        return store.runtime(service.broker)

    @action(name="$startDispatch")
    async def start_dispatch(service: Any, ctx: Context) -> dict[str, Any]:
        runtime = runtime_of(service)
        runtime.dispatcher.start()
        return {"dispatching": True}

    @action(name="$stopDispatch")
    async def stop_dispatch(service: Any, ctx: Context) -> dict[str, Any]:
        await runtime_of(service).dispatcher.stop()
        return {"dispatching": False}

    return type(
        f"{store.name}Mixin",
        (CqrsMixin,),
        {
            "_cqrs_component": store,
            "cqrs_start_dispatch": start_dispatch,
            "cqrs_stop_dispatch": stop_dispatch,
        },
    )
