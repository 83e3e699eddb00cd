"""The profile example as the interop, HTTP and metrics tests use it.

The one place these tests name the example's module: when it moves, only this file changes.
"""

from __future__ import annotations

from moleculerpy_cqrs.examples.profile import SUMMARY_FIELDS, build

PROFILE_MODULE = "profile"
"""What ``cqrs run`` is given to serve the example."""

__all__ = ["PROFILE_MODULE", "SUMMARY_FIELDS", "build"]
