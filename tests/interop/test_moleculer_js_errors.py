"""A Moleculer.js client (npm ``moleculer`` 0.14.36 over a real NATS server) sees our errors
under moleculer-db's names and codes, with their data.

Moleculer.js comes from ``tests/interop/node`` (``npm ci`` by the interop fixture).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker, Settings

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.testing.nats_server import NatsServer
from tests.interop.node_script import run_node_script

CLIENT = """
const { ServiceBroker } = require("moleculer");
const [url, calls] = process.argv.slice(2);
const broker = new ServiceBroker({ nodeID: `js-${process.pid}`, transporter: url, logger: false });
(async () => {
    await broker.start();
    await broker.waitForServices(["noteAggregate"], 10000);
    const out = {};
    for (const [label, action, params] of JSON.parse(calls)) {
        try {
            out[label] = { answer: await broker.call(action, params) };
        } catch (e) {
            out[label] = { name: e.name, code: e.code, type: e.type, data: e.data };
        }
    }
    console.log(JSON.stringify(out));
    await broker.stop();
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture
def node_modules(node_dir: Path) -> Path:
    return node_dir / "node_modules"


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:
        yield server.url


@pytest.fixture
async def python_node(nats_url: str) -> AsyncIterator[ServiceBroker]:
    events = EventStore("noteEventStore", stores.memory())
    notes = Aggregate("noteAggregate", stores.memory(fields={"name": "string"})).snapshot(
        "noteEventStore"
    )

    class Notes(events.mixin(), notes.mixin(), Service):  # type: ignore[misc]
        name = "notes"

    broker = ServiceBroker("py-node", settings=Settings(transporter=nats_url, log_level="CRITICAL"))
    await broker.register(Notes())
    await broker.start()
    yield broker
    await broker.stop()


async def _from_moleculer_js(
    node_modules: Path, url: str, calls: list[tuple[str, str, Any]], tmp_path: Path
) -> dict[str, Any]:
    script = tmp_path / "client.js"
    script.write_text(CLIENT)
    answer: dict[str, Any] = await run_node_script(node_modules, script, url, json.dumps(calls))
    return answer


async def test_a_moleculer_js_client_sees_moleculer_db_error_names(
    node_modules: Path, nats_url: str, python_node: ServiceBroker, tmp_path: Path
) -> None:
    seen = await _from_moleculer_js(
        node_modules,
        nats_url,
        [
            ("missing", "noteAggregate.get", {"id": 99}),
            ("invalid", "noteAggregate.find", {"name": {"like": "A%"}}),
            ("readonly", "noteAggregate.create", {"name": "stray"}),
            ("fine", "noteAggregate.count", {}),
        ],
        tmp_path,
    )
    assert seen["missing"] == {
        "name": "EntityNotFoundError",
        "code": 404,
        "type": None,  # as moleculer-db's own: MoleculerClientError(msg, 404, null, {id})
        "data": {"id": 99},
    }
    # moleculer-db's come from Moleculer's validator: same name, code and type; its data is
    # fastest-validator's list of problems, ours one object (see the README's table)
    assert (seen["invalid"]["name"], seen["invalid"]["code"]) == ("ValidationError", 422)
    assert seen["invalid"]["type"] == "VALIDATION_ERROR"
    assert seen["invalid"]["data"]["field"] == "name"
    assert (seen["readonly"]["name"], seen["readonly"]["code"]) == ("ReadOnlyAggregateError", 405)
    assert seen["fine"] == {"answer": 0}
