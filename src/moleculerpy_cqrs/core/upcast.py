"""Event versions, upcasters and renames: the one place a stored event becomes the event read.

Every reader of an event log goes through :meth:`Upcasters.read_all` (the dispatcher, the
event-log port that projectors, replays, restores' catch-up and dead-letter retries read, and
the event store's read actions), so all of them see each event under its current name, at its
current version. Stored rows are never changed.

A stored event keeps its position as ``id`` when it is read. An upcaster may split one stored
event into several: the pieces all carry the stored event's ``id`` (checkpoints and the
exactly-once promise stay per stored event, and all pieces of one stored event are in the same
read, so in the same batch) and are told apart by ``part`` (0, 1, ...) and ``parts`` (how
many); an event read as exactly one has neither.

An event that cannot be read (an upcaster raised) is answered in its stored form with
``upcastError`` set: the dispatcher marks it failed with that error, and each aggregate
dead-letters it; nothing stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from moleculerpy_cqrs.core.records import EVENT_VERSION, EventType
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.stores.fields import Record

UPCAST_ERROR: Final = "upcastError"
"""Set on an event that could not be read in its current shape (the stored form is kept)."""

MAX_STEPS: Final = 1000  # one stored event read through more steps than this: a cycle
_COMMAND: Final = int(EventType.COMMAND)  # a plain int: compared once per event read


@dataclass(frozen=True)
class Upcasted:
    """An upcaster's answer that renames the event, or one piece of a split (in a list).

    An upcaster answers the new payload (same name), an ``Upcasted(event, payload)`` (a new
    name), or a list of payloads / ``Upcasted`` (the stored event is read as several; at
    least one: a stored event is always read as something, so that it has a position).
    """

    event: str
    payload: Any


Upcaster = Callable[[Any], Any]


class UpcastFailed(Exception):
    """An upcaster raised, or answered something that is not an event."""

    def __init__(self, event: str, version: int, error: BaseException | str) -> None:
        self.event = event
        self.version = version
        self.error = error
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"upcasting {event!r} from version {version} failed: {why}")


class Upcasters:
    """The versions, upcasters and renames of one event store (made by ``EventStore``)."""

    def __init__(self, store: str) -> None:
        self.store = store
        self._declared: dict[str, set[int]] = {}  # event -> versions mappings store it at
        self._steps: dict[tuple[str, int], list[Upcaster]] = {}
        self._renames: dict[str, list[str]] = {}
        self._current: dict[str, int] = {}
        self._rename: dict[str, str] = {}  # the checked renames
        # (event, stored version) -> the steps to its current version, for events no rename
        # touches: the usual case, read without the general walk (made by check)
        self._chains: dict[tuple[str, int], tuple[Upcaster, ...]] = {}
        self.active = False  # anything to do when reading: else reads are passed through

    # ------------------------------------------------------------------ declaring

    def declare(self, event: str, version: int) -> None:
        """A mapping stores ``event`` at ``version`` (its current version)."""
        _check_version(version, "version")
        self._declared.setdefault(event, set()).add(version)

    def add(self, event: str, from_version: int, fn: Upcaster) -> None:
        _check_version(from_version, "from_version")
        if not callable(fn):
            raise ConfigurationError(f"the upcaster of {event!r} v{from_version} is not callable")
        self._steps.setdefault((event, from_version), []).append(fn)

    def rename(self, old: str, new: str) -> None:
        if old == new:
            raise ConfigurationError(f"rename {old!r} to itself: nothing to rename")
        self._renames.setdefault(old, []).append(new)

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Check every chain; raises one ``ConfigurationError`` naming each event and the
        versions at fault. Run when the node starts."""
        problems: list[str] = []
        for event, versions in sorted(self._declared.items()):
            if len(versions) > 1:
                problems.append(
                    f"event {event!r} is stored at versions {sorted(versions)} by different "
                    "mappings: give every map_action/map_event of it one version"
                )
        for old, targets in sorted(self._renames.items()):
            if len(targets) > 1:
                problems.append(
                    f"event {old!r} is renamed to both {targets[0]!r} and {targets[1]!r}"
                )
        renames = {old: targets[0] for old, targets in self._renames.items()}
        for old in sorted(renames):
            seen = [old]
            name = renames[old]
            while name in renames and name not in seen:
                seen.append(name)
                name = renames[name]
            if name in seen and name == old:
                problems.append("renames go round in a cycle: " + " -> ".join([*seen, old]))
        for (event, version), fns in sorted(self._steps.items()):
            if len(fns) > 1:
                problems.append(
                    f"event {event!r} has {len(fns)} upcasters from version {version} "
                    f"(to {version + 1}): keep one"
                )
            if event in renames:
                problems.append(
                    f"event {event!r} is renamed to {renames[event]!r}, so its upcaster from "
                    f"version {version} never runs: register it under {renames[event]!r}"
                )
        current: dict[str, int] = {}
        names = {e for e, _ in self._steps} | set(self._declared)
        for event in sorted(names):
            froms = sorted(v for e, v in self._steps if e == event)
            declared = self._declared.get(event)
            top = max(declared) if declared else (froms[-1] + 1 if froms else EVENT_VERSION)
            current[event] = top
            beyond = [v for v in froms if v >= top]
            if beyond:
                problems.append(
                    f"event {event!r} is at version {top}, but an upcaster goes from version "
                    f"{beyond[0]} to {beyond[0] + 1}, past it: raise the version of its "
                    "map_action/map_event or remove the upcaster"
                )
            missing = [v for v in range(1, top) if v not in froms]
            if missing and event not in renames:
                chain = " -> ".join(f"v{v}" for v in range(1, top + 1))
                problems.append(
                    f"event {event!r} is at version {top} but has no upcaster from version "
                    f"{', '.join(str(v) for v in missing)} (the chain {chain} does not reach "
                    f"v{top}): add events.upcast({event!r}, {missing[0]}, fn)"
                )
        if problems:
            raise ConfigurationError(f"event store {self.store!r}: " + "; ".join(problems))
        self._current = current
        self._rename = renames
        self._chains = self._same_name_chains()
        self.active = bool(self._steps or renames)

    def _same_name_chains(self) -> dict[tuple[str, int], tuple[Upcaster, ...]]:
        chains: dict[tuple[str, int], tuple[Upcaster, ...]] = {}
        for event, version in self._steps:
            if event in self._rename:
                continue
            fns: list[Upcaster] = []
            while (step := self._steps.get((event, version + len(fns)))) is not None:
                fns.append(step[0])
            chains[(event, version)] = tuple(fns)
        return chains

    def versions(self) -> dict[str, int]:
        """The current version of every event a mapping stores or an upcaster reaches."""
        return dict(sorted(self._current.items()))

    def renamed(self) -> dict[str, str]:
        return dict(sorted(self._rename.items()))

    def current(self, event: str) -> int:
        return self._current.get(event, EVENT_VERSION)

    # ------------------------------------------------------------------ reading

    def read_all(self, rows: Iterable[Record], *, in_place: bool = False) -> list[Record]:
        """``rows`` as read: each in its current shape, a split one as its pieces, one that
        cannot be upcast in its stored form with ``upcastError``. ``in_place``: the rows are
        the caller's alone (fresh from the adapter), and one read as a single event under its
        stored name is changed where it is rather than copied.

        This is paid per event by every reader of the log. The chain of a name and version is
        looked up once for a run of rows that share them, and an event that no rename touches
        runs its chain here (:meth:`_run_chain`) without the general walk."""
        if not self.active:
            return rows if isinstance(rows, list) else list(rows)
        out: list[Record] = []
        append = out.append
        chains, renames, run_chain = self._chains, self._rename, self._run_chain
        last_name: str | None = None
        last_version = 0
        chain: tuple[Upcaster, ...] | None = None
        for row in rows:
            if row.get("eventType", 0) != _COMMAND:
                append(row)
                continue
            name = row["event"]
            version = row.get("version") or EVENT_VERSION
            if name != last_name or version != last_version:
                last_name, last_version = name, version
                chain = chains.get((name, version))
                if chain is None and name not in renames:
                    chain = _AS_STORED  # no step from this version
            if chain is _AS_STORED:
                append(row)
                continue
            try:
                if chain is None:  # renamed
                    read = self._read_renamed(row, name, version)
                else:
                    read = run_chain(row, name, version, chain, in_place)
            except UpcastFailed as failed:
                append({**row, UPCAST_ERROR: str(failed)})
                continue
            if type(read) is list:
                out += read
            else:
                append(read)  # type: ignore[arg-type]
        return out

    def read(self, row: Record) -> list[Record]:
        """One event (stored, or read already: reading is idempotent) in its current shape;
        raises :class:`UpcastFailed`."""
        if not self.active or row.get("eventType", 0) != _COMMAND:
            return [row]
        name = row["event"]
        version = row.get("version") or EVENT_VERSION
        chain = self._chains.get((name, version))
        if chain is None:  # renamed, or nothing to do
            read = self._read_renamed(row, name, version)
        else:
            read = self._run_chain(row, name, version, chain, in_place=False)
        return read if type(read) is list else [read]  # type: ignore[list-item]

    def _run_chain(
        self,
        row: Record,
        name: str,
        version: int,
        chain: tuple[Upcaster, ...],
        in_place: bool,
    ) -> Record | list[Record]:
        """``row`` read through ``chain``, the steps from ``version`` of an event no rename
        touches; a step that renames or splits goes on in the general walk."""
        payload = row.get("payload")
        for fn in chain:
            try:
                answer = fn(payload)
            except Exception as error:
                raise UpcastFailed(name, version, error) from error
            if type(answer) is not dict:  # a rename or a split: the general walk
                return self._pieces(row, self._walk(name, version, payload, answer))
            payload = answer
            version += 1
        read = row if in_place else row.copy()
        read["version"] = version
        read["payload"] = payload
        return read

    def _read_renamed(self, row: Record, name: str, version: int) -> Record | list[Record]:
        renames, steps = self._rename, self._steps
        payload = row.get("payload")
        start = (name, version)
        for _ in range(MAX_STEPS):
            if name in renames:
                name = self._final(name)
            fns = steps.get((name, version))
            if fns is None:
                break
            try:
                answer = fns[0](payload)
            except Exception as error:
                raise UpcastFailed(name, version, error) from error
            if type(answer) is not dict:  # a rename or a split: the general walk
                return self._pieces(row, self._walk(name, version, payload, answer))
            payload, version = answer, version + 1
        else:
            raise UpcastFailed(name, version, "more than 1000 steps: a cycle")
        if (name, version) == start:
            return row
        return {**row, "event": name, "version": version, "payload": payload}

    @staticmethod
    def _pieces(row: Record, pieces: list[tuple[str, int, Any]]) -> Record | list[Record]:
        if len(pieces) == 1:
            name, version, payload = pieces[0]
            return {**row, "event": name, "version": version, "payload": payload}
        return [
            {**row, "event": n, "version": v, "payload": p, "part": i, "parts": len(pieces)}
            for i, (n, v, p) in enumerate(pieces)
        ]

    def _final(self, name: str) -> str:
        for _ in range(MAX_STEPS):
            if name not in self._rename:
                break
            name = self._rename[name]
        return name

    def _walk(
        self, name: str, version: int, payload: Any, first: Any
    ) -> list[tuple[str, int, Any]]:
        """Every piece ``(name, version, payload)`` that a step from ``name`` at ``version``
        which answered ``first`` (a rename or a split) leads to, in order."""
        done: list[tuple[str, int, Any]] = []
        todo: list[tuple[str, int, Any, Any]] = [(name, version, payload, first)]
        steps = 0
        while todo:
            name, version, payload, answer = todo.pop()
            name = self._final(name)
            if answer is _NOT_YET:
                fns = self._steps.get((name, version))
                if fns is None:
                    done.append((name, version, payload))
                    continue
                steps += 1
                if steps > MAX_STEPS:
                    raise UpcastFailed(name, version, "more than 1000 steps: a cycle")
                try:
                    answer = fns[0](payload)
                except Exception as error:
                    raise UpcastFailed(name, version, error) from error
            pieces = answer if isinstance(answer, list) else [answer]
            if not pieces:  # a stored event read as nothing would hold no position
                raise UpcastFailed(name, version, "it answered no event (an empty list)")
            nxt: list[tuple[str, int, Any, Any]] = []
            for piece in pieces:
                if isinstance(piece, Upcasted):
                    if not isinstance(piece.event, str) or not piece.event:
                        raise UpcastFailed(name, version, "Upcasted needs an event name")
                    piece_name, piece_payload = piece.event, piece.payload
                else:
                    piece_name, piece_payload = name, piece
                top = self._current.get(self._final(piece_name), EVENT_VERSION)
                if version + 1 > top:
                    raise UpcastFailed(
                        name,
                        version,
                        f"it answered {piece_name!r} at version {version + 1}, past that "
                        f"event's current version {top}",
                    )
                nxt.append((piece_name, version + 1, piece_payload, _NOT_YET))
            todo += reversed(nxt)  # pieces come out in the order the upcaster gave them
        return done


_NOT_YET: Final = object()  # a piece whose next step has not run yet
_AS_STORED: Final[tuple[Upcaster, ...]] = ()  # read_all: an event read as it is stored


def _check_version(version: Any, what: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigurationError(f"{what} must be an integer from 1, got {version!r}")
