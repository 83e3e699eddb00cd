"""Crash safety of maintenance: SIGKILL during a snapshot, a restore and a replay.

A node (``maintenance_node``) runs one kind of operation again and again under load and is
killed with SIGKILL, either at a random moment of one operation (its measured length and a
bit more) or exactly at a chosen point inside it (it hangs there until killed). After all
the kills a node starts in this process and must find:

1. the aggregate equal to a recomputation from the whole log (rows, their ``eventId``, the
   counters, dead letters: each event exactly once);
2. its checkpoint at the head of the log once caught up;
3. no interrupted snapshot listed "completed" (it is "created", then "failed", and restoring it is
   refused), and every "completed" snapshot restorable, with a consistent aggregate after;
4. nothing of an interrupted replay's or restore's shadow table in the reads (also after a
   new replay, which must clear it rather than build on it).

SQLite and PostgreSQL only: the memory store does not outlive a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from moleculerpy import ServiceBroker

from moleculerpy_cqrs import Conflict
from moleculerpy_cqrs.core.records import AGGREGATE_FIELDS, EventType
from moleculerpy_cqrs.stores import with_fields
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.postgres_server import isolated_schema
from tests.core.maintenance_node import (
    AGGREGATE,
    EVENT,
    EVENT_STORE,
    FIELDS,
    ROWS_PER_EVENT,
    Node,
    build,
    store_for,
)

ROOT: Final = Path(__file__).resolve().parents[2]
FILL: Final = 1000  # events in the log before the first kill (four rows each)
RANDOM_KILLS: Final = 5  # per operation and backend
# Exact points, in this order (the last one leaves a whole shadow table behind).
PHASE_KILLS: Final[list[tuple[str, str, dict[str, Any]]]] = [
    ("snapshot", "before-backup", {}),
    ("snapshot", "between-backups", {}),
    ("snapshot", "before-settle", {}),
    ("restore", "between-restores", {}),
    ("replay", "mid-swap", {"lagging": True}),
    ("replay", "before-swap", {"lagging": True}),
]
LINE_TIMEOUT: Final = 60.0


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


class ForkServer:
    """``python -m tests.core.maintenance_node``: forks one node per request."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self.node: int | None = None  # the pid of the node running, if any

    @classmethod
    @asynccontextmanager
    async def running(cls, log: Path) -> AsyncIterator[ForkServer]:
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.core.maintenance_node",
                cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, env={**os.environ, "PYTHONPATH": _pythonpath()},
            )  # fmt: skip
        server = cls(process, log)
        try:
            yield server
        finally:
            if server.node is not None:  # a check failed while it ran
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.node, signal.SIGKILL)
            assert process.stdin is not None
            process.stdin.close()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    def why(self) -> str:
        return "; the nodes' stderr ends with:\n" + self.log.read_text(errors="replace")[-6000:]

    async def line(self) -> str:
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(LINE_TIMEOUT):
                raw = await self.process.stdout.readline()
        except TimeoutError:
            if self.node is not None:  # ask it where it is stuck (it answers "dumped")
                os.kill(self.node, signal.SIGUSR1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while b"dumped" not in await self.process.stdout.readline():
                            pass
            raise AssertionError("a node said nothing for a minute" + self.why()) from None
        assert raw, "the fork server is gone" + self.why()
        line = raw.decode().rstrip("\n")
        if line.startswith("exit "):
            self.node = None
        return line

    async def start(self, params: dict[str, Any]) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(params).encode() + b"\n")
        await self.process.stdin.drain()
        line = await self.line()
        assert line.startswith("node "), line
        self.node = int(line.split()[1])
        return self.node

    async def until(self, prefix: str, seen: Seen) -> str:
        """Reads up to the first line that starts with ``prefix`` and answers it."""
        while not (line := await self.line()).startswith(prefix):
            assert not line.startswith("exit "), f"the node ended ({line})" + self.why()
            seen.note(line)
        return line

    async def killed(self, pid: int, seen: Seen) -> list[str]:
        """SIGKILL the node; answers what it printed before it died."""
        with contextlib.suppress(ProcessLookupError):  # it died by itself: "exit" tells how
            os.kill(pid, signal.SIGKILL)
        last: list[str] = []
        while not (line := await self.line()).startswith("exit "):
            seen.note(line)
            last.append(line)
        assert line == f"exit {-signal.SIGKILL}", line + self.why()
        return last


@dataclass
class Seen:
    """What the nodes said before they died."""

    done: set[str] = field(default_factory=set)  # snapshots answered (so: completed)
    interrupted: dict[str, str] = field(default_factory=dict)  # snapshot id -> phase
    durations: dict[str, list[float]] = field(default_factory=dict)
    inside: Counter[str] = field(default_factory=Counter)  # random kills inside an operation

    def note(self, line: str) -> None:
        if line.startswith("done snapshot "):
            self.done.add(line.split()[2])


async def fill(server: ForkServer, params: dict[str, Any], seen: Seen, count: int) -> None:
    await server.start({**params, "mode": "fill", "count": count})
    await server.until("filled", seen)
    assert await server.until("exit ", seen) == "exit 0"


async def kill_at_random(
    server: ForkServer, params: dict[str, Any], mode: str, rng: random.Random, seen: Seen
) -> None:
    """Kill the node at a random moment of one of its operations."""
    pid = await server.start({**params, "mode": mode})
    await server.until("ready", seen)
    durations = seen.durations.setdefault(mode, [])
    target = 1 if durations else 2  # the first node measures one operation first
    loop = asyncio.get_running_loop()
    started_at, started = 0.0, 0
    while True:
        line = await server.line()
        assert not line.startswith("exit "), f"the node ended ({line})" + server.why()
        seen.note(line)
        if line == f"started {mode}":
            started += 1
            started_at = loop.time()
            if started == target:
                break
        elif line.startswith(f"done {mode}") and started:
            durations.append(loop.time() - started_at)
    # The experiment itself: somewhere in the operation (or just after it).
    await asyncio.sleep(rng.uniform(0, 1.2 * statistics.median(durations)))
    last = await server.killed(pid, seen)
    seen.inside[mode] += not any(line.startswith(f"done {mode}") for line in last)


async def kill_at_phase(
    server: ForkServer, params: dict[str, Any], mode: str, phase: str, extra: dict[str, Any],
    seen: Seen,
) -> None:  # fmt: skip
    """Kill the node exactly at ``phase`` of its first operation."""
    pid = await server.start({**params, **extra, "mode": mode, "phase": phase})
    line = await server.until("phase ", seen)
    _, name, snapshot_id = line.split()
    assert name == phase
    await server.killed(pid, seen)
    if mode == "snapshot":
        seen.interrupted[snapshot_id] = phase


# ---------------------------------------------------------------------- the checks


async def read_log(broker: ServiceBroker) -> tuple[list[dict[str, Any]], int]:
    events: list[dict[str, Any]] = []
    after, head = 0, 0
    while True:
        page = await broker.call(f"{EVENT_STORE}.read", {"after": after, "limit": 5000})
        head = page["head"]
        if not page["events"]:
            return events, head
        events.extend(page["events"])
        after = page["events"][-1]["id"]


async def dead_letters(broker: ServiceBroker) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    page = 1
    while True:
        answer = await broker.call(f"{AGGREGATE}.deadLetters", {"page": page, "pageSize": 100})
        if not answer["rows"]:
            return rows
        rows.extend(answer["rows"])
        page += 1


def _differences(want: Counter[Any], got: Counter[Any]) -> str:
    missing, extra = want - got, got - want
    return (
        f"{sum(missing.values())} missing (e.g. {sorted(missing)[:3]}), "
        f"{sum(extra.values())} extra (e.g. {sorted(extra)[:3]})"
    )


async def assert_consistent(broker: ServiceBroker, when: str, *, cured: bool = False) -> None:
    """The aggregate equals a recomputation from the whole log, its checkpoint is the head."""
    events, head = await read_log(broker)
    items: Counter[tuple[Any, ...]] = Counter()
    counters: dict[int, tuple[int, int]] = {}
    poison: Counter[int] = Counter()
    for e in events:
        if e["eventType"] != EventType.COMMAND:
            continue
        assert e["event"] == EVENT
        p = e["payload"]
        if p.get("poison"):
            poison[e["id"]] += 1
        if cured or not p.get("poison"):
            for i in range(ROWS_PER_EVENT):
                items[(p["grp"], f"{p['nonce']}-{i}", i, e["id"])] += 1
        counters[p["grp"]] = (counters.get(p["grp"], (0, 0))[0] + 1, e["id"])

    rows = await broker.call(f"{AGGREGATE}.find", {})
    got_items = Counter(
        (r["grp"], r["name"], r["n"], r["eventId"]) for r in rows if r["kind"] == "item"
    )
    got_counters = sorted((r["grp"], r["n"], r["eventId"]) for r in rows if r["kind"] == "counter")
    assert {r["kind"] for r in rows} <= {"item", "counter"}, when
    assert got_items == items, f"{when}: item rows: {_differences(items, got_items)}"
    assert got_counters == sorted((g, n, last) for g, (n, last) in counters.items()), (
        f"{when}: counters {got_counters}"
    )
    dead = Counter(d["eventId"] for d in await dead_letters(broker))
    want_dead = Counter() if cured else poison
    assert dead == want_dead, f"{when}: dead letters: {_differences(want_dead, dead)}"
    status = await broker.call(f"{AGGREGATE}.status", {})
    assert (status["checkpoint"], status["head"]) == (head, head), f"{when}: {status}"
    assert status["rows"] == len(rows) == await broker.call(f"{AGGREGATE}.count", {}), when


async def caught_up(broker: ServiceBroker, node: Node) -> None:
    await asyncio.wait_for(node.aggregate.runtime(broker).wait_caught_up(), 120)


async def shadow_rows(location: str, backend: str) -> int:
    """Rows in the replay's shadow table (a sibling of the aggregate's table)."""
    factory = with_fields(store_for(backend, location), FIELDS)
    async with factory(AGGREGATE, dict(AGGREGATE_FIELDS), {}) as live:
        shadow = live.sibling(f"{AGGREGATE}__shadow", live.fields)
        await shadow.connect()
        return await shadow.count()


async def check(backend: str, location: str, backups: Path, seen: Seen) -> None:
    assert await shadow_rows(location, backend) > 0, "the interrupted replay left no shadow"
    node = build(store_for(backend, location), backups)
    async with running_broker(node.service()) as broker:
        await caught_up(broker, node)
        await assert_consistent(broker, "after the kills")

        listed = await broker.call(f"{AGGREGATE}.snapshots", {})
        status = {s["snapshotId"]: s["status"] for s in listed}
        # An interrupted snapshot is "created" until its heartbeat expires, then "failed".
        failed = [s for s in listed if s["status"] == "failed"]
        assert all("interrupted" in s["error"] for s in failed), failed
        for snapshot_id, phase in seen.interrupted.items():
            assert status.get(snapshot_id) in ("created", "failed"), (
                f"the snapshot killed {phase} is listed {status.get(snapshot_id)!r}"
            )
        assert seen.done <= {s for s, st in status.items() if st == "completed"}
        for snapshot_id, st in status.items():
            if st in ("created", "failed"):
                with pytest.raises(Conflict, match=r"never completed|interrupted"):
                    await broker.call(f"{AGGREGATE}.restore", {"snapshotID": snapshot_id})

        completed = [s for s in listed if s["status"] == "completed"]
        assert completed
        for snapshot in completed:  # every one can be restored, as it was taken
            try:
                answer = await broker.call(
                    f"{AGGREGATE}.restore", {"snapshotID": snapshot["snapshotId"]}
                )
            except Exception as error:
                raise AssertionError(f"a completed snapshot cannot be restored: {error}") from None
            assert answer["checkpoint"] == snapshot["checkpoint"], (answer, snapshot)
        await caught_up(broker, node)
        await assert_consistent(broker, "after restoring every completed snapshot")
        await broker.call(f"{AGGREGATE}.restore", {"snapshotID": completed[0]["snapshotId"]})
        await caught_up(broker, node)
        await assert_consistent(broker, "after restoring the oldest snapshot")

        await broker.call(f"{AGGREGATE}.replay", {"wait": True})
        await assert_consistent(broker, "after a replay over the interrupted one's shadow")

        node.cure.applied = True
        retried = await broker.call(f"{AGGREGATE}.retryDeadLetters", {})
        assert (retried["failed"], retried["remaining"]) == ([], 0), retried
        await assert_consistent(broker, "after retrying the dead letters", cured=True)


# ---------------------------------------------------------------------- the tests


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def location(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "data")
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    with isolated_schema(dsn) as schema:
        yield f"{dsn}|{schema}"


@pytest.mark.slow
async def test_kill_9_during_snapshot_restore_and_replay(
    backend: str, location: str, tmp_path: Path
) -> None:
    params = {"backend": backend, "location": location, "backups": str(tmp_path / "backups")}
    rng = random.Random(20261127)
    seen = Seen()
    runs = [mode for mode in ("snapshot", "restore", "replay") for _ in range(RANDOM_KILLS)]
    rng.shuffle(runs)
    async with ForkServer.running(tmp_path / "nodes.log") as server:
        await fill(server, {**params, "seed": 0}, seen, FILL)
        for seed, mode in enumerate(runs, start=1):
            await kill_at_random(server, {**params, "seed": seed}, mode, rng, seen)
        for seed, (mode, phase, extra) in enumerate(PHASE_KILLS, start=len(runs) + 1):
            await kill_at_phase(server, {**params, "seed": seed}, mode, phase, extra, seen)
    for mode in ("snapshot", "restore", "replay"):
        assert seen.inside[mode] >= 1, f"no kill landed inside a {mode}: {seen.durations}"
    assert set(seen.interrupted.values()) == {"before-backup", "between-backups", "before-settle"}
    await check(backend, location, tmp_path / "backups", seen)


@pytest.mark.slow
async def test_kill_9_between_restoring_the_aggregate_and_its_dead_letters(
    backend: str, location: str, tmp_path: Path
) -> None:
    params = {"backend": backend, "location": location, "backups": str(tmp_path / "backups")}
    seen = Seen()
    async with ForkServer.running(tmp_path / "nodes.log") as server:
        await fill(server, {**params, "seed": 0}, seen, 100)
        extra = {"late_poison": True}  # a dead letter past the snapshot's checkpoint
        await kill_at_phase(
            server, {**params, "seed": 1}, "restore", "between-restores", extra, seen
        )
    node = build(store_for(backend, location), tmp_path / "backups")
    async with running_broker(node.service()) as broker:
        await caught_up(broker, node)
        await assert_consistent(broker, "after the kill")
        node.cure.applied = True
        await broker.call(f"{AGGREGATE}.retryDeadLetters", {})
        await assert_consistent(broker, "after retrying the dead letters", cured=True)


@pytest.mark.slow
async def test_kill_9_during_a_version_bump_rebuild(
    backend: str, location: str, tmp_path: Path
) -> None:
    """Nodes of ever newer aggregate versions (each rebuilds the table as it starts, under
    load) are killed at random moments of the rebuild and in its swap: the table is the old
    version's or the new one's, whole, and a later node rebuilds from the start."""
    params = {"backend": backend, "location": location, "backups": str(tmp_path / "backups")}
    rng = random.Random(20261202)
    seen = Seen()
    version = 1
    durations: list[float] = []
    inside = 0
    async with ForkServer.running(tmp_path / "nodes.log") as server:
        await fill(server, {**params, "seed": 0}, seen, FILL)
        loop = asyncio.get_running_loop()
        for seed in range(1, 5):
            version += 1
            pid = await server.start({**params, "seed": seed, "mode": "bump", "version": version})
            await server.until("started bump", seen)
            started = loop.time()
            if not durations:  # the first one measures a whole rebuild
                await server.until("done bump", seen)
                durations.append(loop.time() - started)
                await server.killed(pid, seen)
                continue
            await asyncio.sleep(rng.uniform(0, 1.1 * statistics.median(durations)))
            last = await server.killed(pid, seen)
            inside += "done bump" not in last
        for seed, phase in enumerate(("before-swap", "mid-swap"), start=10):
            version += 1
            await server.start(
                {**params, "seed": seed, "mode": "bump", "version": version, "phase": phase}
            )
            await server.until(f"phase {phase}", seen)
            assert server.node is not None
            await server.killed(server.node, seen)
    assert inside >= 1, f"no kill landed inside a rebuild: {durations}"
    assert await shadow_rows(location, backend) > 0, "the killed swaps left no shadow"
    # The version killed in its swap again: the table must still be the older one's, so it
    # rebuilds (its counters are named by the version that created them).
    node = build(store_for(backend, location), tmp_path / "backups", version)
    async with running_broker(node.service()) as broker:
        await caught_up(broker, node)
        await assert_consistent(broker, f"after the kills, rebuilt as version {version}")
        status = await broker.call(f"{AGGREGATE}.status", {})
        assert (status["tableVersion"], status["state"]) == (version, "running"), status
        counters = await broker.call(f"{AGGREGATE}.find", {"query": {"kind": "counter"}})
        assert {c["name"].rsplit(" ", 1)[1] for c in counters} == {f"v{version}"}
