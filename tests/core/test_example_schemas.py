"""The shipped examples (what ``cqrs run profile`` and ``cqrs run property`` serve) refuse bad
commands with a 422 and store nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from moleculerpy.errors import MoleculerError

from moleculerpy_cqrs.examples import profile, property
from moleculerpy_cqrs.testing.brokers import running_broker

GOOD_PROPERTY = {"name": "Beach villa", "bedrooms": 3, "city": "Napier", "countryCode": "NZ"}


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "No country"},
        {**GOOD_PROPERTY, "countryCode": 64},
        {**GOOD_PROPERTY, "bedrooms": "three"},
        {**GOOD_PROPERTY, "active": "yes"},
        {"countryCode": "NZ"},
    ],
)
async def test_the_property_example_refuses_bad_params(
    bad: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CQRS_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    async with running_broker(property.PropertyService()) as broker:
        with pytest.raises(MoleculerError) as refused:
            await broker.call("property.create", bad)
        assert refused.value.code == 422
        await broker.call("property.create", GOOD_PROPERTY)
        assert await broker.call("propertyEventStore.count", {}) == 1  # only the good one


async def test_the_profile_example_refuses_a_profile_without_a_country(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with running_broker(profile.ProfileService()) as broker:
        for bad in ({"name": "NoCountry"}, {"name": "Ann", "country": 42}):
            with pytest.raises(MoleculerError) as refused:
                await broker.call("profile.update", bad)
            assert refused.value.code == 422
        assert await broker.call("profileEventStore.count", {}) == 0
