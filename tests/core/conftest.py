from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from moleculerpy_cqrs.stores import StoreFactory
from moleculerpy_cqrs.stores import memory as memory_store
from moleculerpy_cqrs.stores import postgres as postgres_store
from moleculerpy_cqrs.stores import sqlite as sqlite_store
from moleculerpy_cqrs.testing.postgres_server import isolated_schema

MakeStore = Callable[[], StoreFactory]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """A maker of store factories on one backend (each call: a fresh, empty database)."""
    kind: str = request.param
    counter = itertools.count()
    if kind == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")

        def make_pg() -> StoreFactory:
            schema = _schema(request, dsn)
            return postgres_store(dsn, schema=schema)

        return make_pg

    def make() -> StoreFactory:
        if kind == "memory":
            return memory_store()
        return sqlite_store(tmp_path / f"db{next(counter)}")

    return make


def _schema(request: pytest.FixtureRequest, dsn: str) -> str:
    manager = isolated_schema(dsn)
    schema = manager.__enter__()
    request.addfinalizer(lambda: manager.__exit__(None, None, None))
    return schema
