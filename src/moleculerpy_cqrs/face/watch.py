"""``cqrs status --watch``: the status redrawn every few seconds until Ctrl-C or SIGTERM.

On a terminal the table is redrawn in place (rich's ``Live``, which hides the cursor and gives
it back on the way out: SIGTERM ends the watch as Ctrl-C does, see
``client.stops_on_sigterm``). Piped, each redraw is printed whole after the last, flushed, so a
``| tee`` or a log file sees every one.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from rich.console import RenderableType
from rich.live import Live

from moleculerpy_cqrs.face.client import OperatorClient
from moleculerpy_cqrs.face.tables import status_view, stdout_console


async def watch_status(client: OperatorClient, interval: float) -> None:
    """Redraw the status every ``interval`` seconds until cancelled; services that appear or
    go away meanwhile come and go in it."""
    console = stdout_console()

    async def view() -> RenderableType:
        stamp = datetime.now().strftime("%H:%M:%S")
        caption = f"every {interval:g}s, last {stamp}; Ctrl-C ends"
        return status_view(await client.status(), console.width, caption)

    if not console.is_terminal:
        while True:
            console.print(await view())
            console.print()
            sys.stdout.flush()
            await asyncio.sleep(interval)
    with Live(await view(), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            live.update(await view(), refresh=True)
