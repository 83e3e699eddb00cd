"""The operator's web page over real HTTP: who may act, what it shows, and `cqrs ui`.

One node runs ``cqrs run profile tests/face/ops_node.py --ui-port 0 --ui-token ...`` on a
private NATS server (SQLite files under ``$CQRS_DATA``), fed as the operator tests feed it.
The browser test (``test_browser.py``) opens the same kind of node in Chromium.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moleculerpy_cqrs.face.model import AggregateStatus, ClusterStatus
from moleculerpy_cqrs.face.ui.history import History
from moleculerpy_cqrs.testing.nats_server import NatsServer
from tests.face.test_operator import AGGREGATES, EVENT_STORES, NODE_ID, OPS_NODE, _feed, with_broker

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class PageNode:
    url: str  # the page's
    transporter: str
    data: Path
    process: subprocess.Popen[str]


class Lines:
    """A process's output lines, read in a thread, awaited with a bound."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        process.stdout.close()
        with self.changed:
            self.lines.append("<eof>")
            self.changed.notify_all()

    def wait_for(self, pattern: str, within: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(regex.search(line) for line in self.lines) or "<eof>" in self.lines,
                within,
            )
            for line in self.lines:
                if match := regex.search(line):
                    return match
        raise AssertionError(
            f"{pattern!r} never showed (waited: {found}):\n" + "\n".join(self.lines)
        )


def start_page_node(transporter: str, data: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``cqrs run profile ops_node.py --ui-port 0 ...``; answers the process and the page's URL."""
    command = [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", "profile", str(OPS_NODE),
               "-t", transporter, "--node-id", NODE_ID, "--ui-port", "0", *extra]  # fmt: skip
    env = {**os.environ, "CQRS_DATA": str(data)}
    for name in ("TRANSPORTER", "CQRS_UI_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = Lines(process)
    url = lines.wait_for(r"page on (http://127\.0\.0\.1:\d+/)")[1]
    lines.wait_for("^ready")
    return process, url


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def page_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageNode]:
    data = tmp_path_factory.mktemp("cqrs-ui")
    with NatsServer() as server:
        process, url = start_page_node(server.url, data, "--ui-token", TOKEN)
        try:
            with_broker(server.url, _feed, process=None, within=30.0)
            yield PageNode(url, server.url, data, process)
        finally:
            stop(process)


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


def http(
    url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Answer:  # fmt: skip
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"Content-Type": "application/json"} if method == "POST" else {}
    request = urllib.request.Request(url, data=data, method=method, headers=sent | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read().decode()
            status, got = answer.status, dict(answer.headers)
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        status, got = error.code, dict(error.headers)
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    return Answer(status, parsed, got)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def snapshot_ids(node: PageNode, aggregate: str) -> set[str]:
    answer = http(f"{node.url}api/aggregates/{aggregate}/snapshots")
    assert answer.status == 200, answer
    return {row["snapshot_id"] for row in answer.body["rows"]}


def test_the_page_and_the_status_are_read_without_a_token(page_node: PageNode) -> None:
    page = http(page_node.url)
    assert page.status == 200
    assert "<title>cqrs</title>" in page.body
    assert "default-src 'none'" in page.headers["content-security-policy"]

    status = http(f"{page_node.url}api/status").body
    assert {s["name"] for s in status["eventStores"]} == EVENT_STORES
    assert {a["name"] for a in status["aggregates"]} == AGGREGATES
    assert status["canAct"] is True
    shipments = next(a for a in status["aggregates"] if a["name"] == "shipments")
    assert shipments["dead_letters"] == 1
    assert shipments["lease"]["node"] == NODE_ID
    assert shipments["history"], "the sampler keeps the chart's points"

    letters = http(f"{page_node.url}api/aggregates/shipments/dead-letters").body
    (letter,) = letters["rows"]
    assert "cannot ship poison" in letter["error"]


def test_actions_need_the_token_from_the_same_site_and_change_nothing_otherwise(
    page_node: PageNode,
) -> None:
    url = f"{page_node.url}api/aggregates/orderTotals/snapshot"
    before = snapshot_ids(page_node, "orderTotals")
    refused = {
        "no token": http(url, method="POST", body={}),
        "wrong token": http(url, method="POST", body={}, headers=bearer("wrong")),
        "a prefix of it": http(url, method="POST", body={}, headers=bearer(TOKEN[:-1])),
        "token in the URL": http(f"{url}?token={TOKEN}", method="POST", body={}),
        "basic auth": http(
            url, method="POST", body={}, headers={"Authorization": f"Basic {TOKEN}"}
        ),
        "another site (Origin)": http(
            url, method="POST", body={}, headers=bearer(TOKEN) | {"Origin": "http://evil.test"}
        ),
        "another site (Sec-Fetch-Site)": http(
            url, method="POST", body={}, headers=bearer(TOKEN) | {"Sec-Fetch-Site": "cross-site"}
        ),
        "a form post": http(
            url,
            method="POST",
            raw=b"x=1",
            headers=bearer(TOKEN) | {"Content-Type": "application/x-www-form-urlencoded"},
        ),
    }
    statuses = {why: answer.status for why, answer in refused.items()}
    assert statuses == {
        "no token": 401, "wrong token": 403, "a prefix of it": 403, "token in the URL": 401,
        "basic auth": 401, "another site (Origin)": 403, "another site (Sec-Fetch-Site)": 403,
        "a form post": 415,
    }  # fmt: skip
    assert refused["no token"].headers["www-authenticate"] == "Bearer"
    assert all("error" in answer.body for answer in refused.values())
    assert snapshot_ids(page_node, "orderTotals") == before  # nothing was taken

    same_site = bearer(TOKEN) | {
        "Origin": page_node.url.rstrip("/"),
        "Sec-Fetch-Site": "same-origin",
    }
    taken = http(url, method="POST", body={}, headers=same_site)
    assert taken.status == 200, taken
    assert snapshot_ids(page_node, "orderTotals") == before | {taken.body["snapshotId"]}


def test_bad_action_input_is_a_4xx_saying_what_to_send(page_node: PageNode) -> None:
    base = f"{page_node.url}api/aggregates"
    auth = bearer(TOKEN)
    bad_ids = http(f"{base}/shipments/retry", method="POST", body={"ids": "all"}, headers=auth)
    no_id = http(f"{base}/orderTotals/restore", method="POST", body={}, headers=auth)
    unknown = http(
        f"{base}/orderTotals/restore", method="POST",
        body={"snapshotId": "snapshot_0000000000000000"}, headers=auth,
    )  # fmt: skip
    not_json = http(f"{base}/orderTotals/replay", method="POST", raw=b"{", headers=auth)
    assert (bad_ids.status, no_id.status, unknown.status, not_json.status) == (422, 422, 404, 400)
    assert "snapshot_0000000000000000" in unknown.body["error"]
    page = http(f"{base}/shipments/dead-letters?page=zero")
    assert page.status == 422
    assert "page" in page.body["error"]


def test_the_log_is_paged_and_filtered_and_one_event_shown(page_node: PageNode) -> None:
    base = f"{page_node.url}api/event-stores/opsEventStore/events"
    shipped = http(f"{base}?event=order.shipped&pageSize=2").body
    assert shipped["total"] == 4
    assert shipped["totalPages"] == 2
    assert [row["event"] for row in shipped["rows"]] == ["order.shipped"] * 2
    assert shipped["rows"][0]["id"] > shipped["rows"][1]["id"]  # newest first
    later = http(f"{base}?event=order.shipped&pageSize=2&page=2").body
    ids = [r["id"] for r in shipped["rows"] + later["rows"]]
    assert len(set(ids)) == 4

    newest = shipped["rows"][0]
    since = http(f"{base}?since={newest['created']}").body
    assert all(row["created"] >= newest["created"] for row in since["rows"])
    assert newest["id"] in [row["id"] for row in since["rows"]]
    before = http(f"{base}?until={newest['created']}").body
    assert newest["id"] not in [row["id"] for row in before["rows"]]
    assert http(f"{base}?since=yesterday").status == 422

    one = http(f"{base}/{newest['id']}").body
    assert one["payload"] == {"sku": "sku3", "qty": 4}
    unknown = http(f"{page_node.url}api/event-stores/nope/events")
    assert unknown.status == 404
    assert "unknown event store 'nope'" in unknown.body["error"]


def test_cqrs_ui_is_a_node_of_its_own_and_read_only_without_a_token(page_node: PageNode) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSPORTER", "CQRS_UI_TOKEN")}
    process = subprocess.Popen(
        [sys.executable, "-m", "moleculerpy_cqrs.cli", "ui", "-t", page_node.transporter,
         "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = Lines(process)
        url = lines.wait_for(r"page on (http://127\.0\.0\.1:\d+/) \(read-only\)")[1]
        status = http(f"{url}api/status").body
        assert {a["name"] for a in status["aggregates"]} == AGGREGATES
        assert status["canAct"] is False
        shipments = next(a for a in status["aggregates"] if a["name"] == "shipments")
        assert shipments["nodes"] == [NODE_ID]  # the page's own node runs nothing

        before = snapshot_ids(page_node, "orderTotals")
        refused = http(
            f"{url}api/aggregates/orderTotals/snapshot", method="POST", body={},
            headers=bearer(TOKEN),
        )  # fmt: skip
        assert refused.status == 403
        assert "read-only" in refused.body["error"]
        assert snapshot_ids(page_node, "orderTotals") == before
    finally:
        process.send_signal(2)
        try:
            assert process.wait(20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()
    assert lines.wait_for(r"page stopped \(SIGINT\)")


# --------------------------------------------------------------------------- the charts' history


def cluster_with(checkpoint: int, head: int) -> ClusterStatus:
    status = AggregateStatus.from_answer({
        "kind": "aggregate", "name": "a", "state": "running", "checkpoint": checkpoint,
        "head": head, "lag": {"events": head - checkpoint, "seconds": 0.0},
    })  # fmt: skip
    return ClusterStatus((), (status,))


def test_a_projector_is_stalled_when_nothing_is_applied_and_the_lag_does_not_shrink() -> None:
    history = History(stall_after=30)
    history.add(cluster_with(10, 10), at=1000)
    history.add(cluster_with(10, 15), at=1010)  # events arrive
    assert not history.stalled("a", now=1010)  # not watched long enough to say
    history.add(cluster_with(10, 20), at=1045)  # 35 s, nothing applied, lag grew
    assert history.stalled("a", now=1045)
    assert history.samples("a")[-1].rate == 0

    moving = History(stall_after=30)
    moving.add(cluster_with(10, 20), at=1000)
    moving.add(cluster_with(15, 40), at=1040)  # lag grew, but events were applied
    assert not moving.stalled("a", now=1040)
    assert moving.samples("a")[-1].rate == 5 / 40

    caught_up = History(stall_after=30)
    caught_up.add(cluster_with(10, 10), at=1000)
    caught_up.add(cluster_with(10, 10), at=1100)  # idle with no lag: not stalled
    assert not caught_up.stalled("a", now=1100)

    restored = History(stall_after=30)
    restored.add(cluster_with(50, 50), at=1000)
    restored.add(cluster_with(20, 50), at=1010)  # a restore moved the checkpoint back
    assert restored.samples("a")[-1].rate == 0


def test_the_history_keeps_fifteen_minutes() -> None:
    history = History()
    for second in range(0, 20 * 60, 10):
        history.add(cluster_with(second, second), at=float(second))
    kept = history.samples("a")
    assert kept[0].at >= kept[-1].at - 15 * 60
    assert len(kept) == 15 * 6 + 1
