"""Loading services from modules and running a node (what ``cqrs run`` does)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from moleculerpy import Service, ServiceBroker, Settings

from moleculerpy_cqrs.errors import ConfigurationError

DEFAULT_TRANSPORTER = "memory://"


def load_module(target: str) -> ModuleType:
    """A dotted module name (``examples.profile``) or a path to a ``.py`` file or package."""
    path = Path(target)
    if path.suffix == ".py" or path.is_dir():
        if path.is_dir():
            path = path / "__init__.py"
        if not path.exists():
            raise ConfigurationError(f"no module at {target!r}")
        name = path.parent.name if path.name == "__init__.py" else path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"cannot load {target!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise ConfigurationError(f"cannot import {target!r}: {error}") from error


def services_of(module: ModuleType) -> list[type[Service]]:
    """The module's ``services`` list, else every Service subclass it defines."""
    declared = getattr(module, "services", None)
    if declared is not None:
        return list(declared)
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Service) and obj.__module__ == module.__name__
    ]


def make_broker(node_id: str | None = None, transporter: str | None = None) -> ServiceBroker:
    transporter = transporter or os.environ.get("TRANSPORTER") or DEFAULT_TRANSPORTER
    node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
    return ServiceBroker(node_id, settings=Settings(transporter=transporter, log_level="WARNING"))


async def start_node(
    targets: Iterable[str], *, node_id: str | None = None, transporter: str | None = None
) -> ServiceBroker:
    broker = make_broker(node_id, transporter)
    classes = [klass for target in targets for klass in services_of(load_module(target))]
    if not classes:
        raise ConfigurationError("no services found in the given modules")
    for klass in classes:
        await broker.register(klass())
    await broker.start()
    return broker


async def run_until_signalled(broker: ServiceBroker) -> None:
    await broker.wait_for_shutdown()


def run(
    targets: list[str],
    *,
    node_id: str | None,
    transporter: str | None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    async def main() -> Any:
        broker = await start_node(targets, node_id=node_id, transporter=transporter)
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
            print(f"metrics on {metrics.url}", file=sys.stderr, flush=True)
        try:
            await run_until_signalled(broker)
        finally:
            if metrics is not None:
                metrics.close()

    asyncio.run(main())
