"""``./scripts/screenshot [PATH]``: the README's picture of the operator's page, made again.

The same node as the browser test (``test_browser.py``): the profile example and the operator
tests' services on a private NATS server, fed as the operator tests feed it (so ``shipments``
holds a dead letter), its page opened in headless Chromium once the charts have a minute of
points.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from moleculerpy import ServiceBroker
from playwright.sync_api import sync_playwright

from moleculerpy_cqrs.testing.nats_server import NatsServer
from tests.face.test_browser import chromium_path, in_thread
from tests.face.test_operator import _feed, with_broker
from tests.face.test_ui import start_page_node, stop

CHART_SECONDS = 20.0
"""How long the page's node samples before the picture (its charts need some points)."""


async def _traffic(broker: ServiceBroker) -> None:
    """Updates in waves for ``CHART_SECONDS``, so that the charts have a shape."""
    started = time.monotonic()
    wave = 0
    while time.monotonic() - started < CHART_SECONDS:
        wave += 1
        count = 5 + 20 * (wave % 4)
        await asyncio.gather(*(
            broker.call("profile.update", {"name": f"w{wave}-{i}", "country": "NZ"})
            for i in range(count)
        ))  # fmt: skip
        await asyncio.sleep(1.0)  # a picture of traffic over time, not an event to await


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as data, NatsServer() as server:
        process, url = start_page_node(server.url, Path(data))
        try:
            in_thread(lambda: with_broker(server.url, _feed, within=30.0))
            in_thread(lambda: with_broker(server.url, _traffic))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium_path())
                page = browser.new_page(viewport={"width": 1280, "height": 640})
                page.goto(url)
                page.locator('tr[data-aggregate="shipments"]').wait_for()
                page.wait_for_timeout(500)
                target.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(target), full_page=True)
                browser.close()
        finally:
            stop(process)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ui.png"))
