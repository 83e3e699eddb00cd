"""Regression tests for the MoleculerPy 0.14.22 workarounds in ``moleculerpy_cqrs.broker.compat``.

Each ``test_*`` that checks a workaround runs with ``install`` applied and fails without it.
The ``test_defect_still_present_*`` tests run plain MoleculerPy and show that the defect is
still there: when one of them fails, MoleculerPy fixed it and the workaround can go.

Cross-node tests run two or three brokers in this process on a private NATS server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from moleculerpy import ServiceBroker, Settings
from moleculerpy.context import Context
from moleculerpy.decorators import action, event
from moleculerpy.errors import (
    MoleculerError,
    RemoteCallError,
    RequestRejectedError,
    RequestTimeoutError,
    ServiceNotFoundError,
    ValidationError,
)
from moleculerpy.registry import Action
from moleculerpy.service import Service

from moleculerpy_cqrs import (
    Aggregate,
    ConflictError,
    EntityNotFoundError,
    EventStore,
    InvalidInput,
    ReadOnlyAggregateError,
    ResponseTooLargeError,
    StoreError,
    stores,
)
from moleculerpy_cqrs.broker import compat
from moleculerpy_cqrs.testing.nats_server import NatsServer

EVENT = "thing.happened"
FLUSH = "test.flush"


def broker_of(service: Service) -> ServiceBroker:
    assert service.broker is not None
    broker: ServiceBroker = service.broker
    return broker


# --------------------------------------------------------------------------- helpers


class Hits:
    """What handlers saw; ``until`` wakes on every new entry (no polling, no sleeps)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, who: str, node: str, value: Any = None) -> None:
        self.items.append((who, node, value))
        self._changed.set()

    def count(self, who: str, node: str | None = None) -> int:
        return sum(1 for w, n, _ in self.items if w == who and node in (None, n))

    async def until(self, ready: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not ready():
                self._changed.clear()
                await self._changed.wait()


def listener(service_name: str, hits: Hits, *, fail: bool = False) -> Service:
    """A service handling EVENT (recorded as its name) and FLUSH (recorded as name + '!')."""

    class Listener(Service):
        name = service_name

        @event(name=EVENT)
        async def on_thing(self, ctx: Context) -> None:
            hits.add(service_name, broker_of(self).nodeID, ctx.params)
            if fail:
                raise RuntimeError("handler failed on purpose")

        @event(name=FLUSH)
        async def on_flush(self, ctx: Context) -> None:
            hits.add(f"{service_name}!", broker_of(self).nodeID)

    return Listener()


class Slow(Service):
    """``nap`` sleeps (stands for work); ``hold`` waits until the test releases it."""

    name = "slow"

    def __init__(self, release: asyncio.Event | None = None) -> None:
        super().__init__()
        self.release = release or asyncio.Event()
        self.entered = asyncio.Event()  # a hold is being served

    @action()
    async def nap(self, ctx: Context) -> str:
        await asyncio.sleep(float(ctx.params["seconds"]))
        return "rested"

    @action()
    async def hold(self, ctx: Context) -> str:
        self.entered.set()
        await self.release.wait()
        return "released"


class Who(Service):
    name = "who"

    @action()
    async def am_i(self, ctx: Context) -> str:
        return str(broker_of(self).nodeID)


async def wait_for_nodes(
    broker: ServiceBroker, expected: dict[str, set[str]], within: float = 5.0
) -> None:
    """Until ``broker`` knows each node in ``expected`` with (at least) those services."""

    def ready() -> bool:
        for node_id, names in expected.items():
            node = broker.node_catalog.get_node(node_id)
            if node is None or not node.available:
                return False
            if not names <= {str(s.get("name")) for s in node.services if isinstance(s, dict)}:
                return False
        return True

    changed = asyncio.Event()

    def on_change(_payload: Any) -> None:
        changed.set()

    broker.local_bus.on("$node.*", on_change)
    try:
        async with asyncio.timeout(within):
            while not ready():
                changed.clear()
                await changed.wait()
    finally:
        broker.local_bus.off("$node.*", on_change)


class Cluster:
    """Brokers of one test on one transporter; all of them are stopped at teardown."""

    def __init__(self, transporter: str) -> None:
        self.transporter = transporter
        self.brokers: list[ServiceBroker] = []

    async def node(
        self,
        label: str,
        *services: Service,
        fixed: bool = True,
        request_timeout: float = 5.0,
        logger: Any = None,
    ) -> ServiceBroker:
        """A started broker with ``services``; ``fixed`` applies ``compat.install`` first."""
        settings = Settings(
            transporter=self.transporter,
            request_timeout=request_timeout,
            log_level="DEBUG" if logger is not None else "WARNING",
            logger=logger,
        )
        broker = ServiceBroker(f"{label}-{uuid.uuid4().hex[:8]}", settings=settings)
        self.brokers.append(broker)
        if fixed:
            compat.install(broker)
        for service in services:
            await broker.register(service)
        await broker.start()
        return broker

    async def stop(self) -> None:
        for broker in reversed(self.brokers):
            await broker.stop()


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:
        yield server.url


async def _cluster(transporter: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(transporter)
    try:
        yield cluster
    finally:
        await cluster.stop()
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if leaked:
        await asyncio.wait(leaked, timeout=1.0)  # let closing connections finish their tasks
    still = [t for t in leaked if not t.done()]
    assert not still, f"tasks left running after the brokers stopped: {still}"


@pytest.fixture
async def memory() -> AsyncIterator[Cluster]:
    async for cluster in _cluster("memory://"):
        yield cluster


@pytest.fixture
async def nats(nats_url: str) -> AsyncIterator[Cluster]:
    async for cluster in _cluster(nats_url):
        yield cluster


@pytest.fixture(params=["memory", "nats"])
async def any_cluster(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[Cluster]:
    transporter = "memory://" if request.param == "memory" else nats_url
    async for cluster in _cluster(transporter):
        yield cluster


# --------------------------------------------------------------------------- emit


async def test_emit_reaches_every_subscribing_service_once(memory: Cluster) -> None:
    hits = Hits()
    broker = await memory.node("n", listener("alpha", hits), listener("beta", hits))
    await broker.emit(EVENT, {"n": 1})
    assert sorted(who for who, _, _ in hits.items) == ["alpha", "beta"]


async def test_emit_without_subscribers_is_a_noop(memory: Cluster) -> None:
    broker = await memory.node("n")
    assert await broker.emit("nobody.listens", {}) is None
    assert await broker.broadcast("nobody.listens", {}) == []


async def test_emit_and_broadcast_keep_handler_errors_from_the_sender(memory: Cluster) -> None:
    hits = Hits()
    broker = await memory.node("n", listener("bad", hits, fail=True), listener("good", hits))
    await broker.emit(EVENT, {"n": 1})
    await broker.broadcast(EVENT, {"n": 2})
    assert sorted((who, value["n"]) for who, _, value in hits.items) == [
        ("bad", 1),
        ("bad", 2),
        ("good", 1),
        ("good", 2),
    ]


async def test_emit_helper_limits_delivery_to_given_groups(memory: Cluster) -> None:
    hits = Hits()
    broker = await memory.node("n", listener("alpha", hits), listener("beta", hits))
    await compat.emit(broker, EVENT, {"n": 1}, groups=["beta"])
    await compat.broadcast(broker, EVENT, {"n": 2}, groups=["alpha"])
    assert sorted((who, value["n"]) for who, _, value in hits.items) == [("alpha", 2), ("beta", 1)]


async def test_emit_reaches_remote_wildcard_subscribers(memory: Cluster) -> None:
    hits = Hits()

    class Wild(Service):
        name = "wild"

        @event(name="thing.*")
        async def on_any_thing(self, ctx: Context) -> None:
            hits.add("wild", broker_of(self).nodeID, ctx.params)

    remote = await memory.node("remote", Wild())
    sender = await memory.node("sender")
    await wait_for_nodes(sender, {remote.nodeID: {"wild"}})
    await sender.emit(EVENT, {"n": 1})
    await sender.emit("thing.deeper.nested", {"n": 2})  # "*" is one segment: no match
    await sender.emit("thing.other", {"n": 3})
    await hits.until(lambda: len(hits.items) >= 2)
    assert [value["n"] for _, _, value in hits.items] == [1, 3]


async def test_emit_across_nodes_once_per_service_balanced(nats: Cluster) -> None:
    hits = Hits()
    one = await nats.node("one", listener("alpha", hits))
    two = await nats.node("two", listener("alpha", hits), listener("beta", hits))
    sender = await nats.node("sender")
    await wait_for_nodes(sender, {one.nodeID: {"alpha"}, two.nodeID: {"alpha", "beta"}})

    for n in range(4):
        await sender.emit(EVENT, {"n": n})
    await sender.broadcast(FLUSH, {})  # arrives after the emits on each node: counts are final
    await hits.until(lambda: hits.count("alpha!") == 2 and hits.count("beta!") == 1)

    assert hits.count("alpha") == 4  # once per emit in total ...
    assert hits.count("alpha", one.nodeID) == 2  # ... balanced over the two instances
    assert hits.count("beta", two.nodeID) == 4


async def test_emit_prefers_the_local_instance_and_still_reaches_remote_services(
    nats: Cluster,
) -> None:
    hits = Hits()
    remote = await nats.node("remote", listener("alpha", hits), listener("beta", hits))
    here = await nats.node("here", listener("alpha", hits))
    await wait_for_nodes(here, {remote.nodeID: {"alpha", "beta"}})

    for n in range(3):
        await here.emit(EVENT, {"n": n})
    await here.broadcast(FLUSH, {})
    await hits.until(lambda: hits.count("beta!") == 1)

    assert hits.count("alpha", here.nodeID) == 3
    assert hits.count("alpha", remote.nodeID) == 0
    assert hits.count("beta", remote.nodeID) == 3


async def test_broadcast_across_nodes_reaches_every_handler_once(nats: Cluster) -> None:
    hits = Hits()
    one = await nats.node("one", listener("alpha", hits))
    two = await nats.node("two", listener("alpha", hits), listener("beta", hits))
    sender = await nats.node("sender")
    await wait_for_nodes(sender, {one.nodeID: {"alpha"}, two.nodeID: {"alpha", "beta"}})

    await sender.broadcast(EVENT, {"n": 0})
    await sender.broadcast(FLUSH, {})
    await hits.until(lambda: hits.count("alpha!") == 2 and hits.count("beta!") == 1)

    assert sorted((who, node) for who, node, _ in hits.items if not who.endswith("!")) == sorted(
        [("alpha", one.nodeID), ("alpha", two.nodeID), ("beta", two.nodeID)]
    )


async def test_events_from_one_sender_are_handled_in_order(any_cluster: Cluster) -> None:
    cluster = any_cluster
    seen: list[int] = []
    done = asyncio.Event()

    class Ordered(Service):
        name = "ordered"

        @event(name=EVENT)
        async def on_thing(self, ctx: Context) -> None:
            n = int(ctx.params["n"])
            for _ in range(5 if n % 2 == 0 else 0):  # a slower handler must not be overtaken
                await asyncio.sleep(0)
            seen.append(n)
            if len(seen) == 30:
                done.set()

    receiver = await cluster.node("receiver", Ordered())
    sender = await cluster.node("sender")
    await wait_for_nodes(sender, {receiver.nodeID: {"ordered"}})
    for n in range(30):
        await sender.emit(EVENT, {"n": n})
    await asyncio.wait_for(done.wait(), 5)
    assert seen == list(range(30))


# --------------------------------------------------------------------------- late services


class Late(Service):
    name = "late"

    def __init__(self, *, install_in_created: bool = False) -> None:
        super().__init__()
        self.install_in_created = install_in_created
        self.started_count = 0

    async def created(self) -> None:
        if self.install_in_created:  # as the toolkit's services do
            compat.install(broker_of(self))

    async def started(self) -> None:
        self.started_count += 1

    @action()
    async def ping(self, ctx: Context) -> str:
        return "pong"


async def test_service_registered_after_start_is_started_and_announced(memory: Cluster) -> None:
    host = await memory.node("host")
    other = await memory.node("other")
    late = Late()
    await host.register(late)
    assert late.started_count == 1
    await wait_for_nodes(other, {host.nodeID: {"late"}})
    assert await other.call("late.ping", {}) == "pong"


async def test_late_service_that_installs_in_created_is_started_once(memory: Cluster) -> None:
    broker = await memory.node("host", fixed=False)
    late = Late(install_in_created=True)
    await broker.register(late)
    assert compat.is_installed(broker)
    assert late.started_count == 1


async def test_install_after_start_is_idempotent_and_leaves_other_brokers_alone(
    memory: Cluster,
) -> None:
    fixed = await memory.node("fixed", fixed=False)
    plain = await memory.node("plain", fixed=False)
    compat.install(fixed)
    compat.install(fixed)
    hooks = [mw for mw in fixed.middlewares if type(mw).__name__ == "_BrokerHooks"]
    assert len(hooks) == 1
    assert await fixed.emit("nobody.listens", {}) is None
    assert not compat.is_installed(plain)
    with pytest.raises(Exception, match="not found"):  # MoleculerPy's own behaviour
        await plain.emit("nobody.listens", {})


# --------------------------------------------------------------------------- local calls


class Chain(Service):
    """``outer`` calls ``inner`` through its context; both keep the contexts they got."""

    name = "chain"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Context] = []

    @action()
    async def outer(self, ctx: Context) -> Any:
        self.seen.append(ctx)
        return await ctx.call("chain.inner", {"n": ctx.params["n"]}, meta={"inner": 1})

    @action(params={"n": "number"})
    async def inner(self, ctx: Context) -> Any:
        self.seen.append(ctx)
        if ctx.params["n"] < 0:
            raise ConflictError("negative on purpose")
        return {"n": ctx.params["n"], "meta": dict(ctx.meta)}


async def test_a_local_call_keeps_moleculerpys_context_and_skips_the_uuid(
    memory: Cluster,
) -> None:
    chain = Chain()
    broker = await memory.node("host", chain)
    answer = await broker.call("chain.outer", {"n": 3}, meta={"outer": True})
    assert answer == {"n": 3, "meta": {"outer": True, "inner": 1}}
    outer, inner = chain.seen
    assert (outer.level, inner.level) == (1, 2)
    assert str(outer.request_id) == str(outer.id) == str(inner.request_id) == str(inner.parent_id)
    assert inner.node_id == broker.nodeID
    assert outer.id != inner.id
    # The short path: ids from one per-broker prefix and a counter, not a uuid4 each.
    assert outer.id[:24] == inner.id[:24]
    assert uuid.UUID(inner.id).version == 4
    with pytest.raises(ValidationError):  # the action's params schema still applies
        await broker.call("chain.inner", {"n": "three"})
    with pytest.raises(ConflictError):  # and a handler's error arrives as raised
        await broker.call("chain.outer", {"n": -1})


@pytest.mark.parametrize("empty", [False, True])
async def test_a_local_calls_context_is_the_one_moleculerpys_constructor_makes(
    memory: Cluster, empty: bool
) -> None:
    broker = await memory.node("host")
    params, meta = ({}, {}) if empty else ({"n": 1}, {"m": 2})
    args = dict(
        context_id="ctx-1", action="a.b", params=params, meta=meta, level=2,
        request_id="req-1", parent_id="parent-1", timeout=3.0, caller="svc", tracing=True,
    )  # fmt: skip
    fast = compat.local_context(broker, **args)  # type: ignore[arg-type]
    made = Context(
        id="ctx-1", action="a.b", params=params, meta=meta, broker=broker, level=2,
        request_id="req-1", parent_id="parent-1", timeout=3.0, node_id=broker.nodeID,
        caller="svc", tracing=True,
    )  # fmt: skip
    assert type(fast) is Context
    for name in Context.__slots__:
        got, want = getattr(fast, name), getattr(made, name)
        if name == "_broker":
            assert got() is want() is broker
        else:
            assert got == want, name
            assert type(got) is type(want), name
    # An empty dict is replaced by a new one, as the constructor does: the callee's changes
    # to its meta never reach the caller's dict.
    assert (fast.meta is meta) is (made.meta is meta) is (not empty)
    assert fast.broker is broker
    fast.parent_span = "span"  # beyond the slots: kept aside, as on any Context
    assert fast.parent_span == "span"


async def test_a_batch_caller_calls_the_local_handler_as_broker_call_would(
    memory: Cluster,
) -> None:
    chain = Chain()
    broker = await memory.node("host", chain)
    caller = compat.batch_caller(broker, "chain.inner")
    assert caller is not None
    assert await caller({"n": 3}, {"m": 1}) == {"n": 3, "meta": {"m": 1}}
    assert await caller({"n": 4}, {}) == {"n": 4, "meta": {}}
    first, second = chain.seen
    assert (first.level, second.level) == (1, 1)  # root calls, each with a context of its own
    assert str(first.request_id) == str(first.id) != str(second.id)
    assert first.node_id == broker.nodeID
    assert first.parent_id is None
    await broker.call("chain.inner", {"n": 5})
    assert chain.seen[-1].id[:24] == first.id[:24]  # ids made as broker.call makes them
    with pytest.raises(ValidationError):  # the action's params schema still applies
        await caller({"n": "three"}, {})
    with pytest.raises(ConflictError):  # and a handler's error arrives as raised
        await caller({"n": -1}, {})
    assert compat.batch_caller(broker, "nobody.here") is None  # served here by nobody
    broker.settings.max_call_level = 1  # even a root call is refused: left to broker.call
    assert compat.batch_caller(broker, "chain.inner") is None


async def test_a_local_call_is_refused_past_the_max_call_level(memory: Cluster) -> None:
    class Loop(Service):
        name = "loop"

        @action()
        async def again(self, ctx: Context) -> Any:
            return await ctx.call("loop.again", {})

    broker = await memory.node("host", Loop())
    broker.settings.max_call_level = 5
    with pytest.raises(MoleculerError, match="level"):
        await broker.call("loop.again", {})


# --------------------------------------------------------------------------- NATS concurrency


async def test_remote_requests_are_served_concurrently(nats: Cluster) -> None:
    server = await nats.node("server", Slow())
    client = await nats.node("client")
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    started = time.monotonic()
    calls = [client.call("slow.nap", {"seconds": 0.5}) for _ in range(10)]
    assert await asyncio.wait_for(asyncio.gather(*calls), 10) == ["rested"] * 10
    assert time.monotonic() - started < 2.5  # one at a time: 5 s


class Ping(Service):
    name = "ping"

    @action()
    async def start(self, ctx: Context) -> str:
        return str(await ctx.call("pong.bounce", {}))

    @action()
    async def end(self, ctx: Context) -> str:
        return "end"


class Pong(Service):
    name = "pong"

    @action()
    async def bounce(self, ctx: Context) -> str:
        return str(await ctx.call("ping.end", {}))


async def test_call_chain_back_to_the_first_node_does_not_deadlock(nats: Cluster) -> None:
    x = await nats.node("x", Ping())
    y = await nats.node("y", Pong())
    await wait_for_nodes(y, {x.nodeID: {"ping"}})
    await wait_for_nodes(x, {y.nodeID: {"pong"}})
    # y asks x, x asks y, y asks x again while x is still serving the first request
    assert await asyncio.wait_for(y.call("ping.start", {}), 3) == "end"


async def test_request_is_served_by_the_local_endpoint(nats: Cluster) -> None:
    first = await nats.node("first", Who())
    second = await nats.node("second")
    await wait_for_nodes(second, {first.nodeID: {"who"}})
    await second.register(Who())  # now second knows first's endpoint before its own
    client = await nats.node("client")
    await wait_for_nodes(client, {first.nodeID: {"who"}, second.nodeID: {"who"}})
    answers = [await asyncio.wait_for(client.call("who.am_i", {}), 3) for _ in range(4)]
    assert set(answers) == {first.nodeID, second.nodeID}


async def test_request_for_a_missing_action_answers_not_found(nats: Cluster) -> None:
    server = await nats.node("server")
    client = await nats.node("client")
    await wait_for_nodes(client, {server.nodeID: set()})
    ghost = Action(name="ghost.walk", node_id=server.nodeID, is_local=False)
    ctx = client.lifecycle.create_context(action="ghost.walk", params={})
    with pytest.raises(ServiceNotFoundError):
        await asyncio.wait_for(client.transit.request(ghost, ctx), 3)


# --------------------------------------------------------------------------- timeouts


async def test_remote_call_honours_its_timeout(nats: Cluster) -> None:
    slow = Slow()
    server = await nats.node("server", slow)
    client = await nats.node("client")
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await asyncio.wait_for(client.call("slow.hold", {}, timeout=0.3), 4)
    assert time.monotonic() - started < 2.0  # the 5 s request_timeout did not apply
    slow.release.set()


async def test_default_remote_timeout_raises_request_timeout_error(nats: Cluster) -> None:
    slow = Slow()
    server = await nats.node("server", slow)
    client = await nats.node("client", request_timeout=0.3)
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    with pytest.raises(RequestTimeoutError):
        await asyncio.wait_for(client.call("slow.hold", {}), 4)
    slow.release.set()


async def test_a_request_to_a_node_that_leaves_fails_at_once(nats: Cluster) -> None:
    slow = Slow()
    server = await nats.node("server", slow)
    client = await nats.node("client", request_timeout=30)
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    call = asyncio.create_task(client.call("slow.hold", {}))
    await asyncio.wait_for(slow.entered.wait(), 4)  # the request is out, waiting
    client.node_catalog.disconnect_node(server.nodeID)  # as when its heartbeats stop
    with pytest.raises(RequestRejectedError, match="left before answering"):
        await asyncio.wait_for(call, 4)
    slow.release.set()


async def test_defect_still_present_a_request_to_a_node_that_left_waits(nats: Cluster) -> None:
    slow = Slow()
    server = await nats.node("server", slow, fixed=False)
    client = await nats.node("client", fixed=False, request_timeout=30)
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    call = asyncio.create_task(client.call("slow.hold", {}))
    await asyncio.wait_for(slow.entered.wait(), 4)
    client.node_catalog.disconnect_node(server.nodeID)
    done, _ = await asyncio.wait({call}, timeout=0.5)
    assert not done  # still waiting for an answer that will not come
    slow.release.set()
    assert await asyncio.wait_for(call, 4) == "released"


# --------------------------------------------------------------------------- errors across nodes

FAILURES: dict[str, MoleculerError] = {
    "invalid": InvalidInput("age must be an integer", field="age", got="ten"),
    "missing": EntityNotFoundError(7, store="things"),
    "conflict": ConflictError("a replay of things is already running", aggregate="things"),
    "readonly": ReadOnlyAggregateError("things", "create"),
    "toolarge": ResponseTooLargeError("things.find", 2_000_000, 1_048_576),
    "store": StoreError("the database is down", store="things"),
}


class Faulty(Service):
    """``fail {kind}`` raises a fresh copy of ``FAILURES[kind]``, as the toolkit raises them."""

    name = "faulty"

    @action()
    async def fail(self, ctx: Context) -> None:
        template = FAILURES[ctx.params["kind"]]
        raise compat.remote_error(template.to_dict(), None)


def _shape(error: BaseException) -> tuple[Any, ...]:
    assert isinstance(error, MoleculerError)
    return (type(error), error.code, error.type, error.data, error.message, error.retryable)


async def _caught(broker: ServiceBroker, kind: str) -> BaseException:
    with pytest.raises(MoleculerError) as caught:
        await asyncio.wait_for(broker.call("faulty.fail", {"kind": kind}), 4)
    return caught.value


@pytest.mark.parametrize("kind", sorted(FAILURES))
async def test_an_error_arrives_from_another_node_as_it_was_raised(
    nats: Cluster, kind: str
) -> None:
    server = await nats.node("server", Faulty())
    client = await nats.node("client")
    await wait_for_nodes(client, {server.nodeID: {"faulty"}})
    local, remote = await _caught(server, kind), await _caught(client, kind)
    assert _shape(local) == _shape(remote) == _shape(FAILURES[kind])
    assert getattr(remote, "nodeID", None) == server.nodeID
    assert "Traceback" in str(getattr(remote, "remote_stack", ""))


async def test_a_validation_error_is_both_ours_and_moleculerpys(nats: Cluster) -> None:
    server = await nats.node("server", Faulty())
    client = await nats.node("client")
    await wait_for_nodes(client, {server.nodeID: {"faulty"}})
    remote = await _caught(client, "invalid")
    assert isinstance(remote, InvalidInput)
    assert isinstance(remote, ValidationError)
    assert remote.to_dict()["name"] == "ValidationError"
    assert EntityNotFoundError(1).to_dict()["name"] == "EntityNotFoundError"  # moleculer-db's


async def test_defect_still_present_remote_404_arrives_as_remote_call_error(nats: Cluster) -> None:
    server = await nats.node("server", Faulty(), fixed=False)
    client = await nats.node("client", fixed=False)
    await wait_for_nodes(client, {server.nodeID: {"faulty"}})
    remote = await _caught(client, "missing")
    assert type(remote) is RemoteCallError
    assert "stack" in remote.data  # the server's stack, in place of the error's own data


# --------------------------------------------------------------------------- answers too large


def _big_aggregate() -> Service:
    events = EventStore("bigEventStore", stores.memory())
    big = Aggregate(
        "bigAggregate", stores.memory(fields={"text": "string"}), write_actions=True
    ).snapshot("bigEventStore")

    class Big(events.mixin(), big.mixin(), Service):  # type: ignore[misc]
        name = "big"

    return Big()


async def test_an_answer_too_large_for_nats_fails_at_once_and_says_how_to_page(
    nats: Cluster,
) -> None:
    server = await nats.node("server", _big_aggregate())
    client = await nats.node("client", request_timeout=30.0)
    await wait_for_nodes(client, {server.nodeID: {"bigAggregate"}})
    for _ in range(4):
        await client.call("bigAggregate.create", {"text": "x" * 400_000})
    with pytest.raises(ResponseTooLargeError) as caught:  # at once: far below the 30 s timeout
        await asyncio.wait_for(client.call("bigAggregate.find", {}), 5)
    error = caught.value
    assert error.code == 413
    assert error.data["action"] == "bigAggregate.find"
    assert error.data["size"] > error.data["limit"] == 1_048_576
    assert "limit and offset" in error.message
    assert "page and pageSize" in error.message
    # params too large to send are the caller's error too, also at once
    entities = [{"text": "y" * 400_000} for _ in range(3)]
    with pytest.raises(InvalidInput, match=r"params of bigAggregate\.insert are too large"):
        await asyncio.wait_for(client.call("bigAggregate.insert", {"entities": entities}), 5)
    # and the node goes on serving: a page of it fits
    page = await client.call("bigAggregate.list", {"page": 2, "pageSize": 2, "fields": ["id"]})
    assert [r["id"] for r in page["rows"]] == [3, 4]


async def test_an_error_too_large_to_send_is_answered_shortened(nats: Cluster) -> None:
    class Loud(Service):
        name = "loud"

        @action()
        async def fail(self, ctx: Context) -> None:
            raise MoleculerError("x" * 2_000_000, code=500, data={"blob": "y" * 2_000_000})

    server = await nats.node("server", Loud(), _big_aggregate())
    client = await nats.node("client", request_timeout=30.0)
    await wait_for_nodes(client, {server.nodeID: {"loud", "bigAggregate"}})
    with pytest.raises(MoleculerError) as caught:
        await asyncio.wait_for(client.call("loud.fail", {}), 5)
    assert caught.value.code == 500
    assert caught.value.message == "x" * 1000
    # a 422 that quotes a huge unknown parameter stays a short 422
    with pytest.raises(InvalidInput, match="unknown parameter") as refused:
        await asyncio.wait_for(client.call("bigAggregate.find", {"k" * 600_000: 1}), 5)
    assert len(refused.value.message) < 1100


async def test_defect_still_present_answer_too_large_is_never_answered(nats: Cluster) -> None:
    class Huge(Service):
        name = "huge"

        @action()
        async def blob(self, ctx: Context) -> str:
            return "x" * 2_000_000

    server = await nats.node("server", Huge(), fixed=False)
    client = await nats.node("client", fixed=False, request_timeout=1.0)
    await wait_for_nodes(client, {server.nodeID: {"huge"}})
    with pytest.raises(TimeoutError):  # the caller hears nothing until its timeout
        await asyncio.wait_for(client.call("huge.blob", {}), 5)


# --------------------------------------------------------------------------- logs


class ToStdlib:
    """A MoleculerPy custom logger that writes to Python's logging (where caplog sees it)."""

    def __init__(self, name: str) -> None:
        self.log = logging.getLogger(f"moleculerpy.test.{name}")

    def debug(self, message: str, **_: Any) -> None:
        self.log.debug(message)

    def info(self, message: str, **_: Any) -> None:
        self.log.info(message)

    def warning(self, message: str, **_: Any) -> None:
        self.log.warning(message)

    def error(self, message: str, **_: Any) -> None:
        self.log.error(message)


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_client_errors_are_not_logged_as_errors_and_failures_once(
    nats: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="moleculerpy.test")
    server = await nats.node("server", Faulty(), logger=ToStdlib("server"))
    client = await nats.node("client", logger=ToStdlib("client"))
    await wait_for_nodes(client, {server.nodeID: {"faulty"}})
    caplog.clear()
    for kind in sorted(FAILURES):
        if kind != "store":
            for broker in (server, client, server, client):
                await _caught(broker, kind)
    assert _errors(caplog) == []
    assert any("age must be an integer" in r.getMessage() for r in caplog.records)  # at DEBUG

    for _ in range(3):  # as a retrying caller does
        await _caught(client, "store")
        await _caught(server, "store")
    failures = [r.getMessage() for r in _errors(caplog)]
    assert len(failures) == 2, failures  # once served to another node, once called locally
    assert all("the database is down" in line for line in failures)
    assert all(r.name.endswith("server") for r in _errors(caplog))  # the caller logs nothing
    assert not any("Traceback" in line for line in failures)


async def test_defect_still_present_client_errors_logged_at_error_with_a_stack(
    nats: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="moleculerpy.test")
    server = await nats.node("server", Faulty(), fixed=False, logger=ToStdlib("server"))
    client = await nats.node("client", fixed=False, logger=ToStdlib("client"))
    await wait_for_nodes(client, {server.nodeID: {"faulty"}})
    caplog.clear()
    await _caught(client, "invalid")
    await _caught(server, "invalid")
    lines = [(r.name.rsplit(".", 1)[1], r.getMessage()) for r in _errors(caplog)]
    assert any(who == "client" and "Traceback" in line for who, line in lines)
    assert any(who == "server" and "age must be an integer" in line for who, line in lines)


# --------------------------------------------------------------------------- defects still present


async def test_defect_still_present_emit(memory: Cluster) -> None:
    hits = Hits()
    broker = await memory.node(
        "plain", listener("alpha", hits, fail=True), listener("beta", hits), fixed=False
    )
    with pytest.raises(RuntimeError, match="on purpose"):  # alpha's error reaches the emitter
        await broker.emit(EVENT, {})
    assert hits.count("alpha") == 1
    assert hits.count("beta") == 0  # only the first handler in the cluster
    with pytest.raises(Exception, match="not found"):  # nobody listens: an error
        await broker.emit("nobody.listens", {})


async def test_defect_still_present_late_service_never_started(memory: Cluster) -> None:
    broker = await memory.node("plain", fixed=False)
    late = Late()
    await broker.register(late)
    assert late.started_count == 0


async def test_defect_still_present_nats_requests_served_one_at_a_time(nats: Cluster) -> None:
    server = await nats.node("server", Slow(), fixed=False)
    client = await nats.node("client", fixed=False)
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    started = time.monotonic()
    await asyncio.gather(*(client.call("slow.nap", {"seconds": 0.3}) for _ in range(4)))
    assert time.monotonic() - started >= 1.1


async def test_defect_still_present_call_chain_deadlocks_with_builtin_timeout(
    nats: Cluster,
) -> None:
    x = await nats.node("x", Ping(), fixed=False, request_timeout=1.0)
    y = await nats.node("y", Pong(), fixed=False, request_timeout=1.0)
    await wait_for_nodes(y, {x.nodeID: {"ping"}})
    await wait_for_nodes(x, {y.nodeID: {"pong"}})
    with pytest.raises(TimeoutError, match="timed out after"):  # builtin, not RequestTimeoutError
        await asyncio.wait_for(y.call("ping.start", {}), 5)


async def test_defect_still_present_remote_timeout_ignored(nats: Cluster) -> None:
    server = await nats.node("server", Slow(), fixed=False)
    client = await nats.node("client", fixed=False)
    await wait_for_nodes(client, {server.nodeID: {"slow"}})
    call = client.call("slow.nap", {"seconds": 0.6}, timeout=0.1)
    assert await asyncio.wait_for(call, 4) == "rested"
