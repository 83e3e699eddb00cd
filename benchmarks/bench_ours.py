"""This project's side of ``benchmarks/run``: one async function per scenario.

Only the public API is used (``EventStore``, ``Aggregate``, ``stores.*``, broker calls,
``<aggregate>.runtime(broker).wait_caught_up()``, the ``status`` actions), so the harness keeps
working while the projection engine and the write path change underneath. Every function takes
a store factory (a fresh database) and sizes, and answers a dict of figures.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from moleculerpy import Context, Service, ServiceBroker, action, event

from benchmarks._common import CallStats, percentile
from moleculerpy_cqrs import Aggregate, EventStore, NoSnapshot, stores
from moleculerpy_cqrs.core.dispatcher import CURSOR_KEY
from moleculerpy_cqrs.core.records import (
    EVENT_FIELDS,
    EVENT_VERSION,
    IDEMPOTENCY_KEY,
    EventType,
    Status,
    now_ms,
)
from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.testing.brokers import running_broker

REQUEST_TIMEOUT: Final = 3600.0  # a replay {wait: true} is one broker call
EVENT_STORE: Final = "profileEventStore"
COUNTRIES: Final = tuple(f"C{n:02d}" for n in range(20))
PROFILE_FIELDS: Final = {"name": "string", "country": "string", "age": "integer"}
SUMMARY_FIELDS: Final = {"country": "string", "total": "integer"}
WARM_UP: Final = 200
FEED_CALLERS: Final = 64
POLL: Final = 0.005  # seconds between the ack -> visible watcher's finds (its resolution)

Shape = Literal["create", "summary"]
Figures = dict[str, Any]


def profile(i: int) -> dict[str, Any]:
    """The command ``profile.update`` takes, number ``i``."""
    return {"name": f"p{i:08d}", "country": COUNTRIES[i % len(COUNTRIES)], "age": i % 90}


# ---------------------------------------------------------------------- services


@dataclass
class BrokerRef:
    """Lets an async-callable transformation reach the broker it runs on (made later)."""

    broker: ServiceBroker | None = None

    async def call(self, name: str, params: dict[str, Any]) -> Any:
        assert self.broker is not None
        return await self.broker.call(name, params)


def upcast_step(payload: dict[str, Any]) -> dict[str, Any]:
    """One upcast step of the kind a real one is: a new payload with a field renamed."""
    out = {k: v for k, v in payload.items() if k != "name"}
    out["name"] = out["fullName"] = payload.get("name")
    return out


def event_store(store: StoreFactory, upcast: bool = False) -> EventStore:
    """The event store; with ``upcast``, ``profile.updated`` is at version 2 and the v1
    events of the log are read through :func:`upcast_step`."""
    events = EventStore(EVENT_STORE, store)
    if upcast:
        events.upcast("profile.updated", 1, upcast_step)
    return events


def appends_service(store: StoreFactory) -> Service:
    """``profile.update`` and nothing that reads the log but the dispatcher."""
    events = event_store(store)

    class ProfileService(events.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated")

    return ProfileService()


def projection_name(shape: Shape, as_action: bool) -> str:
    return f"{shape}{'Action' if as_action else 'Callable'}Aggregate"


def projection_service(
    store: StoreFactory,
    shape: Shape,
    as_action: bool,
    ref: BrokerRef,
    *,
    upcast: bool = False,
    version: int = 1,
    name: str | None = None,
) -> tuple[Aggregate, Service]:
    """``profile.update`` plus one aggregate fed from it: ``create`` makes one row per event
    (the property example's shape), ``summary`` reads its row through the broker and answers
    ``{id, total + 1}`` (the profile summary's shape); the transformation is an action of the
    service or an async callable. ``upcast``: the log is read through one upcast step;
    ``version``: the aggregate's version."""
    events = event_store(store, upcast)
    name = name or projection_name(shape, as_action)
    fields = PROFILE_FIELDS if shape == "create" else SUMMARY_FIELDS
    aggregate = Aggregate(
        name, stores.with_fields(store, fields), NoSnapshot, version=version
    ).snapshot(EVENT_STORE)

    async def create_row(event: dict[str, Any]) -> dict[str, Any]:
        payload = event["payload"]
        return {k: payload.get(k) for k in PROFILE_FIELDS}

    async def count_in(event: dict[str, Any], find: Callable[..., Awaitable[Any]]) -> Any:
        country = event["payload"]["country"]
        found = await find(f"{name}.find", {"country": country})
        if found:
            return {"id": found[0]["id"], "total": found[0]["total"] + 1}
        return {"country": country, "total": 1}

    async def summarise(event: dict[str, Any]) -> Any:
        return await count_in(event, ref.call)

    class ProjectionService(events.mixin(), aggregate.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated", version=2 if upcast else 1)

        @action(name="transform")
        async def transform(self, ctx: Context) -> Any:
            if shape == "create":
                return await create_row(ctx.params)
            return await count_in(ctx.params, ctx.call)

    on = aggregate.on("profile.updated")
    transform: Any = (
        "profile.transform" if as_action else (create_row if shape == "create" else summarise)
    )
    if shape == "create":
        on.create(transform)
    else:
        on.update(transform)
    return aggregate, ProjectionService()


# ---------------------------------------------------------------------- calling


async def call_for(
    callers: int, seconds: float, call: Callable[[int], Awaitable[object]], first: int = 0
) -> CallStats:
    """``callers`` concurrent loops calling ``call(i)`` (i counting up from ``first``), each
    waiting for its previous call, until ``seconds`` have passed; every latency recorded."""
    latencies: list[float] = []
    counter = first
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            index = counter
            counter += 1
            started = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return CallStats(callers, len(latencies), time.perf_counter() - started, latencies)


async def call_count(callers: int, count: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Make ``count`` calls from ``callers`` loops; answers the seconds taken."""
    counter = 0

    async def caller() -> None:
        nonlocal counter
        while counter < count:
            index = counter
            counter += 1
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(min(callers, count))))
    return time.perf_counter() - started


async def update(broker: ServiceBroker, i: int) -> dict[str, Any]:
    answer: dict[str, Any] = await broker.call("profile.update", profile(i))
    return answer


async def update_keyed(broker: ServiceBroker, i: int, prefix: str = "k") -> dict[str, Any]:
    """``profile.update`` with an idempotency key of its own (a new command each call)."""
    answer: dict[str, Any] = await broker.call(
        "profile.update", profile(i), meta={"idempotencyKey": f"{prefix}-{i}"}
    )
    return answer


async def dispatcher_lag(broker: ServiceBroker, event_store: str = EVENT_STORE) -> int | None:
    status = await broker.call(f"{event_store}.status", {})
    lag = (status.get("dispatcher") or {}).get("lag") if isinstance(status, dict) else None
    return int(lag) if isinstance(lag, int) else None


async def wait_dispatched(
    broker: ServiceBroker, limit: float, event_store: str = EVENT_STORE
) -> float:
    """Poll the event store's status until the dispatcher's lag is 0; answers the seconds."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if (await dispatcher_lag(broker, event_store)) in (0, None):
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


# ---------------------------------------------------------------------- appends


async def appends(
    store: StoreFactory,
    callers: int,
    dispatch: bool,
    seconds: float,
    keyed: bool = False,
    key_prefix: str = "k",
) -> Figures:
    """``profile.update`` from ``callers`` concurrent callers for ``seconds``; with ``keyed``,
    each call with an idempotency key of its own (``<key_prefix>-<n>``)."""

    async def call(broker: ServiceBroker, i: int) -> dict[str, Any]:
        if keyed:
            return await update_keyed(broker, i, key_prefix)
        return await update(broker, i)

    async with running_broker(appends_service(store), request_timeout=REQUEST_TIMEOUT) as broker:
        if not dispatch:
            await broker.call("profile.$stopDispatch", {})
        await call_count(callers, WARM_UP, lambda i: call(broker, i))
        stats = await call_for(callers, seconds, lambda i: call(broker, i), first=WARM_UP)
        lag = await dispatcher_lag(broker) if dispatch else None
    return {
        "events": stats.count,
        "seconds": stats.seconds,
        "per_second": stats.per_second,
        "p50_ms": stats.percentile(50) * 1000,
        "p99_ms": stats.percentile(99) * 1000,
        "dispatcher_lag_at_end": lag,
    }


async def prefill_keyed(store: StoreFactory, count: int) -> Figures:
    """Fill the log with ``count`` keyed events fast, straight through its adapter (batches
    of 10,000 rows: COPY on PostgreSQL, one executemany on SQLite; the unique index kept up
    as they go), all settled, so a broker on it has nothing to dispatch."""
    adapter = store(EVENT_STORE, EVENT_FIELDS, {})  # the key's unique index declared there
    await adapter.connect()
    started = time.perf_counter()
    try:
        now = now_ms()
        for start in range(0, count, 10_000):
            await adapter.append(
                [
                    {
                        "event": "profile.updated",
                        "version": EVENT_VERSION,
                        "created": now,
                        "updated": now,
                        "status": int(Status.COMPLETE),
                        "eventType": int(EventType.COMMAND),
                        "payload": profile(i),
                        "meta": {},
                        "attempts": 0,
                        IDEMPOTENCY_KEY: f"fill-{i}",
                    }
                    for i in range(start, min(start + 10_000, count))
                ]
            )
        head = await adapter.head()
        await adapter.set_meta(CURSOR_KEY, head)
    finally:
        await adapter.close()
    return {"events": head, "fill_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------- catch-up, replay


async def prefill(
    store: StoreFactory, count: int, *, seconds: float | None = None, settle: bool = True
) -> Figures:
    """Store ``count`` events (or as many as ``seconds`` allow) through ``profile.update``
    with nothing projecting them; with ``settle``, let the dispatcher settle them all, so that
    later brokers on this log have nothing to dispatch."""
    async with running_broker(appends_service(store), request_timeout=REQUEST_TIMEOUT) as broker:
        await broker.call("profile.$stopDispatch", {})
        started = time.perf_counter()
        if seconds is None:
            await call_count(FEED_CALLERS, count, lambda i: update(broker, i))
        else:
            stored = 0

            async def bounded(i: int) -> object:
                nonlocal stored
                if i >= count or time.perf_counter() - started > seconds:
                    return None
                stored += 1
                return await update(broker, i)

            await call_count(FEED_CALLERS, count, bounded)
            count = stored
        appended = time.perf_counter() - started
        settled = None
        if settle:
            await broker.call("profile.$startDispatch", {})
            settled = await wait_dispatched(broker, limit=3600)
    return {"events": count, "append_seconds": appended, "dispatch_seconds": settled}


async def checkpoint_of(broker: ServiceBroker, aggregate: str) -> int:
    status = await broker.call(f"{aggregate}.status", {})
    return int(status.get("checkpoint") or 0)


async def catch_up(
    store: StoreFactory,
    shape: Shape,
    as_action: bool,
    head: int,
    cap: float,
    upcast: bool | None = None,
    round_: int = 0,
) -> Figures:
    """A new aggregate on a log of ``head`` stored events: seconds from the broker's start
    until its checkpoint reaches ``head`` (or how far it got in ``cap`` seconds). ``upcast``
    (True or False: an aggregate of its own): the log read through one upcast step, or not."""
    ref = BrokerRef()
    name = None if upcast is None else f"upcast{int(upcast)}r{round_}Aggregate"
    aggregate, service = projection_service(
        store, shape, as_action, ref, upcast=bool(upcast), name=name
    )
    started = time.perf_counter()
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        ref.broker = broker
        runtime = aggregate.runtime(broker)
        try:
            done = await asyncio.wait_for(runtime.wait_caught_up(head), cap)
            complete = True
        except TimeoutError:
            done = await checkpoint_of(broker, aggregate.name)
            complete = False
        seconds = time.perf_counter() - started
        correct = await check_rows(broker, aggregate.name, shape, done) if complete else None
    return {
        "events": done,
        "seconds": seconds,
        "per_second": done / seconds,
        "complete": complete,
        "correct": correct,
    }


async def check_rows(broker: ServiceBroker, aggregate: str, shape: Shape, applied: int) -> bool:
    if shape == "create":
        return int(await broker.call(f"{aggregate}.count", {})) == applied
    rows = await broker.call(f"{aggregate}.find", {})
    return sum(int(r["total"]) for r in rows) == applied


Abandon = Callable[[Figures], None]


async def replay(
    store: StoreFactory, head: int, cap: float, abandon: Abandon | None = None
) -> Figures:
    """``replay {wait: true}`` of the create-only aggregate (action transformation) over a log
    of ``head`` events, once its live projector has caught up."""
    ref = BrokerRef()
    aggregate, service = projection_service(store, "create", True, ref)
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        ref.broker = broker
        await aggregate.runtime(broker).wait_caught_up(head)
        return await timed_replay(broker, aggregate.name, head, cap, abandon)


async def timed_replay(
    broker: ServiceBroker, name: str, head: int, cap: float, abandon: Abandon | None
) -> Figures:
    """Seconds of ``<name>.replay {wait: true}``; past ``cap`` seconds, how far it got. Then
    ``abandon`` (if given) is handed the figures and may end the process; else the replay is
    waited for, since the broker cannot stop under it."""
    started = time.perf_counter()
    call = asyncio.ensure_future(broker.call(f"{name}.replay", {"wait": True}))
    try:
        answer = await asyncio.wait_for(asyncio.shield(call), cap)
        done = int(answer.get("done") or head)
        complete = answer.get("state") == "done"
    except TimeoutError:
        status = await broker.call(f"{name}.status", {})
        done = int((status.get("replay") or {}).get("done") or 0)
        complete = False
    seconds = time.perf_counter() - started
    figures = {"events": done, "seconds": seconds, "per_second": done / seconds}
    if not complete:
        if abandon is not None:
            abandon({**figures, "complete": False})
        await asyncio.wait_for(call, 3600)
    return {**figures, "complete": complete}


async def replay_large(
    store: StoreFactory, count: int, fill_cap: float, cap: float, abandon: Abandon | None = None
) -> Figures:
    """Store ``count`` create-only events (as many as ``fill_cap`` seconds allow), then start a
    broker with the aggregate and replay it at once. The dispatcher is stopped as soon as the
    broker runs; there is no public way to hold the live projector, which starts catching up
    from 0 beside the replay."""
    began = time.perf_counter()
    filled = await prefill(store, count, seconds=fill_cap, settle=False)
    filled["seconds"] = time.perf_counter() - began
    ref = BrokerRef()
    aggregate, service = projection_service(store, "create", True, ref)
    began = time.perf_counter()
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        ref.broker = broker
        await broker.call("profile.$stopDispatch", {})
        started = time.perf_counter() - began
        extra = {"stored": filled["events"], "fill": filled, "start_seconds": started}

        def give_up(figures: Figures) -> None:
            if abandon is not None:
                abandon({**figures, **extra})

        figures = await timed_replay(broker, aggregate.name, filled["events"], cap, give_up)
    return {**figures, **extra}


# ---------------------------------------------------------------------- versions


async def dispatch(store: StoreFactory, count: int, upcast: bool) -> Figures:
    """Store ``count`` events undispatched, then time the dispatcher delivering them all to
    one subscriber, the log read with one upcast step or not."""
    await prefill(store, count, settle=False)
    events = event_store(store, upcast)
    heard: list[float] = []  # when each event arrived

    class Listener(Service):
        name = "listener"

        @event(name="profile.updated")
        async def on_updated(self, ctx: Context) -> None:
            heard.append(time.perf_counter())

    class Profile(events.mixin(), Service):  # type: ignore[misc]
        name = "profile"
        update = events.map_action("update", "profile.updated", version=2 if upcast else 1)

    async with running_broker(Profile(), Listener(), request_timeout=REQUEST_TIMEOUT) as broker:
        await events.runtime(broker).dispatcher.wait_settled(count)
    # From the first delivery to the last: the broker's start-up is not the dispatcher's.
    seconds = heard[-1] - heard[0]
    return {
        "events": count,
        "seconds": seconds,
        "per_second": (len(heard) - 1) / seconds,
        "heard": len(heard),
    }


async def upcast_pairs(
    log: StoreFactory,
    head: int,
    dispatch_stores: list[StoreFactory],
    count: int,
    cap: float,
    pairs: int,
) -> Figures:
    """One upcast step against none, ``pairs`` times, each pair's two runs back to back in
    this process (seconds apart, not a process start and minutes apart: the machine's load
    moves less between them than a 10 % difference), the first run of each pair alternating:
    a catch-up of the create-only callable aggregate on ``log`` (``head`` events; each run an
    aggregate of its own), then the dispatch of ``count`` events (each run a store of its own,
    two per pair from ``dispatch_stores``). Answers each job's runs in pair order, with and
    without the step (``harness.upcast_shares`` divides them)."""
    runs: dict[str, dict[str, list[Figures]]] = {
        job: {"with": [], "without": []} for job in ("catch_up", "dispatch")
    }
    for pair in range(pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        for upcast in order:
            side = "with" if upcast else "without"
            figures = await catch_up(log, "create", False, head, cap, upcast, pair)
            runs["catch_up"][side].append(figures)
        for upcast in order:
            side = "with" if upcast else "without"
            store = dispatch_stores[2 * pair + int(upcast)]
            runs["dispatch"][side].append(await dispatch(store, count, upcast))
    return runs


@dataclass
class Reads:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)


async def _reader(broker: ServiceBroker, name: str, head: int, stats: Reads) -> None:
    """Reads by id, one after another with a pause, for as long as it runs."""
    i = 0
    while True:
        i += 1
        began = time.perf_counter()
        try:
            await broker.call(f"{name}.get", {"id": 1 + (i * 7919) % head})
        except Exception:
            stats.failed += 1
        stats.latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.002)


async def rebuild(store: StoreFactory, head: int) -> Figures:
    """The create-only aggregate (an action) on a log of ``head`` events: first ``replay``
    of version 1 (the baseline), then a node of version 2 rebuilding it as it starts; a reader
    reads by id throughout both. Answers both durations (as the replay's progress measures
    them) and the reads' latencies during the rebuild."""
    name = "rebuiltAggregate"
    ref = BrokerRef()
    seconds: dict[str, float] = {}
    reads: dict[str, Reads] = {}
    for version in (1, 2):
        aggregate, service = projection_service(
            store, "create", True, ref, version=version, name=name
        )
        async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
            ref.broker = broker
            if version == 1:
                await aggregate.runtime(broker).wait_caught_up(head)
            stats = reads[f"v{version}"] = Reads()
            reader = asyncio.create_task(_reader(broker, name, head, stats))
            if version == 1:
                progress = await broker.call(f"{name}.replay", {"wait": True})
            else:
                await aggregate.runtime(broker).wait_caught_up(head)
                progress = (await broker.call(f"{name}.status", {}))["replay"]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            seconds[f"v{version}"] = float(progress["finished"]) - float(progress["started"])
    during = reads["v2"]
    return {
        "events": head,
        "replay_seconds": seconds["v1"],
        "rebuild_seconds": seconds["v2"],
        "rebuild_over_replay": seconds["v2"] / seconds["v1"],
        "reads": len(during.latencies),
        "reads_failed": during.failed,
        "read_p99_ms": during.percentile(99) * 1000,
        "read_p50_ms": during.percentile(50) * 1000,
        "read_p99_ms_during_replay": reads["v1"].percentile(99) * 1000,
    }


# ---------------------------------------------------------------------- sustained load


async def sustained(store: StoreFactory, callers: int, seconds: float) -> Figures:
    """The profile example (summary projector and dispatcher running) under ``callers``
    concurrent ``profile.update`` callers for ``seconds``; lags read at the end of the load."""
    from moleculerpy_cqrs.examples import profile as example

    _, summary, service_class = example.build(store)
    async with running_broker(service_class(), request_timeout=REQUEST_TIMEOUT) as broker:
        await broker.call("profile.update", {"name": "first", "country": "NZ"})
        await summary.runtime(broker).wait_caught_up()
        stats = await call_for(
            callers, seconds, lambda i: broker.call("profile.update", full_profile(i))
        )
        status = await broker.call("profileSummaryAggregate.status", {})
        lag = await dispatcher_lag(broker)
    rate = stats.per_second
    projector_lag = int((status.get("lag") or {}).get("events") or 0)
    return {
        "seconds": stats.seconds,
        "per_second": rate,
        "p99_ms": stats.percentile(99) * 1000,
        "projector_lag_events": projector_lag,
        "projector_lag_seconds_worth": projector_lag / rate if rate else None,
        "projector_applied_per_second": (int(status.get("checkpoint") or 0) - 1) / stats.seconds,
        "dispatcher_lag_events": lag,
        "dispatcher_lag_seconds_worth": (lag / rate) if (lag is not None and rate) else None,
    }


def full_profile(i: int) -> dict[str, Any]:
    p = profile(i)
    return {**p, "married": i % 2 == 0, "student": i % 3 == 0}


# ---------------------------------------------------------------------- ack -> visible


@dataclass
class Visibility:
    acked: dict[int, float] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)


async def ack_to_visible(store: StoreFactory, rate: int, seconds: float) -> Figures:
    """``rate`` appends a second (open loop) for ``seconds``; for each, the time from the
    answer of ``profile.update`` until ``find`` on the create-only aggregate shows its row."""
    ref = BrokerRef()
    aggregate, service = projection_service(store, "create", True, ref)
    v = Visibility()
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        ref.broker = broker
        await update(broker, 0)
        await aggregate.runtime(broker).wait_caught_up()
        sending = True

        async def send(i: int) -> None:
            answer = await update(broker, i)
            v.acked[int(answer["id"])] = time.perf_counter()

        async def watch() -> None:
            # Rows are created in log order, so new ones have the higher ids (the primary
            # key): each find reads only what is new, and the watcher stays light.
            last = 0
            while sending or not v.acked.keys() <= v.seen.keys():
                rows = await broker.call(
                    f"{aggregate.name}.find",
                    {"query": {"id": {">=": last + 1}}, "sort": "id", "limit": 10_000},
                )
                now = time.perf_counter()
                for row in rows:
                    v.seen.setdefault(int(row["eventId"]), now)
                    last = max(last, int(row["id"]))
                await asyncio.sleep(POLL)

        watcher = asyncio.create_task(watch())
        tasks: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i + 1)))
        await asyncio.gather(*tasks)
        offered = total / (time.perf_counter() - started)
        sending = False
        await asyncio.wait_for(watcher, 600)
    latencies = [max(v.seen[i] - t, 0.0) for i, t in v.acked.items() if i in v.seen]
    return {
        "events": len(latencies),
        "offered_per_second": offered,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=0.0) * 1000,
    }


# ---------------------------------------------------------------------- three nodes


async def cluster_node(store: StoreFactory, transporter: str, node_id: str, ready: Path) -> Figures:
    """One node of the profile example (event store, summary projector, dispatcher) on a
    shared database; touches ``ready`` once started and runs until its stdin has a line."""
    from moleculerpy_cqrs.examples import profile as example

    _, _, service_class = example.build(store)
    async with running_broker(
        service_class(), transporter=transporter, node_id=node_id, request_timeout=REQUEST_TIMEOUT
    ):
        await asyncio.to_thread(ready.touch)
        await asyncio.to_thread(sys.stdin.readline)
    return {"node": node_id}


async def cluster_load(transporter: str, callers: int, seconds: float, nodes: int) -> Figures:
    """A broker with no services of its own calling ``profile.update`` (balanced over the
    nodes) from ``callers`` loops for ``seconds``. The lags are read right after the load
    through the status actions, asked several times so that every node answers: a standby
    node's projector and dispatcher are idle, so the smallest lag is the active one's."""
    async with running_broker(
        transporter=transporter, node_id="load-driver", request_timeout=REQUEST_TIMEOUT
    ) as broker:
        await broker.wait_for_services(
            ["profile", "profileSummaryAggregate", "profileEventStore"], timeout=60
        )
        await call_count(callers, WARM_UP, lambda i: update(broker, i))
        stats = await call_for(
            callers, seconds, lambda i: broker.call("profile.update", full_profile(i))
        )
        projector: list[int] = []
        dispatcher: list[int] = []
        for _ in range(3 * nodes):
            status = await broker.call("profileSummaryAggregate.status", {})
            projector.append(int((status.get("lag") or {}).get("events") or 0))
            lag = await dispatcher_lag(broker)
            if lag is not None:
                dispatcher.append(lag)
    rate = stats.per_second
    p_lag = min(projector)
    d_lag = min(dispatcher) if dispatcher else None
    return {
        "seconds": stats.seconds,
        "per_second": rate,
        "p99_ms": stats.percentile(99) * 1000,
        "projector_lag_events": p_lag,
        "projector_lag_seconds_worth": p_lag / rate if rate else None,
        "dispatcher_lag_events": d_lag,
        "dispatcher_lag_seconds_worth": (d_lag / rate) if (d_lag is not None and rate) else None,
        "status_answers": {"projector": projector, "dispatcher": dispatcher},
    }


# ---------------------------------------------------------------------- per-entity read model

ACCOUNTS: Final = "accountsAggregate"
ACCOUNT_EVENT_STORE: Final = "accountEventStore"
ACCOUNT_FIELDS: Final[dict[str, Any]] = {
    "accountId": {"type": "string", "index": True},  # the business key: declared indexed
    "balance": "integer",
}
FILL_CHUNK: Final = 10_000


def account_id(n: int) -> str:
    return f"acc{n:09d}"


def deposits(rows: int, count: int) -> list[tuple[str, int]]:
    """The ``count`` deposits every subject applies: accounts picked at random (seeded) among
    ``rows`` filled ones, so one batch touches up to 1,000 distinct rows of a large table."""
    import random

    rng = random.Random(13)
    return [(account_id(rng.randrange(rows)), 1 + i % 7) for i in range(count)]


def bank_service(store: StoreFactory, *, project: bool) -> tuple[Aggregate, Service]:
    """``bank.deposit`` (the command); with ``project``, the accounts aggregate too, fed by
    the ``bank.credit`` action: it finds the account's row through the broker, by its
    business key, and answers the new balance. The binding declares ``key="accountId"``."""
    events = EventStore(ACCOUNT_EVENT_STORE, store)
    accounts = Aggregate(ACCOUNTS, stores.with_fields(store, ACCOUNT_FIELDS), NoSnapshot)
    accounts.snapshot(ACCOUNT_EVENT_STORE)
    accounts.on("account.deposited").update("bank.credit", key="accountId")
    mixins: tuple[type, ...] = (events.mixin(), accounts.mixin()) if project else (events.mixin(),)

    async def credit(ctx: Context) -> Any:
        p = ctx.params["payload"]
        found = await ctx.call(f"{ACCOUNTS}.find", {"accountId": p["accountId"]})
        if found:
            return {"id": found[0]["id"], "balance": found[0]["balance"] + p["amount"]}
        return {"accountId": p["accountId"], "balance": p["amount"]}

    class BankService(*mixins, Service):  # type: ignore[misc]
        name = "bank"
        deposit = events.map_action("deposit", "account.deposited")

        @action(name="credit")
        async def credit_action(self, ctx: Context) -> Any:
            return await credit(ctx)

    return accounts, BankService()


async def fill_accounts(store: StoreFactory, rows: int) -> float:
    """``rows`` accounts with balance 0 written straight into the aggregate's table (set-up,
    not measured); answers the seconds it took."""
    from moleculerpy_cqrs.core.records import AGGREGATE_FIELDS

    started = time.perf_counter()
    factory = stores.with_fields(store, ACCOUNT_FIELDS)
    async with factory(ACCOUNTS, dict(AGGREGATE_FIELDS)) as table:
        for first in range(0, rows, FILL_CHUNK):
            await table.insert_many(
                [
                    {"accountId": account_id(n), "balance": 0, "eventId": 0}
                    for n in range(first, min(first + FILL_CHUNK, rows))
                ]
            )
        # As autovacuum would within a minute (the raw subject's fill does the same).
        analyze = getattr(table, "analyze", None)
        if analyze is not None:
            await analyze()
    return time.perf_counter() - started


async def per_entity(store: StoreFactory, rows: int, events: int, cap: float) -> Figures:
    """The per-entity read model: ``rows`` accounts filled, ``events`` deposits stored, then
    the aggregate's projector started; only the updates are timed (from the broker's start,
    less what was applied before it, to the last deposit applied)."""
    fill_seconds = await fill_accounts(store, rows)
    plan = deposits(rows, events)
    _, feeder = bank_service(store, project=False)
    async with running_broker(feeder, request_timeout=REQUEST_TIMEOUT) as broker:
        await broker.call("bank.$stopDispatch", {})

        async def deposit(i: int) -> object:
            account, amount = plan[i]
            return await broker.call("bank.deposit", {"accountId": account, "amount": amount})

        await call_count(FEED_CALLERS, events, deposit)
        await broker.call("bank.$startDispatch", {})
        await wait_dispatched(broker, 3600, ACCOUNT_EVENT_STORE)
        head = int((await broker.call(f"{ACCOUNT_EVENT_STORE}.status", {})).get("head") or 0)
    accounts, service = bank_service(store, project=True)
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        started = time.perf_counter()
        before = await checkpoint_of(broker, ACCOUNTS)
        runtime = accounts.runtime(broker)
        try:
            done = await asyncio.wait_for(runtime.wait_caught_up(head), cap)
            complete = True
        except TimeoutError:
            done = await checkpoint_of(broker, ACCOUNTS)
            complete = False
        seconds = time.perf_counter() - started
        correct = None
        if complete:
            want = sum(amount for _, amount in plan)
            total = 0
            touched = sorted({a for a, _ in plan})
            for first in range(0, len(touched), 10_000):
                found = await broker.call(
                    f"{ACCOUNTS}.find",
                    {"query": {"accountId": {"in": touched[first : first + 10_000]}}},
                )
                total += sum(int(r["balance"]) for r in found)
            correct = total == want and await broker.call(f"{ACCOUNTS}.count", {}) == rows
    applied = done - before
    return {
        "rows": rows,
        "events": applied,
        "seconds": seconds,
        "per_second": applied / seconds if seconds else 0.0,
        "complete": complete,
        "correct": correct,
        "fill_seconds": fill_seconds,
    }


# ---------------------------------------------------------------------- transformation elsewhere

RemoteShape = Literal["create", "summary", "summary_keyed"]


def remote_aggregate_name(
    shape: RemoteShape, where: str, call_many: bool = True, round_: int = 0
) -> str:
    before = "" if call_many else "Before"
    return f"{shape.replace('_', '')}{where.title()}{before}R{round_}Aggregate"


def summarizer_service(shape: RemoteShape, aggregate: str) -> Service:
    """The ``summarizer`` service: one transformation action, ``summarizer.transform``, for
    the aggregate ``aggregate`` (create-only: a row from the event; the summaries: read the
    country's row through the broker, answer ``{id, total + 1}``)."""

    class Summarizer(Service):
        name = "summarizer"

        @action(name="transform")
        async def transform(self, ctx: Context) -> Any:
            payload = ctx.params["payload"]
            if shape == "create":
                return {k: payload.get(k) for k in PROFILE_FIELDS}
            country = payload["country"]
            found = await ctx.call(f"{aggregate}.find", {"query": {"country": country}})
            if found:
                return {"id": found[0]["id"], "total": found[0]["total"] + 1}
            return {"country": country, "total": 1}

    return Summarizer()


async def catch_up_over_nats(
    store: StoreFactory,
    shape: RemoteShape,
    where: Literal["local", "remote"],
    transporter: str,
    head: int,
    cap: float,
    call_many: bool = True,
    round_: int = 0,
) -> Figures:
    """A new aggregate on a log of ``head`` events, its transformation ``summarizer.transform``
    served on the projector's node (``local``) or only by another node (``remote``, started by
    the harness: :func:`summarizer_node`); the projector's node is on NATS either way.
    Seconds from the broker's start until the checkpoint reaches ``head``."""
    events = event_store(store)
    name = remote_aggregate_name(shape, where, call_many, round_)
    fields = PROFILE_FIELDS if shape == "create" else SUMMARY_FIELDS
    aggregate = Aggregate(name, stores.with_fields(store, fields), NoSnapshot).snapshot(EVENT_STORE)
    on = aggregate.on("profile.updated")
    if shape == "create":
        on.create("summarizer.transform")
    else:
        on.update("summarizer.transform", key="country" if shape == "summary_keyed" else None)

    class Projecting(events.mixin(), aggregate.mixin(), Service):  # type: ignore[misc]
        name = "profile"

    services: list[Service] = [Projecting()]
    if where == "local":
        services.append(summarizer_service(shape, name))
    started = time.perf_counter()
    async with running_broker(
        *services, transporter=transporter, node_id=f"projector-{where}",
        request_timeout=REQUEST_TIMEOUT,
    ) as broker:  # fmt: skip
        runtime = aggregate.runtime(broker)
        try:
            done = await asyncio.wait_for(runtime.wait_caught_up(head), cap)
            complete = True
        except TimeoutError:
            done = await checkpoint_of(broker, name)
            complete = False
        seconds = time.perf_counter() - started
        real_shape: Shape = "create" if shape == "create" else "summary"
        correct = await check_rows(broker, name, real_shape, done) if complete else None
    return {
        "events": done,
        "seconds": seconds,
        "per_second": done / seconds,
        "complete": complete,
        "correct": correct,
    }


async def summarizer_node(
    shape: RemoteShape,
    transporter: str,
    node_id: str,
    ready: Path,
    call_many: bool = True,
    round_: int = 0,
) -> Figures:
    """A node serving only ``summarizer.transform`` for the remote variant of ``shape``;
    touches ``ready`` once started and runs until its stdin has a line. Without
    ``call_many`` it does not offer many calls in one request (the projector then calls it
    once per event, as before)."""
    from moleculerpy_cqrs.broker import compat

    service = summarizer_service(shape, remote_aggregate_name(shape, "remote", call_many, round_))
    async with running_broker(
        transporter=transporter, node_id=node_id, request_timeout=REQUEST_TIMEOUT
    ) as broker:
        compat.install(broker)
        if not call_many:
            node = broker.node_catalog.local_node
            assert node is not None
            node.metadata = {}
        await broker.register(service)
        await asyncio.to_thread(ready.touch)
        await asyncio.to_thread(sys.stdin.readline)
    return {"node": node_id}
