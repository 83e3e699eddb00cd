"""Python's ``eventsourcing`` 9.5.6 doing the same jobs (only in the ``bench`` extra).

Appends: ``Application.save()`` of a new ``Profile`` aggregate per call (one commit each),
from 1 thread or 64 threads (it is synchronous). Projections: its ``ProjectionRunner`` with a
``TrackingRecorder`` view (the row change and the tracking record commit together, per event).
On SQLite, 9.5's application recorder has no ``subscribe()``; ``SubscribableSQLiteRecorder``
answers the library's own pull loop (``ListenNotifySubscription``), which is what a catch-up
needs. SQLite: its recorder turns WAL on and leaves ``synchronous`` at SQLite's default (FULL);
the harness reads the PRAGMAs back.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Literal

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import ListenNotifySubscription, Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteTrackingRecorder
from psycopg.sql import SQL, Identifier

from benchmarks._common import percentile

COUNTRIES: Final = tuple(f"C{n:02d}" for n in range(20))
ACCOUNTS_DB: Final = "es-accounts.sqlite3"
Figures = dict[str, Any]


class Profile(Aggregate):
    @event("Registered")
    def __init__(self, name: str, country: str, age: int) -> None:
        self.name = name
        self.country = country
        self.age = age


def new_profile(i: int) -> Profile:
    return Profile(name=f"p{i:08d}", country=COUNTRIES[i % len(COUNTRIES)], age=i % 90)


class Profiles(Application[Any]):
    pass


class SubscribableSQLiteRecorder(SQLiteApplicationRecorder):
    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Any:
        return ListenNotifySubscription(self, gt=gt, topics=topics)


def environment(store: dict[str, Any]) -> dict[str, str]:
    if store["kind"] == "sqlite":
        folder = Path(store["dir"])
        folder.mkdir(parents=True, exist_ok=True)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(folder / "es.sqlite3"),
            "APPLICATION_RECORDER_TOPIC": f"{__name__}:SubscribableSQLiteRecorder",
            "ROWSPROJECTION_SQLITE_DBNAME": str(folder / "es-rows.sqlite3"),
            "SUMMARYPROJECTION_SQLITE_DBNAME": str(folder / "es-summary.sqlite3"),
            "ACCOUNTSPROJECTION_SQLITE_DBNAME": str(folder / ACCOUNTS_DB),
        }
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": store["dbname"],
        "POSTGRES_HOST": store["host"],
        "POSTGRES_PORT": str(store["port"]),
        "POSTGRES_USER": store["user"],
        "POSTGRES_PASSWORD": "",
        "POSTGRES_SCHEMA": store["schema"],
        "POSTGRES_POOL_SIZE": "10",
        "POSTGRES_MAX_OVERFLOW": "64",
    }


# ---------------------------------------------------------------------- appends


def appends(store: dict[str, Any], threads: int, seconds: float) -> Figures:
    app = Profiles(env=environment(store))
    try:
        for i in range(50):  # warm-up
            app.save(new_profile(-i))
        latencies: list[float] = []
        lock = threading.Lock()
        counter = 0
        deadline = time.perf_counter() + seconds

        def work() -> None:
            nonlocal counter
            mine: list[float] = []
            while time.perf_counter() < deadline:
                with lock:
                    counter += 1
                    i = counter
                profile = new_profile(i)
                started = time.perf_counter()
                app.save(profile)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(work) for _ in range(threads)]:
                future.result()
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    return {
        "events": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


# ---------------------------------------------------------------------- projections


class SqliteView(SQLiteTrackingRecorder):
    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, name TEXT, country TEXT, "
            "age INTEGER)",
            "CREATE TABLE IF NOT EXISTS summary (id INTEGER PRIMARY KEY, country TEXT, "
            "total INTEGER)",
            "CREATE INDEX IF NOT EXISTS summary_country ON summary (country)",
        ]

    def insert_row(self, e: Any, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(
                "INSERT INTO rows (name, country, age) VALUES (?, ?, ?)", (e.name, e.country, e.age)
            )
            self._insert_tracking(c, tracking)

    def increment(self, country: str, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute("SELECT id, total FROM summary WHERE country = ?", (country,))
            found = c.fetchone()
            if found:
                c.execute("UPDATE summary SET total = ? WHERE id = ?", (found[1] + 1, found[0]))
            else:
                c.execute("INSERT INTO summary (country, total) VALUES (?, 1)", (country,))
            self._insert_tracking(c, tracking)

    def check(self, shape: str, applied: int) -> bool:
        with self.datastore.transaction(commit=False) as c:
            if shape == "create":
                c.execute("SELECT COUNT(*) FROM rows")
            else:
                c.execute("SELECT SUM(total) FROM summary")
            return int(c.fetchone()[0] or 0) == applied


class PostgresView(PostgresTrackingRecorder):
    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements += [
            SQL(
                "CREATE TABLE IF NOT EXISTS {}.rows (id BIGSERIAL PRIMARY KEY, name TEXT, "
                "country TEXT, age INTEGER)"
            ).format(schema),
            SQL(
                "CREATE TABLE IF NOT EXISTS {}.summary (id BIGSERIAL PRIMARY KEY, country TEXT, "
                "total INTEGER)"
            ).format(schema),
            SQL("CREATE INDEX IF NOT EXISTS summary_country ON {}.summary (country)").format(
                schema
            ),
        ]

    def insert_row(self, e: Any, tracking: Tracking) -> None:
        schema = Identifier(self.datastore.schema)
        with self.datastore.transaction(commit=True) as c:
            c.execute(
                SQL("INSERT INTO {}.rows (name, country, age) VALUES (%s, %s, %s)").format(schema),
                (e.name, e.country, e.age),
                prepare=True,
            )
            self._insert_tracking(c, tracking)

    def increment(self, country: str, tracking: Tracking) -> None:
        schema = Identifier(self.datastore.schema)
        with self.datastore.transaction(commit=True) as c:
            c.execute(
                SQL("SELECT id, total FROM {}.summary WHERE country = %s").format(schema),
                (country,),
                prepare=True,
            )
            found = c.fetchone()
            if found:
                c.execute(
                    SQL("UPDATE {}.summary SET total = %s WHERE id = %s").format(schema),
                    (found["total"] + 1, found["id"]),
                    prepare=True,
                )
            else:
                c.execute(
                    SQL("INSERT INTO {}.summary (country, total) VALUES (%s, 1)").format(schema),
                    (country,),
                    prepare=True,
                )
            self._insert_tracking(c, tracking)

    def check(self, shape: str, applied: int) -> bool:
        schema = Identifier(self.datastore.schema)
        table = (
            "SELECT COUNT(*) AS n FROM {}.rows"
            if shape == "create"
            else ("SELECT SUM(total) AS n FROM {}.summary")
        )
        with self.datastore.transaction(commit=False) as c:
            c.execute(SQL(table).format(schema))
            row = c.fetchone()
            return int((row or {}).get("n") or 0) == applied


class RowsProjection(Projection[Any]):
    name = "rowsprojection"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:  # type: ignore[override]
        if isinstance(domain_event, Profile.Registered):
            self.view.insert_row(domain_event, tracking)
        else:
            self.view.insert_tracking(tracking)


class SummaryProjection(Projection[Any]):
    name = "summaryprojection"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:  # type: ignore[override]
        if isinstance(domain_event, Profile.Registered):
            self.view.increment(domain_event.country, tracking)
        else:
            self.view.insert_tracking(tracking)


def prefill(store: dict[str, Any], count: int) -> int:
    """``count`` profiles saved a thousand per ``save`` (the set-up, not measured)."""
    app = Profiles(env=environment(store))
    try:
        for first in range(0, count, 1000):
            app.save(*(new_profile(i) for i in range(first, min(first + 1000, count))))
        return int(app.recorder.max_notification_id() or 0)
    finally:
        app.close()


POLL_SECONDS: Final = 0.005


def wait_tracked(runner: ProjectionRunner[Any, Any], head: int, cap: float) -> None:
    """Until the runner's view has tracked notification ``head``, looked at every 5 ms; past
    ``cap`` seconds, the runner's own ``wait`` raises (its TimeoutError, or the error that
    stopped its thread). Not ``runner.wait`` from the start: it looks with a back-off from
    100 ms to 800 ms, which added up to 0.8 s to a timed run (measured: the same job took
    6.313 s and 6.313 s, 7.113 s and 7.112 s in two runs 45 minutes apart, the sums of its
    sleeps, while the other subjects' times moved by 10-80 %)."""
    deadline = time.perf_counter() + cap
    while int(runner.view.max_tracking_id(runner.app_name) or 0) < head:
        if time.perf_counter() > deadline:
            runner.wait(head, timeout=POLL_SECONDS)
            return
        time.sleep(POLL_SECONDS)


def catch_up(
    store: dict[str, Any], shape: Literal["create", "summary"], count: int, cap: float
) -> Figures:
    """A ``ProjectionRunner`` started on ``count`` stored events: seconds until its view has
    tracked the last one (or how far it got in ``cap`` seconds)."""
    head = prefill(store, count)
    env = environment(store)
    view = SqliteView if store["kind"] == "sqlite" else PostgresView
    projection = RowsProjection if shape == "create" else SummaryProjection
    started = time.perf_counter()
    complete = True
    with ProjectionRunner(
        application_class=Profiles, projection_class=projection, view_class=view, env=env
    ) as runner:
        try:
            wait_tracked(runner, head, cap)
        except Exception as error:  # its TimeoutError: report how far it got
            print(f"eventsourcing wait: {type(error).__name__}: {error}", file=sys.stderr)
            complete = False
        elapsed = time.perf_counter() - started
        done = int(runner.view.max_tracking_id(runner.app_name) or 0)
        if done >= head:
            complete = True
        correct = runner.view.check(shape, done) if complete else None
    return {
        "events": done,
        "seconds": elapsed,
        "per_second": done / elapsed,
        "complete": complete,
        "correct": correct,
    }


# ---------------------------------------------------------------------- per-entity read model


class Deposit(Aggregate):
    @event("Made")
    def __init__(self, account_id: str, amount: int) -> None:
        self.account_id = account_id
        self.amount = amount


class AccountsView(SqliteView):
    """One row per account, with the index on the business key a user would write."""

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *ACCOUNTS_SQL]

    def deposit(self, account_id: str, amount: int, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute("SELECT id, balance FROM accounts WHERE account_id = ?", (account_id,))
            found = c.fetchone()
            if found:
                c.execute(
                    "UPDATE accounts SET balance = ? WHERE id = ?", (found[1] + amount, found[0])
                )
            else:
                c.execute(
                    "INSERT INTO accounts (account_id, balance) VALUES (?, ?)",
                    (account_id, amount),
                )
            self._insert_tracking(c, tracking)

    def balances(self) -> int:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT SUM(balance) FROM accounts")
            return int(c.fetchone()[0] or 0)


ACCOUNTS_SQL: Final = (
    "CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, account_id TEXT, "
    "balance INTEGER)",
    "CREATE INDEX IF NOT EXISTS accounts_account_id ON accounts (account_id)",
)


class AccountsProjection(Projection[Any]):
    name = "accountsprojection"

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:  # type: ignore[override]
        if isinstance(domain_event, Deposit.Made):
            self.view.deposit(domain_event.account_id, domain_event.amount, tracking)
        else:
            self.view.insert_tracking(tracking)


def per_entity(store: dict[str, Any], rows: int, events: int, cap: float) -> Figures:
    """SQLite: ``rows`` accounts in the view's table (filled before the runner starts), then
    ``events`` deposits stored (a thousand per ``save``); timed: a ``ProjectionRunner`` from
    its start until its view has tracked the last deposit (or how far it got in ``cap``)."""
    import sqlite3

    from benchmarks.bench_raw import account_id, deposits

    if store["kind"] != "sqlite":
        raise SystemExit("the eventsourcing per-entity job runs on SQLite only")
    env = environment(store)
    with sqlite3.connect(Path(store["dir"]) / ACCOUNTS_DB) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # as its recorder sets it (read back too)
        for statement in ACCOUNTS_SQL:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO accounts (account_id, balance) VALUES (?, 0)",
            ((account_id(n),) for n in range(rows)),
        )
    conn.close()
    plan = deposits(rows, events)
    app = Profiles(env=env)
    try:
        for first in range(0, events, 1000):
            app.save(*(Deposit(a, n) for a, n in plan[first : first + 1000]))
        head = int(app.recorder.max_notification_id() or 0)
    finally:
        app.close()
    started = time.perf_counter()
    complete = True
    with ProjectionRunner(
        application_class=Profiles,
        projection_class=AccountsProjection,
        view_class=AccountsView,
        env=env,
    ) as runner:
        try:
            wait_tracked(runner, head, cap)
        except Exception as error:  # its TimeoutError: report how far it got
            print(f"eventsourcing wait: {type(error).__name__}: {error}", file=sys.stderr)
            complete = False
        elapsed = time.perf_counter() - started
        done = int(runner.view.max_tracking_id(runner.app_name) or 0)
        if done >= head:
            complete = True
        correct = runner.view.balances() == sum(n for _, n in plan) if complete else None
    return {
        "rows": rows,
        "events": done,
        "seconds": elapsed,
        "per_second": done / elapsed,
        "complete": complete,
        "correct": correct,
    }
