"""``cqrs demo``: the profile example on SQLite files, fed a stream of profile updates."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.face.runner import make_broker

COUNTRIES = {"NZ": 5, "AU": 8, "US": 20, "GB": 10, "DE": 9, "BR": 12, "IN": 25, "JP": 11}
FIRST = ["Aroha", "Liam", "Mei", "Noah", "Priya", "Kai", "Sofia", "Tane", "Yuki", "Lucas"]
LAST = ["Ngata", "Smith", "Chen", "Silva", "Patel", "Müller", "Tanaka", "Brown", "Kaur"]


def random_profile(rng: random.Random) -> dict[str, Any]:
    age = rng.randint(16, 80)
    return {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": age,
        "country": rng.choices(list(COUNTRIES), weights=list(COUNTRIES.values()))[0],
        "married": age > 22 and rng.random() < 0.5,
        "student": age < 30 and rng.random() < 0.6,
    }


def _console() -> Console:
    # Piped, rich would wrap at 80 columns, in the middle of the summary's sentence.
    return Console() if sys.stdout.isatty() else Console(width=200, highlight=False)


async def run_demo(data: Path, count: int, concurrency: int, seed: int | None) -> None:
    """Feed ``count`` random profile updates (``concurrency`` at a time) to the profile example
    on SQLite files in ``data`` (snapshots in ``data/backups``), then show the summary."""
    if count < 1 or concurrency < 1:
        raise ConfigurationError("the demo sends at least 1 update, at least 1 at a time")
    console = _console()
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    _, summary, service_class = profile.build(stores.sqlite(data), backups=data / "backups")
    broker = make_broker("cqrs-demo", "memory://")
    await broker.register(service_class())
    await broker.start()
    try:
        before = await broker.call("profileEventStore.status", {})
        if before["head"]:
            console.print(
                f"[bold]Continuing[/]: {before['head']} events already stored in {data}/",
                soft_wrap=True,
            )
        rng = random.Random(seed)
        queue = [random_profile(rng) for _ in range(count)]
        started = time.perf_counter()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            sent = progress.add_task("profile.update", total=count)
            applied = progress.add_task("summary projected", total=count)

            async def sender() -> None:
                while queue:
                    await broker.call("profile.update", queue.pop())
                    progress.advance(sent)

            projector = summary.runtime(broker).projector
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            head = (await broker.call("profileEventStore.status", {}))["head"]
            while projector is None:
                await asyncio.sleep(0.05)
                projector = summary.runtime(broker).projector
            base = before["head"]
            while projector.checkpoint < head:
                progress.update(applied, completed=max(projector.checkpoint - base, 0))
                await asyncio.wait_for(
                    projector.wait_until(min(head, projector.checkpoint + 200)), 60
                )
            progress.update(applied, completed=count)
        elapsed = time.perf_counter() - started
        rows = await broker.call("profileSummaryAggregate.find", {"sort": "-total"})
        table = Table(title="profileSummaryAggregate")
        for column in ("country", "total", "totalMarried", "totalStudents"):
            table.add_column(column, justify="right" if column != "country" else "left")
        for row in rows:
            table.add_row(row["country"], str(row["total"]), str(row["totalMarried"]),
                          str(row["totalStudents"]))  # fmt: skip
        console.print(table)
        status = await broker.call("profileSummaryAggregate.status", {})
        console.print(
            f"{count} updates stored and projected in {elapsed:.2f}s "
            f"({count / elapsed:,.0f}/s); log head {status['head']}, "
            f"checkpoint {status['checkpoint']}, dead letters {status['deadLetters']}.",
            soft_wrap=True,
        )
    finally:
        await broker.stop()
