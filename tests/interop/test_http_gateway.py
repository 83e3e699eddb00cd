"""The profile example behind moleculerpy-web's gateway, over real HTTP on 127.0.0.1.

One node started as ``cqrs run profile web`` in a subprocess, on SQLite
files under ``$CQRS_DATA``; the gateway listens on a port uvicorn picks (``CQRS_HTTP_PORT=0``)
and names in its start-up line.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.profile_example import PROFILE_MODULE

ROOT = Path(__file__).resolve().parents[2]
WEB_EXAMPLE = "web"
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class Node:
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    log: list[str]
    base: str = ""

    def wait_for_line(self, pattern: re.Pattern[str], within: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.log.append(line)
            if found := pattern.search(line):
                return found
            if self.process.poll() is not None and self.lines.empty():
                break
        raise AssertionError(f"no line like {pattern.pattern!r}:\n{''.join(self.log)[-3000:]}")


def http(
    method: str, url: str, body: Any = None, *, raw: bytes | None = None,
    content_type: str = "application/json", headers: dict[str, str] | None = None,
) -> tuple[int, Any]:  # fmt: skip
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    env = {**os.environ, "CQRS_DATA": str(tmp_path), "CQRS_HTTP_PORT": "0"}
    env.pop("TRANSPORTER", None)
    command = [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", PROFILE_MODULE,
               str(WEB_EXAMPLE), "--node-id", "web-n1"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    output = process.stdout
    assert output is not None

    def read() -> None:
        for line in output:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    node = Node(process, lines, [])
    try:
        port = node.wait_for_line(LISTENING)[1]
        node.base = f"http://127.0.0.1:{port}/api"
        yield node
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(5)
        output.close()


def summary_once(node: Node, totals: dict[str, int], within: float = 20.0) -> list[Any]:
    """The summary rows once the projection shows ``totals`` (the read side lags the
    writes a little, and HTTP offers nothing to await)."""
    deadline = time.monotonic() + within
    while True:
        status, page = http("GET", f"{node.base}/profile-summary?sort=country")
        assert status == 200, page
        if {row["country"]: row["total"] for row in page["rows"]} == totals:
            return list(page["rows"])
        assert time.monotonic() < deadline, page
        time.sleep(0.05)


def test_commands_and_reads_over_http(node: Node) -> None:
    profiles = [
        {"name": "Ann", "country": "NZ", "married": True},
        {"name": "Bo", "country": "NZ", "student": True},
        {"name": "Cy", "country": "AU"},
    ]
    answers = [http("POST", f"{node.base}/profile/update", p) for p in profiles]
    assert [status for status, _ in answers] == [200] * 3
    assert [a["payload"] for _, a in answers] == profiles
    assert {a["event"] for _, a in answers} == {"profile.updated"}

    rows = summary_once(node, {"AU": 1, "NZ": 2})
    nz = next(row for row in rows if row["country"] == "NZ")
    assert (nz["totalMarried"], nz["totalStudents"]) == (1, 1)

    status, page = http("GET", f"{node.base}/profile-summary?sort=country&page=2&pageSize=1")
    assert status == 200
    assert (page["page"], page["pageSize"], page["total"], page["totalPages"]) == (2, 1, 2, 2)
    assert [row["country"] for row in page["rows"]] == ["NZ"]
    assert http("GET", f"{node.base}/profile-summary/{nz['id']}") == (200, nz)

    status, events = http("GET", f"{node.base}/profile-events?sort=id")
    assert status == 200
    assert [e["payload"] for e in events["rows"]] == profiles  # the commands, stored in order


def test_errors_keep_their_status_and_change_nothing(node: Node) -> None:
    status, refused = http(
        "POST", f"{node.base}/profile/update", {"name": "a\u0000b", "country": "NZ"}
    )
    assert (status, refused["code"]) == (422, 422), refused
    assert "NUL" in refused["message"]
    status, events = http("GET", f"{node.base}/profile-events")
    assert (status, events["total"]) == (200, 0)  # nothing was stored

    status, unknown = http("GET", f"{node.base}/profile-summary?colour=red")
    assert (status, unknown["code"]) == (422, 422), unknown
    assert "colour" in unknown["message"]

    status, missing = http("GET", f"{node.base}/profile-summary/999999")
    assert (status, missing["code"]) == (404, 404), missing
    assert "999999" in missing["message"]

    status, nowhere = http("GET", f"{node.base}/nowhere")
    assert status == 404, nowhere


def test_bad_commands_are_refused_by_the_examples_schema_and_nothing_is_stored(
    node: Node,
) -> None:
    update = f"{node.base}/profile/update"
    status, missing = http("POST", update, {"name": "NoCountry"})
    assert (status, missing["code"]) == (422, 422), missing
    assert "country" in missing["message"]
    status, wrong = http("POST", update, {"name": "Ann", "country": 42})
    assert (status, wrong["code"]) == (422, 422), wrong
    assert "country" in wrong["message"]
    status, married = http("POST", update, {"name": "Ann", "country": "NZ", "married": "yes"})
    assert status == 422, married

    for content_type, raw in (("text/plain", b"hello"), ("application/x-www-form-urlencoded",
                              b"name=Ann&country=NZ"), ("", b'{"name": "Ann"}')):  # fmt: skip
        status, unsupported = http("POST", update, raw=raw, content_type=content_type)
        assert status == 415, (content_type, unsupported)
        assert "application/json" in unsupported["message"]
    status, malformed = http("POST", update, raw=b"{name: Ann")
    assert status == 400, malformed

    status, events = http("GET", f"{node.base}/profile-events")
    assert (status, events["total"]) == (200, 0)  # nothing was stored
    status, dead = http("GET", f"{node.base}/profile-summary?pageSize=1")
    assert (status, dead["total"]) == (200, 0)


def test_the_idempotency_key_header_makes_a_post_safe_to_retry(node: Node) -> None:
    update = f"{node.base}/profile/update"
    ann = {"name": "Ann", "country": "NZ"}
    status, first = http("POST", update, ann, headers={"Idempotency-Key": '"order-7"'})
    assert status == 200, first
    unquoted = {"Idempotency-Key": "order-7"}
    status, again = http("POST", update, ann, headers=unquoted)
    assert status == 200, again
    assert again["id"] == first["id"]
    assert again["payload"] == ann

    status, conflict = http("POST", update, {**ann, "name": "Bo"}, headers=unquoted)
    assert (status, conflict["code"]) == (409, 409), conflict
    assert "order-7" in conflict["message"]
    assert conflict["data"]["id"] == first["id"]

    status, bad = http("POST", update, ann, headers={"Idempotency-Key": "x" * 201})
    assert (status, bad["code"]) == (422, 422), bad
    assert "idempotency key" in bad["message"]

    status, events = http("GET", f"{node.base}/profile-events")
    assert (status, events["total"]) == (200, 1)  # stored once
