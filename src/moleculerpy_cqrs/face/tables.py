"""The operator's tables in a terminal, rendered from the typed client's values.

Each listing has two layouts. Where the whole table fits the terminal it is a table, one row
per item. Where it does not (80 columns, say), the items are *stacked*: a heading line, then
``label value`` pairs packed into lines; a pair is never split, and a long value (a path, an
error) breaks only after a space, ``/``, ``.`` or punctuation, so that every value stays
whole and readable: no zero-width columns, no truncated ids, no words cut in the middle.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moleculerpy_cqrs.core.states import DispatcherState, ProjectorState, SnapshotState
from moleculerpy_cqrs.face.model import (
    AggregateStatus,
    ClusterStatus,
    DeadLetter,
    EventStoreStatus,
    Page,
    RetryResult,
    ServiceStatus,
    Snapshot,
)

PROJECTOR_STYLES: Final[dict[ProjectorState, str]] = {
    ProjectorState.RUNNING: "green",
    ProjectorState.STANDBY: "cyan",
    ProjectorState.WAITING: "yellow",
    ProjectorState.PAUSED: "yellow",
    ProjectorState.HALTED: "bold red",
    ProjectorState.STOPPED: "red",
}
"""How each projector state shows (every state must have one: a test checks)."""

DISPATCHER_STYLES: Final[dict[DispatcherState, str]] = {
    DispatcherState.RUNNING: "green",
    DispatcherState.STANDBY: "cyan",
    DispatcherState.STOPPED: "red",
}

SNAPSHOT_STYLES: Final[dict[SnapshotState, str]] = {
    SnapshotState.COMPLETED: "green",
    SnapshotState.FAILED: "red",
    SnapshotState.CREATED: "yellow",
}


def stdout_console() -> Console:
    # A table piped into grep keeps whole names rather than 80 columns of ellipses.
    import os

    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(width=wide, highlight=False)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def when(ms: int | float | None) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def size(value: int | float | None) -> str:
    if not isinstance(value, int | float):
        return "-"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if number < 1024 or unit == "GiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return str(value)  # pragma: no cover


def seconds(value: float) -> str:
    return f"{value:.1f}"


def natural_width(table: Table) -> int:
    """How wide ``table`` is with every cell whole (rendered where nothing squeezes it)."""
    wide = Console(width=10_000, file=io.StringIO(), highlight=False, color_system=None)
    lines = wide.render_lines(table, pad=False)
    return max((sum(segment.cell_length for segment in line) for line in lines), default=0)


def fits(console: Console, table: Table) -> bool:
    """Whether ``table`` shows every cell whole within the console's width."""
    return natural_width(table) <= console.width


# --------------------------------------------------------------------------- stacked layout

_BREAK_AFTER = re.compile(r"(?<=[ /.,:;])")


def wrap_value(value: str, width: int) -> list[str]:
    """``value`` in lines of at most ``width``, broken only after a space, ``/``, ``.``,
    ``,``, ``:`` or ``;`` (ids such as ``snapshot_0123…`` stay whole; a run without any of
    them is folded only when it is longer than a line)."""
    width = max(width, 8)
    lines: list[str] = []
    for paragraph in value.splitlines() or [""]:
        line = ""
        for piece in _BREAK_AFTER.split(paragraph):
            while len(piece) > width:  # one unbroken run longer than a line
                if line:
                    lines.append(line.rstrip())
                    line = ""
                lines.append(piece[:width])
                piece = piece[width:]
            if len(line) + len(piece.rstrip()) > width and line:
                lines.append(line.rstrip())
                line = piece.lstrip()
            else:
                line += piece
        lines.append(line.rstrip())
    return lines


def stacked(
    heading: str, pairs: Sequence[tuple[str, str]], width: int, *, indent: int = 2
) -> list[str]:
    """A heading line, then ``label value`` pairs packed into lines of ``width`` (a pair is
    never split; one too long for a line gets lines of its own, its value wrapped)."""
    out = wrap_value(heading, width)
    pad = " " * indent
    room = width - indent
    line = ""
    for label, value in pairs:
        pair = f"{label} {value}"
        if len(pair) > room:  # on lines of its own
            if line:
                out.append(pad + line)
                line = ""
            first, *rest = wrap_value(pair, room)
            out.append(pad + first)
            out.extend(pad + "  " + more for more in wrap_value(" ".join(rest), room - 2) if more)
            continue
        if line and len(line) + 3 + len(pair) > room:
            out.append(pad + line)
            line = ""
        line = f"{line} · {pair}" if line else pair
    if line:
        out.append(pad + line)
    return out


def print_lines(console: Console, lines: Iterable[str]) -> None:
    for line in lines:
        console.print(Text(line), soft_wrap=True)


# --------------------------------------------------------------------------- status


def _state_text(status: ServiceStatus) -> Text:
    if isinstance(status, EventStoreStatus):
        d = status.dispatcher
        text = Text(str(d.state), style=DISPATCHER_STYLES[d.state])
        if d.failed:
            text.append(f" ({d.failed} failed)", style="red")
        return text
    if isinstance(status, AggregateStatus):
        text = Text(str(status.state), style=PROJECTOR_STYLES[status.state])
        if status.halted_at is not None:
            text.append(f" at {status.halted_at}")
        if status.replay is not None and status.replay.active:
            text.append(f", replaying {status.replay.done}/{status.replay.total}")
        return text
    return Text("unreachable", style="red")


def _lease_cells(status: ServiceStatus) -> tuple[str, str]:
    if isinstance(status, EventStoreStatus):
        lease, standby = status.dispatcher.lease, status.standby
    elif isinstance(status, AggregateStatus):
        lease, standby = status.lease, status.standby
    else:
        return "-", ", ".join(status.nodes) or "-"
    return (lease.node if lease else "-"), ", ".join(standby) or "-"


def status_notes(cluster: ClusterStatus) -> list[str]:
    """The last errors, said under the table."""
    notes: list[str] = []
    for s in cluster.ordered():
        if isinstance(s, EventStoreStatus) and s.dispatcher.last_error:
            notes.append(f"{s.name}: dispatcher's last error: {s.dispatcher.last_error}")
        elif isinstance(s, AggregateStatus):
            if s.waiting_for:
                notes.append(f"{s.name}: waiting for {', '.join(s.waiting_for)}")
            if s.last_error:
                notes.append(f"{s.name}: last error: {s.last_error}")
        elif not isinstance(s, EventStoreStatus | AggregateStatus):
            notes.append(f"{s.name}: {s.error}")
    return notes


def status_table(cluster: ClusterStatus, title: str = "cqrs status") -> Table:
    """One row per event store and aggregate."""
    table = Table(title=title)
    numbers = ("head", "checkpoint/cursor", "lag (events)", "lag (s)", "dead letters")
    for column in ("kind", "name", *numbers[:4], "state", numbers[4], "lease", "standby"):
        right = column in numbers
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for s in cluster.ordered():
        lease, standby = _lease_cells(s)
        if isinstance(s, EventStoreStatus):
            d = s.dispatcher
            table.add_row(
                "event store", s.name, str(s.head), str(d.cursor), str(d.lag), "-",
                _state_text(s), "-", lease, standby,
            )  # fmt: skip
        elif isinstance(s, AggregateStatus):
            table.add_row(
                "aggregate", s.name, cell(s.head), str(s.checkpoint), str(s.lag_events),
                seconds(s.lag_seconds), _state_text(s), str(s.dead_letters), lease, standby,
            )  # fmt: skip
        else:
            table.add_row(s.kind, s.name, "-", "-", "-", "-", _state_text(s), "-", "-", standby)
    return table


def status_stacked(cluster: ClusterStatus, width: int) -> list[str]:
    lines: list[str] = []
    for s in cluster.ordered():
        lease, standby = _lease_cells(s)
        if isinstance(s, EventStoreStatus):
            d = s.dispatcher
            pairs = [
                ("head", str(s.head)), ("cursor", str(d.cursor)), ("lag", str(d.lag)),
                ("state", _state_text(s).plain), ("lease", lease), ("standby", standby),
            ]  # fmt: skip
            lines += stacked(f"event store {s.name}", pairs, width)
        elif isinstance(s, AggregateStatus):
            pairs = [
                ("head", cell(s.head)), ("checkpoint", str(s.checkpoint)),
                ("lag", f"{s.lag_events} events, {seconds(s.lag_seconds)} s"),
                ("dead letters", str(s.dead_letters)), ("state", _state_text(s).plain),
                ("lease", lease), ("standby", standby),
            ]  # fmt: skip
            source = f" (fed by {s.event_store})" if s.event_store else ""
            lines += stacked(f"aggregate {s.name}{source}", pairs, width)
        else:
            lines += stacked(f"{s.kind} {s.name}", [("state", "unreachable"),
                                                    ("nodes", standby)], width)  # fmt: skip
    return lines


def status_view(cluster: ClusterStatus, width: int, caption: str | None = None) -> RenderableType:
    """The status as a table when it fits ``width``, stacked otherwise; notes under it."""
    table = status_table(cluster)
    if caption:
        table.caption = caption
    notes = status_notes(cluster)
    if natural_width(table) <= width:
        return Group(table, *(Text(note) for note in notes))
    lines = ["cqrs status", *status_stacked(cluster, width)]
    lines += [line for note in notes for line in wrap_value(note, width)]
    if caption:
        lines.append(caption)
    return Text("\n".join(lines))


# --------------------------------------------------------------------------- snapshots


def _snapshot_state(snapshot: Snapshot) -> Text:
    style = SNAPSHOT_STYLES.get(snapshot.status, "white") if isinstance(
        snapshot.status, SnapshotState
    ) else "white"  # fmt: skip
    return Text(str(snapshot.status), style=style)


def print_snapshots(console: Console, aggregate: str, rows: Sequence[Snapshot]) -> None:
    if not rows:
        console.print(f"no snapshots of {escape(aggregate)}")
        return
    table = Table(title=f"snapshots of {aggregate}")
    for column in ("snapshot", "status", "checkpoint", "size", "created", "updated",
                   "location"):  # fmt: skip
        right = column in ("checkpoint", "size")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for s in rows:
        table.add_row(
            s.snapshot_id, _snapshot_state(s), cell(s.checkpoint), size(s.size), when(s.created),
            when(s.updated), cell(s.location),
        )  # fmt: skip
    if fits(console, table):
        # Errors are sentences: under the table, wrapped between words.
        console.print(table)
        print_lines(
            console,
            (line for s in rows if s.error
             for line in wrap_value(f"{s.snapshot_id} {s.status}: {s.error}", console.width)),
        )  # fmt: skip
        return
    lines = [f"snapshots of {aggregate}"]
    for s in rows:
        pairs = [("checkpoint", cell(s.checkpoint)), ("size", size(s.size)),
                 ("created", when(s.created)), ("updated", when(s.updated)),
                 ("location", cell(s.location))]  # fmt: skip
        if s.error:
            pairs.append(("error", s.error))
        lines += stacked(f"{s.snapshot_id} {s.status}", pairs, console.width)
    print_lines(console, lines)


# --------------------------------------------------------------------------- dead letters


def print_dead_letters(console: Console, aggregate: str, page: Page[DeadLetter]) -> None:
    if not page.total:
        console.print(f"no dead letters in {escape(aggregate)}")
        return
    if page.past_the_end:
        console.print(f"{escape(aggregate)}: {escape(page.caption())}", soft_wrap=True)
        return
    table = Table(title=f"dead letters of {aggregate}", caption=page.caption())
    for column in ("id", "event id", "event", "handler", "kind", "attempts", "error", "updated"):
        right = column in ("id", "event id", "attempts")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for row in page.rows:
        table.add_row(
            str(row.id), cell(row.event_id), row.event, cell(row.handler), cell(row.kind),
            str(row.attempts), cell(row.error), when(row.updated),
        )  # fmt: skip
    if fits(console, table):
        console.print(table)
        return
    lines = [f"dead letters of {aggregate}"]
    for row in page.rows:
        pairs = [("event id", cell(row.event_id)), ("handler", cell(row.handler)),
                 ("kind", cell(row.kind)), ("attempts", str(row.attempts)),
                 ("updated", when(row.updated)), ("error", cell(row.error))]  # fmt: skip
        lines += stacked(f"dead letter {row.id}: {row.event}", pairs, console.width)
    lines.append(page.caption())
    print_lines(console, lines)


def print_retry(console: Console, aggregate: str, result: RetryResult) -> None:
    console.print(
        f"{escape(aggregate)}: retried {result.retried}, failed again {len(result.failed)}, "
        f"remaining {result.remaining}",
        soft_wrap=True,
    )
    for failure in result.failed:
        console.print(f"  dead letter {failure.id}: {escape(failure.error)}", soft_wrap=True)
