"""Moleculer.js for the interop tests: ``npm ci`` of ``tests/interop/node`` when needed.

Installed here, by the fixture, rather than by ``scripts/test``: the packages are needed by
these tests alone, and a fixture runs however the tests are started (``./scripts/test``,
``.ci/run``, a bare ``pytest tests/interop``). ``npm ci`` installs exactly the locked versions;
a stamp of the lock file's hash makes later runs a no-op until the lock changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).with_name("node")
STAMP = NODE_DIR / "node_modules" / ".cqrs-lock-sha256"


def _lock_hash() -> str:
    return hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """The folder of the Node scripts, with ``moleculer`` and ``nats`` installed."""
    want = _lock_hash()
    if STAMP.exists() and STAMP.read_text() == want:
        return NODE_DIR
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("the interop tests need Node.js (>= 18) and npm on PATH")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci in {NODE_DIR} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    STAMP.write_text(want)
    return NODE_DIR
