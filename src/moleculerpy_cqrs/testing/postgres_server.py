"""A private, throw-away PostgreSQL server for tests and benchmarks.

``PostgresServer`` runs ``initdb`` and ``pg_ctl`` on a fresh temporary folder that listens only
on a unix socket inside that folder (no TCP port, trust authentication), and answers a psycopg
conninfo for it. As root it runs the server as the ``postgres`` user, since PostgreSQL refuses
to run as root. Folders left behind by a run that died are cleaned up by the next start::

    with PostgresServer() as server:
        stores.postgres(server.dsn)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from glob import glob
from pathlib import Path
from types import TracebackType
from typing import Final

from psycopg.conninfo import make_conninfo

from moleculerpy_cqrs.stores.sql import quote

PREFIX: Final = "cqrs-pg-"
OWNER_FILE: Final = "owner.pid"
_SOCKET_PATH_MAX: Final = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" goes after the folder
_PORT: Final = 5432

DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "max_connections": "200",
    "shared_buffers": "64MB",
    # fsync stays on: acknowledged writes must survive a crash in the durability tests.
    "fsync": "on",
    "synchronous_commit": "on",
    "max_locks_per_transaction": "256",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}


class PostgresServerError(RuntimeError):
    """The private server could not be found, started or stopped (the log tail is included)."""


def find_bindir() -> Path:
    """The folder with ``initdb``/``pg_ctl``: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    candidates = sorted(
        (Path(p) for p in glob("/usr/lib/postgresql/*/bin") if (Path(p) / "initdb").exists()),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    if candidates:
        return candidates[0]
    raise PostgresServerError(
        "PostgreSQL server binaries not found: install PostgreSQL (initdb, pg_ctl) or set "
        "CQRS_TEST_POSTGRES_DSN to a server to use"
    )


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


class PostgresServer:
    """One private server; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._base_dir = base_dir
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._bindir = Path(bindir) if bindir else None
        self.folder: Path | None = None
        self._started = False

    # ------------------------------------------------------------------ public

    @property
    def dsn(self) -> str:
        """A psycopg conninfo for the running server (database and user ``postgres``)."""
        if self.folder is None or not self._started:
            raise PostgresServerError("the server is not running")
        return make_conninfo(host=str(self.folder), port=_PORT, user="postgres", dbname="postgres")

    @property
    def running(self) -> bool:
        return self._started

    def start(self) -> str:
        """Create the cluster and start the server; answers the DSN. Raises if it cannot."""
        if self._started:
            return self.dsn
        bindir = self._bindir or find_bindir()
        self._bindir = bindir
        base = _usable_base(self._base_dir)
        remove_stale(base, bindir)
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        self.folder = folder
        atexit.register(self.stop)
        try:
            (folder / OWNER_FILE).write_text(str(os.getpid()))
            user = _run_as()
            if user is not None:
                os.chown(folder, user.pw_uid, user.pw_gid)
            data = folder / "data"
            self._run(
                [
                    str(bindir / "initdb"),
                    "-D", str(data),
                    "-U", "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",  # only skips syncing the fresh cluster; WAL fsync stays on
                    "--no-instructions",
                ],
                "initdb",
            )  # fmt: skip
            conf = {
                **self.settings,
                "listen_addresses": "''",
                "unix_socket_directories": _conf_string(str(folder)),
                "port": str(_PORT),
            }
            with (data / "postgresql.conf").open("a") as f:
                f.write("\n# moleculerpy-cqrs private test server\n")
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())
            self._run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D", str(data),
                    "-l", str(folder / "server.log"),
                    "-w",
                    "-t", "60",
                ],
                "pg_ctl start",
            )  # fmt: skip
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self.dsn

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder; idempotent."""
        atexit.unregister(self.stop)
        folder, self.folder = self.folder, None
        self._started = False
        if folder is None:
            return
        _shutdown(folder, self._bindir)
        shutil.rmtree(folder, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        if self.folder is None:
            return ""
        return _tail(self.folder / "server.log", lines)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers

    def _run(self, argv: Sequence[str], what: str) -> None:
        assert self.folder is not None
        try:
            done = subprocess.run(
                _as_server_user(argv),
                cwd=self.folder,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise PostgresServerError(f"{what} failed: {e}") from e
        if done.returncode != 0:
            raise PostgresServerError(
                f"{what} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}\n"
                f"{self.log_tail()}"
            )


@contextlib.contextmanager
def isolated_schema(dsn: str, prefix: str = "t") -> Iterator[str]:
    """A fresh schema in the database at ``dsn``, dropped with everything in it afterwards."""
    import psycopg

    name = quote(f"{prefix}_{uuid.uuid4().hex[:16]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}".encode())
    try:
        yield name.strip('"')
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE".encode())


def remove_stale(base: Path, bindir: Path | None = None) -> None:
    """Stop and remove private servers whose owning process is gone (a run that was killed)."""
    for folder in base.glob(PREFIX + "*"):
        try:
            owner = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            # No owner file: a start that died before writing it, or not ours; only
            # clean it if it is old enough not to be a start in progress.
            if _age(folder) < 120:
                continue
        else:
            if _alive(owner):
                continue
        _shutdown(folder, bindir)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- internals


def _usable_base(base: str | os.PathLike[str] | None) -> Path:
    """A folder for the server: short enough for a socket path, reachable by the server user."""
    path = Path(base) if base is not None else Path(tempfile.gettempdir())
    path.mkdir(parents=True, exist_ok=True)
    too_long = len(str(path)) + len(PREFIX) + 10 + len(f"/.s.PGSQL.{_PORT}") > _SOCKET_PATH_MAX
    user = _run_as()
    if too_long or (user is not None and not _traversable(path)):
        if base is not None:
            raise PostgresServerError(
                f"{path} cannot hold the server folder (socket path too long, or not "
                "reachable by the postgres user)"
            )
        return Path("/tmp")
    return path


def _traversable(path: Path) -> bool:
    """Whether every folder on the way is searchable by others (the postgres user)."""
    return all(os.stat(p).st_mode & 1 for p in (path, *path.resolve().parents))


def _run_as() -> pwd.struct_passwd | None:
    """The user to run the server as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresServerError(
            "running as root, but there is no 'postgres' user to run the server as"
        ) from None


def _as_server_user(argv: Sequence[str]) -> list[str]:
    if _run_as() is None:
        return list(argv)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--", *argv]


def _shutdown(folder: Path, bindir: Path | None) -> None:
    data = folder / "data"
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    pg_ctl = str((bindir or find_bindir()) / "pg_ctl")
    for mode in ("fast", "immediate"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                _as_server_user([pg_ctl, "stop", "-D", str(data), "-m", mode, "-w", "-t", "30"]),
                cwd=folder,
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0 or not pid_file.exists():
                return
    # pg_ctl could not do it (a damaged folder): kill the postmaster by its recorded pid.
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


__all__ = [
    "PostgresServer",
    "PostgresServerError",
    "find_bindir",
    "isolated_schema",
    "remove_stale",
]
