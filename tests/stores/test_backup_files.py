"""The backup layout every backend shares (stores/backup_files.py): what a restore refuses
before it changes anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.errors import StoreError
from moleculerpy_cqrs.stores.backup_files import VERSION, Manifest

FIELDS = {"name": "string", "n": "integer"}


async def test_a_memory_backup_restores_and_its_manifest_says_what_it_holds(
    tmp_path: Path,
) -> None:
    table = stores.memory(FIELDS)("things")
    await table.connect()
    await table.insert_many([{"name": "a", "n": 1}, {"name": "b"}])
    await table.set_meta("checkpoint", {"position": 2})
    await table.backup(str(tmp_path))
    manifest = Manifest.parse((tmp_path / "things.manifest.json").read_bytes())
    assert (manifest.rows_format, manifest.table, manifest.rows) == ("json-lines", "things", 2)
    assert manifest.fields == FIELDS
    assert manifest.meta == {"checkpoint": '{"position":2}'}
    await table.remove_many(stores.Query())
    await table.restore(str(tmp_path))
    assert [r["name"] for r in await table.find()] == ["a", "b"]
    assert await table.get_meta("checkpoint") == {"position": 2}


async def test_a_backup_in_another_backends_rows_form_is_refused(tmp_path: Path) -> None:
    source = stores.memory(FIELDS)("things")
    await source.connect()
    await source.insert({"name": "a"})
    await source.backup(str(tmp_path / "backup"))
    async with stores.sqlite(tmp_path / "db", FIELDS)("things") as target:
        await target.insert({"name": "kept"})
        with pytest.raises(StoreError, match="its rows are json-lines, this store reads sqlite"):
            await target.restore(str(tmp_path / "backup"))
        assert [r["name"] for r in await target.find()] == ["kept"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"version": VERSION - 1}, "version"),
        ({"format": "something else"}, "not a moleculerpy-cqrs backup"),
        ({"sequence": "12"}, "'sequence'"),
        ({"fields": {"name": "text"}}, "damaged"),
        ({"size": 1}, "bytes, its manifest says 1"),
    ],
)
async def test_a_manifest_that_does_not_fit_is_refused_and_nothing_changes(
    tmp_path: Path, change: dict[str, object], why: str
) -> None:
    table = stores.memory(FIELDS)("things")
    await table.connect()
    await table.insert({"name": "a"})
    await table.backup(str(tmp_path))
    path = tmp_path / "things.manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_bytes()), **change}))
    await table.insert({"name": "b"})
    with pytest.raises(StoreError, match="damaged") as refused:
        await table.restore(str(tmp_path))
    assert why in str(refused.value)
    assert await table.count() == 2


async def test_a_backup_without_a_manifest_is_no_backup(tmp_path: Path) -> None:
    table = stores.memory(FIELDS)("things")
    await table.connect()
    await table.backup(str(tmp_path))
    (tmp_path / "things.manifest.json").unlink()  # as a backup made before the manifest
    missing = r"no backup of 'things' in .*: things\.manifest\.json is missing"
    with pytest.raises(StoreError, match=missing):
        await table.restore(str(tmp_path))
