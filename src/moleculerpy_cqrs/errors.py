"""One error tree for the toolkit.

Every error that can reach a caller over the broker is also a Moleculer error with a code, so
it crosses nodes as one: 422 for bad input, 404 for a missing entity, 409 for a conflict, 500
for a failing store. Each carries structured data and builds its message from it.
"""

from __future__ import annotations

from typing import Any

from moleculerpy.errors import MoleculerClientError, MoleculerError, ValidationError


class CqrsError(Exception):
    """Root of every error raised by moleculerpy-cqrs (a marker; catch this one)."""


class InvalidInput(CqrsError, ValidationError):
    """Bad input: nothing was changed. Code 422, named ``ValidationError`` on the wire."""

    def __init__(self, message: str, *, field: str | None = None, got: Any = None) -> None:
        data: dict[str, Any] = {}
        if got is not None:
            data["got"] = _short(got)
        ValidationError.__init__(self, message, field=field, data=data)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["name"] = "ValidationError"
        return out


class EntityNotFound(CqrsError, MoleculerClientError):
    """No row with the given id (moleculer-db's ``EntityNotFoundError``, code 404)."""

    def __init__(self, entity_id: Any, *, store: str | None = None) -> None:
        self.entity_id = entity_id
        self.store = store
        where = f" in {store!r}" if store else ""
        MoleculerClientError.__init__(
            self,
            f"Entity not found: no row with id {entity_id!r}{where}",
            code=404,
            type="ENTITY_NOT_FOUND",
            data={"id": entity_id, "store": store},
        )


class Conflict(CqrsError, MoleculerClientError):
    """The operation clashes with the current state (code 409)."""

    def __init__(self, message: str, **data: Any) -> None:
        MoleculerClientError.__init__(self, message, code=409, type="CONFLICT", data=data)


class StoreError(CqrsError, MoleculerError):
    """A backend failed (driver error, I/O). Raised ``from`` the driver's own error."""

    def __init__(self, message: str, *, store: str | None = None) -> None:
        self.store = store
        MoleculerError.__init__(
            self, message, code=500, error_type="STORE_ERROR", data={"store": store}
        )


class ConfigurationError(CqrsError, MoleculerError):
    """The toolkit was set up wrongly (a programming error, not bad input)."""

    def __init__(self, message: str) -> None:
        MoleculerError.__init__(self, message, code=500, error_type="CQRS_CONFIGURATION")


def _short(value: Any, limit: int = 200) -> Any:
    text = repr(value)
    return value if len(text) <= limit else text[:limit] + "..."
