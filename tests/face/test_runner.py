"""``cqrs run``: how it finds modules and services, what it says when it starts and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import moleculerpy
import pytest
from moleculerpy import Service

from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.face import runner
from moleculerpy_cqrs.testing.nats_server import NatsServer

SERVICE_FILE = """
from moleculerpy import Service, action

from moleculerpy_cqrs import Aggregate, EventStore, StoreBackup, stores
from helper import TOTAL_FIELDS  # a neighbour of this file

store = stores.sqlite("{data}")
events = EventStore("bankEventStore", store)
totals = Aggregate(
    "bankTotals", stores.with_fields(store, TOTAL_FIELDS), snapshot=StoreBackup("{data}/snaps")
).snapshot("bankEventStore")


async def to_total(event):
    return {{"account": event["payload"]["account"], "amount": event["payload"]["amount"]}}


totals.on("money.deposited").create(to_total)


class BankService(events.mixin(), totals.mixin(), Service):
    name = "bank"
    deposit = events.map_action("deposit", "money.deposited")


class Plain(Service):
    name = "plain"

    @action()
    async def hello(self, ctx):
        return "hello"
"""


@pytest.fixture
def service_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder with ``my_service.py`` (two services) and a neighbour it imports."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "helper.py").write_text('TOTAL_FIELDS = {"account": "string", "amount": "float"}\n')
    (folder / "my_service.py").write_text(SERVICE_FILE.format(data=tmp_path / "data"))
    monkeypatch.chdir(folder)
    saved = set(sys.modules)
    yield folder
    for name in set(sys.modules) - saved:
        if name in ("my_service", "helper", "app", "mine", "bankapp"):
            del sys.modules[name]


# --------------------------------------------------------------------------- finding modules


def test_a_short_name_is_a_shipped_example_even_where_python_has_a_module_of_that_name() -> None:
    module = runner.load_module("profile")  # the standard library has `profile` too
    assert module.__name__ == "moleculerpy_cqrs.examples.profile"
    assert [klass.__name__ for klass in runner.services_of(module)] == ["ProfileService"]
    module = runner.load_module("property")
    assert [klass.__name__ for klass in runner.services_of(module)] == ["PropertyService"]


def test_a_dotted_name_is_imported(service_folder: Path) -> None:
    module = runner.load_module("moleculerpy_cqrs.examples.property")
    assert module.__name__ == "moleculerpy_cqrs.examples.property"
    (service_folder / "mine").mkdir()
    (service_folder / "mine" / "__init__.py").write_text("")
    (service_folder / "mine" / "svc.py").write_text(
        "from moleculerpy import Service\n\nclass Mine(Service):\n    name = 'mine'\n"
    )
    found = runner.services_of(runner.load_module("mine.svc"))  # from the working folder
    assert [getattr(klass, "name", None) for klass in found] == ["mine"]


def test_a_path_is_loaded_with_its_folder_on_the_path(service_folder: Path) -> None:
    module = runner.load_module("./my_service.py")
    found = runner.services_of(module)
    # Every Service subclass the module defines, not the ones it imports (Service itself).
    assert sorted(getattr(klass, "__name__", "") for klass in found) == ["BankService", "Plain"]
    assert runner.load_module(str(service_folder / "my_service.py")).__name__ == "my_service"


def test_a_package_folder_is_loaded_and_a_plain_folder_is_not_taken_for_one(
    service_folder: Path,
) -> None:
    package = service_folder / "bankapp"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from moleculerpy import Service\n\nclass Teller(Service):\n    name = 'teller'\n"
    )
    found = runner.services_of(runner.load_module("bankapp"))
    assert [getattr(klass, "name", None) for klass in found] == ["teller"]
    (service_folder / "profile").mkdir()  # a folder of data, say: the example still wins
    assert runner.load_module("profile").__name__ == "moleculerpy_cqrs.examples.profile"


def test_a_services_list_names_what_runs(tmp_path: Path) -> None:
    (tmp_path / "listed.py").write_text(
        textwrap.dedent("""
        from moleculerpy import Service

        class A(Service):
            name = "a"

        class B(Service):
            name = "b"

        services = [A, B(), ]
        """)
    )
    found = runner.services_of(runner.load_module(str(tmp_path / "listed.py")))
    assert isinstance(found[0], type)
    assert isinstance(found[1], Service)
    assert [getattr(item, "name", None) for item in found] == ["a", "b"]

    (tmp_path / "wrong.py").write_text("services = ['profile']\n")
    with pytest.raises(ConfigurationError, match=r"wrong\.services holds 'profile'"):
        runner.services_of(runner.load_module(str(tmp_path / "wrong.py")))


def test_what_cannot_be_found_says_what_to_give(service_folder: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no module 'nosuch\.thing' here .*example's"):
        runner.load_module("nosuch.thing")
    with pytest.raises(ConfigurationError, match=r"no Python file at 'missing\.py'"):
        runner.load_module("missing.py")
    (service_folder / "broken.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(runner.UserCodeError, match="not_installed_anywhere") as shown:
        runner.load_module("broken")  # the module is there: its own import error is shown
    assert 'broken.py", line 1' in "\n".join(shown.value.lines)


# --------------------------------------------------------------------------- a node


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("TRANSPORTER", "CQRS_DATA")}
    return subprocess.Popen(
        [sys.executable, "-m", "moleculerpy_cqrs.cli", "run", *args],
        cwd=cwd,
        env={**environment, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until_ready(process: subprocess.Popen[str]) -> list[str]:
    """The lines the node printed up to the one that says it is ready."""
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # blocks until the node prints (bounded by pytest's timeout)
        lines.append(line.rstrip("\n"))
        if line.startswith("ready;"):
            return lines
    raise AssertionError(f"the node ended: {lines} {process.stderr and process.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_node_says_what_it_started_and_that_it_stopped(
    service_folder: Path, tmp_path: Path, nats_url: str, sig: signal.Signals
) -> None:
    process = _start(["./my_service.py", "profile", "-t", nats_url, "--node-id", "bank-1"],
                     service_folder, {"CQRS_DATA": str(tmp_path / "profile-data")})  # fmt: skip
    try:
        printed = _until_ready(process)
    finally:
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    # What the node says, from its first line on (a log line may come before).
    lines = printed[[line.startswith("node ") for line in printed].index(True) :]
    data = (tmp_path / "data").resolve()
    profile_data = (tmp_path / "profile-data").resolve()
    assert lines == [
        f"node bank-1 started on {nats_url} (moleculerpy-cqrs 0.1.0, "
        f"MoleculerPy {moleculerpy.__version__}, log level warning)",
        "  service bank",
        f"    event store bankEventStore: SQLite {data}/bankEventStore.sqlite3, "
        "table bankEventStore",
        f"    aggregate bankTotals (fed by bankEventStore): SQLite {data}/bankTotals.sqlite3, "
        f"table bankTotals; snapshots in {data}/snaps",
        "  service plain",
        "  service profile",
        f"    event store profileEventStore: SQLite {profile_data}/profileEventStore.sqlite3, "
        "table profileEventStore",
        "    aggregate profileSummaryAggregate (fed by profileEventStore): SQLite "
        f"{profile_data}/profileSummaryAggregate.sqlite3, table profileSummaryAggregate; "
        f"snapshots in {profile_data}/backups",
        "metrics: off (--metrics-port)",
        "ready; Ctrl-C or SIGTERM stops it",
    ]
    assert out == f"node bank-1 stopped ({sig.name})\n"
    assert process.returncode == 0
    assert err == ""


def test_the_log_level_is_moleculerpys_and_its_banner_tells_the_true_version(
    tmp_path: Path,
) -> None:
    process = _start(["profile", "--log-level", "info"], tmp_path)
    try:
        lines = _until_ready(process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    banner = [line for line in lines if "is starting" in line]
    assert banner, lines
    assert f"MoleculerPy v{moleculerpy.__version__} is starting" in banner[0]
    assert moleculerpy.__version__ == "0.14.22"

    quiet = _start(["profile"], tmp_path)  # warning by default: no info lines
    try:
        assert not [line for line in _until_ready(quiet) if " INFO " in line]
    finally:
        quiet.send_signal(signal.SIGTERM)
        quiet.communicate(timeout=30)


async def test_an_unreachable_server_is_one_clear_error(tmp_path: Path) -> None:
    with NatsServer() as server:
        url = server.url
    # The server is gone: nothing listens on its port any more.
    with pytest.raises(ConfigurationError) as caught:
        await runner.start_node(["profile"], transporter=url, node_id="lonely", join_timeout=1.0)
    message = str(caught.value)
    port = url.rsplit(":", 1)[1]
    assert message.startswith(f"connection refused by 127.0.0.1:{port} ({url})"), message
    assert "check --transporter" in message


def test_passwords_are_not_shown() -> None:
    assert runner.public_url("nats://me:secret@host:4222") == "nats://me:***@host:4222"
    assert runner.public_url("nats://host:4222") == "nats://host:4222"
