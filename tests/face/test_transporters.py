"""``cqrs run`` and the operator commands refuse a transporter that cannot work before anything
starts, in one line, and never show a password (a real NATS server requiring one)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moleculerpy_cqrs.testing.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pw"


def cqrs(*commands: list[str], data: Path, prelude: str = "") -> list[tuple[int, str, str]]:
    """Run ``cqrs`` commands side by side; each one's exit code, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSPORTER"}
    env["CQRS_DATA"] = str(data)
    started = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"{prelude}\nfrom moleculerpy_cqrs.cli import main\nmain({command!r})",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    done = []
    for process in started:
        out, err = process.communicate(timeout=60)
        done.append((process.returncode, out, err))
    return done


def one_error_line(run: tuple[int, str, str]) -> str:
    code, out, err = run
    assert code == 2, run
    assert "ready" not in out, run
    lines = err.splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith("error: "), run
    return lines[0]


@pytest.fixture(scope="module")
def guarded() -> Iterator[NatsServer]:
    with NatsServer(user="alice", password=PASSWORD) as server:
        yield server


def test_a_refused_or_unknown_address_is_said_by_the_probe_not_after_a_timeout(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused, unknown = cqrs(
        ["run", "profile", "-t", f"nats://127.0.0.1:{port}"],
        ["run", "profile", "-t", "nats://no-such-host.invalid:4222"],
        data=tmp_path,
    )
    line = one_error_line(refused)
    assert f"connection refused by 127.0.0.1:{port}" in line
    assert "within" not in line  # not the join timeout's message
    assert "no address for host 'no-such-host.invalid'" in one_error_line(unknown)


def test_transporters_that_cannot_work_are_refused_before_ready(tmp_path: Path) -> None:
    tcp, redis, status = cqrs(
        ["run", "profile", "-t", "tcp://127.0.0.1:4222"],
        ["run", "profile", "-t", "redis://127.0.0.1:6379"],
        ["status", "-t", "redis://127.0.0.1:6379"],
        data=tmp_path,
        prelude="import sys; sys.modules['redis'] = None  # as if not installed",
    )
    line = one_error_line(tcp)
    assert "tcp://127.0.0.1:4222 is not a TCP transporter endpoint" in line
    assert "nats://127.0.0.1:4222" in line
    for run in (redis, status):
        line = one_error_line(run)
        assert "the redis:// transporter needs the 'redis' package" in line
        assert "pip install redis" in line


def test_refused_credentials_are_said_as_such_without_the_password(
    tmp_path: Path, guarded: NatsServer
) -> None:
    url = f"nats://alice:wrong-pw@127.0.0.1:{guarded.port}"
    bare = f"nats://127.0.0.1:{guarded.port}"
    runs = cqrs(
        ["run", "profile", "-t", url], ["status", "-t", url], ["dead-letters", "x", "-t", url],
        ["run", "profile", "-t", bare], data=tmp_path,
    )  # fmt: skip
    for run in runs[:3]:
        line = one_error_line(run)
        assert f"nats://alice:***@127.0.0.1:{guarded.port} refused the user and password" in line
        assert "Authorization Violation" in line
        assert "wrong-pw" not in line
    assert "refused no credentials" in one_error_line(runs[3])


def test_no_line_shows_the_password_of_a_working_transporter(
    tmp_path: Path, guarded: NatsServer
) -> None:
    url = f"nats://alice:{PASSWORD}@127.0.0.1:{guarded.port}"
    env = {k: v for k, v in os.environ.items() if k != "TRANSPORTER"}
    env["CQRS_DATA"] = str(tmp_path)
    node = subprocess.Popen(
        [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", "profile", "-t", url,
         "--node-id", "auth-n1", "--log-level", "debug"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert node.stdout is not None
        seen = []
        for line in node.stdout:  # ends if the node exits
            seen.append(line)
            if line.startswith("ready"):
                break
        else:
            raise AssertionError("the node did not come up:\n" + "".join(seen))
        (status,) = cqrs(["status", "-t", url, "--json"], data=tmp_path)
        assert status[0] == 0, status
    finally:
        node.send_signal(signal.SIGTERM)
        rest, _ = node.communicate(timeout=30)
    printed = "".join(seen) + rest + status[1] + status[2]
    assert f"node auth-n1 started on nats://alice:***@127.0.0.1:{guarded.port}" in printed
    assert "node auth-n1 stopped (SIGTERM)" in printed
    assert PASSWORD not in printed
