"""Errors of the serving layer, each carrying the HTTP status it maps to.

They are raised in model replicas and re-raised in the ingress (Ray wraps a remote
exception in a subclass of both RayTaskError and the original class, so `except
SubjectNotFound` still works there); `http_status` and `message` turn any of them,
wrapped or not, into a response without a traceback.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class; `status_code` is the HTTP status of the error."""

    status_code = 500


class InvalidRequest(ServeError):
    """Parameters outside their bounds, a bad subject id (422)."""

    status_code = 422


class SubjectNotFound(ServeError):
    """No finished subject of that id in storage (404)."""

    status_code = 404


class SubjectMismatch(ServeError):
    """The subject's scale set does not fit the served base, or is corrupt (409)."""

    status_code = 409


class Overloaded(ServeError):
    """The replica's queue is full; the client should retry later (503)."""

    status_code = 503


class BaseNotFound(ServeError):
    """The output folder holds no usable quantized base (a configuration error)."""

    status_code = 500


def original(error: BaseException) -> BaseException:
    """The exception raised in the replica, for one re-raised by Ray (`.cause`)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def message(error: BaseException) -> str:
    """A one-line message for a client: the original exception's text, no traceback."""
    error = original(error)
    text = str(error.args[0]) if error.args else type(error).__name__
    return " ".join(text.split())


class DeadlinePassed(ServeError):
    """The request passed its deadline (`request_timeout_s`) and was cancelled (504)."""

    status_code = 504


class Relayed(ServeError):
    """An error from a model replica, answered with the status worked out for it."""

    def __init__(self, status_code: int, text: str) -> None:
        super().__init__(text)
        self.status_code = status_code
