"""The daemon's user-facing failures.

Each carries the HTTP status it maps to, a short machine-readable ``error``
code and a human ``message``.  ``api/plugin.py`` turns any ``ApiError`` into a JSON
body ``{"error": ..., "message": ...}`` in exactly one place.
"""

ECHO_LIMIT = 100  # characters of a client's input repeated in one message


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr(value) for a message, cut to *limit* characters: a 10 KB id is not echoed whole."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """*text* (a client's input), cut to *limit* characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class ApiError(Exception):
    status = 500
    error = "internal"

    def __init__(self, message: str, *, error: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error:
            self.error = error
        self.field = field

    def body(self) -> dict[str, str]:
        body = {"error": self.error, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class BadRequest(ApiError):
    status = 400
    error = "bad-request"


class Unauthorized(ApiError):
    status = 401
    error = "unauthorized"


class Forbidden(ApiError):
    """The caller may not do this (its role, or another's job); ``error`` says which."""

    status = 403
    error = "forbidden"


class NotFound(ApiError):
    status = 404
    error = "not-found"


class Conflict(ApiError):
    status = 409
    error = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    error = "payload-too-large"


class QueueFull(ApiError):
    status = 429
    error = "queue-full"


class Unavailable(ApiError):
    status = 503
    error = "unavailable"


class InsufficientStorage(ApiError):
    status = 507
    error = "insufficient-storage"


class TooManyStreams(Unavailable):
    error = "too-many-streams"
