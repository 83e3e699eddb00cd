"""Crash safety: SIGKILL at random moments under load, then restart (invariants 2 and 3).

Every acknowledged command must be in the log exactly once, and the aggregate must equal a
fresh recomputation from the log, however often the node died mid-batch.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.examples import profile
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.postgres_server import isolated_schema

KILLS = 20
ROOT = Path(__file__).resolve().parents[2]


async def _run_and_kill(
    backend: str, location: str, seed: int, rng: random.Random, *, keyed: bool = False
) -> set[str]:
    """Start a node, let it take load for a random moment, SIGKILL it; answers the acks."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.core.crash_node", backend, location, str(seed),
        *(["keyed"] if keyed else []),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.stdout is not None
    acked: set[str] = set()
    async with asyncio.timeout(60):
        while (line := await process.stdout.readline()) != b"ready\n":
            assert line, "the node died before it was ready"

    async def read_acks() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            if raw.startswith(b"ack "):
                acked.add(raw[4:].strip().decode())

    reader = asyncio.create_task(read_acks())
    await asyncio.sleep(rng.uniform(0.05, 0.6))  # the random moment of the crash
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await reader  # everything the node printed before it died
    return acked


async def read(broker: Any, after: int) -> dict[str, Any]:
    answer: dict[str, Any] = await broker.call(
        "profileEventStore.read", {"after": after, "limit": 5000}
    )
    return answer


def _summary_from(events: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    total: Counter[str] = Counter()
    married: Counter[str] = Counter()
    students: Counter[str] = Counter()
    for e in events:
        p = e["payload"]
        total[p["country"]] += 1
        married[p["country"]] += bool(p.get("married"))
        students[p["country"]] += bool(p.get("student"))
    return {c: (total[c], married[c], students[c]) for c in total}


async def _check(backend: str, location: str, acked: set[str]) -> int:
    store = (
        stores.sqlite(location)
        if backend == "sqlite"
        else stores.postgres(location.split("|")[0], schema=location.split("|")[1])
    )
    _, summary, service = profile.build(store, batch_size=50)
    async with running_broker(service()) as broker:
        await asyncio.wait_for(summary.runtime(broker).wait_caught_up(), 120)
        events: list[dict[str, Any]] = []
        after = 0
        while batch := (await read(broker, after))["events"]:
            events.extend(batch)
            after = batch[-1]["id"]
        rows = await broker.call("profileSummaryAggregate.find", {})
    nonces = Counter(e["payload"]["nonce"] for e in events)
    assert not [n for n in acked if nonces[n] != 1], "an acknowledged command is lost"
    assert not [n for n, c in nonces.items() if c > 1], "a command is stored twice"
    got = {r["country"]: (r["total"], r["totalMarried"], r["totalStudents"]) for r in rows}
    assert got == _summary_from(events)
    return len(events)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "keyed"), [("sqlite", False), ("postgres", False), ("sqlite", True)]
)
async def test_sigkill_under_load_loses_and_doubles_nothing(
    backend: str, keyed: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``keyed``: 64 writers, and the summary's transformations run concurrently by country
    (the batch engine's concurrent path)."""
    if backend == "sqlite":
        location = str(tmp_path / "data")
        schema_cm = None
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema_cm = isolated_schema(dsn)
        location = f"{dsn}|{schema_cm.__enter__()}"
    try:
        rng = random.Random(20261126)
        acked: set[str] = set()
        for kill in range(KILLS):
            acked |= await _run_and_kill(backend, location, kill, rng, keyed=keyed)
        stored = await _check(backend, location, acked)
    finally:
        if schema_cm is not None:
            schema_cm.__exit__(None, None, None)
    assert len(acked) > KILLS * 10, "the node took too little load to test anything"
    assert stored >= len(acked)
