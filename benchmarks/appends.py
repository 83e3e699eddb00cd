"""Append throughput and latency through the broker, against one-per-transaction appends.

    .venv/bin/python benchmarks/appends.py [--backend sqlite|postgres|memory]
        [--events 10000] [--callers 1,16,64] [--dispatch-events 2000]
        [--dispatch-batches 1,100] [--projector-events 10000] [--projector-batches 1,1000]

1. ``profile.update`` (the profile example's ``map_action``) called ``--events`` times by each
   number of concurrent callers: events/s, p50/p99 latency, and events per commit (the group
   commit: ``profileEventStore.status`` → ``appended``/``commits``). The event store's
   dispatcher is stopped and the summary projector held meanwhile, so only the append path runs;
   then once more with the most callers and the dispatcher running, counting the events it
   settled meanwhile. The peer, in the same run: the same number of event records appended
   straight through the adapter, one ``adapter.append([record])`` transaction each,
   sequentially (no broker, no group commit). Ratios are broker / peer.
2. The dispatcher settling ``--dispatch-events`` events stored while it was stopped, with each
   ``dispatch_batch_size`` (100 is the default; nothing subscribes to ``profile.updated``).
3. The summary projector catching up ``--projector-events`` events with each batch size; its
   transformation calls ``profileSummaryAggregate.find`` through the broker for every event.

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from _common import (
    BACKENDS,
    REQUEST_TIMEOUT,
    Backend,
    CallStats,
    Environment,
    Stopwatch,
    call_concurrently,
    fmt_ms,
    fmt_rate,
    fmt_seconds,
    open_backend,
    say,
    table,
)
from moleculerpy import ServiceBroker

from moleculerpy_cqrs.core.aggregate import AggregateRuntime
from moleculerpy_cqrs.core.eventstore import EventStoreRuntime
from moleculerpy_cqrs.core.projector import Projector
from moleculerpy_cqrs.core.records import EVENT_FIELDS, EVENT_VERSION, EventType, Status, now_ms
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker

WARM_UP = 200  # calls before each measured run (not counted)
PROJECTOR_FEED_CALLERS = 64


def profiles(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_profile(rng) for _ in range(count)]


def event_record(payload: dict[str, Any]) -> dict[str, Any]:
    """The row ``EventStoreRuntime.append`` writes for ``profile.update``."""
    now = now_ms()
    return {
        "event": "profile.updated",
        "version": EVENT_VERSION,
        "created": now,
        "updated": now,
        "status": int(Status.CREATED),
        "eventType": int(EventType.COMMAND),
        "payload": payload,
        "meta": {},
        "attempts": 0,
    }


async def commits(broker: ServiceBroker) -> tuple[int, int]:
    status: dict[str, Any] = await broker.call("profileEventStore.status", {})
    return int(status["appended"]), int(status["commits"])


async def running_projector(runtime: AggregateRuntime) -> Projector:
    """The aggregate's projector, once it runs."""
    await runtime.projecting.wait()
    assert runtime.projector is not None
    return runtime.projector


# ---------------------------------------------------------------------- 1. appends


@dataclass
class AppendRun:
    stats: CallStats
    per_commit: float
    dispatched: int | None  # events the dispatcher settled meanwhile (None: it was stopped)


async def append_run(backend: Backend, events: int, callers: int, *, dispatch: bool) -> AppendRun:
    """``events`` calls of ``profile.update`` by ``callers`` concurrent callers, on a fresh
    database, with the summary projector held (and the dispatcher stopped unless ``dispatch``)."""
    events_store, summary, service_class = profile.build(backend.fresh())
    async with running_broker(service_class(), request_timeout=REQUEST_TIMEOUT) as broker:
        runtime: EventStoreRuntime = events_store.runtime(broker)
        if not dispatch:
            await broker.call("profile.$stopDispatch", {})
        projector = await running_projector(summary.runtime(broker))
        inputs = profiles(events + WARM_UP, callers)

        async def update(i: int) -> object:
            return await broker.call("profile.update", inputs[i])

        async with projector.paused():
            await call_concurrently(callers, WARM_UP, lambda i: update(events + i))
            if dispatch:
                await runtime.dispatcher.wait_settled(WARM_UP)
            appended0, commits0 = await commits(broker)
            settled0 = runtime.dispatcher.cursor
            say(
                f"appends: {events:,} calls of profile.update by {callers} callers, "
                f"dispatcher {'running' if dispatch else 'stopped'}"
            )
            stats = await call_concurrently(callers, events, update)
            settled1 = runtime.dispatcher.cursor
            appended1, commits1 = await commits(broker)
    per_commit = (appended1 - appended0) / max(commits1 - commits0, 1)
    say(f"  {fmt_rate(stats.per_second)}, {per_commit:.1f} events per commit")
    return AppendRun(stats, per_commit, settled1 - settled0 if dispatch else None)


async def peer_run(backend: Backend, events: int) -> CallStats:
    """The peer: a log of its own on a fresh database, one transaction per append."""
    say(f"peer: {events:,} sequential adapter.append([record]) calls")
    adapter = backend.fresh()("peerEventStore", EVENT_FIELDS)
    await adapter.connect()
    try:
        inputs = profiles(events + WARM_UP, 0)

        async def append(i: int) -> object:
            return await adapter.append([event_record(inputs[i])])

        await call_concurrently(1, WARM_UP, lambda i: append(events + i))
        peer = await call_concurrently(1, events, append)
        assert await adapter.head() == events + WARM_UP
    finally:
        await adapter.close()
    say(f"  {fmt_rate(peer.per_second)}")
    return peer


# ---------------------------------------------------------------------- 2. dispatcher


async def dispatcher_drain(backend: Backend, count: int, batch_size: int) -> tuple[float, int]:
    """Seconds for the dispatcher to settle ``count`` events stored while it was stopped."""
    events_store, summary, service_class = profile.build(
        backend.fresh(), dispatch_batch_size=batch_size
    )
    async with running_broker(service_class(), request_timeout=REQUEST_TIMEOUT) as broker:
        await broker.call("profile.$stopDispatch", {})
        projector = await running_projector(summary.runtime(broker))
        inputs = profiles(count, 7)
        async with projector.paused():
            await call_concurrently(
                PROJECTOR_FEED_CALLERS, count, lambda i: broker.call("profile.update", inputs[i])
            )
            runtime: EventStoreRuntime = events_store.runtime(broker)
            head = await runtime.adapter.head()
            say(f"dispatcher: settling {head:,} events, dispatch_batch_size {batch_size}")
            with Stopwatch() as sw:
                await broker.call("profile.$startDispatch", {})
                await runtime.dispatcher.wait_settled(head)
            pending = await broker.call(
                "profileEventStore.count", {"query": {"status": {"in": [0, 1, 4]}}}
            )
            assert pending == 0, f"{pending} events not settled"
        return sw.seconds, head


# ---------------------------------------------------------------------- 3. projector


async def projector_catch_up(backend: Backend, count: int, batch_size: int) -> tuple[float, int]:
    """Seconds for the summary projector to apply ``count`` events stored while held."""
    _, summary, service_class = profile.build(backend.fresh(), batch_size=batch_size)
    async with running_broker(service_class(), request_timeout=REQUEST_TIMEOUT) as broker:
        await broker.call("profile.$stopDispatch", {})
        runtime = summary.runtime(broker)
        projector = await running_projector(runtime)
        inputs = profiles(count, batch_size)
        async with projector.paused():
            await call_concurrently(
                PROJECTOR_FEED_CALLERS, count, lambda i: broker.call("profile.update", inputs[i])
            )
            head = await projector.source.head()
            say(f"projector: catching up {head:,} events, batch_size {batch_size}")
            started = time.perf_counter()
        await runtime.wait_caught_up(head)
        seconds = time.perf_counter() - started
        rows = await broker.call("profileSummaryAggregate.find", {})
        assert sum(r["total"] for r in rows) == count, "the summary does not add up"
        return seconds, head


# ---------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


async def run(args: argparse.Namespace, backend: Backend) -> list[str]:
    peer = await peer_run(backend, args.events)
    runs = [(n, await append_run(backend, args.events, n, dispatch=False)) for n in args.callers]
    busiest = max(args.callers)
    live = await append_run(backend, args.events, busiest, dispatch=True)

    def line(label: str, stats: CallStats, per_commit: str, ratio: str) -> list[str]:
        p50, p99 = fmt_ms(stats.percentile(50)), fmt_ms(stats.percentile(99))
        return [label, fmt_rate(stats.per_second), p50, p99, per_commit, ratio]

    rows = [
        line(
            f"profile.update, {n} caller{'s' if n > 1 else ''}",
            r.stats,
            f"{r.per_commit:.1f}",
            f"{r.stats.per_second / peer.per_second:.2f}x",
        )
        for n, r in runs
    ]
    rows.append(line("peer: adapter.append([record]), sequential", peer, "1.0", "1.00x"))
    live_row = line(
        f"profile.update, {busiest} callers, dispatcher running",
        live.stats,
        f"{live.per_commit:.1f}",
        f"{live.stats.per_second / peer.per_second:.2f}x",
    )
    return [
        f"Appends: {args.events:,} events per row (after {WARM_UP} warm-up calls), each row on a "
        "fresh database; dispatcher stopped and summary projector held, so only appends run",
        *table(["", "events/s", "p50", "p99", "events/commit", "vs peer"], rows),
        "",
        "The same with the event store's dispatcher running (dispatch_batch_size 100, the default)",
        *table(
            ["", "events/s", "p50", "p99", "events/commit", "vs peer", "dispatched meanwhile"],
            [[*live_row, f"{live.dispatched:,} of {args.events:,}"]],
        ),
    ]


async def run_dispatcher(args: argparse.Namespace, backend: Backend, batch_size: int) -> list[str]:
    seconds, count = await dispatcher_drain(backend, args.dispatch_events, batch_size)
    return [
        f"dispatch_batch_size {batch_size}",
        f"{count:,}",
        fmt_seconds(seconds),
        fmt_rate(count / seconds),
    ]


async def run_projector(args: argparse.Namespace, backend: Backend, batch_size: int) -> list[str]:
    seconds, count = await projector_catch_up(backend, args.projector_events, batch_size)
    return [
        f"batch_size {batch_size}",
        f"{count:,}",
        fmt_seconds(seconds),
        fmt_rate(count / seconds),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument(
        "--events", type=int, default=10_000, help="appends per caller count (0: skip)"
    )
    parser.add_argument("--callers", type=int_list, default=[1, 16, 64], help="e.g. 1,16,64")
    parser.add_argument(
        "--dispatch-events", type=int, default=2000, help="events for the dispatcher (0: skip)"
    )
    parser.add_argument(
        "--dispatch-batches", type=int_list, default=[1, 100], help="dispatch_batch_size values"
    )
    parser.add_argument(
        "--projector-events", type=int, default=10_000, help="events to catch up (0: skip)"
    )
    parser.add_argument(
        "--projector-batches", type=int_list, default=[1, 1000], help="batch sizes, e.g. 1,1000"
    )
    args = parser.parse_args()
    lines: list[str] = []
    with Stopwatch() as whole, open_backend(args.backend, "appends") as backend:
        measured = Environment(backend)
        # Every part runs on fresh, empty stores (backend.fresh()), one asyncio.run each.
        if args.events:
            lines += asyncio.run(run(args, backend))
        if args.dispatch_events:
            rows = [
                asyncio.run(run_dispatcher(args, backend, batch_size))
                for batch_size in args.dispatch_batches
            ]
            lines += [
                "",
                "Dispatcher: settling events stored while it was stopped (nothing subscribes to "
                "profile.updated; dispatch_batch_size 100 is the default)",
                *table(["", "events", "time", "events/s"], rows),
            ]
        if args.projector_events:
            rows = [
                asyncio.run(run_projector(args, backend, batch_size))
                for batch_size in args.projector_batches
            ]
            lines += [
                "",
                "Projector catch-up (profileSummaryAggregate; the transformation calls "
                "profileSummaryAggregate.find through the broker per event)",
                *table(["", "events", "time", "events/s"], rows),
            ]
        env = measured.lines(backend)
    print(
        f"benchmarks/appends.py --backend {args.backend} --events {args.events} "
        f"--callers {','.join(map(str, args.callers))} --dispatch-events {args.dispatch_events} "
        f"--dispatch-batches {','.join(map(str, args.dispatch_batches))} "
        f"--projector-events {args.projector_events} "
        f"--projector-batches {','.join(map(str, args.projector_batches))}"
    )
    for line in env:
        print(line)
    print()
    for line in lines:
        print(line)
    print(f"\n(whole run {fmt_seconds(whole.seconds)})")


if __name__ == "__main__":
    main()
