"""``cqrs call``, ``cqrs --version`` and ``cqrs dead-letters --discard`` against a real cluster:
a private NATS server and one ``cqrs run tests/face/calls_node.py`` node in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import moleculerpy
import pytest

import moleculerpy_cqrs
from moleculerpy_cqrs.testing.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[2]
CALLS_NODE = Path(__file__).with_name("calls_node.py")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def cqrs(*args: str, transporter: str | None = None) -> Run:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TRANSPORTER", None)
    full = [*args, "--transporter", transporter] if transporter else list(args)
    done = subprocess.run(
        [sys.executable, "-m", "moleculerpy_cqrs.cli", *full],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("calls-data")
    with NatsServer() as server:
        env = {**os.environ, "CQRS_DATA": str(data)}
        env.pop("TRANSPORTER", None)
        command = [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", str(CALLS_NODE),
                   "--transporter", server.url, "--node-id", "calls-n1"]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            seen = []
            for line in process.stdout:  # ends if the node exits
                seen.append(line)
                if line.startswith("ready"):
                    break
            else:
                raise AssertionError("the node did not come up:\n" + "".join(seen))
            yield server.url
        finally:
            process.terminate()
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()


def test_version() -> None:
    run = cqrs("--version")
    assert run.code == 0
    assert run.out.strip() == (
        f"moleculerpy-cqrs {moleculerpy_cqrs.__version__} (MoleculerPy {moleculerpy.__version__})"
    )


def test_call_prints_the_answer_as_json(url: str) -> None:
    run = cqrs("call", "shop.whoami", '{"a": [1, 2]}', "--meta", '{"user": "ann"}', transporter=url)
    assert run.code == 0, run
    assert json.loads(run.out) == {"params": {"a": [1, 2]}, "user": "ann"}
    placed = cqrs("call", "shop.place", '{"sku": "a"}', transporter=url)
    assert json.loads(placed.out)["event"] == "order.placed"


def test_call_prints_an_errors_name_code_and_data(url: str) -> None:
    run = cqrs("call", "shop.refuse", transporter=url)
    assert run.code == 1, run
    assert run.out == ""
    first, data = run.err.splitlines()
    assert first.startswith("error: ValidationError (422")
    assert "no such sku" in first
    assert data.startswith("data: ")
    assert json.loads(data.removeprefix("data: "))["field"] == "sku"


def test_call_refuses_bad_json_and_unknown_actions(url: str) -> None:
    bad = cqrs("call", "shop.whoami", "{name: 1}", transporter=url)
    assert bad.code == 2
    assert bad.err.startswith("error: PARAMS_JSON is not JSON")
    unknown = cqrs("call", "shop.nothing", "--timeout", "1", transporter=url)
    assert unknown.code == 2
    assert "no action 'shop.nothing' in the cluster" in unknown.err


def test_dead_letters_are_discarded_and_the_discard_is_recorded(url: str) -> None:
    placed = cqrs("call", "shop.place", '{"sku": "poison"}', transporter=url)
    event_id = json.loads(placed.out)["id"]
    listed = cqrs("dead-letters", "shipping", "--json", transporter=url)
    (letter,) = [row for row in json.loads(listed.out)["rows"] if row["eventId"] == event_id]

    gone = cqrs("dead-letters", "shipping", "--discard", str(letter["id"]), transporter=url)
    assert gone.code == 0, gone
    assert gone.out.startswith("shipping: discarded 1 (by ")
    assert "remaining 0" in gone.out
    again = cqrs("dead-letters", "shipping", "--retry", transporter=url)
    assert "remaining 0" in again.out

    kept = cqrs("dead-letters", "shipping", "--discarded", "--json", transporter=url)
    (row,) = json.loads(kept.out)["rows"]
    assert row["deadLetterId"] == letter["id"]
    assert row["eventId"] == event_id
    assert "@" in row["discardedBy"]
    table = cqrs("dead-letters", "shipping", "--discarded", transporter=url)
    assert "cannot ship poison" in table.out
    assert row["discardedBy"] in table.out


def test_ids_go_with_discard_only() -> None:
    run = cqrs("dead-letters", "shipping", "3", "--transporter", "nats://127.0.0.1:1")
    assert run.code == 2
    assert "dead-letter ids go with --discard" in run.err
