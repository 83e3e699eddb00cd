"""Helpers shared by the benchmarks: backends, timing, concurrent callers, printing.

Not a test framework: each benchmark is a plain script that prints its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Final

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.stores import StoreFactory

BACKENDS: Final = ("sqlite", "postgres", "memory")
REQUEST_TIMEOUT: Final = 3600.0  # seconds: a 1M-row snapshot or replay is one broker call


class Backend:
    """One database server (or file folder) for a benchmark run, and a scratch folder.

    ``store`` is the store factory of the first database; ``fresh()`` answers the factory of
    another, empty one on the same backend (a new folder, schema or memory database).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        detail: str,
        make: Callable[[str], StoreFactory],
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.detail = detail
        self._make = make
        self._count = 0
        self.store = self.fresh()

    def fresh(self) -> StoreFactory:
        self._count += 1
        return self._make(f"db{self._count}")


@contextlib.contextmanager
def open_backend(name: str, prefix: str) -> Iterator[Backend]:
    """A backend (SQLite files, a PostgreSQL server, or memory) and a temporary folder;
    everything is removed on the way out."""
    if name not in BACKENDS:
        raise SystemExit(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    workdir = Path(tempfile.mkdtemp(prefix=f"cqrs-bench-{prefix}-"))
    try:
        if name == "sqlite":
            yield Backend(
                name,
                workdir,
                f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL, "
                f"one file per store, in {workdir}",
                lambda db: stores.sqlite(workdir / db),
            )
        elif name == "memory":
            yield Backend(
                name, workdir, "memory (the reference backend)", lambda db: stores.memory()
            )
        else:
            with _postgres_backend(workdir) as backend:
                yield backend
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _postgres_backend(workdir: Path) -> Iterator[Backend]:
    import psycopg

    from moleculerpy_cqrs.testing.postgres_server import PostgresServer, isolated_schema

    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("CQRS_TEST_POSTGRES_DSN")
        where = "CQRS_TEST_POSTGRES_DSN"
        if not dsn:
            dsn = stack.enter_context(PostgresServer()).dsn
            where = "a private server (PostgresServer: unix socket, fsync on)"
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        server_version = row[0] if row else "?"
        server_dsn = dsn

        def make(db: str) -> StoreFactory:
            schema = stack.enter_context(isolated_schema(server_dsn, f"bench_{db}"))
            return stores.postgres(server_dsn, schema=schema)

        yield Backend(
            "postgres",
            workdir,
            f"PostgreSQL {server_version} on {where}, a schema per database",
            make,
        )


def fsync_latency(folder: Path, count: int = 200) -> tuple[float, float]:
    """p50 and p99 seconds of a 4 KiB write + fsync in ``folder`` (what a commit waits for)."""
    path = folder / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(times, 50), percentile(times, 99)


class Environment:
    """Measured before a run: the load average and the disk's fsync latency."""

    def __init__(self, backend: Backend) -> None:
        self.load_before = os.getloadavg()
        self.fsync = fsync_latency(backend.workdir)

    def lines(self, backend: Backend) -> list[str]:
        return environment(backend, self.load_before, self.fsync)


def environment(
    backend: Backend, load_before: tuple[float, float, float], fsync: tuple[float, float]
) -> list[str]:
    """Lines describing where the figures come from (and whether the machine was busy)."""
    load_after = os.getloadavg()
    return [
        f"backend     {backend.detail}",
        f"python      {platform.python_implementation()} {sys.version.split()[0]}, "
        f"moleculerpy {version('moleculerpy')}, moleculerpy-cqrs {version('moleculerpy-cqrs')}",
        f"machine     {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"{platform.machine()}",
        f"disk fsync  p50 {fsync[0] * 1000:.2f} ms, p99 {fsync[1] * 1000:.2f} ms "
        "(4 KiB write + fsync in the temp folder, before the run)",
        f"peak RSS    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB",
        f"load avg    {_load(load_before)} before, {_load(load_after)} after "
        "(1/5/15 min; above the core count means other work shared the CPU)",
    ]


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


@dataclass
class CallStats:
    """``count`` calls made by ``callers`` concurrent callers in ``seconds``."""

    callers: int
    count: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def call_concurrently(
    callers: int, count: int, call: Callable[[int], Awaitable[object]]
) -> CallStats:
    """Make ``count`` calls ``call(i)`` (i = 0..count-1) from ``callers`` concurrent loops,
    each call waiting for the previous one of its loop; records every call's latency."""
    latencies: list[float] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - started)

    with Stopwatch() as sw:
        await asyncio.gather(*(caller() for _ in range(min(callers, count))))
    return CallStats(callers, count, sw.seconds, latencies)


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: bool = True
) -> list[str]:
    """A plain text table: the first column left-aligned, the others right-aligned when
    ``numeric``, else left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 or not numeric else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [line(header), rule, *(line(r) for r in rows)]


def fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def fmt_rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s"


def fmt_bytes(size: int) -> str:
    return f"{size:,} B ({size / 1_048_576:.1f} MiB)"


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
