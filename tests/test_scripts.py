"""The set-up scripts: the demo's environment holds the package and its dependencies only; the
stamps say which sets are installed, for which pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ensure(checkout: Path, extra: str = "") -> str:
    """``ensure_venv [extra]`` in ``checkout``; what it said on stderr."""
    done = subprocess.run(
        ["bash", "-c", f'source scripts/_env.sh && ensure_venv {extra}'],
        cwd=checkout, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_the_demo_environment_is_the_package_alone(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    for folder in ("scripts", "src"):
        shutil.copytree(
            ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = checkout / ".venv"

    said = _ensure(checkout)
    assert "Installing moleculerpy-cqrs into" in said
    assert (venv / "bin" / "cqrs").exists()
    for tool in ("pytest", "mypy", "ruff"):
        assert not (venv / "bin" / tool).exists(), tool  # the dev extra is not installed
    assert (venv / ".installed-base").exists()
    assert not (venv / ".installed-dev").exists()
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import moleculerpy_cqrs.examples.profile"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert version.returncode == 0, version.stderr

    assert _ensure(checkout) == ""  # up to date: nothing to do

    # The dev set holds the package too: when it is current, the demo installs nothing.
    current = (venv / ".installed-base").read_text()
    (venv / ".installed-base").unlink()
    (venv / ".installed-dev").write_text(current)
    assert _ensure(checkout) == ""

    # A changed pyproject.toml makes every stamp stale.
    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("# changed\n")
    assert "Installing moleculerpy-cqrs into" in _ensure(checkout)
