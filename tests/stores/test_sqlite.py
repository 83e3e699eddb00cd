"""The SQLite backend: the conformance suite as a file and in memory, plus its own rules."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.errors import ConfigurationError, StoreError
from moleculerpy_cqrs.stores.backends.sqlite import SqliteAdapter, glob_pattern
from moleculerpy_cqrs.stores.base import Adapter, StoreFactory
from moleculerpy_cqrs.stores.fields import Declarations, FieldType
from moleculerpy_cqrs.stores.query import ALL, parse_find
from moleculerpy_cqrs.testing.conformance import ITEM_FIELDS, LOG_FIELDS, AdapterConformance


def sqlite_adapter(
    name: str,
    fields: Declarations | None = None,
    location: str | Path = ":memory:",
    memory_key: str = "",
    **options: Any,
) -> SqliteAdapter:
    return SqliteAdapter(
        name,
        fields,
        location=str(location),
        memory_key=memory_key or uuid.uuid4().hex,
        options=options,
    )


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestSqliteFolder(AdapterConformance):
    async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
        return sqlite_adapter(name, fields, self.tmp_path / "data")


class TestSqliteMemory(AdapterConformance):
    readers_wait_for_writers = True
    survives_close = False

    def setup_method(self) -> None:
        self.memory_key = uuid.uuid4().hex

    async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
        return sqlite_adapter(name, fields, ":memory:", self.memory_key)


def test_the_factory_can_be_called_again(tmp_path: Path) -> None:
    # Importing the backend module must not replace the ``stores.sqlite`` factory with it.
    first: StoreFactory = stores.sqlite(tmp_path)
    second: StoreFactory = stores.sqlite(tmp_path)
    assert (first("a").name, second("b").name) == ("a", "b")


def tables_in(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


async def test_a_folder_holds_one_file_per_store(tmp_path: Path) -> None:
    async with sqlite_adapter("events", LOG_FIELDS, tmp_path / "data") as events:
        log = events.sibling("events_dead", LOG_FIELDS)
        await log.connect()
        async with sqlite_adapter("summary", ITEM_FIELDS, tmp_path / "data"):
            pass
    assert file_names(tmp_path / "data") == ["events.sqlite3", "summary.sqlite3"]
    assert {"events", "events_dead", "cqrs_meta"} <= tables_in(tmp_path / "data/events.sqlite3")


@pytest.mark.parametrize("suffix", [".db", ".sqlite", ".sqlite3"])
async def test_a_database_file_holds_every_store(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "sub" / f"all{suffix}"
    async with sqlite_adapter("a", ITEM_FIELDS, path), sqlite_adapter("b", LOG_FIELDS, path):
        pass
    assert {"a", "b", "cqrs_meta"} <= tables_in(path)
    assert file_names(path.parent) == [path.name]


async def test_a_file_uri_is_used_as_given(tmp_path: Path) -> None:
    path = tmp_path / "by-uri.db"
    async with sqlite_adapter("a", ITEM_FIELDS, f"file:{path}?cache=private") as a:
        await a.insert({"name": "x"})
    assert "a" in tables_in(path)


async def test_in_memory_stores_of_one_key_share_a_database(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    async with sqlite_adapter("a", ITEM_FIELDS, memory_key=key) as a:
        async with sqlite_adapter("a", ITEM_FIELDS, memory_key=key) as same:
            await a.insert({"name": "shared"})
            assert await same.count() == 1
        async with sqlite_adapter("a", ITEM_FIELDS) as other:
            assert await other.count() == 0
    assert file_names(tmp_path) == []


async def pragma(adapter: Adapter, name: str) -> Any:
    assert isinstance(adapter, SqliteAdapter)
    database = adapter._database
    assert database is not None
    return await database.writer.run(lambda c: c.execute(f"PRAGMA {name}").fetchone()[0], "t")


async def test_files_use_wal_and_full_synchronous_by_default(tmp_path: Path) -> None:
    async with sqlite_adapter("a", ITEM_FIELDS, tmp_path) as a:
        assert await pragma(a, "journal_mode") == "wal"
        assert await pragma(a, "synchronous") == 2


async def test_synchronous_normal_is_an_option(tmp_path: Path) -> None:
    async with sqlite_adapter("a", ITEM_FIELDS, tmp_path, synchronous="normal") as a:
        assert await pragma(a, "synchronous") == 1


@pytest.mark.parametrize(
    "options", [{"synchronous": "FAST"}, {"busy_timeout": -1}, {"busy_timeout": "5"}]
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        sqlite_adapter("a", ITEM_FIELDS, **options)


async def test_settings_meant_for_other_layers_are_left_alone(tmp_path: Path) -> None:
    async with sqlite_adapter("a", ITEM_FIELDS, tmp_path, dispatchBatchSize=10) as a:
        assert await pragma(a, "synchronous") == 2


@pytest.mark.parametrize("name", ["cqrs_meta", "sqlite_master", "SQLITE_x"])
def test_names_sqlite_reserves_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        sqlite_adapter(name, ITEM_FIELDS)


def cqrs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cqrs-sqlite")]


async def test_close_leaves_no_thread_behind(tmp_path: Path) -> None:
    before = cqrs_threads()
    for location in (tmp_path, ":memory:"):
        async with sqlite_adapter("a", ITEM_FIELDS, location) as a:
            await a.insert({"name": "x"})
            await a.find()
            assert len(cqrs_threads()) > len(before)
    assert cqrs_threads() == before


async def test_a_new_field_becomes_a_new_column(tmp_path: Path) -> None:
    async with sqlite_adapter("a", {"name": "string"}, tmp_path) as old:
        await old.insert({"name": "old"})
    async with sqlite_adapter("a", {"name": "string", "qty": "integer"}, tmp_path) as new:
        await new.insert({"name": "new", "qty": 2})
        assert [(r["name"], r["qty"]) for r in await new.find()] == [("old", None), ("new", 2)]


async def test_driver_errors_become_store_errors_with_their_cause(tmp_path: Path) -> None:
    async with sqlite_adapter("a", ITEM_FIELDS, tmp_path) as a:
        await a.drop()
        with pytest.raises(StoreError) as caught:
            await a.count()
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


async def test_backup_is_a_sqlite_rows_file_and_a_manifest(tmp_path: Path) -> None:
    async with sqlite_adapter("things", ITEM_FIELDS, tmp_path / "db") as a:
        await a.insert({"name": "x"})
        await a.set_meta("checkpoint", 3)
        size = await a.backup(str(tmp_path / "bk"))
    rows, manifest = tmp_path / "bk" / "things.rows", tmp_path / "bk" / "things.manifest.json"
    assert file_names(rows.parent) == ["things.manifest.json", "things.rows"]
    assert rows.stat().st_size + manifest.stat().st_size == size
    with closing(sqlite3.connect(rows)) as conn:
        assert conn.execute('SELECT "id", "name" FROM cqrs_rows').fetchall() == [(1, "x")]
    described = json.loads(manifest.read_bytes())
    assert (described["rows_format"], described["rows"]) == ("sqlite", 1)
    assert described["meta"]["checkpoint"] == "3"


async def test_restore_refuses_a_backup_with_a_field_of_another_type(tmp_path: Path) -> None:
    async with sqlite_adapter("things", {"n": "string"}, tmp_path / "one") as old:
        await old.insert({"n": "text"})
        await old.backup(str(tmp_path / "bk"))
    async with sqlite_adapter("things", {"n": "integer"}, tmp_path / "two") as other:
        await other.insert({"n": 5})
        with pytest.raises(StoreError, match="damaged"):
            await other.restore(str(tmp_path / "bk"))
        assert [r["n"] for r in await other.find()] == [5]


async def test_restores_copy_in_batches_and_take_turns(tmp_path: Path) -> None:
    async with sqlite_adapter("log", LOG_FIELDS, tmp_path) as log:
        rows = await log.append([{"event": str(i)} for i in range(12_001)])
        await log.remove(rows[5]["id"])
        await log.backup(str(tmp_path / "bk"))
        await log.remove_many(ALL)
        await asyncio.gather(log.restore(str(tmp_path / "bk")), log.restore(str(tmp_path / "bk")))
        assert await log.count() == 12_000
        assert await log.head() == rows[-1]["id"]
        assert await log.get(rows[5]["id"]) is None


@pytest.mark.parametrize(
    ("like", "glob"),
    [
        ("a%b", "a*b"),
        ("a_b", "a?b"),
        ("a\\%b", "a%b"),
        ("a\\_b", "a_b"),
        ("a\\\\b", "a\\b"),
        ("a\\", "a\\"),
        ("a*b?[c]", "a[*]b[?][[]c]"),
        ("\\*", "[*]"),
        ("", ""),
    ],
)
def test_glob_pattern(like: str, glob: str) -> None:
    assert glob_pattern(like) == glob


_APPENDER = """
import asyncio, sys
from moleculerpy_cqrs.stores.backends.sqlite import SqliteAdapter

async def main() -> None:
    log = SqliteAdapter("log", {"event": "string"}, location=sys.argv[1], memory_key="",
                        options={"synchronous": sys.argv[2]})
    await log.connect()
    i = 0
    while True:
        rows = await log.append([{"event": str(i)}])
        print(rows[0]["id"], flush=True)
        i += 1

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_acknowledged_appends_survive_kill_9(tmp_path: Path, synchronous: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _APPENDER,
        str(tmp_path),
        synchronous,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    acknowledged: list[int] = []
    while len(acknowledged) < 200:
        acknowledged.append(int(await proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    async with sqlite_adapter("log", {"event": "string"}, tmp_path) as log:
        stored = {r["id"] for r in await log.read_after(0, 1_000_000)}
    assert set(acknowledged) <= stored


async def test_in_memory_factories_do_not_share_a_database() -> None:
    first, second = stores.sqlite(":memory:"), stores.sqlite(":memory:")
    async with first("t", {"n": "integer"}) as a, second("t", {"n": "integer"}) as b:
        await a.insert({"n": 1})
        assert await b.count() == 0


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
    ({"query": {"n": {">": 40, "<": 45}}}, "n"),
    ({"query": {"n": {">": 40}}, "sort": "n"}, "n"),
    ({"query": {"n": {"between": [3, 9]}}}, "n"),
]


@pytest.mark.parametrize(("params", "field"), PLANNED)
async def test_lookups_on_an_indexed_field_use_its_index(
    tmp_path: Path, params: dict[str, Any], field: str
) -> None:
    # A range bounded on one side only, in id order, may be answered by a scan in id order:
    # without statistics, SQLite's planner prefers that to an index search and a sort.
    path = tmp_path / "things.db"
    things = sqlite_adapter("things", INDEXED, path)
    async with things:
        await things.insert_many(
            [{"account": f"acc-{i}", "owner": f"own-{i % 5}", "n": i} for i in range(50)]
        )
        sql, values = things._sql.select(parse_find(things.fields, params))
        plain_sql, plain_values = things._sql.select(parse_find(things.fields, {"plain": "x"}))
    with closing(sqlite3.connect(path)) as conn:
        plan = " ".join(r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", values))
        plain = " ".join(
            r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {plain_sql}", plain_values)
        )
    kind = "ux" if field == "account" else "ix"
    assert f"USING INDEX things${field}${kind}" in plan, plan
    assert "SCAN things" in plain, plain  # no index on the plain field: a scan


async def test_indexes_survive_restore_and_replace_with_under_their_own_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "things.db"
    async with sqlite_adapter("things", INDEXED, path) as things:
        await things.insert_many([{"account": "a"}, {"account": "b"}])
        await things.backup(str(tmp_path / "backup"))
        await things.restore(str(tmp_path / "backup"))
        shadow = things.sibling("things_replay", things.specs)
        await shadow.connect()
        await shadow.insert({"account": "c"})
        await things.replace_with(shadow)
    with closing(sqlite3.connect(path)) as conn:
        found = conn.execute(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "ORDER BY 1, 2"
        ).fetchall()
    assert found == [
        ("things", "things$account$ux"),
        ("things", "things$n$ix"),
        ("things", "things$owner$ix"),
        ("things_replay", "things_replay$account$ux"),
        ("things_replay", "things_replay$n$ix"),
        ("things_replay", "things_replay$owner$ix"),
    ]


async def test_keys_are_looked_up_through_the_unique_index(tmp_path: Path) -> None:
    # The log may hold millions of keys: append_keyed must search the index, never scan.
    adapter = stores.sqlite(tmp_path)("log", {"event": "string", "key": "string"})
    assert isinstance(adapter, SqliteAdapter)
    adapter.declare_unique("key")
    await adapter.connect()
    try:
        conn = sqlite3.connect(tmp_path / "log.sqlite3")
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + adapter._holders_sql("key", 3), ["a", "b", "c"]
        ).fetchall()
        conn.close()
    finally:
        await adapter.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX log$key$ux" in details, details  # the unique index
    assert "SCAN" not in details, details


# ---------------------------------------------------------------------- statements, not rows
# sqlite3 lets go of the GIL around every step of a statement, and a worker thread then waits
# for the busy event loop to give it back (up to 5 ms each time): a write or read that steps
# once per row took seconds while the loop was busy. So many rows go in one statement (a
# write) or come back as one JSON document made in one step (a read).


async def _traced(adapter: SqliteAdapter, statements: list[str]) -> None:
    """Record the SQL every one of ``adapter``'s connections runs from now on (a callback
    set on the connection's own thread, by a job)."""

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append)

    await adapter._write(trace)
    await adapter._read(trace)


def _row_statements(statements: list[str], verb: str) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith(verb)]


async def test_a_batch_write_runs_a_few_statements_not_one_a_row(tmp_path: Path) -> None:
    from moleculerpy_cqrs.stores.ports import Changes

    fields = {"n": "integer", "name": "string", "tags": "json"}
    adapter = stores.sqlite(tmp_path)("things", fields)
    assert isinstance(adapter, SqliteAdapter)
    await adapter.connect()
    try:
        await adapter.insert_many([{"n": i, "name": f"x{i}", "tags": [i]} for i in range(1200)])
        statements: list[str] = []
        await _traced(adapter, statements)
        changes = Changes(
            inserts=[
                {"id": 5000 + i, "n": i, "name": "new", "tags": {"i": i}} for i in range(1200)
            ],
            updates={i: {"n": -i, "tags": ["u"]} for i in range(1, 601)},
            deletes=list(range(601, 1201)),
        )
        await adapter.apply(changes)
        # 1,200 inserts, 600 updates, 600 deletes: 500 rows a statement at most.
        assert len(_row_statements(statements, 'INSERT INTO "THINGS"')) == 3
        assert len(_row_statements(statements, 'UPDATE "THINGS"')) == 2
        assert len(_row_statements(statements, 'DELETE FROM "THINGS"')) == 2
        assert await adapter.count(ALL) == 1800
        assert await adapter.get(7) == {"id": 7, "n": -7, "name": "x6", "tags": ["u"]}
        assert await adapter.get(601) is None
        last = {"id": 6199, "n": 1199, "name": "new", "tags": {"i": 1199}}
        assert await adapter.get(6199) == last
    finally:
        await adapter.close()


async def test_a_duplicate_among_many_rows_names_its_value_and_writes_nothing(
    tmp_path: Path,
) -> None:
    from moleculerpy_cqrs.errors import ConflictError

    adapter = stores.sqlite(tmp_path)("things", {"code": {"type": "string", "unique": True}})
    assert isinstance(adapter, SqliteAdapter)
    await adapter.connect()
    try:
        await adapter.insert_many([{"code": "taken"}])
        rows = [{"code": f"c{i}"} for i in range(700)]
        rows[450] = {"code": "taken"}
        with pytest.raises(ConflictError) as raised:
            await adapter.insert_many(rows)
        assert raised.value.data["field"] == "code"
        assert raised.value.data["value"] == "taken"
        assert await adapter.count(ALL) == 1
    finally:
        await adapter.close()


async def test_a_read_of_many_rows_is_one_step_and_reads_back_every_value(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    fields: dict[str, FieldType] = {
        "name": "string",
        "n": "integer",
        "ok": "boolean",
        "at": "datetime",
        "doc": "json",
    }
    adapter = stores.sqlite(tmp_path)("things", dict(fields))
    assert isinstance(adapter, SqliteAdapter)
    await adapter.connect()
    try:
        odd = ["", "tab\there", 'quote " and \\ back', "ünï €𝄞", "line\nbreak", "\x01\x1f", "null"]
        records = [
            {
                "name": odd[i % len(odd)] if i % 5 else None,
                "n": (2**63 - 1 - i) if i % 2 else -(2**62) + i,
                "ok": bool(i % 3) if i % 4 else None,
                "at": datetime(2026, 1, 1, 12, 0, i % 60, 123456, tzinfo=UTC),
                "doc": {"x": [i, 0.1 + 0.2, None, True, odd[i % len(odd)]], "y": 1e300},
            }
            for i in range(3000)
        ]
        inserted = await adapter.insert_many(records)
        # Some gaps, so that id order is not insertion position.
        for entity_id in range(10, 3000, 7):
            await adapter.remove(entity_id)
        statements: list[str] = []
        await _traced(adapter, statements)
        found = await adapter.find(parse_find(fields, {}))
        want = [r for r in inserted if r["id"] % 7 != 3 or r["id"] < 10]
        assert found == want
        selects = _row_statements(statements, "SELECT")
        assert len(selects) == 1
        assert "json_group_array" in selects[0]
        # A sort asked for (or a float column) is read row by row, with the same values.
        statements.clear()
        by_name = await adapter.find(parse_find(fields, {"sort": "-n"}))
        assert by_name == sorted(want, key=lambda r: -r["n"])
        assert "json_group_array" not in " ".join(statements)
    finally:
        await adapter.close()


async def test_floats_and_long_results_are_read_row_by_row_exactly(tmp_path: Path) -> None:
    from moleculerpy_cqrs.stores.backends.sqlite import _ONE_STEP_ROWS

    adapter = stores.sqlite(tmp_path)("things", {"x": "float", "n": "integer"})
    assert isinstance(adapter, SqliteAdapter)
    await adapter.connect()
    try:
        values = [0.1 + 0.2, 1 / 3, 2.2250738585072014e-308, 123456789.12345679, -1e-300]
        await adapter.insert_many([{"x": v, "n": i} for i, v in enumerate(values)])
        assert [r["x"] for r in await adapter.find(ALL)] == values  # 17 digits kept
        more = _ONE_STEP_ROWS + 1 - len(values)
        await adapter.insert_many([{"x": None, "n": i} for i in range(more)])
        statements: list[str] = []
        await _traced(adapter, statements)
        ns = await adapter.find(parse_find({"x": "float", "n": "integer"}, {"fields": ["id", "n"]}))
        assert len(ns) == _ONE_STEP_ROWS + 1  # more than one step takes: read again by rows
        assert [r["id"] for r in ns] == list(range(1, _ONE_STEP_ROWS + 2))
        assert sum("json_group_array" in s for s in statements) == 1
    finally:
        await adapter.close()
