"""A node whose projector can never apply anything, for the page's stall test: the aggregate
``stuck`` transforms through ``nobody.transform``, an action no node serves, so its projector
waits (state ``waiting``) while ``stallStore.add`` stores events and the lag grows."""

from __future__ import annotations

from moleculerpy import Service

from moleculerpy_cqrs import Aggregate, EventStore, stores

store = stores.memory()
events = EventStore("stallStore", store)
stuck = Aggregate("stuck", stores.with_fields(store, {"n": "integer"})).snapshot("stallStore")
stuck.on("thing.added").create("nobody.transform")


class StallService(events.mixin(), stuck.mixin(), Service):  # type: ignore[misc]
    name = "stall"

    add = events.map_action("add", "thing.added")


services = [StallService]
