"""The operator's page in a real browser: headless Chromium (Debian's ``chromium``, which
``./scripts/test`` installs when it is missing) driven by Playwright, on a node running the
profile example and the operator tests' services.

It sees the aggregates, provokes a dead letter and retries it from the page, takes a snapshot
and sees it listed, and starts a replay and sees it finish. Screenshots go to the test's
``tmp_path``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from moleculerpy import ServiceBroker
from playwright.sync_api import Browser, Page, expect, sync_playwright

from moleculerpy_cqrs.testing.nats_server import NatsServer
from tests.face.test_operator import _feed, with_broker
from tests.face.test_ui import TOKEN, PageNode, start_page_node, stop

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """Debian's chromium; the test fails (never skips) without it."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "no chromium on PATH: ./scripts/test installs it (apt-get install chromium)"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page_node(tmp_path: Path) -> Iterator[PageNode]:
    with NatsServer() as server:
        process, url = start_page_node(server.url, tmp_path, "--ui-token", TOKEN)
        try:
            in_thread(lambda: with_broker(server.url, _feed, within=30.0))
            yield PageNode(url, server.url, tmp_path, process)
        finally:
            stop(process)


def in_thread[T](work: Callable[[], T]) -> T:
    """Playwright's sync API keeps an event loop in this thread: brokers run in another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


def shot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def test_an_operator_works_from_the_page(
    browser: Browser, page_node: PageNode, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)

    # The overview: every aggregate, read-only until the token is given.
    page.goto(page_node.url)
    for name in ("profileSummaryAggregate", "orderTotals", "shipments"):
        expect(page.locator(f'tr[data-aggregate="{name}"]')).to_be_visible()
    expect(page.locator("#mode")).to_have_text("read-only (enter the token)")
    expect(page.locator('tr[data-aggregate="shipments"] td.dead')).to_have_text("1")
    shot(page, shots, "overview")
    page.fill("#token", TOKEN)
    page.click("#token-save")
    expect(page.locator("#message")).to_have_text("token accepted")
    expect(page.locator("#mode")).to_have_text("can act")

    # A dead letter, provoked, seen, then retried from the page once the cause is fixed.
    async def ship_poison(broker: ServiceBroker) -> None:
        await broker.call("ops.ship", {"sku": "poison", "qty": 7})

    in_thread(lambda: with_broker(page_node.transporter, ship_poison))
    expect(page.locator('tr[data-aggregate="shipments"] td.dead')).to_have_text("2")
    page.click('tr[data-aggregate="shipments"] a')
    letters = page.locator("#dead-letters tr[data-dead-letter]")
    expect(letters).to_have_count(2)
    expect(page.locator("#dead-letters")).to_contain_text("cannot ship poison")
    shot(page, shots, "dead-letters")
    (page_node.data / "fixed").touch()  # the transformation is fixed
    newest = letters.last.get_attribute("data-dead-letter")
    page.check(f'input.pick[data-id="{newest}"]')
    page.click("#retry-selected")
    expect(page.locator("#message")).to_have_text("retried 1, failed again 0, remaining 1")
    expect(letters).to_have_count(1)
    page.click("#retry-all")
    expect(page.locator("#message")).to_have_text("retried 1, failed again 0, remaining 0")
    expect(page.locator("#no-dead-letters")).to_be_visible()

    # A snapshot, taken and listed.
    page.goto(page_node.url + "#/aggregate/profileSummaryAggregate")
    expect(page.locator("#detail h2")).to_have_text("Aggregate profileSummaryAggregate")
    page.click("#take-snapshot")
    expect(page.locator("#message")).to_have_text(re.compile(r"snapshot snapshot_\w+ taken"))
    said = page.locator("#message").text_content() or ""
    snapshot_id = said.split()[1]
    row = page.locator(f'#snapshots tr[data-snapshot="{snapshot_id}"]')
    expect(row).to_contain_text("completed")
    shot(page, shots, "snapshot")

    # A replay, confirmed, followed to its end.
    page.click("#replay-btn")
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-yes")
    expect(page.locator("#replay-text")).to_have_text(re.compile(r"^done (\d+)/\1\b"))
    expect(page.locator("#replay-bar")).to_be_visible()
    shot(page, shots, "replay")

    # The log of an event store, one event whole.
    page.goto(page_node.url + "#/store/profileEventStore")
    events = page.locator("#events tr[data-event]")
    expect(events.first).to_contain_text("profileSummaryAggregate.snapshot")  # newest first
    page.fill("#ev-name", "profile.updated")
    page.click("#ev-apply")
    expect(page.locator("#ev-caption")).to_have_text("page 1 of 2, 40 in all")
    expect(events).to_have_count(25)
    page.click("#ev-next")
    expect(page.locator("#ev-caption")).to_have_text("page 2 of 2, 40 in all")
    expect(events).to_have_count(15)
    events.first.click()
    expect(page.locator("#payload")).to_contain_text('"country"')
    page.fill("#ev-name", "no.such.event")
    page.click("#ev-apply")
    expect(page.locator("#ev-caption")).to_have_text("page 1 of 0, 0 in all")
    shot(page, shots, "event-store")
    page.close()

    assert sorted(p.name for p in shots.iterdir()) == [
        "dead-letters.png", "event-store.png", "overview.png", "replay.png", "snapshot.png",
    ]  # fmt: skip
