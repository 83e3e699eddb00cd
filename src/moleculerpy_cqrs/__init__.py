"""moleculerpy-cqrs: CQRS for MoleculerPy services.

Commands are saved as events the moment they arrive; the event store dispatches them to
subscribers and feeds aggregates (read models) through transformations.
"""

from __future__ import annotations

from moleculerpy_cqrs import stores

__all__ = ["stores"]
__version__ = "0.1.0"
