"""After a restore, the node that held the projector's lease still shows as its holder (it was
shown as ``-``, the node itself standing by, until the next event)."""

from __future__ import annotations

from pathlib import Path

from moleculerpy_cqrs import stores
from moleculerpy_cqrs.examples.profile import build
from moleculerpy_cqrs.testing.brokers import running_broker


async def test_the_holder_keeps_its_lease_across_a_restore(tmp_path: Path) -> None:
    _, summary, service = build(
        stores.sqlite(tmp_path / "data"), backups=tmp_path / "backups", lease_ttl=30
    )
    async with running_broker(service(), node_id="restorer") as broker:
        await broker.call("profile.update", {"name": "Ann", "country": "NZ"})
        await summary.runtime(broker).wait_caught_up()
        before = await broker.call("profileSummaryAggregate.status", {})
        assert before["lease"]["node"] == "restorer"
        snapshot_id = await broker.call("profileSummaryAggregate.snapshot", {})
        await broker.call("profileSummaryAggregate.restore", {"snapshotID": snapshot_id})
        after = await broker.call("profileSummaryAggregate.status", {})
    assert after["lease"] is not None
    assert after["lease"]["node"] == "restorer"
    assert after["lease"]["mine"] is True
