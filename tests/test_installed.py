"""Installed means working: the wheel, installed on its own, runs ``cqrs demo`` and ``cqrs run
profile`` from a folder that has nothing of the repository in it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the package as ``pip install`` of the wheel puts it (the dependencies
    come from this environment)."""
    work = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("moleculerpy_cqrs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moleculerpy_cqrs/examples/profile.py" in names
    assert "moleculerpy_cqrs/examples/property.py" in names
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return site


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSPORTER", "CQRS_DATA")}
    env["PYTHONPATH"] = str(site)  # ahead of this checkout's editable install
    return env


def test_the_installed_package_is_the_one_that_runs(installed: Path, tmp_path: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import moleculerpy_cqrs.examples.profile as p; print(p.__file__)"],
        cwd=tmp_path, env=_env(installed), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert found.stdout.strip() == str(installed / "moleculerpy_cqrs/examples/profile.py")
    assert (installed / "moleculerpy_cqrs/face/ui/page.html").is_file()  # the web page ships


def test_cqrs_demo_works_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(installed / "bin" / "cqrs"), "demo", "--count", "20"],
        cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "20 updates stored and projected" in done.stdout
    assert (tmp_path / "data" / "profileSummaryAggregate.sqlite3").exists()


def test_cqrs_run_profile_works_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [str(installed / "bin" / "cqrs"), "run", "profile", "--node-id", "solo"],
        cwd=tmp_path, env=_env(installed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    printed = []
    try:
        for line in process.stdout:  # until it is ready (bounded by pytest's timeout)
            printed.append(line)
            if line.startswith("ready;"):
                break
    finally:
        process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=30)
    assert any(line.startswith("node solo started on memory://") for line in printed), printed
    assert rest.endswith("node solo stopped (SIGTERM)\n")
    assert process.returncode == 0, err
