"""docs/configuration.md is executable: each Python block runs as written, in an empty folder,
and prints what the text block after it shows."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moleculerpy_cqrs import Aggregate, EventStore

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "configuration.md").read_text()
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\dT")  # MoleculerPy logs to stdout
EXAMPLE = re.compile(r"```python\n(.*?)```\n\n```text\n(.*?)```", flags=re.DOTALL)
EXAMPLES = EXAMPLE.findall(DOC)


def _pattern(expected: str) -> re.Pattern[str]:
    """The printed text, where times in ms and a dispatch status may differ."""
    pattern = re.escape(expected)
    pattern = re.sub(r"\d{13}", r"\\d{13}", pattern)
    pattern = pattern.replace(r"'status':\ 2", r"'status':\ [012]")
    return re.compile(pattern)


def test_every_python_block_has_its_output() -> None:
    assert len(EXAMPLES) == len(re.findall(r"```python\n", DOC)) == 5


@pytest.mark.parametrize(
    ("code", "expected"),
    EXAMPLES,
    ids=["params-schema", "validator-pitfalls", "idempotency", "transformations", "indexes"],
)
def test_the_block_prints_what_the_doc_says(code: str, expected: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = "".join(line + "\n" for line in done.stdout.splitlines() if not LOG_LINE.match(line))
    assert _pattern(expected).fullmatch(printed), printed


def test_the_readme_links_the_reference() -> None:
    assert "(docs/configuration.md)" in (ROOT / "README.md").read_text()


def _signature_text(target: object) -> list[str]:
    """``name=default`` (or ``name``) for each parameter, as the doc writes them."""
    words = []
    for name, parameter in inspect.signature(target).parameters.items():  # type: ignore[arg-type]
        if name == "self":
            continue
        default = parameter.default
        if default is inspect.Parameter.empty:
            words.append(name)
        elif isinstance(default, int) and not isinstance(default, bool) and default > 9999:
            words.append(f"{name}={default:_}")
        else:
            words.append(f"{name}={default!r}".replace("'", '"'))
    return words


@pytest.mark.parametrize(
    "target",
    [EventStore.__init__, EventStore.map_action, Aggregate.__init__],
    ids=["EventStore", "map_action", "Aggregate"],
)
def test_the_reference_names_every_option_with_its_default(target: object) -> None:
    signatures = " ".join(re.findall(r"```text\n(\w.*?\(.*?\))\n```", DOC, flags=re.DOTALL))
    flat = " ".join(signatures.split())
    for word in _signature_text(target):
        assert re.search(rf"[(, ]{re.escape(word)}[,)]", flat), word
        assert f"`{word.split('=')[0]}`" in DOC  # and its row in a table
