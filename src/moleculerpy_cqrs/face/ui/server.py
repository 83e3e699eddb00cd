"""Serving the page: uvicorn in the node's own event loop, next to its broker.

The socket is bound here (a port in use is a one-line error, not uvicorn's ``sys.exit``), and
uvicorn's signal handling is left out: the node's runner owns SIGINT and SIGTERM and closes the
page when it stops. A sampler asks the cluster's status every few seconds, so the charts cover
the last 15 minutes whether or not a page is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Generator
from typing import Final

import uvicorn

from moleculerpy_cqrs.face.client import OperatorClient, OperatorError
from moleculerpy_cqrs.face.ui.app import OperatorPage
from moleculerpy_cqrs.face.ui.history import History

SAMPLE_EVERY: Final = 2.0
TOKEN_ENV: Final = "CQRS_UI_TOKEN"
log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the node's runner handles the signals and closes the page


class UiServer:
    """The page of one node, served until :meth:`close`."""

    def __init__(
        self, server: _Server, task: asyncio.Task[None], sampler: asyncio.Task[None],
        host: str, port: int,
    ) -> None:  # fmt: skip
        self._server = server
        self._task = task
        self._sampler = sampler
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        self._sampler.cancel()
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        try:
            await asyncio.wait_for(self._task, 5)
        except TimeoutError:
            self._task.cancel()


def ui_token(given: str | None) -> str | None:
    """The token actions need: ``--ui-token``, else ``$CQRS_UI_TOKEN``, else none."""
    return given or os.environ.get(TOKEN_ENV) or None


async def serve_ui(
    client: OperatorClient,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    stall_after: float = 30.0,
) -> UiServer:
    """Serve the page on ``host:port`` (0: any free port; see ``.url``). An ``OSError``
    says the address cannot be bound."""
    history = History(stall_after=stall_after)
    page = OperatorPage(client, token=token, history=history)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        page.app(), log_level="warning", lifespan="off", access_log=False, ws="none"
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="cqrs-ui")

    async def sample() -> None:
        while True:
            try:
                history.add(await client.status(), time.time())
            except OperatorError as error:
                log.debug("ui sampler: %s", error)
            await asyncio.sleep(SAMPLE_EVERY)

    sampler = asyncio.create_task(sample(), name="cqrs-ui-sampler")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the page on {host}:{port} stopped at once")
        await asyncio.sleep(0.01)
    return UiServer(server, task, sampler, host, int(sock.getsockname()[1]))
