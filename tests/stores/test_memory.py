"""The memory backend: the conformance suite plus what is particular to it."""

from __future__ import annotations

import asyncio
import contextvars
import json
from pathlib import Path

import pytest

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.errors import StoreError
from moleculerpy_cqrs.stores.backends.memory import MemoryDatabase
from moleculerpy_cqrs.stores.base import Adapter, StoreFactory
from moleculerpy_cqrs.stores.fields import Declarations
from moleculerpy_cqrs.testing.conformance import ITEM_FIELDS, AdapterConformance


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestMemoryStore(AdapterConformance):
    def setup_method(self) -> None:
        self.database = MemoryDatabase()

    async def make_adapter(self, name: str, fields: Declarations) -> Adapter:
        return self.database.adapter(name, fields)


def test_the_factory_can_be_called_again() -> None:
    # Importing the backend module must not replace the ``stores.memory`` factory with it.
    first: StoreFactory = stores.memory()
    second: StoreFactory = stores.memory()
    assert (first("a").name, second("b").name) == ("a", "b")


async def test_the_same_name_shares_one_table() -> None:
    database = MemoryDatabase()
    first, second = database.adapter("t", {"n": "integer"}), database.adapter("t", {"n": "int"})
    await first.connect()
    await second.connect()
    row = await first.insert({"n": 1})
    assert await second.get(row["id"]) == row


async def test_tables_of_other_databases_are_separate() -> None:
    first, second = MemoryDatabase().adapter("t"), MemoryDatabase().adapter("t")
    await first.connect()
    await second.connect()
    await first.insert({})
    assert await second.count() == 0


async def test_backup_is_json_lines_and_a_manifest_named_after_the_table(tmp_path: Path) -> None:
    adapter = MemoryDatabase().adapter("things", ITEM_FIELDS)
    await adapter.connect()
    await adapter.insert({"name": "x"})
    await adapter.set_meta("checkpoint", 3)
    size = await adapter.backup(str(tmp_path))
    assert file_names(tmp_path) == ["things.manifest.json", "things.rows"]
    rows = (tmp_path / "things.rows").read_bytes()
    assert [json.loads(line)[:2] for line in rows.splitlines()] == [[1, "x"]]
    manifest = json.loads((tmp_path / "things.manifest.json").read_bytes())
    assert (manifest["rows_format"], manifest["rows"], manifest["meta"]) == (
        "json-lines",
        1,
        {"checkpoint": "3"},
    )
    assert size == len(rows) + (tmp_path / "things.manifest.json").stat().st_size


async def test_restore_refuses_a_backup_with_a_field_of_another_type(tmp_path: Path) -> None:
    database = MemoryDatabase()
    old = database.adapter("things", {"n": "string"})
    await old.connect()
    await old.insert({"n": "text"})
    await old.backup(str(tmp_path))
    other = MemoryDatabase().adapter("things", {"n": "integer"})
    await other.connect()
    await other.insert({"n": 5})
    with pytest.raises(StoreError, match="damaged"):
        await other.restore(str(tmp_path))
    assert [r["n"] for r in await other.find()] == [5]


def test_a_database_serves_one_event_loop_after_another() -> None:
    database = MemoryDatabase()

    async def contend() -> int:
        adapter = database.adapter("t", {"n": "integer"})
        await adapter.connect()
        async with adapter.transaction():
            waiting = asyncio.create_task(adapter.insert({"n": 2}), context=contextvars.Context())
            await adapter.insert({"n": 1})
        await waiting
        return await adapter.count()

    assert asyncio.run(contend()) == 2
    assert asyncio.run(contend()) == 4
