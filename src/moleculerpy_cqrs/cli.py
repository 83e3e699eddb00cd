"""The ``cqrs`` command."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from moleculerpy_cqrs.errors import CqrsError
from moleculerpy_cqrs.examples import NAMES as EXAMPLES

if TYPE_CHECKING:
    from moleculerpy_cqrs.face.operator import Options

app = typer.Typer(
    help="moleculerpy-cqrs: run CQRS services and operate them.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        import moleculerpy

        import moleculerpy_cqrs

        ours, theirs = moleculerpy_cqrs.__version__, moleculerpy.__version__
        print(f"moleculerpy-cqrs {ours} (MoleculerPy {theirs})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """moleculerpy-cqrs: run CQRS services and operate them."""


Transporter = Annotated[
    str | None,
    typer.Option("--transporter", "-t", envvar="TRANSPORTER", help="e.g. nats://127.0.0.1:4222"),
]
NodeId = Annotated[str | None, typer.Option("--node-id", help="this node's ID")]
LogLevel = Annotated[
    str,
    typer.Option("--log-level", "-l", help="MoleculerPy's log level: debug, info, warning, error"),
]


UiPort = Annotated[
    int | None,
    typer.Option(
        min=0, max=65535, help="serve the operator's web page on this port (0: any free port)"
    ),
]
UiHost = Annotated[
    str, typer.Option(help="address the page listens on (another machine's browser: 0.0.0.0)")
]
UiToken = Annotated[
    str | None,
    typer.Option(
        envvar="CQRS_UI_TOKEN",
        show_envvar=True,
        help="token the page's actions (retry, snapshot, restore, replay) need, sent as "
        "Authorization: Bearer; without one the page is read-only",
    ),
]


def _ui_token(token: str | None) -> str | None:
    return token.strip() if token and token.strip() else None


@app.command()
def run(
    modules: Annotated[
        list[str],
        typer.Argument(
            help=f"what to run: an example's name ({', '.join(EXAMPLES)}), a dotted module name "
            "importable from here, or a path to a .py file or package folder",
            show_default=False,
        ),
    ],
    transporter: Transporter = None,
    node_id: NodeId = None,
    log_level: LogLevel = "warning",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="serve Prometheus metrics on this port (0: any free port)"
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="address the metrics endpoint listens on")
    ] = "127.0.0.1",
    ui_port: UiPort = None,
    ui_host: UiHost = "127.0.0.1",
    ui_token: UiToken = None,
) -> None:
    """Start a node with the services of the given modules (like moleculer-runner); it says
    what it started, and stops cleanly on Ctrl-C or SIGTERM."""
    from moleculerpy_cqrs.face import options
    from moleculerpy_cqrs.face.runner import run as run_node

    url, node, level = _checked(
        lambda: (
            options.transporter(transporter) if transporter else None,
            options.node_id(node_id) if node_id is not None else None,
            options.log_level(log_level),
        )
    )
    _guard(
        lambda: run_node(
            modules,
            transporter=url,
            node_id=node,
            log_level=level,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            ui_port=ui_port,
            ui_host=ui_host,
            ui_token=_ui_token(ui_token),
        )
    )


@app.command()
def demo(
    data: Annotated[
        Path, typer.Option(help="folder for the SQLite files and snapshots", envvar="CQRS_DATA")
    ] = Path("data"),
    count: Annotated[int, typer.Option(help="profile updates to send (>= 1)")] = 2000,
    concurrency: Annotated[int, typer.Option(help="updates in flight at once (>= 1)")] = 32,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
) -> None:
    """Run the profile example on SQLite files and feed it profile updates."""
    from moleculerpy_cqrs.face import options
    from moleculerpy_cqrs.face.demo import run_demo

    _checked(
        lambda: (
            options.at_least(count, 1, "--count"),
            options.at_least(concurrency, 1, "--concurrency"),
            options.writable_folder(data, "--data"),
        )
    )
    _guard(lambda: asyncio.run(run_demo(data, count, concurrency, seed)))


def _checked[T](check: Callable[[], T]) -> T:
    """The checks' answer; a bad value is one line on stderr and exit code 2."""
    from moleculerpy_cqrs.face.options import BadOption

    try:
        return check()
    except BadOption as error:
        _fail(str(error))


def _guard(work: Callable[[], object]) -> None:
    from moleculerpy_cqrs.face.runner import UserCodeError

    try:
        work()
    except UserCodeError as error:  # the user's frames and error, as Python shows them
        err.print(f"[red]error:[/] {escape(error.lines[0])}", soft_wrap=True, highlight=False)
        for line in error.lines[1:]:
            err.print(escape(line), soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except CqrsError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


# --------------------------------------------------------------------------- operator commands
# Each one joins the cluster with a short-lived node of its own (the modules are imported
# when a command runs, so that ``--help`` stays quick).

Json = Annotated[
    bool, typer.Option("--json", help="print the raw answer as JSON (nothing else on stdout)")
]
Timeout = Annotated[
    float,
    typer.Option("--timeout", help="seconds to wait for the services to appear and for answers"),
]
CallTimeout = Annotated[
    float,
    typer.Option("--call-timeout", min=0.0, help="seconds to wait for this operation's answer"),
]
AggregateName = Annotated[str, typer.Argument(help="the aggregate's name", show_default=False)]


@app.command()
def status(
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    as_json: Json = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="redraw the table until Ctrl-C")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between redraws with --watch")
    ] = 2.0,
) -> None:
    """A table of every event store and aggregate in the cluster: head, checkpoint, lag,
    state, dead letters, the node holding each lease and the nodes standing by."""
    from moleculerpy_cqrs.face import operator

    if watch and as_json:
        _fail("--watch draws a live table; leave out --json")
    options = _options(transporter, timeout, as_json)
    _operate(lambda: operator.status(options, watch=watch, interval=interval))


@app.command()
def snapshot(
    aggregate: AggregateName,
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    call_timeout: CallTimeout = 600.0,
    as_json: Json = False,
) -> None:
    """Snapshot an aggregate; prints the snapshot's id."""
    from moleculerpy_cqrs.face import operator

    options = _options(transporter, timeout, as_json)
    _operate(lambda: operator.snapshot(options, aggregate, call_timeout=call_timeout))


@app.command()
def snapshots(
    aggregate: AggregateName,
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    as_json: Json = False,
) -> None:
    """List an aggregate's snapshots: status, checkpoint, size, time, location."""
    from moleculerpy_cqrs.face import operator

    _operate(lambda: operator.snapshots(_options(transporter, timeout, as_json), aggregate))


@app.command()
def restore(
    aggregate: AggregateName,
    snapshot_id: Annotated[str, typer.Argument(help="the id `cqrs snapshot` printed")],
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    call_timeout: CallTimeout = 600.0,
    as_json: Json = False,
) -> None:
    """Put a completed snapshot back; the aggregate catches up from its checkpoint."""
    from moleculerpy_cqrs.face import operator

    options = _options(transporter, timeout, as_json)
    _operate(lambda: operator.restore(options, aggregate, snapshot_id, call_timeout=call_timeout))


@app.command()
def replay(
    aggregate: AggregateName,
    snapshot_id: Annotated[
        str | None,
        typer.Option("--snapshot", help="restore this snapshot and catch up from it instead"),
    ] = None,
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    call_timeout: CallTimeout = 600.0,
    as_json: Json = False,
) -> None:
    """Rebuild an aggregate from the whole log (reads go on meanwhile), with live progress."""
    from moleculerpy_cqrs.face import operator

    options = _options(transporter, timeout, as_json)
    _operate(
        lambda: operator.replay(
            options, aggregate, snapshot_id=snapshot_id, call_timeout=call_timeout
        )
    )


@app.command("dead-letters")
def dead_letters(
    aggregate: AggregateName,
    ids: Annotated[
        list[int] | None,
        typer.Argument(help="with --discard: the dead letters' ids (default: all)"),
    ] = None,
    retry: Annotated[bool, typer.Option("--retry", help="apply the dead letters again")] = False,
    discard: Annotated[
        bool,
        typer.Option(
            "--discard", help="give up on the dead letters IDS (or all), recording who and when"
        ),
    ] = False,
    discarded: Annotated[
        bool, typer.Option("--discarded", help="list the discarded dead letters instead")
    ] = False,
    page: Annotated[int, typer.Option(min=1, help="page to show")] = 1,
    page_size: Annotated[int, typer.Option(min=1, max=1000, help="rows per page")] = 20,
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    call_timeout: CallTimeout = 600.0,
    as_json: Json = False,
) -> None:
    """List an aggregate's dead letters (events its transformations failed on), retry them,
    or discard them."""
    from moleculerpy_cqrs.face import calls, operator

    if sum((retry, discard, discarded)) > 1:
        _fail("give one of --retry, --discard and --discarded")
    if ids and not discard:
        _fail("dead-letter ids go with --discard (e.g. `cqrs dead-letters AGG --discard 3 4`)")
    options = _options(transporter, timeout, as_json)
    if discard:
        _operate(
            lambda: calls.discard_dead_letters(
                options, aggregate, ids or None, call_timeout=call_timeout
            )
        )
        return
    if discarded:
        _operate(
            lambda: calls.discarded_dead_letters(options, aggregate, page=page, page_size=page_size)
        )
        return
    _operate(
        lambda: operator.dead_letters(
            options,
            aggregate,
            page=page,
            page_size=page_size,
            retry=retry,
            call_timeout=call_timeout,
        )
    )


@app.command()
def call(
    action: Annotated[str, typer.Argument(help="the action, e.g. profile.update")],
    params: Annotated[
        str | None, typer.Argument(help='its params as JSON, e.g. \'{"name": "Ann"}\'')
    ] = None,
    meta: Annotated[str | None, typer.Option("--meta", help="meta as a JSON object")] = None,
    transporter: Transporter = None,
    timeout: Timeout = 10.0,
    call_timeout: CallTimeout = 60.0,
) -> None:
    """Call any action in the cluster and print its answer as JSON; an error answer prints
    its name, code, type and data on stderr, with exit code 1."""
    import json

    from moleculerpy_cqrs.face import calls

    def parsed(text: str | None, what: str) -> Any:
        if text is None:
            return {}
        try:
            return json.loads(text)
        except ValueError as error:
            _fail(f'{what} is not JSON ({error}): give e.g. \'{{"name": "Ann"}}\'')

    values, meta_values = parsed(params, "PARAMS_JSON"), parsed(meta, "--meta")
    if not isinstance(meta_values, dict):
        _fail('--meta must be a JSON object, e.g. \'{"user": "ann"}\'')
    options = _options(transporter, timeout, True)
    try:
        _operate(
            lambda: calls.call(options, action, values, meta_values, call_timeout=call_timeout)
        )
    except calls.CallFailed as failed:
        detail = failed.detail
        kind = f", {detail['type']}" if detail["type"] else ""
        err.print(
            f"[red]error:[/] {escape(str(detail['name']))} ({detail['code']}{escape(kind)}): "
            f"{escape(' '.join(str(detail['message']).split()))}",
            soft_wrap=True,
            highlight=False,
        )
        if detail["data"] is not None:
            err.print(
                f"data: {escape(json.dumps(detail['data'], default=str))}",
                soft_wrap=True,
                highlight=False,
            )
        raise typer.Exit(1) from None


@app.command()
def ui(
    transporter: Transporter = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free port)")] = 8000,
    host: UiHost = "127.0.0.1",
    token: UiToken = None,
    stall_after: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="seconds without an applied event, the lag not shrinking, before an "
            "aggregate is shown as stalled",
        ),
    ] = 30.0,
    timeout: Timeout = 10.0,
) -> None:
    """Serve the operator's web page from a node of its own that joins the cluster, watches
    and calls (it runs no services); read-only unless started with a token."""
    from moleculerpy_cqrs.face.runner import signalled
    from moleculerpy_cqrs.face.ui.node import run_ui

    options = _options(transporter, timeout, False)

    async def serve() -> None:
        with signalled() as stop:
            await run_ui(
                options, host=host, port=port, token=_ui_token(token), stall_after=stall_after,
                say=lambda line: print(line, flush=True), stop=stop,
            )  # fmt: skip

    _operate(serve)


def _options(transporter: str | None, timeout: float, as_json: bool) -> Options:
    from moleculerpy_cqrs.face import options
    from moleculerpy_cqrs.face.operator import Options

    def check() -> Options:
        if timeout <= 0:
            raise options.BadOption("--timeout", timeout, "give seconds > 0, e.g. 10")
        url = options.transporter(transporter) if transporter else None
        return Options(transporter=url, timeout=timeout, as_json=as_json)

    checked = _checked(check)
    if checked.transporter:
        from moleculerpy_cqrs.face import reach

        try:  # refused credentials, a missing package: said at once (also any refusal)
            asyncio.run(reach.check(checked.transporter, timeout))
        except CqrsError as error:
            _fail(str(error))
    return checked


def _operate(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an operator command; any failure is one line on stderr and exit code 2."""
    from moleculerpy_cqrs.face.operator import OperatorError

    try:
        asyncio.run(work())
    except typer.Exit:
        raise  # a bad option, already said
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (OperatorError, CqrsError) as error:
        _fail(str(error))
    except Exception as error:
        from moleculerpy_cqrs.face.calls import CallFailed

        if isinstance(error, CallFailed):
            raise  # `cqrs call` says it
        _fail(f"{type(error).__name__}: {error}")


def _fail(message: str) -> NoReturn:
    from moleculerpy_cqrs.face.reach import redact  # no line shows a password

    err.print(
        f"[red]error:[/] {escape(' '.join(redact(message).split()))}",
        soft_wrap=True,
        highlight=False,
    )
    raise typer.Exit(2)


def main(args: list[str] | None = None) -> None:
    """The ``cqrs`` command. A usage error (an unknown option, a value of the wrong type) is
    one line on stderr and exit code 2, as every other bad value is."""
    args = sys.argv[1:] if args is None else args
    if not args:
        args = ["--help"]
    try:
        result = app(args=args, prog_name="cqrs", standalone_mode=False)
    except typer.Abort:
        sys.exit(1)
    except Exception as error:
        show = getattr(error, "format_message", None)
        code = getattr(error, "exit_code", None)
        if show is None or not isinstance(code, int):
            raise
        command = getattr(getattr(error, "ctx", None), "command_path", None) or "cqrs"
        err.print(
            f"[red]error:[/] {escape(' '.join(str(show()).split()))} "
            f"(see `{escape(command)} --help`)",
            soft_wrap=True,
            highlight=False,
        )
        sys.exit(code)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
