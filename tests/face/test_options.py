"""Every ``cqrs`` command refuses a bad value with one line that says what to give, exit code 2,
nothing on stdout and no traceback; the demo works from any folder, and piped, its lines stay
whole."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moleculerpy_cqrs.cli import main
from moleculerpy_cqrs.face import options


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str


def cqrs(*commands: list[str], cwd: Path, env: dict[str, str] | None = None) -> list[Run]:
    """Run ``cqrs`` commands side by side, output piped (not a terminal)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TRANSPORTER", "COLUMNS")}
    started = [
        (
            tuple(command),
            subprocess.Popen(
                [sys.executable, "-m", "moleculerpy_cqrs.cli", *command],
                cwd=cwd,
                env={**environment, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for command in commands
    ]
    runs = []
    for args, process in started:
        out, err = process.communicate(timeout=120)
        runs.append(Run(args, process.returncode, out, err))
    return runs


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


BAD: list[tuple[list[str], str]] = [
    (["demo", "--count", "-5"], "--count -5: give a whole number >= 1"),
    (["demo", "--count", "0"], "--count 0: give a whole number >= 1"),
    (["demo", "--concurrency", "0"], "--concurrency 0: give a whole number >= 1"),
    (["demo", "--count", "many"], "Invalid value for '--count'"),
    (["demo", "--data", "{file}/data"], "Not a directory; give a folder this user can"),
    (["run", "profile", "-t", "localhost:4222"], "give a URL such as nats://127.0.0.1:4222"),
    (["run", "profile", "-t", "nats://"], "give a URL such as nats://127.0.0.1:4222"),
    (["run", "profile", "-t", "nats://host:port"], "--transporter 'nats://host:port': give"),
    (["run", "profile", "-t", "carrier-pigeon://x"], "(schemes: nats://, redis://"),
    (["run", "profile", "--node-id", "a b"], "--node-id 'a b': give letters, digits"),
    (["run", "profile", "--node-id", "n.>"], "--node-id 'n.>': give letters, digits"),
    (["run", "profile", "--node-id", ""], "--node-id '': give letters, digits"),
    (["run", "profile", "--log-level", "loud"], "give one of debug, info, warning, error"),
    (["run", "no_such_module_here"], "no module 'no_such_module_here' here"),
    (["run", "./nothing.py"], "no Python file at './nothing.py'"),
    (["run"], "Missing argument"),
    (["status", "-t", "nats:/x"], "--transporter 'nats:/x': give a URL"),
    (["status", "--timeout", "-1"], "--timeout -1.0: give seconds > 0"),
    (["status", "--timeout", "0"], "--timeout 0.0: give seconds > 0"),
    (["snapshot", "agg", "-t", "nats://"], "--transporter 'nats://': give a URL"),
    (["snapshots", "agg", "-t", "x"], "--transporter 'x': give a URL"),
    (["restore", "agg", "snapshot_1", "-t", "x"], "--transporter 'x': give a URL"),
    (["replay", "agg", "-t", "x"], "--transporter 'x': give a URL"),
    (["dead-letters", "agg", "-t", "x"], "--transporter 'x': give a URL"),
    (["dead-letters", "agg", "--page", "0"], "Invalid value for '--page'"),
    (["dead-letters", "agg", "--page-size", "5000"], "Invalid value for '--page-size'"),
    (["snapshot"], "Missing argument"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["status", "--no-such-option"], "No such option"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(args) for args, _ in BAD])
def test_bad_values_are_one_line_exit_2_and_nothing_else(
    args: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "60")  # narrow: nothing may wrap
    monkeypatch.delenv("TRANSPORTER", raising=False)
    file = a_file(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main([arg.format(file=file) for arg in args])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, ""), err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert not (tmp_path / "data").exists()  # a refused demo stored nothing


def test_a_bad_value_in_a_subprocess_is_the_same_one_line(tmp_path: Path) -> None:
    (run,) = cqrs(["demo", "--concurrency", "0"], cwd=tmp_path)
    assert (run.code, run.out) == (2, "")
    assert run.err == "error: --concurrency 0: give a whole number >= 1\n"


def test_a_bad_transporter_in_the_environment_is_refused_too(tmp_path: Path) -> None:
    (run,) = cqrs(["status"], cwd=tmp_path, env={"TRANSPORTER": "nats//oops"})
    assert (run.code, run.out) == (2, "")
    assert run.err == (
        "error: --transporter 'nats//oops': give a URL such as nats://127.0.0.1:4222 "
        "(schemes: nats://, redis://, mqtt://, amqp://, kafka://, tcp://, memory://)\n"
    )


@pytest.mark.parametrize(
    "url", ["nats://127.0.0.1:4222", "nats://user:pw@host", "memory://", "redis://r:6379/0"]
)
def test_good_transporters_pass(url: str) -> None:
    assert options.transporter(url) == url


def test_the_demo_runs_from_any_folder_and_its_piped_lines_stay_whole(tmp_path: Path) -> None:
    (run,) = cqrs(["demo", "--count", "30", "--concurrency", "4", "--seed", "1"], cwd=tmp_path,
                  env={"COLUMNS": "40"})  # fmt: skip
    assert run.code == 0, run
    assert (tmp_path / "data" / "profileEventStore.sqlite3").exists()
    last = run.out.splitlines()[-1]
    assert last.startswith("30 updates stored and projected in ")
    assert last.endswith("; log head 30, checkpoint 30, dead letters 0."), run.out
    assert "\x1b" not in run.out  # no colour codes, no progress bar redraws in a pipe

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (again,) = cqrs(
        ["demo", "--count", "5"], cwd=elsewhere, env={"CQRS_DATA": str(tmp_path / "data")}
    )
    assert again.code == 0, again
    assert f"Continuing: 30 events already stored in {tmp_path / 'data'}/" in again.out
    assert again.out.splitlines()[-1].endswith("log head 35, checkpoint 35, dead letters 0.")


def test_no_arguments_show_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    assert "Usage: cqrs" in out
    for command in ("run", "demo", "status", "snapshot", "restore", "replay", "dead-letters"):
        assert command in out
