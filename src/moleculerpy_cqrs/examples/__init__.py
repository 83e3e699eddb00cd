"""The seed's examples, shipped with the package so that ``cqrs run profile`` and ``cqrs demo``
work wherever the package is installed.

- ``profile``: ``profile.update`` → ``profile.updated`` → ``profileSummaryAggregate`` (totals per
  country). ``profile_v2``: the same after the payload became ``{fullName, address: {country}}``
  (an upcaster, a new transformation, ``Aggregate(version=2)``).
- ``property``: ``property.create`` → ``property.created`` → ``propertyAggregate`` (one row per
  property) and ``propertySummaryAggregate`` (totals per country).
- ``web``: an HTTP gateway (moleculerpy-web, the ``web`` extra) in front of ``profile``.

Both keep their SQLite files in ``$CQRS_DATA`` (default ``data``, relative to the working
folder) and their snapshots in ``$CQRS_DATA/backups``.
"""

from __future__ import annotations

import os
from pathlib import Path

NAMES = ("profile", "profile_v2", "property", "web")
"""What ``cqrs run NAME`` finds here before looking for a module of that name."""


def data_folder() -> Path:
    """Where the examples keep their files: ``$CQRS_DATA``, else ``./data``."""
    return Path(os.environ.get("CQRS_DATA") or "data")
