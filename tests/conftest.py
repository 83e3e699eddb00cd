"""Fixtures shared by every test package: a PostgreSQL server per session, a schema per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from moleculerpy_cqrs.testing.nats_server import NatsServer
from moleculerpy_cqrs.testing.postgres_server import PostgresServer, isolated_schema


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """``CQRS_TEST_POSTGRES_DSN`` if set, else a private server started once (never skipped:
    if no server can be had, the tests that need one fail)."""
    dsn = os.environ.get("CQRS_TEST_POSTGRES_DSN")
    if dsn:
        yield dsn
        return
    with PostgresServer() as server:
        yield server.dsn


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A fresh, empty schema for one test (stores use it with ``schema=``), dropped after."""
    with isolated_schema(postgres_dsn) as schema:
        yield schema


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A private NATS server for tests that cross nodes."""
    with NatsServer() as server:
        yield server.url
