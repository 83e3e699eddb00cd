"""The operator's commands: ``cqrs status``, ``snapshot``, ``snapshots``, ``restore``,
``replay`` and ``dead-letters``.

Each command joins the cluster with the operator client (``face.client``: a short-lived node
of its own), asks for typed values, prints them as tables (``face.tables``) or, with
``--json``, the actions' answers as they came, and leaves the cluster. ``status --watch``
is ``face.watch``.
"""

from __future__ import annotations

import asyncio
import time

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moleculerpy_cqrs.face.client import (
    LONG_CALL,
    POLL,
    OperatorClient,
    OperatorError,
    Options,
    operator_client,
    session,
    stops_on_sigterm,
)
from moleculerpy_cqrs.face.model import ReplayProgress
from moleculerpy_cqrs.face.tables import (
    print_dead_letters,
    print_json,
    print_lines,
    print_retry,
    print_snapshots,
    status_view,
    stdout_console,
    wrap_value,
)
from moleculerpy_cqrs.face.watch import watch_status

__all__ = [
    "LONG_CALL",
    "OperatorError",
    "Options",
    "dead_letters",
    "replay",
    "restore",
    "session",
    "snapshot",
    "snapshots",
    "status",
]


async def status(options: Options, *, watch: bool = False, interval: float = 2.0) -> None:
    if watch and options.as_json:
        raise OperatorError("--watch draws a live table; leave out --json")
    with stops_on_sigterm():
        async with operator_client(options) as client:
            if watch:
                await watch_status(client, interval)
                return
            cluster = await client.status()
    if options.as_json:
        print_json(cluster.as_json())
    else:
        console = stdout_console()
        console.print(status_view(cluster, console.width))
    if cluster.unreachable:
        first, more = cluster.unreachable[0], len(cluster.unreachable) - 1
        raise OperatorError(first.error + (f" (and {more} more)" if more else ""))


async def snapshot(options: Options, aggregate: str, *, call_timeout: float) -> None:
    with stops_on_sigterm():
        async with operator_client(options) as client:
            snapshot_id = await client.snapshot(aggregate, within=call_timeout)
    if options.as_json:
        print_json(snapshot_id)
    else:
        print_lines(stdout_console(), [snapshot_id])


async def snapshots(options: Options, aggregate: str) -> None:
    with stops_on_sigterm():
        async with operator_client(options) as client:
            rows = await client.snapshots(aggregate)
    if options.as_json:
        print_json([row.raw for row in rows])
    else:
        print_snapshots(stdout_console(), aggregate, rows)


async def restore(
    options: Options, aggregate: str, snapshot_id: str, *, call_timeout: float
) -> None:
    with stops_on_sigterm():
        async with operator_client(options) as client:
            answer = await client.restore(aggregate, snapshot_id, within=call_timeout)
    if options.as_json:
        print_json(answer)
    else:
        _say(
            f"restored {aggregate} from {answer.get('snapshotId', snapshot_id)} "
            f"(checkpoint {answer.get('checkpoint')}); it catches up from there"
        )


async def replay(
    options: Options, aggregate: str, *, snapshot_id: str | None, call_timeout: float
) -> None:
    with stops_on_sigterm():
        async with operator_client(options) as client:
            if snapshot_id is not None:
                answer = await client.replay_from_snapshot(
                    aggregate, snapshot_id, within=call_timeout
                )
                if options.as_json:
                    print_json(answer)
                else:
                    _say(
                        f"restored {aggregate} from {snapshot_id} (checkpoint "
                        f"{answer.get('checkpoint')}) and caught up with the log"
                    )
                return
            started = await client.start_replay(aggregate)
            final = await _follow_replay(client, aggregate, started)
    if final.state == "failed":
        raise OperatorError(f"replay of {aggregate} failed: {final.error}")
    if options.as_json:
        print_json(final.raw)
        return
    elapsed = (final.finished or time.time()) - (final.started or time.time())
    _say(
        f"replay of {aggregate} done: {final.done} events in {elapsed:.1f}s "
        f"({final.events_per_second:.0f} events/s)"
    )


async def _follow_replay(
    client: OperatorClient, aggregate: str, started: ReplayProgress
) -> ReplayProgress:
    """Poll the aggregate's status until the replay that answered ``started`` ends, with a
    live progress bar unless the output is JSON."""

    async def progress_now() -> ReplayProgress:
        progress = await client.replay_progress(aggregate)
        if progress is None or progress.started != started.started:
            raise OperatorError(f"{aggregate} no longer reports the replay it started")
        return progress

    current = started
    if client.options.as_json:
        while not current.ended:
            await asyncio.sleep(POLL)
            current = await progress_now()
        return current
    columns = (
        TextColumn("[bold]replay[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} ev/s"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stdout_console()) as bar:
        task = bar.add_task(escape(aggregate), total=None, rate=0.0, state="")

        def show(p: ReplayProgress) -> None:
            bar.update(
                task, total=p.total or None, completed=p.done,
                rate=p.events_per_second, state=str(p.state),
            )  # fmt: skip

        show(current)
        while not current.ended:
            await asyncio.sleep(POLL)
            current = await progress_now()
            show(current)
    return current


async def dead_letters(
    options: Options, aggregate: str, *, page: int, page_size: int, retry: bool,
    call_timeout: float,
) -> None:  # fmt: skip
    with stops_on_sigterm():
        async with operator_client(options) as client:
            if retry:
                result = await client.retry(aggregate, within=call_timeout)
            else:
                listed = await client.dead_letters(aggregate, page=page, page_size=page_size)
    console = stdout_console()
    if retry:
        if options.as_json:
            print_json(result.raw)
        else:
            print_retry(console, aggregate, result)
    elif options.as_json:
        print_json(listed.raw)
    else:
        print_dead_letters(console, aggregate, listed)


def _say(line: str) -> None:
    console = stdout_console()
    print_lines(console, wrap_value(line, console.width))
