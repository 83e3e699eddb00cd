"""Where the page runs: beside a node's services (``cqrs run --ui-port``), or on a node of
its own that only watches and calls (``cqrs ui``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from moleculerpy import ServiceBroker

from moleculerpy_cqrs.face.client import OperatorClient, OperatorError, Options, Session, session
from moleculerpy_cqrs.face.ui.server import UiServer, serve_ui


async def serve_beside(
    broker: ServiceBroker,
    *,
    host: str,
    port: int,
    token: str | None,
    stall_after: float = 30.0,
) -> UiServer:
    """The page of a running node: it sees the node's own services and the cluster's."""
    options = Options(transporter=broker.settings.transporter)
    client = OperatorClient(Session(broker, options, include_local=True))
    return await serve_ui(client, host=host, port=port, token=token, stall_after=stall_after)


async def run_ui(
    options: Options,
    *,
    host: str,
    port: int,
    token: str | None,
    stall_after: float,
    say: Callable[[str], None],
    stop: asyncio.Future[str],
) -> None:
    """Join the cluster, serve the page until ``stop`` resolves (to a signal's name), leave."""
    async with session(options) as joined:
        try:
            await joined.discover()
        except OperatorError as error:
            say(f"nothing to show yet ({error}); the page fills in as nodes come")
        try:
            page = await serve_ui(
                OperatorClient(joined), host=host, port=port, token=token,
                stall_after=stall_after,
            )  # fmt: skip
        except OSError as error:
            raise OperatorError(
                f"cannot serve the page on {host}:{port}: {error.strerror or error}"
            ) from None
        try:
            say(f"page on {page.url} ({'actions need the token' if token else 'read-only'})")
            say("Ctrl-C or SIGTERM stops it")
            signal_name = await stop
        finally:
            await page.close()
    say(f"page stopped ({signal_name})")
