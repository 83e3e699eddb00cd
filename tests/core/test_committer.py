"""The group committer: concurrent appends share a commit; a bad row fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from moleculerpy_cqrs.core.committer import GroupCommitter
from moleculerpy_cqrs.errors import StoreError
from moleculerpy_cqrs.stores import sqlite as sqlite_store
from moleculerpy_cqrs.stores.backends.sqlite import SqliteAdapter
from moleculerpy_cqrs.stores.fields import Record


async def _log(tmp_path: Path) -> SqliteAdapter:
    log = sqlite_store(tmp_path)("log", {"event": "string"})
    assert isinstance(log, SqliteAdapter)
    await log.connect()
    return log


async def test_concurrent_appends_share_one_commit(tmp_path: Path) -> None:
    log = await _log(tmp_path)
    committed: list[Record] = []
    committer = GroupCommitter(log, committed.extend)
    try:
        rows = [log.check_row({"event": str(i)}) for i in range(50)]
        answers = await asyncio.gather(*(committer.append(r) for r in rows))
        assert [a["event"] for a in answers] == [str(i) for i in range(50)]
        assert [a["id"] for a in answers] == list(range(1, 51))
        assert (committer.batches, committer.appended) == (1, 50)
        assert committed == answers == await log.read_after(0, 100)
    finally:
        await log.close()


@pytest.mark.parametrize("callers", [1, 3, 64])
async def test_callers_in_waves_are_all_answered(tmp_path: Path, callers: int) -> None:
    # Each caller appends one row after another: its next row comes as soon as the last is
    # answered, before the writer that answered it has ended; no row may be left queued
    # without a writer.
    log = await _log(tmp_path)
    committer = GroupCommitter(log, lambda rows: None)

    async def caller(n: int) -> list[int]:
        return [
            (await committer.append(log.check_row({"event": f"{n}.{i}"})))["id"] for i in range(15)
        ]

    try:
        ids = await asyncio.wait_for(asyncio.gather(*(caller(n) for n in range(callers))), 60)
        assert sorted(i for mine in ids for i in mine) == list(range(1, callers * 15 + 1))
        assert all(mine == sorted(mine) for mine in ids)
        assert await log.head() == callers * 15
    finally:
        await log.close()


async def test_a_row_the_database_refuses_fails_alone(tmp_path: Path) -> None:
    log = await _log(tmp_path)
    # A real refusal by SQLite: a text longer than the connection's length limit.
    await log._db().writer.run(lambda c: c.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000), "log")
    committed: list[Record] = []
    committer = GroupCommitter(log, committed.extend)
    try:
        rows = [log.check_row({"event": "x" * (5000 if i == 3 else i + 1)}) for i in range(8)]
        answers = await asyncio.gather(*(committer.append(r) for r in rows), return_exceptions=True)
        refused = answers.pop(3)
        assert isinstance(refused, StoreError)
        assert "too big" in str(refused)
        assert [a["event"] for a in answers if isinstance(a, dict)] == [
            "x" * (i + 1) for i in range(8) if i != 3
        ]
        stored = await log.read_after(0, 100)
        assert stored == committed == answers
        assert [r["id"] for r in stored] == sorted(r["id"] for r in stored)
    finally:
        await log.close()
