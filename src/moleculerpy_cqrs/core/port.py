"""The core's only view of the broker: a small port the broker layer implements."""

from __future__ import annotations

from typing import Any, Protocol


class BrokerPort(Protocol):
    async def call(
        self, action: str, params: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Any:
        """Call an action; raise its error."""

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
