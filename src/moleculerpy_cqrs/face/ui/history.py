"""What the page charts: applied events per second and lag of each aggregate over the last
15 minutes, sampled by the UI's node, and which projectors are stalled.

A projector is *stalled* when, for ``stall_after`` seconds, it applied nothing while its lag
was above zero and did not shrink (events wait, and nothing moves them: a halted or waiting
projector, a transformation that hangs, a lease nobody takes over).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from moleculerpy_cqrs.face.model import ClusterStatus

WINDOW: Final = 15 * 60.0
"""Seconds of history kept and charted."""

MIN_STEP: Final = 0.5
"""Samples closer together than this are one."""


@dataclass(frozen=True)
class Sample:
    at: float  # Unix seconds
    checkpoint: int
    lag_events: int
    lag_seconds: float
    rate: float  # events applied per second since the sample before


class History:
    """Samples of every aggregate the UI has seen, ``WINDOW`` seconds of them."""

    def __init__(self, *, stall_after: float = 30.0, window: float = WINDOW) -> None:
        self.stall_after = stall_after
        self.window = window
        self._samples: dict[str, deque[Sample]] = {}

    def add(self, cluster: ClusterStatus, at: float) -> None:
        for aggregate in cluster.aggregates:
            samples = self._samples.setdefault(aggregate.name, deque())
            rate = 0.0
            if samples and at - samples[-1].at < MIN_STEP:
                continue  # the page and the sampler asked at once: one sample is enough
            if samples:
                last = samples[-1]
                elapsed = at - last.at
                moved = aggregate.checkpoint - last.checkpoint
                # A restore or a replay's swap moves the checkpoint back: not negative work.
                rate = moved / elapsed if elapsed > 0 and moved > 0 else 0.0
            samples.append(
                Sample(at, aggregate.checkpoint, aggregate.lag_events, aggregate.lag_seconds, rate)
            )
            while samples and samples[0].at < at - self.window:
                samples.popleft()

    def samples(self, name: str) -> list[Sample]:
        return list(self._samples.get(name, ()))

    def stalled(self, name: str, now: float) -> bool:
        """No event applied for ``stall_after`` seconds while the lag was above zero and
        did not shrink."""
        samples = self._samples.get(name)
        if not samples or samples[-1].lag_events <= 0:
            return False
        latest = samples[-1]
        since = now - self.stall_after
        start = None
        for sample in samples:  # the last sample at or before the stall window began
            if sample.at <= since:
                start = sample
            else:
                break
        if start is None:
            return False  # not watched for long enough to say
        return latest.checkpoint == start.checkpoint and latest.lag_events >= start.lag_events
