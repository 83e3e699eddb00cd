"""The profile example after its payload changed shape: v2 is ``{fullName, address:
{country}}``. ``cqrs run profile_v2`` serves it on the same files as ``profile``: the upcaster
reads the v1 events stored there as v2, and the summary (``Aggregate(version=2)``, a new
transformation) is rebuilt from the log when the node starts, while reads answer from the old
table.
"""

from __future__ import annotations

from moleculerpy_cqrs.examples.profile import PROFILE_V2_PARAMS, build

events, summary, ProfileService = build(params=PROFILE_V2_PARAMS, version=2)
services = [ProfileService]
