"""Snapshot, restore and replay of a large aggregate, through the broker.

    .venv/bin/python benchmarks/snapshots.py [--backend sqlite|postgres|memory]
        [--rows 1000000] [--rows-per-event 1000] [--since 100000]

Builds an aggregate of ``--rows`` rows from "load" events that each create
``--rows-per-event`` rows (``on(...).create_many``), then measures:

- ``<agg>.snapshot``: how long the projector is held (``Maintenance.last_pause_ms``) and the
  wall time of the call; the backup size (``<agg>.snapshots`` → ``size``);
- after ``--since`` small events (one row each, ``on(...).create``) stored since the
  snapshot: ``<agg>.restore {snapshotID}`` plus the catch-up until the checkpoint reaches the
  head (``AggregateRuntime.wait_caught_up``);
- ``<agg>.replay {wait: true}`` over the whole log: events/s and wall time.

There is no peer to compare with here; the figures stand alone. Progress goes to stderr, the
figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from _common import (
    BACKENDS,
    REQUEST_TIMEOUT,
    Backend,
    Environment,
    Stopwatch,
    call_concurrently,
    fmt_bytes,
    fmt_rate,
    fmt_seconds,
    open_backend,
    say,
    table,
)
from moleculerpy import Context, Service, ServiceBroker, event

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup
from moleculerpy_cqrs.core.aggregate import AggregateRuntime
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker

ITEM_FIELDS = {"n": "integer", "name": "string", "grp": "integer"}
LOAD_CALLERS = 8  # concurrent callers of bench.load (large events)
ADD_CALLERS = 64  # concurrent callers of bench.add (small events)


def build(
    backend: Backend, batch_size: int, on_replay_progress: Callable[[dict[str, Any]], None]
) -> tuple[EventStore, Aggregate, Service]:
    events = EventStore("benchEventStore", backend.store)
    items = Aggregate(
        "itemAggregate",
        with_fields(backend.store, ITEM_FIELDS),
        StoreBackup(backend.workdir / "backups"),
        batch_size=batch_size,
    ).snapshot("benchEventStore")

    async def rows_of(event: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = event["payload"]["rows"]
        return rows

    async def row_of(event: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = event["payload"]
        return row

    items.on("items.loaded").create_many(rows_of)
    items.on("item.added").create(row_of)

    class Bench(events.mixin(), items.mixin(), Service):  # type: ignore[misc]
        name = "bench"
        load = events.map_action("load", "items.loaded")
        add = events.map_action("add", "item.added")

        @event(name="itemAggregate.replay.progress")
        async def replay_progress(self, ctx: Context) -> None:
            on_replay_progress(ctx.params)

    return events, items, Bench()


def row(n: int) -> dict[str, Any]:
    return {"n": n, "name": f"item-{n:08d}", "grp": n % 97}


async def count(broker: ServiceBroker) -> int:
    total: int = await broker.call("itemAggregate.count", {})
    return total


async def run(args: argparse.Namespace, backend: Backend) -> list[tuple[str, str]]:
    rows_total: int = args.rows
    per_event: int = args.rows_per_event
    since: int = args.since
    load_events = -(-rows_total // per_event)
    figures: list[tuple[str, str]] = []

    def record(name: str, value: str) -> None:
        figures.append((name, value))
        say(f"{name}: {value}")

    progress_listeners: list[Callable[[dict[str, Any]], None]] = []

    def on_replay_progress(payload: dict[str, Any]) -> None:
        for listener in progress_listeners:
            listener(payload)

    _, items, service = build(backend, args.batch_size, on_replay_progress)
    async with running_broker(service, request_timeout=REQUEST_TIMEOUT) as broker:
        runtime: AggregateRuntime = items.runtime(broker)
        if not args.dispatch:
            # Nothing subscribes to these events; a running dispatcher would still write two
            # status transactions per event to the event store all through the run.
            await broker.call("bench.$stopDispatch", {})

        # ---------------------------------------------------------------- build
        say(f"building {rows_total:,} rows from {load_events:,} events of {per_event:,} rows")

        async def load(i: int) -> object:
            first = i * per_event
            last = min(first + per_event, rows_total)
            return await broker.call("bench.load", {"rows": [row(n) for n in range(first, last)]})

        with Stopwatch() as built:
            appended = await call_concurrently(LOAD_CALLERS, load_events, load)
            await runtime.wait_caught_up()
        assert await count(broker) == rows_total
        record(
            "build: append load events",
            f"{load_events:,} events ({per_event:,} rows each) in "
            f"{fmt_seconds(appended.seconds)}, {LOAD_CALLERS} callers",
        )
        record(
            "build: projected rows",
            f"{rows_total:,} rows in {fmt_seconds(built.seconds)} "
            f"({fmt_rate(rows_total / built.seconds)} rows)",
        )

        # ---------------------------------------------------------------- snapshot
        say("snapshot")
        with Stopwatch() as snap:
            snapshot_id: str = await broker.call("itemAggregate.snapshot", {})
        assert runtime.maintenance is not None
        pause_ms = runtime.maintenance.last_pause_ms or 0.0
        listed = {s["snapshotId"]: s for s in await broker.call("itemAggregate.snapshots", {})}
        snapshot = listed[snapshot_id]
        assert snapshot["status"] == "completed", snapshot
        size = int(snapshot["size"])
        record("snapshot: projector paused", f"{pause_ms:,.1f} ms (last_pause_ms)")
        record("snapshot: call wall time", fmt_seconds(snap.seconds))
        record("snapshot: backup size", f"{fmt_bytes(size)}, {size / rows_total:.1f} B/row")
        record("snapshot: checkpoint", f"{snapshot['checkpoint']:,}")

        # ---------------------------------------------------------------- events since
        say(f"appending {since:,} one-row events after the snapshot (projector held)")

        async def add(i: int) -> object:
            return await broker.call("bench.add", row(rows_total + i))

        projector = runtime.projector
        assert projector is not None
        # Held, so the projector does not apply them now only to apply them again after the
        # restore: the catch-up below is the only pass over them.
        async with projector.paused():
            added = await call_concurrently(ADD_CALLERS, since, add)
        head = await projector.source.head()
        record(
            "since: append one-row events",
            f"{since:,} events in {fmt_seconds(added.seconds)} "
            f"({fmt_rate(added.per_second)}, {ADD_CALLERS} callers through bench.add)",
        )

        # ---------------------------------------------------------------- restore
        say("restore + catch-up")
        started = time.perf_counter()
        restored = await broker.call("itemAggregate.restore", {"snapshotID": snapshot_id})
        restore_call_s = time.perf_counter() - started
        restore_pause_ms = runtime.maintenance.last_pause_ms or 0.0
        caught = await runtime.wait_caught_up(head)
        restore_total_s = time.perf_counter() - started
        catch_up_s = restore_total_s - restore_call_s
        assert caught >= head
        behind = head - int(restored["checkpoint"])
        assert await count(broker) == rows_total + since, "the catch-up missed rows"
        record("restore: call wall time", fmt_seconds(restore_call_s))
        record("restore: projector paused", f"{restore_pause_ms:,.1f} ms (last_pause_ms)")
        record(
            "restore: catch-up",
            f"{behind:,} events in {fmt_seconds(catch_up_s)} "
            f"({fmt_rate(behind / catch_up_s)}, batch_size {args.batch_size})",
        )
        record("restore: total (restore + catch-up)", fmt_seconds(restore_total_s))

        # ---------------------------------------------------------------- replay
        say("replay over the whole log")
        maintenance = runtime.maintenance
        # For a split by shape: the first replay.progress event past the load events. Its
        # own figures (position / events_per_second = seconds since the replay began) date it,
        # however late the broadcast arrives.
        boundary: list[dict[str, Any]] = []

        def progress(payload: dict[str, Any]) -> None:
            running = payload.get("state") == "running"
            if not boundary and running and int(payload.get("done", 0)) >= load_events:
                boundary.append(payload)

        progress_listeners.append(progress)
        with Stopwatch() as replay_sw:
            done = await broker.call("itemAggregate.replay", {"wait": True})
        replay_pause_ms = maintenance.last_pause_ms or 0.0
        assert done["state"] == "done", done
        assert await count(broker) == rows_total + since
        events_replayed = int(done["done"])
        rows_replayed = rows_total + since
        record(
            "replay: wall time",
            f"{fmt_seconds(replay_sw.seconds)} for {events_replayed:,} log positions "
            f"({load_events:,} x {per_event:,}-row + {since:,} x 1-row events)",
        )
        record(
            "replay: throughput",
            f"{fmt_rate(events_replayed / replay_sw.seconds)} events, "
            f"{fmt_rate(rows_replayed / replay_sw.seconds)} rows "
            f"(replay's own figure: {fmt_rate(float(done['events_per_second']))} events)",
        )
        if boundary and boundary[0]["events_per_second"]:
            first_events = int(boundary[0]["done"])
            first = first_events / float(boundary[0]["events_per_second"])
            small = max(0, first_events - load_events - 1)  # one-row events in those batches
            first_rows = rows_total + small
            rest_events = events_replayed - first_events
            rest = replay_sw.seconds - first
            mixed = f" + {small:,} one-row events" if small else ""
            record(
                f"replay: positions 1-{first_events:,}",
                f"{fmt_seconds(first)} ({load_events:,} load events{mixed}: "
                f"{fmt_rate(first_rows / first)} rows, {fmt_rate(first_events / first)} events)",
            )
            record(
                f"replay: the {rest_events:,} positions after",
                f"{fmt_seconds(rest)} ({fmt_rate(rest_events / rest)} events; includes the swap)",
            )
        record("replay: projector paused for the swap", f"{replay_pause_ms:,.1f} ms")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument("--rows", type=int, default=1_000_000, help="aggregate rows to build")
    parser.add_argument(
        "--rows-per-event", type=int, default=1000, help="rows each load event creates"
    )
    parser.add_argument(
        "--since", type=int, default=100_000, help="one-row events stored after the snapshot"
    )
    parser.add_argument(
        "--batch-size", type=int, default=100, help="the aggregate's projector batch_size"
    )
    parser.add_argument(
        "--dispatch",
        action="store_true",
        help="keep the event store's dispatcher running (default: stopped, nothing subscribes)",
    )
    args = parser.parse_args()
    with open_backend(args.backend, "snapshots") as backend, Stopwatch() as whole:
        measured = Environment(backend)
        figures = asyncio.run(run(args, backend))
        env = measured.lines(backend)
    shape = (
        f"{args.rows:,} rows built from {-(-args.rows // args.rows_per_event):,} events of "
        f"{args.rows_per_event:,} rows (create_many); {args.since:,} one-row events "
        "(create) after the snapshot; dispatcher " + ("running" if args.dispatch else "stopped")
    )
    flags = " --dispatch" if args.dispatch else ""
    print(
        f"benchmarks/snapshots.py --backend {args.backend} --rows {args.rows} "
        f"--rows-per-event {args.rows_per_event} --since {args.since} "
        f"--batch-size {args.batch_size}{flags}"
    )
    print(f"shape       {shape}")
    for line in env:
        print(line)
    print()
    for line in table(["figure", "value"], figures, numeric=False):
        print(line)
    removed = not backend.workdir.exists()
    print(f"\n(whole run {fmt_seconds(whole.seconds)}; temp files removed: {removed})")


if __name__ == "__main__":
    main()
