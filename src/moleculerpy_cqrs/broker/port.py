"""The core's broker port, implemented on a MoleculerPy broker."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial
from typing import Any

from moleculerpy import ServiceBroker

from moleculerpy_cqrs.broker import compat, remote
from moleculerpy_cqrs.core.port import BatchCaller, ManyAnswers, ManyCall


class MoleculerPort:
    def __init__(self, broker: ServiceBroker) -> None:
        self.broker = broker

    async def call(
        self, action: str, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Any:
        return await self.broker.call(action, params, meta or {})

    def batch_caller(self, action: str) -> BatchCaller:
        local = compat.batch_caller(self.broker, action)
        return partial(self.call, action) if local is None else local

    def batch_node(self, action: str) -> str | None:
        endpoints = self.broker.registry.get_all_actions(action)
        if not endpoints or any(e.is_local for e in endpoints):
            return None
        endpoint = self.broker.registry.get_action_endpoint(action)
        node = None if endpoint is None else str(endpoint.node_id)
        return node if node is not None and remote.serves_many(self.broker, node) else None

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
        params = remote.request_params(
            calls, serial=serial, fields=fields, known=known, session=session
        )
        answer = await compat.request_on_node(self.broker, node, remote.CALL_MANY, params)
        return remote.answers_of(answer, node, compat.remote_error)

    async def emit(
        self, event: str, payload: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> None:
        if self.broker.registry.get_all_events(event):
            await self.broker.emit(event, payload, meta or {})

    async def broadcast(
        self, event: str, payload: dict[str, Any], *, others_only: bool = False
    ) -> None:
        handlers = self.broker.registry.get_all_events(event)
        if any(not h.is_local for h in handlers) if others_only else handlers:
            await self.broker.broadcast(event, payload)

    def is_available(self, action: str) -> bool:
        return self.broker.registry.get_action(action) is not None

    async def wait_for_actions(self, actions: list[str]) -> None:
        # Start-up only: MoleculerPy has no "action available" signal to await.
        delay = 0.01
        while any(self.broker.registry.get_action(a) is None for a in actions):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
