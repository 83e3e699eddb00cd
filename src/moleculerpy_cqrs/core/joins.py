"""How a transformation's reads of its own aggregate reach the batch being applied.

The projector runs a batch's transformations before anything is written; a transformation
that reads its aggregate (``profileSummaryAggregate.find``) must see the effect of every
earlier event of the batch, which lives in the batch's :class:`~.batch.BatchView`. So the
projector opens each batch under a token. An action transformation receives the token in
``meta`` (only ``meta`` travels between nodes); an async-callable transformation runs with it
in a context variable, which the broker's local calls carry along. The aggregate's read
actions answer from the open view when they see a token of theirs; a token that names an
aggregate but no batch open on this node is refused (the read would otherwise silently see
committed data only).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from moleculerpy_cqrs.core.batch import BatchView
from moleculerpy_cqrs.core.records import ORIGIN_KEY
from moleculerpy_cqrs.errors import Conflict

TOKEN_KEY: Final = "$cqrsTx"
AGGREGATE_KEY: Final = "$cqrsAggregate"
NODE_KEY: Final = "$cqrsNode"
ITEM_KEY: Final = "$cqrsItem"
"""On the calls of a serial request to another node (core/remote.py): the call's number in
its batch, 0 for the first call of a session's first request (which reads the batch as it
is). The serving node records the reads of the aggregate such a call makes itself, and marks
the ones it forwards here with ``RECORDED_KEY``; a read of any other call (number > 0) that
arrives without the mark came another way (through a third service), unrecorded: its call's
answer is not used (:meth:`OpenBatches.unrecorded`)."""
RECORDED_KEY: Final = "$cqrsRecorded"
PRIVATE_META: Final = (TOKEN_KEY, AGGREGATE_KEY, NODE_KEY, ITEM_KEY, RECORDED_KEY, ORIGIN_KEY)


@dataclass(frozen=True)
class BatchToken:
    aggregate: str
    token: str
    node: str

    def meta(self) -> dict[str, str]:
        return {TOKEN_KEY: self.token, AGGREGATE_KEY: self.aggregate, NODE_KEY: self.node}


_CURRENT: ContextVar[BatchToken | None] = ContextVar("moleculerpy_cqrs_batch", default=None)


class OpenBatches:
    """The batches one aggregate's projector has open on this node, by token."""

    def __init__(self, aggregate: str, node: str) -> None:
        self.aggregate = aggregate
        self.node = node
        self._views: dict[str, BatchView] = {}
        self._unrecorded: dict[str, set[int]] = {}  # token -> calls that read unrecorded

    @contextmanager
    def open(self, view: BatchView) -> Iterator[BatchToken]:
        """Register ``view`` for the reads of the transformations run inside this block."""
        token = BatchToken(self.aggregate, secrets.token_hex(8), self.node)
        self._views[token.token] = view
        reset = _CURRENT.set(token)
        try:
            yield token
        finally:
            _CURRENT.reset(reset)
            del self._views[token.token]
            self._unrecorded.pop(token.token, None)

    def unrecorded(self, token: BatchToken) -> set[int]:
        """The numbers of the calls of serial requests that read the aggregate here
        unrecorded (see :data:`ITEM_KEY`)."""
        return self._unrecorded.get(token.token) or set()

    def open_view(self, meta: dict[str, Any]) -> BatchView | None:
        """The common case of :meth:`view_for`, and nothing else: the view of a batch open
        here that ``meta`` names, for a read no serial request made. None otherwise (never
        raises)."""
        held = meta.get(TOKEN_KEY)
        if type(held) is str and meta.get(AGGREGATE_KEY) == self.aggregate:
            found = self._views.get(held)
            if found is not None and ITEM_KEY not in meta:
                return found
        return None

    def view_for(self, meta: Any) -> BatchView | None:
        """The open view a read of this aggregate must answer from; None for a plain read."""
        if isinstance(meta, dict):  # the common case first: a transformation's read, here
            found = self.open_view(meta)
            if found is not None:
                return found
        token = _from_meta(meta) or _CURRENT.get()
        if token is None or token.aggregate != self.aggregate:
            return None
        view = self._views.get(token.token)
        if isinstance(meta, Mapping) and view is not None and not meta.get(RECORDED_KEY):
            item = meta.get(ITEM_KEY)
            if isinstance(item, int) and item > 0:
                self._unrecorded.setdefault(token.token, set()).add(item)
        if view is None:
            where = f"node {token.node!r}" if token.node != self.node else "this node any more"
            raise Conflict(
                f"this read of {self.aggregate} comes from a transformation of batch "
                f"{token.token}, which is open on {where}, not on node {self.node!r}: a "
                "transformation's reads of its own aggregate must reach the projector's node "
                "(and finish before its transformation answers)",
                batch=token.token,
                node=token.node,
            )
        return view


def _from_meta(meta: Any) -> BatchToken | None:
    if not isinstance(meta, Mapping):
        return None
    token, aggregate = meta.get(TOKEN_KEY), meta.get(AGGREGATE_KEY)
    if not isinstance(token, str) or not isinstance(aggregate, str):
        return None
    node = meta.get(NODE_KEY)
    return BatchToken(aggregate, token, node if isinstance(node, str) else "?")
