"""The core's only view of the broker: a small port the broker layer implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Outcome = tuple[bool, Any]
"""(answered, the answer) or (False, the exception raised)."""


@dataclass(frozen=True)
class KeyRows:
    """Every row of the aggregate whose ``field`` equals ``value``, as the batch holds them
    when the call is made: a read that asks for no more than that is answered from them on
    the serving node, with no call back."""

    field: str
    value: Any
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class ManyCall:
    """One call of :meth:`BrokerPort.call_many`."""

    action: str
    params: dict[str, Any]
    meta: dict[str, Any]
    rows: KeyRows | None = None
    kind: str | None = None  # the binding's: how its answer changes the rows it read


Read = tuple[str, dict[str, Any], Any]
"""A read of the aggregate a call made: (action method, params, answer)."""


@dataclass
class ManyAnswers:
    """The outcome of each call of :meth:`BrokerPort.call_many`, in order, and (``serial``
    mode) the reads of the aggregate each made, with the answers it got (None: a read whose
    answer could not be recorded, e.g. it failed)."""

    outcomes: list[Outcome] = field(default_factory=list)
    reads: list[list[Read] | None] = field(default_factory=list)


BatchCaller = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]
"""Calls one action with (params, meta): see :meth:`BrokerPort.batch_caller`."""


class BrokerPort(Protocol):
    async def call(
        self, action: str, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Any:
        """Call an action; raise its error."""

    def batch_caller(self, action: str) -> BatchCaller:
        """A function that calls ``action`` for a projector's batch (``meta`` names the
        batch) as :meth:`call` would, resolved now: when this node serves the action, its
        handler, called with a new context each time, with no look-up per call; else
        :meth:`call`. Good for one batch (services may come and go between batches)."""

    def batch_node(self, action: str) -> str | None:
        """The other node that would serve ``action`` and runs many calls in one request
        (see :meth:`call_many`); None when it is served on this node or by no such node:
        then call it once per event."""

    async def call_many(
        self,
        node: str,
        calls: Sequence[ManyCall],
        *,
        serial: bool,
        fields: dict[str, Any] | None = None,
        known: Sequence[tuple[dict[str, Any], Any]] = (),
        session: tuple[str, int] | None = None,
    ) -> ManyAnswers:
        """Make every call on ``node`` (which serves their actions) in one request.
        ``serial``: one after another, each read of the aggregate named in a call's meta
        recorded with its answer; a read whose params are in ``known`` (find params and their
        answer as the batch holds it), or that an earlier call of the request made, may be
        answered on that node, patched by the answers of the calls since; so may a read of a
        call's key rows (:class:`KeyRows`). ``session`` (an id, and this request's number in
        it from 0): that node runs the requests of one session in that order and carries
        those answers from one to the next. Else all at once. ``fields`` are the aggregate's.
        Raises when the request as a whole failed (the node is gone, the request timed out):
        then no call was answered."""

    async def emit(
        self, event: str, payload: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> None:
        """Emit an event once per subscribing service; a no-op when nobody listens.
        Raises only when the event could not be handed over (e.g. transport down)."""

    async def broadcast(
        self, event: str, payload: dict[str, Any], *, others_only: bool = False
    ) -> None:
        """Tell every node (best effort). With ``others_only``, nothing is sent unless
        another node listens (this node's listeners may then hear it too)."""

    async def wait_for_actions(self, actions: list[str]) -> None:
        """Return once every action is callable somewhere in the cluster."""

    def is_available(self, action: str) -> bool:
        """Whether some node (this one or another) serves ``action`` now."""
