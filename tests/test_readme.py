"""The README is executable: its Python blocks run as written, in an empty folder."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\dT")  # MoleculerPy logs to stdout


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_opens_with_exactly_two_set_up_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert [c for c in commands if c] == ["./scripts/demo", "./scripts/test"]
    assert README.index(first.group(0)) < README.index("## ")


def test_the_quickstart_is_short() -> None:
    (quickstart, *_) = python_blocks()
    assert len(quickstart.strip().splitlines()) <= 45
    ast.parse(quickstart)


def test_the_quickstart_runs_and_does_what_it_says(tmp_path: Path) -> None:
    (quickstart, *_) = python_blocks()
    done = subprocess.run(
        [sys.executable, "-c", quickstart],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if not LOG_LINE.match(line)]
    saved, found = printed
    assert saved == "profile.updated 0 {'name': 'John', 'country': 'NZ'}"
    assert "'country': 'NZ'" in found
    assert "'total': 1" in found
    # Its own folder and names: the demo's ./data and tables are never touched.
    assert (tmp_path / "quickstart" / "quickstartEvents.sqlite3").exists()
    assert not (tmp_path / "data").exists()
    assert "profileEventStore" not in quickstart
    assert "profileSummaryAggregate" not in quickstart


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the sockets are closed before the ports are used)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [int(each.getsockname()[1]) for each in sockets]
    finally:
        for each in sockets:
            each.close()


def command_block() -> str:
    """The README's block of operator commands (the one that exports TRANSPORTER)."""
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
                if "export TRANSPORTER" in b]  # fmt: skip
    return str(block)


def test_every_cqrs_command_of_the_readme_runs_as_written(tmp_path: Path, nats_url: str) -> None:
    """The block runs in bash, in an empty folder, with the installed ``cqrs`` on PATH; the
    changes are the NATS server's address (``nats_url``, a private server, for 127.0.0.1:4222)
    and the pages' ports (free ones, for 8000 and 8001, which other programs may hold)."""
    block = command_block()
    assert "export TRANSPORTER=nats://127.0.0.1:4222" in block
    assert "--ui-port 8000 &" in block
    assert "cqrs ui --port 8001 &" in block
    ports = free_ports(2)
    script = (
        block.replace("nats://127.0.0.1:4222", nats_url)
        .replace("--ui-port 8000", f"--ui-port {ports[0]}")
        .replace("--port 8001", f"--port {ports[1]}")
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSPORTER", "CQRS_DATA")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"{script}\nwait\n"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    assert "2000 updates stored and projected" in out  # the demo
    assert "node n1 started on " + nats_url in out  # the node says what it runs
    assert "aggregate profileSummaryAggregate (fed by profileEventStore)" in out
    assert '"event": "profile.updated"' in out  # cqrs call answers the stored event as JSON
    assert f"snapshots in {tmp_path / 'data' / 'backups'}" in out
    snapshot = re.search(r"restored profileSummaryAggregate from (snapshot_[0-9a-f]{16})", out)
    assert snapshot is not None, out  # snapshot, then restore, of the example's own aggregate
    assert (tmp_path / "data" / "backups" / snapshot[1] / "profileSummaryAggregate").exists()
    assert re.search(r"replay of profileSummaryAggregate done: 20\d\d events", out), out
    assert "node n1 stopped (SIGTERM)" in out
    assert f"page on http://127.0.0.1:{ports[0]}/ (read-only)" in out
    assert f"page on http://127.0.0.1:{ports[1]}/ (read-only)" in out
    assert "page stopped (SIGTERM)" in out
    assert "Traceback" not in done.stderr
