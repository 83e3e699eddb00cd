"""The README is executable: its Python blocks run as written, in an empty folder."""

from __future__ import annotations

import ast
import re
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
    assert (tmp_path / "data" / "profileEventStore.sqlite3").exists()
