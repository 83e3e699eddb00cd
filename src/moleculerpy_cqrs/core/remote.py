"""Transformations served by another node: many events in one request.

A transformation action served on the projector's own node is called once per event (a local
call costs tens of microseconds). One served only on another node would cost a network round
trip per event, and CPU on both sides for each; so the projector sends that node many events
in one request (:meth:`~.port.BrokerPort.call_many`), which calls the action locally for each
and answers every answer or error. Answers are still applied to the batch in log order, one
event at a time, with the usual retries, dead letters and halting; a request that fails as a
whole (the node died, a timeout) leaves its events unanswered, and each is then retried on its
own like any failed call. Nothing is written before the batch commits, so nothing is applied
twice.

What a request may hold keeps "a transformation sees the effect of every earlier event":

* **Keyed bindings** (:class:`KeyedCalls`): a call is made only once the earlier events of its
  key are applied (as :class:`~.projector.KeyedRun` does for local calls), so calls that wait
  together are independent and go in one request. With a key that is a field, each call
  carries the rows of its key as the batch holds them then (:class:`~.port.KeyRows`): a read
  of the aggregate that asks for no more than that key's rows is answered on the serving node
  with no call back; any other read goes back to the projector's node as before.
* **Bindings without a key** (:func:`serial_chunk`): each event may depend on every earlier
  one. The serving node runs the calls one after another and stops before the first one
  after the first that reads the aggregate (its meta says its place, ``$cqrsItem``); the
  projector applies the answers it got and sends the rest again, the reader first. A call
  that does not read the aggregate answers the same whatever came before it, and the first
  call of a request sees every earlier answer applied. The projector's node refuses such an
  early read too (:meth:`~.joins.OpenBatches.view_for`), and drops the answers from that call
  on, should the user's code have swallowed the refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from moleculerpy_cqrs.core.joins import ITEM_KEY, BatchToken, OpenBatches
from moleculerpy_cqrs.core.port import BrokerPort, KeyRows, ManyCall, Outcome
from moleculerpy_cqrs.stores.query import Compare, Query

if TYPE_CHECKING:
    from moleculerpy_cqrs.core.batch import BatchView

MAX_CALLS: Final = 256  # calls in one request
IN_FLIGHT: Final = 4  # requests to one node at once, for one keyed batch
FIRST_CHUNK: Final = 16  # calls in the first serial request of a batch


class KeyedCalls:
    """The calls of one keyed batch that go to other nodes, gathered into requests.

    A call waits in its node's queue; a request leaves as soon as fewer than ``IN_FLIGHT``
    are out (on the next turn of the event loop, so that the calls that became ready
    together leave together), carrying up to ``MAX_CALLS`` calls. While requests are out,
    the calls made ready by their answers gather for the next one.
    """

    def __init__(self, port: BrokerPort, fields: dict[str, Any]) -> None:
        self.port = port
        self.fields = fields
        self._queues: dict[str, list[tuple[ManyCall, asyncio.Future[Outcome]]]] = {}
        self._out: dict[str, int] = {}
        self._scheduled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def call(self, node: str, call: ManyCall) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(node, []).append((call, future))
        self._schedule(node)
        return await future

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()

    def _schedule(self, node: str) -> None:
        if self._closed or node in self._scheduled or self._out.get(node, 0) >= IN_FLIGHT:
            return
        self._scheduled.add(node)
        asyncio.get_running_loop().call_soon(self._flush, node)

    def _flush(self, node: str) -> None:
        self._scheduled.discard(node)
        queue = self._queues.get(node)
        if not queue:
            return
        taken, self._queues[node] = queue[:MAX_CALLS], queue[MAX_CALLS:]
        self._out[node] = self._out.get(node, 0) + 1
        task = asyncio.create_task(self._send(node, taken))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._queues[node]:
            self._schedule(node)

    async def _send(self, node: str, taken: list[tuple[ManyCall, asyncio.Future[Outcome]]]) -> None:
        try:
            try:
                answers = await self.port.call_many(
                    node, [c for c, _ in taken], serial=False, fields=self.fields
                )
                outcomes = answers.outcomes
            except Exception as error:  # the request as a whole failed
                outcomes = [(False, error)] * len(taken)
            for (_, future), outcome in zip(taken, outcomes, strict=False):
                if not future.done():
                    future.set_result(outcome)
            for _, future in taken[len(outcomes) :]:
                if not future.done():
                    future.set_result((False, RuntimeError("the request answered too few")))
        finally:
            self._out[node] -= 1
            if self._queues.get(node):
                self._schedule(node)


async def key_rows(view: BatchView, field: str, value: Any) -> KeyRows | None:
    """Every row whose ``field`` is ``value``, as ``view`` holds them now (None when that
    cannot be read, e.g. a value of the wrong type: the reads then go back as before)."""
    if field not in view.fields or value is None:
        return None
    try:
        rows = await view.find(Query(where=Compare(field, "=", value)))
    except Exception:
        return None
    return KeyRows(field, value, rows)


async def serial_chunk(
    port: BrokerPort,
    node: str,
    calls: Sequence[ManyCall],
    batches: OpenBatches,
    token: BatchToken,
) -> list[Outcome]:
    """Make ``calls`` (events of bindings without a key) on ``node`` in one serial request;
    answers the outcomes of the leading calls that saw every earlier answer applied (at
    least the first: a failed request answers its failure for it)."""
    numbered = [
        ManyCall(c.action, c.params, {**c.meta, ITEM_KEY: i}, c.rows) for i, c in enumerate(calls)
    ]
    batches.take_early_read(token)
    try:
        outcomes = (await port.call_many(node, numbered, serial=True)).outcomes
    except Exception as error:
        return [(False, error)]
    early = batches.take_early_read(token)
    if early is not None:
        outcomes = outcomes[:early]
    return outcomes or [(False, RuntimeError(f"{node} answered none of the calls"))]


class ChunkSizer:
    """How many calls the next serial request carries: twice as many while every call is
    answered; after a request cut short (a call read the aggregate), as many as were
    answered, for ``HOLD`` requests, before trying more again (a transformation that reads
    on every event then costs one request per event, not a wasted call as well)."""

    HOLD: Final = 16

    def __init__(self) -> None:
        self.size = FIRST_CHUNK
        self.held = 0

    def answered(self, asked: int, answered: int) -> None:
        if answered < asked:
            self.size, self.held = max(answered, 1), self.HOLD
        elif self.held > 0:
            self.held -= 1
        else:
            self.size = min(self.size * 2, MAX_CALLS)
