"""Crash safety of retried commands: SIGKILL a node while it commits, under callers that
retry with the same idempotency key until answered (SQLite and PostgreSQL).

Every command must be answered, stored exactly once, and every answer must name the event
stored for it, however many answers the kills lost after their commands were committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moleculerpy_cqrs.face.demo import random_profile
from moleculerpy_cqrs.testing.brokers import running_broker
from moleculerpy_cqrs.testing.postgres_server import isolated_schema

COMMANDS = 1200
KILLS = 5
ROOT = Path(__file__).resolve().parents[2]


async def _life(
    backend: str, location: str, pending: dict[str, Any], tmp: Path, kill_after: int | None
) -> tuple[dict[str, int], bool]:
    """One life of the node, killed once it has answered ``kill_after`` commands (64 are in
    flight then): the answers ``key -> id`` it printed, and whether it was killed."""
    commands = tmp / "pending.json"
    commands.write_text(json.dumps(list(pending.items())))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.core.retry_node", backend, location, str(commands),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while (line := await process.stdout.readline()) != b"ready\n":
            assert line, "the node died before it was ready"
    answers: dict[str, int] = {}
    finished = asyncio.Event()
    enough = asyncio.Event()

    async def read_answers() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            if raw.startswith(b"ack "):
                key, event_id = raw[4:].decode().split()
                answers[key] = int(event_id)
                if kill_after is not None and len(answers) >= kill_after:
                    enough.set()
            elif raw == b"done\n":
                finished.set()

    reader = asyncio.create_task(read_answers())
    killed = False
    if kill_after is not None:
        async with asyncio.timeout(60):
            await asyncio.wait(
                [asyncio.create_task(finished.wait()), asyncio.create_task(enough.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        if not finished.is_set():
            process.send_signal(signal.SIGKILL)
            killed = True
    async with asyncio.timeout(120):
        if not killed:
            await finished.wait()
            process.send_signal(signal.SIGTERM)
        await process.wait()
        await reader
    return answers, killed


async def _stored(backend: str, location: str) -> list[dict[str, Any]]:
    from moleculerpy_cqrs.examples import profile
    from tests.core.crash_node import store_for

    *_, service = profile.build(store_for(backend, location), batch_size=50)
    events: list[dict[str, Any]] = []
    async with running_broker(service()) as broker:
        after = 0
        while batch := (
            await broker.call("profileEventStore.read", {"after": after, "limit": 5000})
        )["events"]:
            events.extend(batch)
            after = batch[-1]["id"]
    return events


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_callers_retrying_with_keys_through_kills_store_each_command_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        location = str(tmp_path / "data")
        schema_cm = None
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        schema_cm = isolated_schema(dsn)
        location = f"{dsn}|{schema_cm.__enter__()}"
    try:
        rng = random.Random(20261202)
        commands = {f"cmd-{i}": {**random_profile(rng), "nonce": f"n{i}"} for i in range(COMMANDS)}
        answers: dict[str, int] = {}
        kills = 0
        for life in range(KILLS + 1):
            pending = {k: v for k, v in commands.items() if k not in answers}
            if not pending:
                break
            kill_after = rng.randint(20, 400) if life < KILLS else None
            got, killed = await _life(backend, location, pending, tmp_path, kill_after)
            kills += killed
            answers.update(got)
        events = await _stored(backend, location)
    finally:
        if schema_cm is not None:
            schema_cm.__exit__(None, None, None)
    assert kills == KILLS, "the node was hardly killed: the test tested little"
    assert sorted(answers) == sorted(commands), "a command was never answered"
    nonces = Counter(e["payload"]["nonce"] for e in events)
    assert not [n for n, c in nonces.items() if c > 1], "a command is stored twice"
    assert len(events) == COMMANDS
    stored_id = {e["idempotencyKey"]: e["id"] for e in events}
    assert answers == stored_id, "an answer names another event than the one stored"
    by_key = {e["idempotencyKey"]: e["payload"]["nonce"] for e in events}
    assert all(by_key[k] == commands[k]["nonce"] for k in commands)
