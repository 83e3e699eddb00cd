"""The ``cqrs`` command."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moleculerpy_cqrs.errors import CqrsError

app = typer.Typer(
    help="moleculerpy-cqrs: run CQRS services and operate them.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)

Transporter = Annotated[
    str | None,
    typer.Option("--transporter", "-t", envvar="TRANSPORTER", help="e.g. nats://127.0.0.1:4222"),
]
NodeId = Annotated[str | None, typer.Option("--node-id", help="this node's ID")]


@app.command()
def run(
    modules: Annotated[list[str], typer.Argument(help="modules (dotted names or .py paths)")],
    transporter: Transporter = None,
    node_id: NodeId = None,
) -> None:
    """Start a node with the services of the given modules (like moleculer-runner)."""
    from moleculerpy_cqrs.face.runner import run as run_node

    _guard(lambda: run_node(modules, node_id=node_id, transporter=transporter))


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="folder for the SQLite files")] = Path("data"),
    count: Annotated[int, typer.Option(help="profile updates to send")] = 2000,
    concurrency: Annotated[int, typer.Option(help="updates in flight at once")] = 32,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
) -> None:
    """Run the profile example on SQLite files and feed it profile updates."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    from moleculerpy_cqrs.face.demo import run_demo

    _guard(lambda: asyncio.run(run_demo(data, count, concurrency, seed)))


def _guard(work: Callable[[], object]) -> None:
    try:
        work()
    except CqrsError as error:
        err.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    app()
