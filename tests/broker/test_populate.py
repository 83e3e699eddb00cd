"""moleculer-db's ``populate`` on an aggregate's read actions (issue 18): rules declared as
``settings.populates`` declares them, followed by ``find``, ``list`` and ``get`` over a broker,
the related rows fetched with the other aggregate's ``get {id: [...], mapping: true}``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from moleculerpy import Service, ServiceBroker
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs import Aggregate, EventStore, stores
from moleculerpy_cqrs.errors import ConfigurationError
from moleculerpy_cqrs.testing.brokers import running_broker

POPULATES: dict[str, Any] = {
    "author": "users.get",
    "reviewers": {"action": "users.get", "params": {"fields": "name"}},
    "writer": {"field": "author", "action": "users.get", "params": {"fields": ["name"]}},
    "self_": {"field": "id", "action": "posts.get", "params": {"fields": "title"}},
}


def _services(populates: dict[str, Any] = POPULATES) -> Service:
    events = EventStore("blogEvents", stores.memory())
    companies = Aggregate("companies", stores.memory(fields={"name": "string"}), write_actions=True)
    users = Aggregate(
        "users",
        stores.memory(fields={"name": "string", "company": "integer"}),
        write_actions=True,
        populates={"company": {"action": "companies.get", "params": {"fields": "name"}}},
    )
    posts = Aggregate(
        "posts",
        stores.memory(fields={"title": "string", "author": "integer", "reviewers": "json"}),
        write_actions=True,
        populates=populates,
    )

    class Blog(events.mixin(), companies.mixin(), users.mixin(), posts.mixin(), Service):  # type: ignore[misc]
        name = "blog"

    return Blog()


@pytest.fixture
async def broker() -> AsyncIterator[ServiceBroker]:
    async with running_broker(_services()) as broker:
        await broker.call("companies.insert", {"entities": [{"name": "Acme"}]})
        await broker.call(
            "users.insert",
            {"entities": [{"name": "Ann", "company": 1}, {"name": "Bo", "company": None}]},
        )
        await broker.call(
            "posts.insert",
            {
                "entities": [
                    {"title": "one", "author": 1, "reviewers": [2, 1, 9]},
                    {"title": "two", "author": 2, "reviewers": []},
                    {"title": "three", "author": None, "reviewers": None},
                    {"title": "four", "author": 9, "reviewers": [2]},
                ]
            },
        )
        yield broker


ANN = {"id": 1, "name": "Ann", "company": 1, "eventId": None}
BO = {"id": 2, "name": "Bo", "company": None, "eventId": None}


async def test_find_replaces_ids_with_the_related_rows(broker: ServiceBroker) -> None:
    rows = await broker.call(
        "posts.find", {"populate": "author", "sort": "id", "fields": "title author"}
    )
    assert rows == [
        {"title": "one", "author": ANN},
        {"title": "two", "author": BO},
        {"title": "three", "author": None},  # moleculer-db leaves the field out
        {"title": "four", "author": None},  # no user 9
    ]


async def test_a_list_of_ids_gives_the_rows_found_with_the_rule_params(
    broker: ServiceBroker,
) -> None:
    rows = await broker.call("posts.find", {"populate": ["reviewers"], "sort": "id"})
    assert [r["reviewers"] for r in rows] == [
        [{"name": "Bo"}, {"name": "Ann"}],
        [],
        None,
        [{"name": "Bo"}],
    ]


async def test_a_rule_may_read_another_field_and_fields_may_name_its_key(
    broker: ServiceBroker,
) -> None:
    page = await broker.call(
        "posts.list", {"populate": "writer", "fields": ["title", "writer"], "pageSize": 2}
    )
    assert page["rows"] == [
        {"title": "one", "writer": {"name": "Ann"}},
        {"title": "two", "writer": {"name": "Bo"}},
    ]
    rows = await broker.call("posts.find", {"populate": "writer", "excludeFields": "reviewers"})
    assert rows[0] == {
        "id": 1, "title": "one", "author": 1, "writer": {"name": "Ann"}, "eventId": None
    }  # fmt: skip


async def test_deep_populate_asks_the_other_service_to_populate(broker: ServiceBroker) -> None:
    one = await broker.call(
        "posts.get", {"id": 1, "populate": "author.company", "fields": "author"}
    )
    assert one == {"author": {**ANN, "company": {"name": "Acme"}}}


async def test_get_with_mapping_and_populate(broker: ServiceBroker) -> None:
    got = await broker.call(
        "posts.get", {"id": [2, 1], "mapping": True, "populate": "self_ author", "fields": "self_"}
    )
    assert got == {"2": {"self_": {"title": "two"}}, "1": {"self_": {"title": "one"}}}


async def test_populate_naming_no_rule_is_refused(broker: ServiceBroker) -> None:
    with pytest.raises(MoleculerError) as caught:
        await broker.call("posts.find", {"populate": "editor"})
    assert caught.value.code == 422
    assert "declared ones are ['author', 'reviewers', 'self_', 'writer']" in str(caught.value)


async def test_a_rule_reading_an_undeclared_field_is_refused_at_the_start() -> None:
    with pytest.raises(ConfigurationError, match="'editorId', which is not a declared field"):
        async with running_broker(_services({"editor": {"field": "editorId", "action": "x"}})):
            pass


async def test_two_rules_reading_one_field_both_see_the_stored_id(broker: ServiceBroker) -> None:
    # moleculer-db lets the first answer replace "author" before the second reads it.
    for populate in ("author writer", "writer author"):
        one = await broker.call(
            "posts.get", {"id": 1, "populate": populate, "fields": "writer author"}
        )
        assert one == {"writer": {"name": "Ann"}, "author": ANN}
