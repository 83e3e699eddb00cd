"""Every workaround for a MoleculerPy 0.14.22 defect, applied by one idempotent ``install``.

The toolkit's services call :func:`install` on each broker they are registered with (in their
``created()`` hook). It patches that broker *instance* and its transit, never a MoleculerPy
class, so a broker that did not opt in behaves exactly as MoleculerPy ships it. Calling it again
is a no-op; calling it after ``broker.start()`` works too.

What it fixes (each has a regression test in ``tests/broker/test_compat.py``):

* **emit** — MoleculerPy delivers an emitted event to the first matching handler in the whole
  cluster, raises when nobody listens, and lets a handler's exception reach the emitter. Now an
  event reaches each subscribing service once (its *group*: the service name, or the group a
  remote Moleculer.js handler declares), balanced round-robin among that service's instances
  (a local one preferred, as ``prefer_local`` says), local and remote. Nobody listening is a
  no-op; a failing handler is logged and never reaches the sender. ``broadcast`` reaches every
  handler once, also two services on one remote node (MoleculerPy sent one packet per handler,
  each of which ran the node's first handler). A remote packet is targeted at the chosen node
  and carries the chosen ``groups`` as in Moleculer.js; the receiver runs exactly those groups'
  handlers (MoleculerPy ran its first local handler and ignored ``groups``). The emitting broker
  always balances, also with ``disable_balancer``.
* **late services** — a service registered after ``broker.start()`` never got ``started()``.
  A broker hook now starts it at the end of ``register`` (MoleculerPy already announces it to
  other nodes there, before ``started()``, as it does at start). No service starts twice.
* **NATS concurrency** — the NATS client runs a subscription's callbacks one at a time, so a
  node served one request at a time and a call chain X → Y → X across nodes deadlocked. Each
  incoming REQUEST packet is now served in its own task (drained on stop). EVENT packets are
  handled one after another per node, in arrival order (the memory transporter, which hands
  each packet to its own task, reordered them). A request is served by the *local* endpoint
  (MoleculerPy took the first endpoint of that name and dropped the request if it was remote);
  with none, the caller gets ``ServiceNotFoundError`` instead of a timeout.
* **answers too large to send** — an answer the transporter refuses (NATS's ``max_payload``,
  1 MB by default) was only logged on the serving node (``MaxPayloadError``) and the caller
  waited for its timeout. The caller now gets :class:`~moleculerpy_cqrs.errors.
  ResponseTooLargeError` (413) at once, saying how to ask for less; an answer that cannot be
  sent for another reason becomes a 500 error answer, and an error answer too large to send is
  sent without its data and stack, its message cut short. Params too large to send are an
  ``InvalidInput`` (422) on the calling node.
* **errors across nodes** — an error that is not in MoleculerPy's registry (ours:
  ``EntityNotFoundError``, ``ConflictError``, ...) arrived as ``RemoteCallError`` (500-ish, the
  server's stack in its data), while a 422 arrived as ``ValidationError``. Each of our errors
  now arrives as the class it was raised as, with the same code, type and data; the remote
  stack is kept in ``remote_stack``.
* **logs** — every failed action was logged at ERROR on the serving node, and the calling node
  logged the remote stack trace at ERROR again. A client error (4xx) is now logged at DEBUG;
  a real failure at ERROR once (the same failure repeated within a minute, as retries do, at
  DEBUG), and never by the caller, who gets the exception.
* **requests to a node that left** — a request sent to a node that then disconnected (its
  DISCONNECT packet, or its heartbeats stopped) waited for its timeout. It now fails at once
  with ``RequestRejectedError`` (503, retryable), as Moleculer.js's
  ``removePendingRequestByNodeID`` does.
* **local calls** (speed, not a defect) — ``broker.call`` of an action this node serves (with
  ``prefer_local``, MoleculerPy's default) goes the way MoleculerPy's own local branch goes
  (the same context fields: level, request id, parent id, caller, tracing and parent span
  from ``parent_ctx``; the max call level; endpoint selection with that context, so the batch
  routing below still applies; params validation; the error logged and raised), but the
  context is built directly (:func:`local_context`: the same slots the constructor sets,
  stored on an object of Context's layout that then becomes a Context), with an id made from
  a per-broker random prefix and a counter in UUID form instead of a fresh ``uuid4`` each (a
  uuid4 was about a quarter of a local call's cost). A transformation's ``find {key: value}``
  of its own aggregate, for a value its batch prefetched, is answered from the batch before
  any context is made (:func:`answer_batch_finds`). Every other call is MoleculerPy's own.
* **timeouts** — ``broker.call(..., timeout=x)`` ignored ``x`` for a remote call (30 s default)
  and raised the builtin ``TimeoutError``; now ``x`` applies and
  :class:`moleculerpy.errors.RequestTimeoutError` (code 504) is raised. A local call's
  ``timeout`` is still not enforced: cancelling a local handler midway (a store commit, say)
  is worse than waiting for it.

Not a workaround, but hooked in the same places: the request handler also serves the toolkit's
own ``$cqrs.callMany`` (many transformation calls in one request, ``broker/remote.py``; no
service registers it, and the node's INFO metadata says it is served), and a read of the
projector's aggregate made by one of those calls is answered on this node when it can be
(from the rows the call carries, or what its session kept), and recorded: ``broker.call``
answers it before making a context (``remote.answer_here``); an outgoing request for it is
marked recorded (``remote.around_read``).

Avoided on purpose rather than worked around: service ``hooks = {"before": ...}`` never fire and
``mixins = [...]`` (dict or class) lose their actions and events in 0.14.22, so the toolkit uses
neither; its mixins are plain Python base classes whose lifecycle hooks chain through
``super()``, which MoleculerPy handles correctly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
import time
import traceback
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, cast

from moleculerpy.context import Context
from moleculerpy.errors import (
    ERROR_REGISTRY,
    MaxCallLevelError,
    MoleculerError,
    RemoteCallError,
    RequestRejectedError,
    RequestTimeoutError,
    ServiceNotFoundError,
)
from moleculerpy.packet import Packet, Topic
from moleculerpy.registry import Registry
from moleculerpy.validator import validate_params

from moleculerpy_cqrs import errors
from moleculerpy_cqrs.broker import remote
from moleculerpy_cqrs.core.joins import AGGREGATE_KEY, NODE_KEY, TOKEN_KEY, OpenBatches

if TYPE_CHECKING:
    from moleculerpy.broker import ServiceBroker
    from moleculerpy.registry import Action, Event
    from moleculerpy.service import Service

__all__ = [
    "broadcast",
    "emit",
    "install",
    "is_client_error",
    "is_installed",
    "remote_error",
    "request_on_node",
]

_STATE_ATTR = "_moleculerpy_cqrs_compat"

# How long stopping a broker waits for requests it is still serving before cancelling them.
DRAIN_GRACE = 5.0

# A failure logged at ERROR is logged again at DEBUG only, for this long (retries repeat it).
REPEAT_WINDOW = 60.0

_AsyncFn = Callable[..., Awaitable[Any]]


def install(broker: ServiceBroker) -> None:
    """Apply every workaround to ``broker`` (idempotent; before or after ``start()``)."""
    if is_installed(broker):
        return
    compat = _Compat(broker)
    setattr(broker, _STATE_ATTR, compat)
    compat.apply()


def answer_batch_finds(broker: ServiceBroker, batches: OpenBatches) -> None:
    """Let ``broker.call`` answer a transformation's ``find {key: value}`` of the aggregate
    whose open batches these are from the batch itself, without a context or the action,
    when the batch prefetched that value (:meth:`~moleculerpy_cqrs.core.batch.BatchView.
    find_by_key`): the answer the aggregate's ``find`` action would give. Needs
    :func:`install` first."""
    _state(broker).batch_finds[f"{batches.aggregate}.find"] = batches


def is_installed(broker: ServiceBroker) -> bool:
    """Whether :func:`install` was applied to ``broker``."""
    return isinstance(getattr(broker, _STATE_ATTR, None), _Compat)


async def emit(
    broker: ServiceBroker,
    event: str,
    payload: Any = None,
    *,
    meta: dict[str, Any] | None = None,
    groups: list[str] | None = None,
) -> None:
    """Emit ``event``: once per subscribing group (all of them, or only ``groups``).

    Installs the workarounds first if needed. Without ``groups`` this is ``broker.emit``
    (middleware ``emit`` hooks apply); with ``groups`` it bypasses them, since MoleculerPy's
    ``emit`` has no ``groups`` argument.
    """
    install(broker)
    if groups is None:
        await broker.emit(event, payload, meta or {})
    else:
        await _state(broker).emit(event, {} if payload is None else payload, meta or {}, groups)


async def broadcast(
    broker: ServiceBroker,
    event: str,
    payload: Any = None,
    *,
    meta: dict[str, Any] | None = None,
    groups: list[str] | None = None,
) -> None:
    """Broadcast ``event`` to every handler (of ``groups`` only, if given), local and remote."""
    install(broker)
    await broker.broadcast(event, payload, meta or {}, groups)


class _BatchReadRouting:
    """Calls made for a projector's batch (their meta names it): a transformation's read of
    its own aggregate goes to the node that holds the batch (MoleculerPy's ``call`` has no
    ``nodeID`` option), and any other such call — the transformation itself — to this node
    when it serves the action, whatever ``prefer_local`` says. Every other call as the
    registry would. The broker's registry becomes a :class:`_RoutingRegistry` on install."""

    __slots__ = ()

    def get_action_endpoint(self, name: Any, ctx: Context | None = None) -> Any:
        meta = getattr(ctx, "meta", None)
        if isinstance(meta, dict) and AGGREGATE_KEY in meta:
            aggregate, node = meta.get(AGGREGATE_KEY), meta.get(NODE_KEY)
            own_read = isinstance(aggregate, str) and str(name).startswith(aggregate + ".")
            for endpoint in cast(Any, self).get_all_actions(name):
                if endpoint.node_id == node if own_read else endpoint.is_local:
                    return endpoint
        return cast(Any, super()).get_action_endpoint(name, ctx)


class _RoutingRegistry(_BatchReadRouting, Registry):
    __slots__ = ()


# Registry.__setattr__ stores a name outside ``self.__slots__`` aside; the subclass must
# answer the registry's own slot names there (its layout is unchanged: no new slots).
_RoutingRegistry.__slots__ = Registry.__slots__  # type: ignore[assignment]


async def request_on_node(broker: ServiceBroker, node_id: str, action: str, params: Any) -> Any:
    """Send a request for ``action`` to ``node_id`` whatever the registry says serves it
    (the toolkit's own :data:`~.remote.CALL_MANY`, which no service registers)."""
    install(broker)
    ctx = broker.lifecycle.create_context(action=action, params=params, meta={})
    return await _state(broker).request(cast(Any, _NodeEndpoint(node_id, action)), ctx)


class _NodeEndpoint:
    """What ``Transit.request`` reads of an endpoint."""

    def __init__(self, node_id: str, name: str) -> None:
        self.node_id = node_id
        self.name = name
        self.timeout: float | None = None
        self.is_local = False


# Context's slots, as local_context sets them (any other set of slots: the constructor).
_CONTEXT_SLOTS: Final = frozenset((
    "id", "level", "request_id", "action", "params", "meta", "parent_id", "timeout", "_broker",
    "node_id", "caller", "tracing", "event", "stream", "service", "need_ack", "ack_id", "seq",
    "span", "_span_stack", "cached_result", "options", "fallback_result", "_params", "_extra",
))  # fmt: skip
_FAST_CONTEXT: Final = frozenset(Context.__slots__) == _CONTEXT_SLOTS


class _ContextLayout:
    """Context's slots in Context's layout (its own ``__slots__``), without the
    ``__setattr__`` Context has (which sends every store through a Python call): an instance
    is filled by plain attribute stores, then made a Context by ``__class__`` assignment,
    which CPython allows between two classes of one layout. Measured here: 0.9 us, against
    4.9 us for the same 25 slots set through ``object.__setattr__`` and 9 us for the
    constructor."""

    __slots__ = Context.__slots__
    id: Any
    level: int
    request_id: Any
    action: Any
    params: Any
    meta: Any
    parent_id: Any
    timeout: Any
    _broker: Any
    node_id: Any
    caller: Any
    tracing: Any
    event: Any
    stream: bool
    service: Any
    need_ack: Any
    ack_id: Any
    seq: Any
    span: Any
    _span_stack: list[Any]
    cached_result: bool
    options: Any
    fallback_result: Any
    _params: Any
    _extra: Any


def local_context(
    broker: Any,
    context_id: str,
    action: Any,
    params: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    level: int,
    request_id: str,
    parent_id: str | None,
    timeout: float | None,
    caller: str | None,
    tracing: bool | None,
) -> Context:
    """The context ``Context(id=context_id, action=action, params=params, meta=meta,
    broker=broker, level=level, request_id=request_id, parent_id=parent_id, timeout=timeout,
    node_id=broker.nodeID, caller=caller, tracing=tracing)`` makes, its 25 slots set as plain
    attribute stores (:class:`_ContextLayout`): made once per local call. (MoleculerPy's
    NewType wrappers are the identity; ``level`` is at least 1 here.) If MoleculerPy's Context
    ever has other slots, its own constructor is used."""
    if not _FAST_CONTEXT:
        return Context(
            id=context_id, action=action, params=params, meta=meta, broker=broker, level=level,
            request_id=request_id, parent_id=parent_id, timeout=timeout,
            node_id=broker.nodeID, caller=caller, tracing=tracing,
        )  # fmt: skip
    context = _ContextLayout()
    context.id = context_id
    context.level = level
    context.request_id = request_id
    context.action = action
    context.params = params or {}
    context.meta = meta or {}
    context.parent_id = parent_id
    context.timeout = timeout
    context._broker = weakref.ref(broker)
    context.node_id = broker.nodeID
    context.caller = caller
    context.tracing = tracing
    context.event = None
    context.stream = False
    context.service = None
    context.need_ack = None
    context.ack_id = None
    context.seq = None
    context.span = None
    context._span_stack = []
    context.cached_result = False
    context.options = None
    context.fallback_result = False
    context._params = None
    context._extra = None
    object.__setattr__(context, "__class__", Context)
    return cast(Context, context)


def root_context(
    broker: Any, context_id: str, action: Any, params: dict[str, Any], meta: dict[str, Any]
) -> Context:
    """The context ``Lifecycle.create_context`` makes for a root call (level 1, its own id
    as its request id), made the cheap way (:func:`local_context`)."""
    return local_context(
        broker, context_id, action, params, meta, 1, context_id, None, None, None, None
    )


def batch_caller(
    broker: ServiceBroker, action_name: str
) -> Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]] | None:
    """A function that calls ``action_name`` as ``broker.call(action_name, params, meta)``
    does for a projector's batch (``meta`` names it), when this node serves the action: the
    registry sends such a call here whatever ``prefer_local`` says (:class:`_BatchReadRouting`),
    so the endpoint is found once, not per call. Each call gets a root context of its own
    (:func:`root_context`) and runs as a local ``broker.call`` runs it (:meth:`_Compat.run_local`:
    params checked, an error logged and raised). None when no local service serves it."""
    install(broker)
    state = _state(broker)
    max_level = cast(Any, broker).settings.max_call_level
    if 0 < max_level <= 1:  # even a root call is refused: broker.call says so
        return None
    found = state._local_action(action_name)
    if found is None or (found.wrapped_handler or found.handler) is None:
        return None

    async def call(params: dict[str, Any], meta: dict[str, Any]) -> Any:
        context_id = state.context_id()
        context = root_context(broker, context_id, action_name, params, meta)
        return await state.run_local(action_name, found, context)

    return call


def _state(broker: ServiceBroker) -> _Compat:
    return cast(_Compat, getattr(broker, _STATE_ATTR))


@lru_cache(maxsize=512)
def _event_pattern(pattern: str) -> re.Pattern[str]:
    # Moleculer's utils.match: "?" one character, "*" one dot-free segment, "**" anything.
    regex = (
        re.escape(pattern)
        .replace(r"\?", ".")
        .replace(r"\*\*", "\0")
        .replace(r"\*", "[^.]*")
        .replace("\0", ".*")
    )
    return re.compile(f"^{regex}$")


def _event_matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if "*" not in pattern and "?" not in pattern:
        return False
    return _event_pattern(pattern).match(name) is not None


def _local_group(endpoint: Event) -> str:
    # The service name: the group other nodes see in our INFO (MoleculerPy sends no "group").
    service = getattr(endpoint.handler, "__self__", None)
    name = getattr(service, "name", None)
    return name if isinstance(name, str) and name else str(endpoint.name)


def _error_payload(error: Exception) -> dict[str, Any]:
    # The same wire shape as MoleculerPy's own Transit._handle_request.
    if isinstance(error, MoleculerError):
        data = error.to_dict()
        data["stack"] = traceback.format_exc()
        return data
    return {
        "name": type(error).__name__,
        "message": str(error),
        "code": 500,
        "type": "INTERNAL_ERROR",
        "retryable": isinstance(error, ConnectionError | OSError | TimeoutError),
        "stack": traceback.format_exc(),
    }


def is_client_error(error: BaseException | None) -> bool:
    """A 4xx Moleculer error: the caller's to fix, not the serving node's failure."""
    code = getattr(error, "code", None)
    return isinstance(error, MoleculerError) and isinstance(code, int) and 400 <= code < 500


def remote_error(plain: Any, sender: str | None) -> MoleculerError:
    """The exception an error packet describes: ours as the class raised, a MoleculerPy one
    as MoleculerPy rebuilds it, anything else as ``RemoteCallError``."""
    plain = plain if isinstance(plain, dict) else {}
    error = errors.restore(plain)
    if error is None and plain.get("name") in ERROR_REGISTRY:
        try:
            rebuilt = MoleculerError.from_dict(plain)
        except Exception:
            rebuilt = None
        if rebuilt is not None and type(rebuilt) is not MoleculerError:
            error = rebuilt
    if error is None:
        error = RemoteCallError(
            message=str(plain.get("message") or "Unknown error"),
            error_name=str(plain.get("name") or "RemoteError"),
            stack=plain.get("stack"),
            code=plain.get("code") if isinstance(plain.get("code"), int) else 500,
            error_type=str(plain.get("type") or "REMOTE_ERROR"),
            retryable=bool(plain.get("retryable", True)),
        )
    dynamic = cast(Any, error)
    dynamic.remote_stack = plain.get("stack")
    dynamic.nodeID = plain.get("nodeID") or sender
    return error


def _too_large(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "MaxPayloadError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Repeats:
    """Which failures were logged at ERROR lately, so that a retried one is logged once."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def first(self, message: str) -> bool:
        now = time.monotonic()
        if len(self.logged) > 1000:
            self.logged = {m: t for m, t in self.logged.items() if now - t < REPEAT_WINDOW}
        last = self.logged.get(message)
        if last is not None and now - last < REPEAT_WINDOW:
            return False
        self.logged[message] = now
        return True


class _BrokerLogger:
    """The broker's logger, except that ERROR lines written while a client error (4xx) is
    being handled are DEBUG lines, and a repeated ERROR line within REPEAT_WINDOW too.

    MoleculerPy logs every failed local action from ``broker.call``'s ``except`` block; the
    exception at hand (``sys.exc_info``) tells a client error from a failure.
    """

    def __init__(self, logger: Any, repeats: _Repeats) -> None:
        self._logger = logger
        self._repeats = repeats

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        if is_client_error(sys.exc_info()[1]) or not self._repeats.first(str(message)):
            self._logger.debug(message, *args, **kwargs)
        else:
            self._logger.error(message, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class _BrokerHooks:
    """Sits in ``broker.middlewares``; MoleculerPy calls only the hooks an object defines.

    A plain object, not a ``Middleware`` subclass: the base class's pass-through
    ``local_action``/``remote_action``/``local_event`` would wrap every handler in another layer.
    """

    def __init__(self, compat: _Compat) -> None:
        self.compat = compat

    async def broker_starting(self, broker: Any) -> None:
        self.compat.stopping = False

    async def broker_stopping(self, broker: Any) -> None:
        self.compat.stopping = True
        await self.compat.drain_requests(cancel=False)

    async def broker_stopped(self, broker: Any) -> None:
        self.compat.started.clear()

    async def service_created(self, service: Service) -> None:
        await self.compat.start_late_service(service)


class _Compat:
    """The per-broker state of the workarounds and the replacement methods."""

    def __init__(self, broker: ServiceBroker) -> None:
        self.broker = broker
        self.transit = broker.transit
        self.repeats = _Repeats()
        self.logger = _BrokerLogger(broker.logger, self.repeats)
        self.sessions = remote.Sessions()  # of $cqrs.callMany (serial requests) served here
        self.stopping = False
        # Keyed by id(); holding the service keeps a replaced one's id from being reused.
        self.started: dict[int, Service] = {}
        self.requests: set[asyncio.Task[None]] = set()
        self.event_lock = asyncio.Lock()
        self.turns: dict[tuple[str, str], int] = {}
        self.pending: dict[str, dict[str, str]] = {}  # node id -> {request id: action}
        # Local calls' context ids: "xxxxxxxx-xxxx-4xxx-yxxx-" (random, per broker) + counter.
        self.id_prefix = str(uuid.uuid4())[:24]
        self.id_counter = itertools.count()
        # "<aggregate>.find" -> that aggregate's open batches, for each aggregate served here
        self.batch_finds: dict[str, OpenBatches] = {}

    def apply(self) -> None:
        broker = cast(Any, self.broker)
        transit = cast(Any, self.transit)
        broker._emit_core = self.emit
        broker._broadcast_core = self.broadcast
        self._original_call: _AsyncFn = broker.call
        broker.call = self.call
        self._original_start_service: _AsyncFn = broker._start_service
        broker._start_service = self.start_service
        broker.logger = self.logger
        self._original_on_response: _AsyncFn = transit._packet_handlers[Topic.RESPONSE]
        transit._packet_handlers[Topic.RESPONSE] = self.on_response_packet
        transit._packet_handlers[Topic.EVENT] = self.on_event_packet
        transit._packet_handlers[Topic.REQUEST] = self.on_request_packet
        self._original_request: _AsyncFn = transit.request
        transit.request = self.request
        self._original_request_without_endpoint: _AsyncFn = transit.request_without_endpoint
        transit.request_without_endpoint = self.request_without_endpoint
        self._original_disconnect: _AsyncFn = transit.disconnect
        transit.disconnect = self.disconnect
        catalog = broker.node_catalog
        self._original_disconnect_node: Callable[..., None] = catalog.disconnect_node
        catalog.disconnect_node = self.disconnect_node
        # A new list: the old one may be a Settings.middlewares list shared with other brokers.
        broker.middlewares = [*broker.middlewares, _BrokerHooks(self)]
        # Tell other nodes (in INFO) that this one serves many transformation calls at once.
        local_node = broker.node_catalog.local_node
        if local_node is not None:
            local_node.metadata = {**(local_node.metadata or {}), remote.CAPABILITY: 1}
        # The registry has fixed slots: route through a subclass, not an instance attribute.
        registry = cast(Any, broker.registry)
        if type(registry) is Registry:
            # Its __setattr__ keeps unknown names aside, so set the class past it.
            object.__setattr__(registry, "__class__", _RoutingRegistry)

    # ------------------------------------------------------------------ local calls

    async def call(
        self,
        action_name: Any,
        params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        parent_ctx: Context | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (broker.call's signature)
    ) -> Any:
        """``broker.call``: MoleculerPy's local branch, with a cheaper context (see the
        module docstring); a call no local endpoint serves is MoleculerPy's own. A read of the
        projector's aggregate that a transformation running here for ``$cqrs.callMany`` makes
        is answered here when it can be, before a context and a request are made for it
        (``remote.answer_here``)."""
        if remote.serving():
            answer = await remote.answer_here(str(action_name), params, meta)
            if answer is not remote.NOT_HERE:
                return answer
        elif type(meta) is dict and TOKEN_KEY in meta:
            batches = self.batch_finds.get(action_name)
            view = None if batches is None else batches.open_view(meta)
            found = None if view is None else view.find_by_key(params)
            if found is not None:
                return found
        broker = cast(Any, self.broker)
        registry = broker.registry
        if not registry.prefer_local or not any(
            e.is_local for e in registry.get_all_actions(action_name)
        ):
            return await self._original_call(action_name, params, meta, parent_ctx, timeout)
        if params is None:
            params = {}
        if meta is None:
            meta = {}
        parent_span = None
        if parent_ctx is not None:
            level = parent_ctx.level + 1
            request_id: str | None = parent_ctx.request_id
            parent_id: str | None = parent_ctx.id
            tracing = parent_ctx.tracing
            caller = parent_ctx.service.name if parent_ctx.service else None
            parent_span = getattr(parent_ctx, "span", None)
        else:
            level, request_id, parent_id, tracing, caller = 1, None, None, None, None
        max_level = broker.settings.max_call_level
        if max_level > 0 and level >= max_level:
            raise MaxCallLevelError(broker.nodeID, level)
        context_id = self.context_id()
        context = local_context(
            broker,
            context_id,
            action_name,
            params,
            meta,
            level,
            context_id if request_id is None else request_id,
            parent_id,
            timeout,
            caller,
            tracing,
        )
        if parent_span is not None:
            context.parent_span = parent_span
        endpoint = registry.get_action_endpoint(action_name, context)
        if endpoint is None or not endpoint.is_local:  # routed elsewhere (a batch's reads)
            return await self._original_call(action_name, params, meta, parent_ctx, timeout)
        return await self.run_local(action_name, endpoint, context)

    def context_id(self) -> str:
        """A new context id: the per-broker random prefix and a counter, in UUID form."""
        return f"{self.id_prefix}{next(self.id_counter) & 0xFFFFFFFFFFFF:012x}"

    async def run_local(self, action_name: Any, endpoint: Action, context: Context) -> Any:
        """Run ``endpoint`` (a local one) on ``context`` as MoleculerPy's local call does: its
        params checked as it declares, its error logged and raised."""
        broker = cast(Any, self.broker)
        handler = endpoint.wrapped_handler or endpoint.handler
        try:
            if endpoint._compiled_checker is not None:
                endpoint._compiled_checker(context.params or {})
            elif endpoint.params_schema and broker._validator is not None:
                broker._validator.validate(context.params or {}, endpoint.params_schema)
            if handler is None:
                raise Exception(f"Handler for action {action_name} is None")
            return await handler(context)
        except Exception as e:
            self.logger.error(f"Error in local action {action_name}: {e}")
            raise

    # ------------------------------------------------------------------ emit / broadcast

    def _local_endpoints(self, event: str) -> Iterator[tuple[str, Event]]:
        for endpoint in self.broker.registry.get_all_events(event):
            if endpoint.is_local and endpoint.handler is not None:
                yield _local_group(endpoint), endpoint

    def _remote_endpoints(self, event: str) -> Iterator[tuple[str, str]]:
        """(group, node id) of every remote service listening to ``event``, from INFO packets."""
        local_id = self.broker.nodeID
        for node in list(self.broker.node_catalog.nodes.values()):
            if node.id == local_id or not node.available:
                continue
            for service in node.services:
                if not isinstance(service, dict):
                    continue
                events = service.get("events") or {}
                for key, definition in events.items():
                    spec = definition if isinstance(definition, dict) else {}
                    if _event_matches(str(spec.get("name") or key), event):
                        group = spec.get("group") or service.get("name") or key
                        yield str(group), str(node.id)

    def _next(self, event: str, group: str, count: int) -> int:
        turn = self.turns.get((event, group), 0)
        self.turns[(event, group)] = turn + 1
        return turn % count

    async def emit(
        self,
        event: str,
        params: Any,
        meta: dict[str, Any],
        groups: list[str] | None = None,
    ) -> None:
        local: dict[str, list[Event]] = {}
        for group, endpoint in self._local_endpoints(event):
            local.setdefault(group, []).append(endpoint)
        remote: dict[str, list[str]] = {}
        for group, node_id in self._remote_endpoints(event):
            nodes = remote.setdefault(group, [])
            if node_id not in nodes:
                nodes.append(node_id)

        chosen_local: list[tuple[str, Event]] = []
        chosen_remote: dict[str, list[str]] = {}
        prefer_local = self.broker.registry.prefer_local
        for group in dict.fromkeys([*local, *remote]):
            if groups is not None and group not in groups:
                continue
            here, there = local.get(group, []), remote.get(group, [])
            candidates: list[Event | str] = [*here] if prefer_local and here else [*here, *there]
            pick = candidates[self._next(event, group, len(candidates))]
            if isinstance(pick, str):
                chosen_remote.setdefault(pick, []).append(group)
            else:
                chosen_local.append((group, pick))

        if not chosen_local and not chosen_remote:
            self.logger.debug(f"No subscriber for event '{event}'; nothing emitted")
            return
        sends = [
            self._send_event(node_id, event, params, meta, node_groups, is_broadcast=False)
            for node_id, node_groups in chosen_remote.items()
        ]
        runs = [
            self._run_local(endpoint, group, self._context(event, params, meta))
            for group, endpoint in chosen_local
        ]
        await self._gather(sends, runs)

    async def broadcast(
        self,
        event: str,
        params: Any,
        meta: dict[str, Any],
        groups: list[str] | None = None,
    ) -> list[Any]:
        runs = [
            self._run_local(endpoint, group, self._context(event, params, meta))
            for group, endpoint in self._local_endpoints(event)
            if groups is None or group in groups
        ]
        nodes = dict.fromkeys(
            node_id
            for group, node_id in self._remote_endpoints(event)
            if groups is None or group in groups
        )
        sends = [
            self._send_event(node_id, event, params, meta, groups, is_broadcast=True)
            for node_id in nodes
        ]
        if not runs and not sends:
            self.logger.debug(f"No subscriber for event '{event}'; nothing broadcast")
            return []
        results = await self._gather(sends, runs)
        return [value for ok, value in results if ok]

    async def _gather(
        self, sends: Sequence[Awaitable[None]], runs: Sequence[Awaitable[tuple[bool, Any]]]
    ) -> list[tuple[bool, Any]]:
        """Run remote sends and local handlers together; a failed send is raised after all ran."""
        outcomes = await asyncio.gather(*sends, *runs, return_exceptions=True)
        results: list[tuple[bool, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                results.append(outcome)
        return results

    def _context(self, event: str, params: Any, meta: dict[str, Any]) -> Context:
        # One context per handler: a handler that changes ctx.meta must not affect another.
        return self.broker.lifecycle.create_context(event=event, params=params, meta=dict(meta))

    async def _run_local(self, endpoint: Event, group: str, ctx: Context) -> tuple[bool, Any]:
        handler = endpoint.wrapped_handler or endpoint.handler
        if handler is None:
            return False, None
        try:
            return True, await handler(ctx)
        except Exception as error:
            self.logger.error(
                f"Handler of event '{ctx.event}' in service group '{group}' failed: {error!r}"
            )
            return False, None

    async def _send_event(
        self,
        node_id: str,
        event: str,
        params: Any,
        meta: dict[str, Any],
        groups: list[str] | None,
        *,
        is_broadcast: bool,
    ) -> None:
        ctx = self._context(event, params, meta)
        # The EVENT wire payload of Transit.send_event (Moleculer.js transit.sendEvent),
        # always targeted: send_event would turn a grouped event into a NATS queue-group
        # publish under disable_balancer, which subscribers that came late never joined.
        payload: dict[str, Any] = {
            "id": ctx.id,
            "event": event,
            "data": ctx.params,
            "groups": list(groups) if groups else None,
            "broadcast": is_broadcast,
            "meta": ctx.meta,
            "level": ctx.level,
            "tracing": ctx.tracing,
            "parentID": ctx.parent_id,
            "requestID": ctx.request_id,
            "caller": ctx.caller,
            "needAck": ctx.need_ack,
        }
        await self.transit.prepublish(Packet(Topic.EVENT, node_id, payload))

    async def on_event_packet(self, packet: Packet) -> None:
        payload = packet.payload
        event = payload.get("event")
        if not event:
            self.logger.warning("Received an EVENT packet without an event name")
            return
        wanted = payload.get("groups") or None
        is_broadcast = bool(payload.get("broadcast"))
        # Handled in arrival order, one packet at a time (the memory transporter delivers
        # each packet in its own task; NATS already runs them one by one).
        async with self.event_lock:
            by_group: dict[str, list[Event]] = {}
            for group, endpoint in self._local_endpoints(str(event)):
                if wanted is None or group in wanted:
                    by_group.setdefault(group, []).append(endpoint)
            runs = []
            for group, endpoints in by_group.items():
                picked = (
                    endpoints
                    if is_broadcast
                    else [endpoints[self._next(str(event), group, len(endpoints))]]
                )
                for endpoint in picked:
                    ctx = self.broker.lifecycle.rebuild_event_context(payload)
                    runs.append(self._run_local(endpoint, group, ctx))
            if not runs:
                return
            outcomes = await asyncio.gather(*runs)
        if payload.get("needAck") and packet.sender:
            await self.transit._send_event_ack(
                target=packet.sender,
                ack_id=payload.get("ackID") or payload.get("id") or "",
                success=all(ok for ok, _ in outcomes),
                error=None if all(ok for ok, _ in outcomes) else "event handler failed",
            )

    # ------------------------------------------------------------------ requests

    async def on_request_packet(self, packet: Packet) -> None:
        task = asyncio.create_task(self._serve_request(packet))
        self.requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.logger.error(f"Serving a request failed: {error!r}")

    async def _run_many_call(
        self, action_name: str, params: dict[str, Any], meta: dict[str, Any], context_id: str
    ) -> Any:
        """One call of ``$cqrs.callMany``, served as an incoming request of its own would be
        (no balancing, and a context id made from the request's, not a new uuid), with a root
        context (:func:`root_context`)."""
        endpoint = self._local_action(action_name)
        if endpoint is None:
            raise ServiceNotFoundError(action_name, node_id=self.broker.nodeID)
        ctx = root_context(self.broker, context_id, action_name, params, meta)
        try:
            return await self._run_request(action_name, ctx, endpoint)
        except Exception as error:
            self._log_failure(action_name, error)
            raise

    def _local_action(self, name: str) -> Action | None:
        for endpoint in self.broker.registry.get_all_actions(name):
            if endpoint.is_local:
                return endpoint
        return None

    async def _serve_request(self, packet: Packet) -> None:
        # Transit._handle_request, except that it looks for the local endpoint.
        action_name = packet.payload.get("action")
        if not action_name:
            self.logger.warning("Received a REQUEST packet without an action name")
            return
        ctx = self.broker.lifecycle.rebuild_context(packet.payload)
        endpoint = self._local_action(str(action_name))
        response: dict[str, Any]
        try:
            result = await self._run_request(str(action_name), ctx, endpoint)
            response = {"id": ctx.id, "data": result, "success": True, "meta": ctx.meta}
        except Exception as error:
            self._log_failure(str(action_name), error)
            response = {
                "id": ctx.id,
                "error": _error_payload(error),
                "success": False,
                "meta": ctx.meta,
            }
        try:
            await self.transit.publish(Packet(Topic.RESPONSE, packet.sender, response))
        except Exception as error:
            if response["success"]:
                await self._answer_unsendable(str(action_name), packet, response, error)
            elif _too_large(error):  # an error that quotes too much of a huge request
                slim = {**response["error"], "data": {}, "stack": None}
                slim["message"] = str(slim.get("message"))[: errors.MAX_MESSAGE]
                await self.transit.publish(
                    Packet(Topic.RESPONSE, packet.sender, {**response, "error": slim})
                )
            else:
                raise

    async def _run_request(self, action_name: str, ctx: Context, endpoint: Action | None) -> Any:
        if action_name == remote.CALL_MANY:  # the toolkit's own: no service registers it
            return await remote.serve_many(
                self.broker, ctx, self._run_many_call, _error_payload, self.sessions
            )
        handler = None if endpoint is None else endpoint.wrapped_handler or endpoint.handler
        if endpoint is None or handler is None:
            raise ServiceNotFoundError(action_name, node_id=self.broker.nodeID)
        if endpoint._compiled_checker is not None:
            endpoint._compiled_checker(ctx.params or {})
        elif endpoint.params_schema:
            validate_params(ctx.params or {}, endpoint.params_schema)
        return await handler(ctx)

    async def _answer_unsendable(
        self, action_name: str, packet: Packet, response: dict[str, Any], error: Exception
    ) -> None:
        """The answer could not be published: send an error answer in its place, so the
        caller learns it at once instead of at its timeout."""
        replacement: MoleculerError
        if _too_large(error):
            try:
                size: int | None = len(json.dumps(response["data"], default=str).encode())
            except Exception:
                size = None
            replacement = errors.ResponseTooLargeError(action_name, size, self._max_payload())
        else:
            replacement = MoleculerError(
                f"the answer of {action_name} could not be sent: {error!r}",
                code=500,
                error_type="RESPONSE_NOT_SENT",
                data={"action": action_name},
            )
        self._log_failure(action_name, replacement)
        answer = {**response, "success": False, "error": replacement.to_dict()}
        answer.pop("data", None)
        await self.transit.publish(Packet(Topic.RESPONSE, packet.sender, answer))

    def _log_failure(self, action_name: str, error: Exception) -> None:
        line = f"Failed call to {action_name}: {error!r}"
        if is_client_error(error):
            self.logger.debug(line)
        else:
            self.logger.error(line)  # once: the logger turns repeats into DEBUG lines

    async def on_response_packet(self, packet: Packet) -> None:
        """An error answer fails the caller's pending request with the error it describes
        (MoleculerPy's request would log its stack at ERROR and raise RemoteCallError)."""
        payload = packet.payload
        if payload.get("stream") or payload.get("success", True):
            await self._original_on_response(packet)
            return
        pending = cast(Any, self.transit)._pending_requests
        future = pending.pop(payload.get("id"), None)
        if future is not None and not future.done():
            future.set_exception(remote_error(payload.get("error"), packet.sender))

    async def drain_requests(self, *, cancel: bool) -> None:
        """Let the requests being served finish (up to DRAIN_GRACE), then cancel the rest."""
        pending = set(self.requests)
        if pending and not cancel:
            _, pending = await asyncio.wait(pending, timeout=DRAIN_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def disconnect(self) -> None:
        await self.drain_requests(cancel=True)
        await self._original_disconnect()

    # ------------------------------------------------------------------ timeouts

    async def request(
        self,
        endpoint: Action,
        context: Context,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        return await remote.around_read(
            str(endpoint.name), context, lambda: self._request(endpoint, context, timeout)
        )

    async def _request(
        self,
        endpoint: Action,
        context: Context,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Any:
        limit = timeout if timeout is not None else (context.timeout or None)
        node_id = str(endpoint.node_id)
        waiting = self.pending.setdefault(node_id, {})
        waiting[context.id] = str(endpoint.name)
        try:
            return await self._original_request(endpoint, context, limit)
        except TimeoutError:
            # Only transit's own wait raises the builtin; remote errors arrive as MoleculerErrors.
            effective = limit or endpoint.timeout or self.transit.settings.request_timeout
            raise RequestTimeoutError(str(endpoint.name), effective) from None
        except Exception as error:
            if _too_large(error):
                raise self._params_too_large(str(endpoint.name)) from None
            raise
        finally:
            waiting.pop(context.id, None)
            if not waiting and self.pending.get(node_id) is waiting:
                del self.pending[node_id]

    def disconnect_node(self, node_id: str, unexpected: bool = True) -> None:
        """The catalog's ``disconnect_node``; first fails the requests waiting on that node."""
        pending = cast(Any, self.transit)._pending_requests
        for request_id, action_name in self.pending.pop(node_id, {}).items():
            future = pending.pop(request_id, None)
            if future is not None and not future.done():
                reason = f"node {node_id} left before answering"
                future.set_exception(RequestRejectedError(action_name, reason))
        self._original_disconnect_node(node_id, unexpected)

    async def request_without_endpoint(
        self,
        action_name: str,
        context: Context,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        return await remote.around_read(
            action_name,
            context,
            lambda: self._request_without_endpoint(action_name, context, timeout),
        )

    async def _request_without_endpoint(
        self,
        action_name: str,
        context: Context,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Any:
        limit = timeout if timeout is not None else (context.timeout or None)
        try:
            return await self._original_request_without_endpoint(action_name, context, limit)
        except TimeoutError:
            effective = limit or self.transit.settings.request_timeout
            raise RequestTimeoutError(action_name, effective) from None
        except Exception as error:
            if _too_large(error):
                raise self._params_too_large(action_name) from None
            raise

    def _params_too_large(self, action_name: str) -> errors.InvalidInput:
        limit = self._max_payload()
        most = f" (at most {limit} bytes)" if limit is not None else ""
        return errors.InvalidInput(
            f"the params of {action_name} are too large for the transporter{most}: "
            "send less in one call, e.g. insert entities a few at a time",
            field="params",
        )

    def _max_payload(self) -> int | None:
        nc = getattr(getattr(self.transit, "transporter", None), "nc", None)
        limit = getattr(nc, "max_payload", None)
        return limit if isinstance(limit, int) else None

    # ------------------------------------------------------------------ late services

    @property
    def running(self) -> bool:
        return self.transit.is_connected and not self.stopping

    async def start_service(self, service: Service) -> None:
        if id(service) in self.started:
            return
        self.started[id(service)] = service
        await self._original_start_service(service)

    async def start_late_service(self, service: Service) -> None:
        if self.running and not service.name.startswith("$"):
            await self.start_service(service)
