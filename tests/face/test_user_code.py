"""``cqrs run`` on a module with an error: the user's frames and the error, a few lines, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cqrs_run(cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRANSPORTER"}
    code = f"{prelude}\nfrom moleculerpy_cqrs.cli import main\nmain({['run', *args]!r})"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("files", "shown"),
    [
        ({"my_service.py": "def broken(:\n    pass\n"}, ["line 1", "def broken(:", "SyntaxError"]),
        (
            {"my_service.py": "from moleculerpy import Service\nimport no_such_helper\n"},
            ['my_service.py", line 2', "import no_such_helper", "ModuleNotFoundError"],
        ),
        (
            {"my_service.py": "import helper\n", "helper.py": "x = 1\nraise KeyError('k')\n"},
            ['my_service.py", line 1', 'helper.py", line 2', "raise KeyError('k')", "KeyError"],
        ),
    ],
    ids=["syntax", "import", "in-a-neighbour"],
)
def test_an_error_in_the_users_module_shows_the_users_frames_only(
    tmp_path: Path, files: dict[str, str], shown: list[str]
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    done = cqrs_run(tmp_path, "./my_service.py")
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) <= 15, done.stderr
    assert lines[0] == "error: could not load ./my_service.py:"
    for text in shown:
        assert text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "moleculerpy_cqrs" not in done.stderr  # none of the toolkit's frames
    assert "asyncio" not in done.stderr


def test_a_missing_extra_names_the_commands_that_install_it(tmp_path: Path) -> None:
    # moleculerpy_web is installed here; hide it as an environment without the extra would.
    done = cqrs_run(
        tmp_path, "profile", "web", prelude="import sys; sys.modules['moleculerpy_web'] = None"
    )
    assert done.returncode == 2, done
    (line,) = done.stderr.splitlines()
    assert "the web example needs the 'web' extra" in line
    assert "pip install 'moleculerpy-cqrs[web]'" in line
    assert ".venv/bin/pip install -e '.[web]'" in line
    assert f"install -e '{ROOT}[web]'" in line  # this clone, said precisely
