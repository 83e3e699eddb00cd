"""Keyed appends against plain ones (or into a large log against an empty one), paired in one
process: short windows of each taken in a random order per pair, on the same broker and store.

    .venv/bin/python benchmarks/paired.py sqlite|postgres keys|large [--callers 1,64]
        [--pairs 20] [--window 0.5] [--log 1000000]

``benchmarks/run`` runs each scenario once or twice in a process of its own, seconds apart: on
a shared machine the load moves more between two such runs than a 10 % difference. Here each
pair is measured within a second, so the median of the per-pair ratios holds still (the load
is printed with it). ``keys``: ``profile.update`` with an idempotency key per call against
without, one event store. ``large``: keyed appends into a log filled with ``--log`` keyed events
(a bulk fill, not timed) against an empty log, two brokers in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from benchmarks import bench_ours as ours
from moleculerpy_cqrs import stores
from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.testing.brokers import running_broker

Window = tuple[str, Callable[[int], Awaitable[object]]]


async def measure(
    factories: list[StoreFactory], mode: str, callers: int, pairs: int, window: float
) -> dict[str, list[float]]:
    """Events/s of each window, by kind (the first kind is the reference)."""
    numbers = iter(range(1, 1 << 62))
    async with contextlib.AsyncExitStack() as stack:
        brokers = [
            await stack.enter_async_context(
                running_broker(ours.appends_service(f), request_timeout=60)
            )
            for f in factories
        ]
        first, second = brokers[0], brokers[-1]
        kinds: list[Window] = (
            [
                ("plain", lambda _: ours.update(first, next(numbers))),
                ("keyed", lambda _: ours.update_keyed(first, next(numbers), "k")),
            ]
            if mode == "keys"
            else [
                ("empty", lambda _: ours.update_keyed(first, next(numbers), "e")),
                ("large", lambda _: ours.update_keyed(second, next(numbers), "l")),
            ]
        )
        for _, call in kinds:  # warm up
            await ours.call_for(callers, window, call)
        rates: dict[str, list[float]] = {name: [] for name, _ in kinds}
        order = random.Random(7)
        for _ in range(pairs):
            turn = list(kinds)
            order.shuffle(turn)  # a random order per pair: nothing periodic lines up with one kind
            for name, call in turn:
                rates[name].append((await ours.call_for(callers, window, call)).per_second)
        return rates


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=("sqlite", "postgres"))
    parser.add_argument("mode", choices=("keys", "large"))
    parser.add_argument("--callers", default="1,64")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--log", type=int, default=1_000_000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.backend == "sqlite":

            def fresh() -> StoreFactory:
                return stores.sqlite(tempfile.mkdtemp(prefix="cqrs-paired-"))

        else:
            from moleculerpy_cqrs.testing.postgres_server import PostgresServer, isolated_schema

            dsn = stack.enter_context(PostgresServer()).dsn

            def fresh() -> StoreFactory:
                return stores.postgres(dsn, schema=stack.enter_context(isolated_schema(dsn, "p")))

        print(f"{args.backend} {args.mode} {time.strftime('%H:%M:%S')} load {load()}", flush=True)
        factories = [fresh()]
        if args.mode == "large":
            filled = asyncio.run(ours.prefill_keyed(factories[0], args.log))
            print(f"filled {filled['events']:,} keyed events in {filled['fill_seconds']:.0f} s")
            factories = [fresh(), factories[0]]
        for callers in (int(c) for c in args.callers.split(",")):
            rates = asyncio.run(measure(factories, args.mode, callers, args.pairs, args.window))
            (a, ra), (b, rb) = rates.items()
            ratios = [y / x for x, y in zip(ra, rb, strict=True)]
            print(f"{callers} caller(s), load {load()}:")
            for name, values in rates.items():
                print(f"  {name}: median {statistics.median(values):,.0f}/s")
            print(
                f"  {b}/{a}: median of {len(ratios)} pairs {statistics.median(ratios):.3f}, "
                f"ratio of sums {sum(rb) / sum(ra):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
