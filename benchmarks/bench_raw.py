"""The raw drivers' side of ``benchmarks/run``: ``sqlite3`` and psycopg doing the same jobs by
hand, the physical limit the toolkit is measured against.

SQLite: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``. PostgreSQL: the server's settings
(fsync on), one connection. Payloads are JSON text, as every subject stores them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from benchmarks._common import percentile

BATCH: Final = 1000  # events read per projection transaction
COUNTRIES: Final = tuple(f"C{n:02d}" for n in range(20))
Figures = dict[str, Any]


def payload(i: int) -> str:
    return json.dumps(
        {"name": f"p{i:08d}", "country": COUNTRIES[i % len(COUNTRIES)], "age": i % 90}
    )


class Db(Protocol):
    """What the jobs need of a connection: the two drivers differ in placeholders only."""

    mark: str

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    @contextmanager
    def transaction(self) -> Iterator[None]: ...
    def close(self) -> None: ...


class SqliteDb:
    mark = "?"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(folder / "raw.sqlite3", isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class PostgresDb:
    mark = "%s"

    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(f'SET search_path TO "{schema}"'.encode())

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(sql.encode(), params, prepare=True)
        return cur.fetchall() if cur.description else []

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.encode(), rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def open_db(store: dict[str, Any]) -> Db:
    if store["kind"] == "sqlite":
        return SqliteDb(Path(store["dir"]))
    return PostgresDb(store["dsn"], store["schema"])


def create_log(db: Db) -> None:
    key = "INTEGER PRIMARY KEY" if db.mark == "?" else "BIGSERIAL PRIMARY KEY"
    db.run(
        f"CREATE TABLE IF NOT EXISTS events (id {key}, event TEXT, payload TEXT, created BIGINT)"
    )


def appends(store: dict[str, Any], per_transaction: int, seconds: float) -> Figures:
    """INSERT + COMMIT of one event at a time, or ``per_transaction`` rows per transaction."""
    db = open_db(store)
    try:
        create_log(db)
        m = db.mark
        sql = f"INSERT INTO events (event, payload, created) VALUES ({m}, {m}, {m})"
        latencies: list[float] = []
        i = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            rows = [
                ("profile.updated", payload(i + k), time.time_ns()) for k in range(per_transaction)
            ]
            i += per_transaction
            t = time.perf_counter()
            with db.transaction():
                if per_transaction == 1:
                    db.run(sql, rows[0])
                else:
                    db.run_many(sql, rows)
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
    finally:
        db.close()
    return {
        "events": i,
        "seconds": elapsed,
        "per_second": i / elapsed,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def prefill(db: Db, count: int) -> None:
    create_log(db)
    m = db.mark
    sql = f"INSERT INTO events (event, payload, created) VALUES ({m}, {m}, {m})"
    for first in range(0, count, 10_000):
        rows = [
            ("profile.updated", payload(i), time.time_ns())
            for i in range(first, min(first + 10_000, count))
        ]
        with db.transaction():
            db.run_many(sql, rows)


def catch_up(store: dict[str, Any], shape: Literal["create", "summary"], count: int) -> Figures:
    """Read 1,000 events after the checkpoint, write their rows and the checkpoint in one
    transaction, repeat until the end of the log."""
    db = open_db(store)
    try:
        prefill(db, count)
        m = db.mark
        key = "INTEGER PRIMARY KEY" if m == "?" else "BIGSERIAL PRIMARY KEY"
        db.run(
            f"CREATE TABLE rows (id {key}, name TEXT, country TEXT, age INTEGER, event_id BIGINT)"
        )
        db.run(f"CREATE TABLE summary (id {key}, country TEXT, total INTEGER, event_id BIGINT)")
        db.run("CREATE INDEX summary_country ON summary (country)")
        db.run("CREATE TABLE checkpoint (name TEXT PRIMARY KEY, position BIGINT)")
        db.run("INSERT INTO checkpoint VALUES ('raw', 0)")
        started = time.perf_counter()
        position = 0
        applied = 0
        while True:
            events = db.run(
                f"SELECT id, payload FROM events WHERE id > {m} ORDER BY id LIMIT {BATCH}",
                (position,),
            )
            if not events:
                break
            with db.transaction():
                if shape == "create":
                    rows = []
                    for event_id, text in events:
                        p = json.loads(text)
                        rows.append((p["name"], p["country"], p["age"], event_id))
                    db.run_many(
                        f"INSERT INTO rows (name, country, age, event_id) "
                        f"VALUES ({m}, {m}, {m}, {m})",
                        rows,
                    )
                else:
                    for event_id, text in events:
                        country = json.loads(text)["country"]
                        found = db.run(
                            f"SELECT id, total FROM summary WHERE country = {m}", (country,)
                        )
                        if found:
                            db.run(
                                f"UPDATE summary SET total = {m}, event_id = {m} WHERE id = {m}",
                                (found[0][1] + 1, event_id, found[0][0]),
                            )
                        else:
                            db.run(
                                f"INSERT INTO summary (country, total, event_id) "
                                f"VALUES ({m}, 1, {m})",
                                (country, event_id),
                            )
                position = events[-1][0]
                db.run(f"UPDATE checkpoint SET position = {m} WHERE name = 'raw'", (position,))
            applied += len(events)
        elapsed = time.perf_counter() - started
        if shape == "create":
            correct = db.run("SELECT COUNT(*) FROM rows")[0][0] == count
        else:
            correct = db.run("SELECT SUM(total) FROM summary")[0][0] == count
    finally:
        db.close()
    return {
        "events": applied,
        "seconds": elapsed,
        "per_second": applied / elapsed,
        "complete": True,
        "correct": bool(correct),
    }


def account_id(n: int) -> str:
    return f"acc{n:09d}"


def deposits(rows: int, count: int) -> list[tuple[str, int]]:
    """The same deposits as ``bench_ours.deposits`` (same seed, same accounts)."""
    import random

    rng = random.Random(13)
    return [(account_id(rng.randrange(rows)), 1 + i % 7) for i in range(count)]


def per_entity(store: dict[str, Any], rows: int, events: int) -> Figures:
    """One row per account, ``CREATE INDEX`` on the account key; ``events`` deposits in the log.
    Timed: read 1,000 events after the checkpoint; per event ``SELECT`` the account by key and
    ``UPDATE`` its balance; the checkpoint; one transaction; until the end of the log."""
    db = open_db(store)
    try:
        create_log(db)
        m = db.mark
        key = "INTEGER PRIMARY KEY" if m == "?" else "BIGSERIAL PRIMARY KEY"
        db.run(f"CREATE TABLE accounts (id {key}, account_id TEXT, balance BIGINT)")
        db.run("CREATE INDEX accounts_account_id ON accounts (account_id)")
        db.run("CREATE TABLE checkpoint (name TEXT PRIMARY KEY, position BIGINT)")
        db.run("INSERT INTO checkpoint VALUES ('raw', 0)")
        for first in range(0, rows, 10_000):
            with db.transaction():
                db.run_many(
                    f"INSERT INTO accounts (account_id, balance) VALUES ({m}, 0)",
                    [(account_id(n),) for n in range(first, min(first + 10_000, rows))],
                )
        if m != "?":
            db.run("ANALYZE accounts")  # as autovacuum would within a minute (ours does too)
        plan = deposits(rows, events)
        sql = f"INSERT INTO events (event, payload, created) VALUES ({m}, {m}, {m})"
        for first in range(0, events, 10_000):
            with db.transaction():
                db.run_many(
                    sql,
                    [
                        ("account.deposited", json.dumps({"accountId": a, "amount": n}), 0)
                        for a, n in plan[first : first + 10_000]
                    ],
                )
        started = time.perf_counter()
        position = applied = 0
        while True:
            batch = db.run(
                f"SELECT id, payload FROM events WHERE id > {m} ORDER BY id LIMIT {BATCH}",
                (position,),
            )
            if not batch:
                break
            with db.transaction():
                for _, text in batch:
                    p = json.loads(text)
                    found = db.run(
                        f"SELECT id, balance FROM accounts WHERE account_id = {m}",
                        (p["accountId"],),
                    )
                    if found:
                        db.run(
                            f"UPDATE accounts SET balance = {m} WHERE id = {m}",
                            (found[0][1] + p["amount"], found[0][0]),
                        )
                    else:
                        db.run(
                            f"INSERT INTO accounts (account_id, balance) VALUES ({m}, {m})",
                            (p["accountId"], p["amount"]),
                        )
                position = batch[-1][0]
                db.run(f"UPDATE checkpoint SET position = {m} WHERE name = 'raw'", (position,))
            applied += len(batch)
        elapsed = time.perf_counter() - started
        total = db.run("SELECT SUM(balance) FROM accounts")[0][0]
        correct = int(total or 0) == sum(n for _, n in plan)
    finally:
        db.close()
    return {
        "rows": rows,
        "events": applied,
        "seconds": elapsed,
        "per_second": applied / elapsed,
        "complete": True,
        "correct": bool(correct),
    }
