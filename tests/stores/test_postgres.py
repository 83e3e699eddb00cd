"""PostgreSQL backend: the conformance suite, plus what only a server database can get wrong
(commit order of concurrent appenders, pools, DDL races, the private server itself)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from moleculerpy_cqrs.errors import ConflictError, StoreError
from moleculerpy_cqrs.stores.backends.postgres import _DATABASES, PostgresAdapter
from moleculerpy_cqrs.stores.base import Adapter, CheckedRow
from moleculerpy_cqrs.stores.fields import Declarations, Record
from moleculerpy_cqrs.stores.query import In, Query, fold_case, matches, parse_find
from moleculerpy_cqrs.testing.conformance import AdapterConformance
from moleculerpy_cqrs.testing.postgres_server import PostgresServer, remove_stale

pytestmark = pytest.mark.postgres

LOG_FIELDS = {"event": "string", "payload": "json"}
Make = Callable[..., Awaitable[PostgresAdapter]]


class TestPostgresStore(AdapterConformance):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_dsn: str, pg_schema: str) -> None:
        self.dsn, self.schema = postgres_dsn, pg_schema

    async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
        return PostgresAdapter(name, fields, dsn=self.dsn, options={"schema": self.schema})


@pytest.fixture
async def make(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Make]:
    """Connected adapters in the test's schema; ``app`` gives one its own pool."""
    made: list[PostgresAdapter] = []

    async def make(
        name: str = "log", fields: Declarations | None = None, *, app: str | None = None
    ) -> PostgresAdapter:
        dsn = make_conninfo(postgres_dsn, application_name=app) if app else postgres_dsn
        adapter = PostgresAdapter(
            name, LOG_FIELDS if fields is None else fields, dsn=dsn, options={"schema": pg_schema}
        )
        await adapter.connect()
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.close()
    assert not _DATABASES, "a pool outlived its adapters"


async def _backend_waits_on_lock(dsn: str, app: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND wait_event_type = 'Lock'",
            [app],
        )
        row = await cur.fetchone()
        return row is not None and row[0] > 0


async def _until_waiting(dsn: str, app: str) -> None:
    """Until a backend of ``app`` waits on a lock (polling the server's own view)."""
    deadline = time.monotonic() + 20
    while not await _backend_waits_on_lock(dsn, app):
        assert time.monotonic() < deadline, f"{app} never waited on a lock"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------- the gap problem


class _Unlocked(PostgresAdapter):
    """An append without the commit-order lock: what the gap problem looks like."""

    async def _append(self, rows: list[CheckedRow]) -> list[Record]:
        async with self._session(atomic=True) as conn:
            return await self._insert_rows(conn, rows)


async def test_without_the_lock_a_tailing_reader_skips_a_late_commit(
    postgres_dsn: str, pg_schema: str
) -> None:
    # The negative control for the test below: shows the scenario loses an event.
    early = _Unlocked("log", LOG_FIELDS, dsn=postgres_dsn, options={"schema": pg_schema})
    late = _Unlocked(
        "log",
        LOG_FIELDS,
        dsn=make_conninfo(postgres_dsn, application_name="late"),
        options={"schema": pg_schema},
    )
    await early.connect()
    await late.connect()
    try:
        async with early.transaction():
            (first,) = await early.append([{"event": "first"}])
            (second,) = await late.append([{"event": "second"}])
            seen = await late.read_after(0, 10)
        assert first["id"] < second["id"]
        assert [r["id"] for r in seen] == [second["id"]]
        assert await late.read_after(second["id"], 10) == []  # "first" is never seen
    finally:
        await early.close()
        await late.close()


@pytest.mark.parametrize("late_rows", [1, 130])  # one INSERT, or by COPY
async def test_an_append_waits_for_an_earlier_uncommitted_append(
    make: Make, postgres_dsn: str, late_rows: int
) -> None:
    early = await make()
    late = await make(app="late-writer")
    reader = await make(app="reader")
    async with early.transaction():
        (first,) = await early.append([{"event": "first"}])
        pending = asyncio.create_task(late.append([{"event": "second"}] * late_rows))
        await _until_waiting(postgres_dsn, "late-writer")
        assert await reader.read_after(0, 100) == []
        assert not pending.done()
    second = await pending
    assert first["id"] < second[0]["id"]
    events = [r["event"] for r in await reader.read_after(0, 1000)]
    assert events == ["first"] + ["second"] * late_rows


@pytest.mark.parametrize("sizes", [(1, 4), (110, 150)])  # INSERTs, then COPY too
async def test_concurrent_writers_never_leave_a_gap_behind_a_tailing_reader(
    make: Make, sizes: tuple[int, int]
) -> None:
    writers = await asyncio.gather(*(make(app=f"writer-{i}") for i in range(8)))
    reader = await make(app="reader")
    acknowledged: list[int] = []
    done = asyncio.Event()

    async def write(i: int, adapter: PostgresAdapter) -> None:
        rng = random.Random(i)
        for n in range(25):
            batch = [
                {"event": f"w{i}-{n}-{k}", "payload": {"k": k}} for k in range(rng.randint(*sizes))
            ]
            rows = await adapter.append(batch)
            ids = [r["id"] for r in rows]
            assert ids == sorted(set(ids))
            acknowledged.extend(ids)

    async def tail() -> list[int]:
        seen: list[int] = []
        position = 0
        while True:
            finished = done.is_set()  # read before the query: an empty answer then means "all"
            rows = await reader.read_after(position, 7)
            for row in rows:
                assert row["id"] > position
                position = row["id"]
                seen.append(position)
            if not rows and finished:
                return seen

    tailing = asyncio.create_task(tail())
    await asyncio.gather(*(write(i, w) for i, w in enumerate(writers)))
    done.set()
    seen = await tailing
    assert seen == sorted(acknowledged)
    assert await reader.head() == max(acknowledged)


_WRITER = """
import asyncio, json, sys
from moleculerpy_cqrs.stores.backends.postgres import PostgresAdapter

async def main(dsn, schema, tag, count):
    log = PostgresAdapter("log", {"event": "string", "payload": "json"}, dsn=dsn,
                          options={"schema": schema})
    await log.connect()
    try:
        for n in range(count):
            rows = await log.append([{"event": f"{tag}-{n}-{k}"} for k in range(1 + n % 3)])
            print(json.dumps([r["id"] for r in rows]), flush=True)
    finally:
        await log.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_writer_processes_never_leave_a_gap_behind_a_tailing_reader(
    make: Make, postgres_dsn: str, pg_schema: str
) -> None:
    reader = await make()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, postgres_dsn, pg_schema, f"p{i}", "40",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(3)
    ]  # fmt: skip
    outputs = asyncio.gather(*(p.communicate() for p in procs))
    seen: list[int] = []
    position = 0
    while True:
        finished = outputs.done()
        rows = await reader.read_after(position, 5)
        for row in rows:
            assert row["id"] > position
            position = row["id"]
            seen.append(position)
        if not rows and finished:
            break
    acknowledged: list[int] = []
    for proc, (out, err) in zip(procs, await outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        for line in out.decode().splitlines():
            acknowledged.extend(json.loads(line))
    assert len(acknowledged) == 3 * sum(1 + n % 3 for n in range(40))
    assert seen == sorted(acknowledged)


# ---------------------------------------------------------------------- pools and transactions


async def test_siblings_and_stores_on_one_database_share_one_pool(
    postgres_dsn: str, pg_schema: str
) -> None:
    # What one stores.postgres(dsn) factory makes: adapters with the same dsn and options.
    first, second = (
        PostgresAdapter(name, {"n": "integer"}, dsn=postgres_dsn, options={"schema": pg_schema})
        for name in ("first", "second")
    )
    shadow = first.sibling("first_shadow")
    for adapter in (first, second, shadow):
        await adapter.connect()
    assert first._db is not None
    assert first._db is second._db is shadow._db
    pool = first._db.pool
    await first.close()  # closes its sibling too; the pool stays for `second`
    assert shadow._db is None
    assert not pool.closed
    await second.close()
    assert pool.closed
    assert not _DATABASES


async def test_a_transaction_spans_siblings_on_one_connection(make: Make) -> None:
    main = await make("main", {"n": "integer"})
    other = main.sibling("main_other", {"label": "string"})
    await other.connect()
    outside = await make("main_other", {"label": "string"}, app="outside")
    async with main.transaction():
        await main.insert({"n": 1})
        await other.insert({"label": "x"})
        await main.set_meta("checkpoint", 1)
        assert await other.count() == 1
        assert await outside.count() == 0  # uncommitted: invisible to other connections
    assert await outside.count() == 1
    assert await main.get_meta("checkpoint") == 1


async def test_a_caught_statement_error_still_fails_the_transaction(make: Make) -> None:
    log = await make()
    gone = log.sibling("gone", {"n": "integer"})
    await gone.connect()
    await gone.drop()
    caught: list[StoreError] = []

    async def work() -> None:
        async with log.transaction():
            await log.append([{"event": "lost"}])
            try:
                await gone.count()  # the table does not exist: the server aborts the transaction
            except StoreError as e:
                caught.append(e)

    with pytest.raises(StoreError, match="rolled back"):
        await work()
    assert isinstance(caught[0].__cause__, psycopg.Error)
    assert await log.head() == 0


async def test_many_adapters_create_one_table_concurrently(make: Make) -> None:
    fresh = await asyncio.gather(*(make("fresh", app=f"ddl-{i}") for i in range(6)))
    await fresh[0].append([{"event": "a"}])
    assert await fresh[-1].head() == 1


async def test_a_new_declared_field_is_added_to_an_existing_table(make: Make) -> None:
    old = await make("grows", {"a": "integer"})
    await old.insert({"a": 1})
    new = await make("grows", {"a": "integer", "b": "string"}, app="newer")
    assert await new.find() == [{"id": 1, "a": 1, "b": None}]


# ---------------------------------------------------------------------- column semantics


async def test_strings_order_and_fold_like_the_reference(make: Make) -> None:
    words = ["b", "B", "a", "é", "É", "Z", "ä", "ab", "a b", "", "\u00ff", "\U0001f600"]
    table = await make("words", {"w": "string"})
    await table.insert_many([{"w": w} for w in words])
    assert [r["w"] for r in await table.find(parse_find(table.fields, {"sort": "w"}))] == sorted(
        words
    )
    for needle in ["A", "é", "É", "B", "a b"]:
        query = parse_find(table.fields, {"search": needle})
        expected = [w for w in words if matches(query.where, {"w": w})]
        assert [r["w"] for r in await table.find(query)] == expected, needle
        assert expected == [w for w in words if fold_case(needle) in fold_case(w)]


async def test_json_documents_come_back_as_written(make: Make) -> None:
    table = await make("docs", {"doc": "json"})
    docs: list[Any] = [{"z": 1, "a": [1.5, None, "x"]}, [], "text", 10**18, 0.1, True]
    written = await table.insert_many([{"doc": d} for d in docs])
    assert [r["doc"] for r in await table.find()] == docs
    assert [r["doc"] for r in written] == docs


# ---------------------------------------------------------------------- backup and restore


async def test_restore_swaps_atomically_and_ids_never_go_back(make: Make, tmp_path: Path) -> None:
    table = await make("agg", {"n": "integer"})
    watcher = await make("agg", {"n": "integer"}, app="watcher")
    await table.insert_many([{"n": i} for i in range(300)])
    await table.set_meta("checkpoint", 300)
    await table.backup(str(tmp_path / "b"))
    await table.remove_many(parse_find(table.fields, {"query": {"n": {">=": 100}}}))
    newest = await table.insert({"n": -1})
    counts: set[int] = set()
    restoring = asyncio.create_task(table.restore(str(tmp_path / "b")))
    while not restoring.done():
        counts.add(await watcher.count())
    await restoring
    counts.add(await watcher.count())
    assert counts <= {101, 300}
    assert 300 in counts
    assert await table.get_meta("checkpoint") == 300
    assert (await table.insert({"n": 0}))["id"] > newest["id"]


async def test_a_damaged_backup_changes_nothing(make: Make, tmp_path: Path) -> None:
    table = await make("agg", {"n": "integer"})
    await table.insert_many([{"n": 1}, {"n": 2}])
    backup = tmp_path / "b"
    await table.backup(str(backup))
    await table.insert({"n": 3})
    rows = backup / "agg.rows"
    rows.write_bytes(rows.read_bytes().replace(b"2", b"7"))  # same size, other content
    with pytest.raises(StoreError, match="damaged"):
        await table.restore(str(backup))
    with pytest.raises(StoreError, match="no backup"):
        await table.restore(str(tmp_path / "nothing"))
    assert [r["n"] for r in await table.find()] == [1, 2, 3]


# ---------------------------------------------------------------------- the private server


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A short, world-searchable folder (the server runs as another user when we are root)."""
    path = Path(tempfile.mkdtemp(prefix="cqrs-base-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _postmaster_pid(folder: Path) -> int:
    return int((folder / "data" / "postmaster.pid").read_text().splitlines()[0])


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _exits(pid: int) -> bool:
    """Whether ``pid`` is gone or exits within a few seconds (it may be mid-exit)."""
    deadline = time.monotonic() + 10
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_private_server_runs_as_postgres_and_listens_only_on_its_socket(
    base_dir: Path,
) -> None:
    with PostgresServer(base_dir=base_dir) as server:
        folder = server.folder
        assert folder is not None
        pid = _postmaster_pid(folder)
        if os.geteuid() == 0:
            assert os.stat(f"/proc/{pid}").st_uid != 0
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute("SELECT current_setting('listen_addresses')").fetchone()
            assert row == ("",)
    assert not folder.exists()
    assert _exits(pid)


_ORPHAN = """
import sys
from moleculerpy_cqrs.testing.postgres_server import PostgresServer
server = PostgresServer(base_dir=sys.argv[1])
server.start()
print(server.folder, flush=True)
sys.stdin.read()
"""


def test_a_server_left_by_a_killed_run_is_cleaned_up(base_dir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, str(base_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        folder = Path(proc.stdout.readline().strip())
        pid = _postmaster_pid(folder)
        proc.kill()
    assert _running(pid)  # the orphaned server is still running
    remove_stale(base_dir)
    assert _exits(pid)
    assert not folder.exists()


# ---------------------------------------------------------------------- declared indexes

INDEXED: Declarations = {
    "account": {"type": "string", "unique": True},
    "owner": {"type": "string", "index": True},
    "n": {"type": "integer", "index": True},
    "plain": "string",
}
PLANNED: list[tuple[dict[str, Any], str]] = [
    ({"account": "acc-7"}, "account"),
    ({"owner": "own-3"}, "owner"),
    ({"query": {"owner": {"in": ["own-1", "own-2"]}}}, "owner"),
    ({"query": {"account": {"in": ["acc-1", "acc-9"]}}}, "account"),
    ({"query": {"n": {">": 40}}}, "n"),
    ({"query": {"n": {"between": [3, 9]}}}, "n"),
]


@pytest.mark.parametrize(("params", "field"), PLANNED)
async def test_lookups_on_an_indexed_field_use_its_index(
    make: Make, postgres_dsn: str, params: dict[str, Any], field: str
) -> None:
    things = await make("things", INDEXED)
    await things.insert_many(
        [{"account": f"acc-{i}", "owner": f"own-{i % 5}", "n": i} for i in range(50)]
    )
    sql, values = things._compiler.select(parse_find(things.fields, params))
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")
        cur = await conn.execute(f"EXPLAIN {sql}".encode(), values)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    kind = "ux" if field == "account" else "ix"
    assert f"things${field}${kind}" in plan, plan
    assert "Index Scan" in plan or "Bitmap Index Scan" in plan or "Index Only Scan" in plan, plan
    # The plain field has no index: the same query on it scans the table.
    plain_sql, plain_values = things._compiler.select(parse_find(things.fields, {"plain": "x"}))
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cur = await conn.execute(f"EXPLAIN {plain_sql}".encode(), plain_values)
        assert "Seq Scan" in "\n".join(row[0] for row in await cur.fetchall())


async def test_a_restored_table_keeps_its_index_names(make: Make, tmp_path: Path) -> None:
    things = await make("things", INDEXED)
    await things.insert_many([{"account": "a"}, {"account": "b"}])
    await things.backup(str(tmp_path))
    await things.restore(str(tmp_path))
    shadow = things.sibling("things_replay", things.specs)
    await shadow.connect()
    await shadow.insert({"account": "c"})
    await things.replace_with(shadow)
    async with await psycopg.AsyncConnection.connect(things.dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = %s "
            "AND tablename LIKE 'things%%' ORDER BY 1, 2",
            [things.schema],
        )
        found = await cur.fetchall()
    assert found == [
        ("things", "things$account$ux"),
        ("things", "things$n$ix"),
        ("things", "things$owner$ix"),
        ("things", "things$pkey"),
        ("things_replay", "things_replay$account$ux"),
        ("things_replay", "things_replay$n$ix"),
        ("things_replay", "things_replay$owner$ix"),
        ("things_replay", "things_replay$pkey"),
    ]


async def test_a_look_at_the_stored_fields_leaves_no_pool_open(make: Make) -> None:
    made = await make("made", {"a": "integer"})
    look = PostgresAdapter("made", {"a": "string"}, dsn=made.dsn, options={"schema": made.schema})
    assert await look.stored_fields() == {"a": "integer"}
    await made.close()
    assert not _DATABASES  # a refused start never closes the adapter it looked with


async def test_keys_are_looked_up_through_the_unique_index(
    postgres_dsn: str, pg_schema: str
) -> None:
    # The log may hold millions of keys: append_keyed must search the index, never scan.
    adapter = PostgresAdapter(
        "log", {"event": "string", "key": "string"}, dsn=postgres_dsn, options={"schema": pg_schema}
    )
    adapter.declare_unique("key")
    await adapter.connect()
    try:
        await adapter.append([{"event": "e", "key": f"k{i}"} for i in range(20_000)])
        await adapter.append([{"event": "e"} for _ in range(100)])
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f'SET search_path TO "{pg_schema}"')
            await conn.execute("ANALYZE log")
            cur = await conn.execute(
                ("EXPLAIN " + adapter._holders_sql("key")).encode(), [["k5", "k77", "nope"]]
            )
            plan = " ".join(str(row[0]) for row in await cur.fetchall())
    finally:
        await adapter.close()
    assert "log$key$ux" in plan, plan  # the unique index (stores.sql.index_name)
    assert "Seq Scan" not in plan, plan


async def test_a_unique_field_not_in_lower_case_refuses_with_a_conflict_naming_it(
    postgres_dsn: str, pg_schema: str
) -> None:
    # The server quotes such a column in its error detail ("idempotencyKey"): it must still be
    # the caller's 409 naming the field and value, not a store error; a keyed append of a held
    # key is answered its holder (the append tries a plain insert first).
    adapter = PostgresAdapter(
        "log",
        {"event": "string", "idempotencyKey": "string"},
        dsn=postgres_dsn,
        options={"schema": pg_schema},
    )
    adapter.declare_unique("idempotencyKey")
    await adapter.connect()
    try:
        held = await adapter.insert({"event": "a", "idempotencyKey": "k"})
        with pytest.raises(ConflictError) as refused:
            await adapter.insert({"event": "b", "idempotencyKey": "k"})
        assert refused.value.data["field"] == "idempotencyKey"
        assert refused.value.data["value"] == "k"
        rows = [adapter.check_row({"event": "c", "idempotencyKey": k}) for k in ("j", "k")]
        fresh, again = await adapter.append_keyed(rows, "idempotencyKey")
        assert fresh.stored
        assert not again.stored
        assert again.row == held
        assert await adapter.count() == 2
    finally:
        await adapter.close()


async def test_a_restored_or_swapped_in_table_is_analyzed_so_a_batchs_keys_use_the_index(
    postgres_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    # Without statistics the planner takes "k = ANY(many keys)" (a batch's prefetch) to match
    # much of the table and scans it; a restore and a replay's swap analyze first.
    fields: Declarations = {"k": {"type": "string", "index": True}, "n": "integer"}

    def adapter(name: str) -> PostgresAdapter:
        return PostgresAdapter(name, fields, dsn=postgres_dsn, options={"schema": pg_schema})

    async def plan_and_analyzed(table: PostgresAdapter) -> tuple[str, bool]:
        keys = tuple(f"k{i * 37}" for i in range(100))
        sql, params = table._compiler.select(Query(where=In("k", keys)))
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f'SET search_path TO "{pg_schema}"')
            cur = await conn.execute(f"EXPLAIN {sql}".encode(), params)
            plan = " ".join(str(row[0]) for row in await cur.fetchall())
            cur = await conn.execute(
                "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = %s",
                [pg_schema, table.name],
            )
            row = await cur.fetchone()
        return plan, bool(row and row[0])

    source, target, shadow = adapter("source"), adapter("target"), adapter("shadow")
    for table in (source, target, shadow):
        await table.connect()
    try:
        rows = [{"k": f"k{i}", "n": i} for i in range(50_000)]
        for table in (source, shadow):
            for first in range(0, len(rows), 10_000):
                await table.insert_many(rows[first : first + 10_000])
        plan, analyzed = await plan_and_analyzed(source)
        assert not analyzed
        assert "Seq Scan" in plan, plan  # no statistics yet (autovacuum not come by)
        await source.backup(str(tmp_path / "b"))
        await source.restore(str(tmp_path / "b"))
        plan, analyzed = await plan_and_analyzed(source)
        assert analyzed
        assert "Seq Scan" not in plan, plan
        assert "source$k$ix" in plan, plan
        await target.replace_with(shadow)
        plan, analyzed = await plan_and_analyzed(target)
        assert analyzed
        assert "Seq Scan" not in plan, plan
    finally:
        for table in (source, target, shadow):
            await table.close()
