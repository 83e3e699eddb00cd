"""Loading services from modules and running a node (what ``cqrs run`` does).

How ``cqrs run TARGET`` finds a module (the first rule that applies):

1. ``TARGET`` ends in ``.py``, names a folder with an ``__init__.py``, or contains a path
   separator: the file (a folder: its ``__init__.py``) is loaded as a module named after it,
   with its folder first on ``sys.path`` (so that it imports its neighbours, as ``python
   file.py`` would).
2. ``TARGET`` is the name of an example shipped with the package (``profile``, ``property``,
   ``web``):
   ``moleculerpy_cqrs.examples.<TARGET>``. (Python's standard library has a ``profile`` module
   too; the example wins.)
3. Otherwise ``TARGET`` is a dotted module name, imported with the working folder first on
   ``sys.path``.

Which services of a module it starts: the module's ``services`` list when it has one (each item a
``Service`` subclass, instantiated without arguments, or a ``Service`` instance); otherwise one
instance of every ``Service`` subclass the module itself defines (classes it imports are left
alone). Services found twice (two modules listing one class) start once.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import moleculerpy
from moleculerpy import Service, ServiceBroker, Settings

import moleculerpy_cqrs
from moleculerpy_cqrs.broker import names
from moleculerpy_cqrs.broker.aggregate import Aggregate
from moleculerpy_cqrs.broker.eventstore import EventStore
from moleculerpy_cqrs.broker.mixin_base import components
from moleculerpy_cqrs.core.snapshots import StoreBackup
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.examples import NAMES as EXAMPLES
from moleculerpy_cqrs.face import reach

DEFAULT_TRANSPORTER = "memory://"
DEFAULT_LOG_LEVEL = "warning"
JOIN_TIMEOUT = 15.0
"""Seconds ``cqrs run`` waits for the transporter's server before it gives up."""
DISCOVERY_WAIT = 0.5
"""Seconds a node started on a shared transporter waits for the other nodes' INFO packets
(Moleculer.js waits as long after connecting) before it checks its names against theirs."""


MAX_FRAMES = 8
"""Frames of the user's own code shown when loading it fails (the innermost ones)."""


class UserCodeError(ConfigurationError):
    """Loading the user's module failed in the user's code: ``lines`` are the user's frames
    and the error, for ``cqrs run`` to print as they are (no toolkit or importlib frames)."""

    def __init__(self, target: str, lines: list[str]) -> None:
        self.lines = [f"could not load {target}:", *lines]
        super().__init__(lines[-1] if lines else f"could not load {target}")


class MissingExtra(ConfigurationError):
    """An example needs an optional extra that is not installed."""

    def __init__(self, target: str, extra: str, missing: str) -> None:
        clone = _clone_root()
        here = (
            f" (this clone: {Path(sys.executable).parent / 'pip'} install -e '{clone}[{extra}]')"
            if clone is not None
            else ""
        )
        super().__init__(
            f"the {target} example needs the {extra!r} extra (no module {missing!r}): install "
            f"it with pip install 'moleculerpy-cqrs[{extra}]', or from a clone of the "
            f"repository with .venv/bin/pip install -e '.[{extra}]' in its folder{here}"
        )


EXTRAS = {"web": ("web", ("moleculerpy_web", "starlette", "uvicorn"))}
"""Examples that need an extra: the extra's name and the modules it brings."""


def _clone_root() -> Path | None:
    """The repository this package runs from (an editable install), if it is one."""
    root = Path(moleculerpy_cqrs.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    try:
        if 'name = "moleculerpy-cqrs"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def load_module(target: str) -> ModuleType:
    """The module ``target`` names (see the module's docstring for the rules); an error in
    the user's code is a :class:`UserCodeError` with the user's frames only."""
    try:
        return _load_module(target)
    except ModuleNotFoundError as error:
        extra = EXTRAS.get(target)
        if extra is not None and error.name is not None and error.name.split(".")[0] in extra[1]:
            raise MissingExtra(target, extra[0], error.name) from None
        raise UserCodeError(target, _user_frames(error)) from None
    except ConfigurationError:
        raise
    except Exception as error:  # SyntaxError, ImportError, whatever the module raised
        raise UserCodeError(target, _user_frames(error)) from None


def _user_frames(error: BaseException) -> list[str]:
    """The frames of ``error``'s traceback outside this package and importlib, then the
    error itself (for a SyntaxError: its file, line and caret)."""
    package = str(Path(moleculerpy_cqrs.__file__).resolve().parent)
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(("<frozen ", package))
    ][-MAX_FRAMES:]
    lines = [
        line.rstrip("\n") for text in traceback.format_list(frames) for line in text.splitlines()
    ]
    lines += [
        line.rstrip("\n")
        for text in traceback.format_exception_only(type(error), error)
        for line in text.splitlines()
    ]
    return lines


def _load_module(target: str) -> ModuleType:
    path = Path(target)
    package = path.is_dir() and (path / "__init__.py").is_file()
    if path.suffix == ".py" or package or os.sep in target or "/" in target:
        return _load_file(target, path)
    if target in EXAMPLES:
        return importlib.import_module(f"moleculerpy_cqrs.examples.{target}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name is not None and not (target + ".").startswith(error.name + "."):
            raise  # the module exists; something it imports does not
        raise ConfigurationError(
            f"no module {target!r} here ({Path.cwd()}): give an example's name "
            f"({', '.join(EXAMPLES)}), a dotted module name importable from this folder, "
            "or a path to a .py file"
        ) from None


def _load_file(target: str, path: Path) -> ModuleType:
    if path.is_dir():
        path = path / "__init__.py"
    if not path.is_file():
        raise ConfigurationError(f"no Python file at {target!r}: give a path to a .py file")
    path = path.resolve()
    name = path.parent.name if path.name == "__init__.py" else path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load {target!r} as a Python module")
    folder = str(path.parent.parent if path.name == "__init__.py" else path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def services_of(module: ModuleType) -> list[Service | type[Service]]:
    """The module's ``services`` list, else every Service subclass it defines."""
    declared = getattr(module, "services", None)
    if declared is None:
        return [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj)
            and issubclass(obj, Service)
            and obj.__module__ == module.__name__
        ]
    if not isinstance(declared, list | tuple):
        raise ConfigurationError(
            f"{module.__name__}.services must be a list of Service classes or instances"
        )
    for item in declared:
        if not (isinstance(item, Service) or (inspect.isclass(item) and issubclass(item, Service))):
            raise ConfigurationError(
                f"{module.__name__}.services holds {item!r}: give Service classes or instances"
            )
    return list(declared)


def make_broker(
    node_id: str | None = None,
    transporter: str | None = None,
    log_level: str = DEFAULT_LOG_LEVEL,
) -> ServiceBroker:
    transporter = transporter or os.environ.get("TRANSPORTER") or DEFAULT_TRANSPORTER
    node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
    settings = Settings(transporter=transporter, log_level=log_level.upper())
    # ServiceBroker's own default version is a stale "0.14.1": it would log "MoleculerPy
    # v0.14.1 is starting..." while 0.14.22 runs.
    return ServiceBroker(node_id, settings=settings, version=moleculerpy.__version__)


async def start_node(
    targets: Iterable[str],
    *,
    node_id: str | None = None,
    transporter: str | None = None,
    log_level: str = DEFAULT_LOG_LEVEL,
    join_timeout: float = JOIN_TIMEOUT,
) -> tuple[ServiceBroker, list[Service]]:
    """A started broker with the targets' services, and those services."""
    found: list[Service | type[Service]] = []
    for target in targets:
        for item in services_of(load_module(target)):
            if item not in found:
                found.append(item)
    if not found:
        raise ConfigurationError(
            "no services found in the given modules (define a Service subclass, "
            "or list them in `services = [...]`)"
        )
    # Refused, unresolvable, refused credentials, a missing package: said now, in one line.
    await reach.check(transporter or os.environ.get("TRANSPORTER") or DEFAULT_TRANSPORTER)
    broker = make_broker(node_id, transporter, log_level)
    names.install_guard(broker)
    services = [item if isinstance(item, Service) else item() for item in found]
    for service in services:
        await broker.register(service)
    url = public_url(broker.settings.transporter)
    with _held_back("nats") as failures:
        try:
            await asyncio.wait_for(broker.start(), join_timeout)
        except TimeoutError:
            # Not stopped: stopping a broker that never connected logs a warning to stdout,
            # and the process ends here anyway (asyncio.run cancels the connection attempts).
            why = f": {failures[-1]}" if failures else ""
            raise ConfigurationError(
                f"could not join the cluster on {url} within {join_timeout:g}s{why} "
                "(is its server running? give another --transporter)"
            ) from None
        except BaseException:
            await _stop_quietly(broker)
            raise
    if not broker.settings.transporter.startswith("memory://"):
        await asyncio.sleep(DISCOVERY_WAIT)
        clashes = names.remote_clashes(broker)
        if clashes:
            await _stop_quietly(broker)
            more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
            raise ConfigurationError(clashes[0] + more)
    return broker, services


@contextmanager
def _held_back(logger_name: str) -> Iterator[list[str]]:
    """While joining, the NATS client logs a traceback for each failed connection attempt;
    the caller reports the last one in one line instead."""
    failures: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            error = record.exc_info[1] if record.exc_info else None
            failures.append(str(error) if error else record.getMessage())

    logger = logging.getLogger(logger_name)
    handler, propagate = Keep(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield failures
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


async def _stop_quietly(broker: ServiceBroker) -> None:
    try:
        await asyncio.wait_for(broker.stop(), 5)
    except Exception:
        pass  # it did not start; what failed is what the caller reports


# --------------------------------------------------------------------------- saying what runs


def describe(broker: ServiceBroker, services: Iterable[Service]) -> list[str]:
    """What the node runs, in lines for its operator: the node, then each service with its
    event stores and aggregates and where their data lives."""
    lines = [
        f"node {broker.nodeID} started on {public_url(broker.settings.transporter)} "
        f"(moleculerpy-cqrs {moleculerpy_cqrs.__version__}, MoleculerPy {moleculerpy.__version__},"
        f" log level {broker.settings.log_level.lower()})"
    ]
    for service in services:
        lines.append(f"  service {service.name}")
        for component in components(service):
            if isinstance(component, EventStore):
                adapter = component.runtime(broker).adapter
                lines.append(f"    event store {component.name}: {adapter.where()}")
            elif isinstance(component, Aggregate):
                runtime = component.runtime(broker)
                source = component.event_store_name or "the local event store"
                strategy = runtime.snapshot_strategy
                snapshots = (
                    f"snapshots in {Path(strategy.location_root).resolve()}"
                    if isinstance(strategy, StoreBackup)
                    else f"no snapshots ({strategy!r})"
                )
                lines.append(
                    f"    aggregate {component.name} (fed by {source}): "
                    f"{runtime.adapter.where()}; {snapshots}"
                )
    return lines


def public_url(url: str) -> str:
    """``url`` without its password."""
    return reach.redact(url)


# --------------------------------------------------------------------------- running


@contextmanager
def signalled() -> Iterator[asyncio.Future[str]]:
    """A future that gets the name of the first SIGINT or SIGTERM this process receives
    while the block runs (installed before the node says it is ready, so none is missed)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()
    wanted = (signal.SIGINT, signal.SIGTERM)

    def on_signal(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(sig.name)

    for sig in wanted:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield got
    finally:
        for sig in wanted:
            loop.remove_signal_handler(sig)


def run(
    targets: list[str],
    *,
    node_id: str | None,
    transporter: str | None,
    log_level: str = DEFAULT_LOG_LEVEL,
    say: Callable[[str], None] | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    ui_port: int | None = None,
    ui_host: str = "127.0.0.1",
    ui_token: str | None = None,
) -> None:
    """Start a node, say what runs, wait for Ctrl-C or SIGTERM, stop it and say so."""
    say = say or _say

    async def main() -> Any:
        broker, services = await start_node(
            targets, node_id=node_id, transporter=transporter, log_level=log_level
        )
        metrics = None
        if metrics_port is not None:
            from moleculerpy_cqrs.face.metrics import serve_metrics

            try:
                metrics = serve_metrics(broker, metrics_host, metrics_port)
            except OSError as error:
                await broker.stop()
                raise ConfigurationError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}: {error.strerror}"
                ) from None
        page = None
        if ui_port is not None:
            from moleculerpy_cqrs.face.ui.node import serve_beside

            try:
                page = await serve_beside(broker, host=ui_host, port=ui_port, token=ui_token)
            except OSError as error:
                if metrics is not None:
                    metrics.close()
                await broker.stop()
                raise ConfigurationError(
                    f"cannot serve the page on {ui_host}:{ui_port}: {error.strerror or error}"
                ) from None
        try:
            with signalled() as stop:
                for line in describe(broker, services):
                    say(line)
                say(f"metrics on {metrics.url}" if metrics else "metrics: off (--metrics-port)")
                if page is not None:
                    access = "actions need the token" if ui_token else "read-only"
                    say(f"page on {page.url} ({access})")
                say("ready; Ctrl-C or SIGTERM stops it")
                signal_name = await stop
        finally:
            if metrics is not None:
                metrics.close()
            if page is not None:
                await page.close()
        await broker.stop()
        say(f"node {broker.nodeID} stopped ({signal_name})")

    asyncio.run(main())


def _say(line: str) -> None:
    print(line, flush=True)
