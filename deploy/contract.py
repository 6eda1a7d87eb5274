"""What the HTTP API promises, declared once: the error body, the statuses each kind
of route can answer, the declared forms of the subject id, and the body-size guard.

The OpenAPI document (/openapi.json) is generated from these declarations, so a
client generated from it (or a property-based tester such as schemathesis) sees every
constraint the server enforces and every status it can return:

- every error is `{"error": "<one line>"}` (`ErrorBody`; validation errors add the
  per-field `detail` list), also for FastAPI's and Starlette's own errors (unknown
  route, wrong method, a body that cannot be parsed: 422, never FastAPI's 400
  `{"detail": ...}`);
- the subject id's pattern and length are declared on every path parameter, header
  and body field that names a subject, while the check itself stays
  `store.check_subject_id` (whose message names the rule);
- `BodyLimit` refuses bodies over `MAX_BODY_BYTES` with 413 whether or not they
  announce a Content-Length: a chunked body is counted as it is read.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.store import ID_RULE

MAX_BODY_BYTES = 64 * 1024
# The JSON-Schema (ECMA 262) form of pipeline.store's ID_PATTERN; `$` there only
# matches at the very end, as `fullmatch` does in validate_subject_id.
SUBJECT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
SUBJECT_ID_SCHEMA: dict[str, Any] = {"pattern": SUBJECT_ID_PATTERN, "minLength": 1,
                                     "maxLength": 64}
SUBJECT_ID_HELP = f"subject id: {ID_RULE}"
PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail


class ErrorBody(BaseModel):
    """Every error answer: one readable line; validation errors add `detail`."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="one readable line naming the input and what is allowed")
    detail: list[dict[str, Any]] | None = Field(
        None, description="422 from validation only: one entry per invalid field")


_WHEN = {
    404: "no finished subject of that id (no done.json)",
    409: "the subject was trained on another base, or its scale set fails its checksum, "
         "does not parse, or does not fit the base's layers",
    413: f"request body over {MAX_BODY_BYTES} bytes (counted also without Content-Length)",
    422: "invalid subject id, a parameter outside its bounds or of the wrong type, a body "
         "that is not a JSON object, a request over the per-request cost bound",
    500: "a server fault (e.g. out of memory), never bad input",
    503: "overloaded: the replica's or the handle's queue is full (Retry-After: 1)",
    504: "the request passed its deadline (request_timeout_s) and was cancelled",
}


def errors(*statuses: int, when: dict[int, str] | None = None
           ) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses, each with the one error schema; `when`
    replaces the usual description of a status for one kind of route."""
    when = {**_WHEN, **(when or {})}
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": when[status]} for status in statuses}
    if 503 in documented:
        documented[503]["headers"] = {"Retry-After": {
            "description": "seconds to wait before retrying", "schema": {"type": "string"}}}
    return documented


LOOKUP_ERRORS = errors(404, 422)
GENERATION_ERRORS = errors(404, 409, 413, 422, 500, 503, 504)
SAMPLE_ERRORS = errors(404, 409, 422, when={
    404: "no finished subject of that id, or it has no sample of that index",
    409: "the sample file does not match its checksum (changed since training)",
    422: "invalid subject id, or a sample index that is not an integer in [0, 99]"})
PHOTO_ERRORS = errors(404, 409, 422, when={
    404: "no finished subject of that id, or it has no photo thumbnail of that index",
    409: "the thumbnail does not match its checksum (changed since training)",
    422: "invalid subject id, or a photo index that is not an integer in [0, 99]"})


def error_response(status: int, text: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """The JSON error answer; 503 carries Retry-After: 1."""
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse({"error": text, **extra}, status_code=status, headers=headers or None)


def add_http_error_handler(app: FastAPI) -> None:
    """FastAPI's and Starlette's HTTPExceptions (unknown route, wrong method, a body
    that does not parse, a body over the limit) answered in the one error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400 and err.detail == PARSE_ERROR:
            cause = err.__cause__
            why = f" ({type(cause).__name__})" if cause is not None else ""
            return error_response(422, f"body: not a JSON document in UTF-8{why}")
        return error_response(err.status_code, str(err.detail), headers=err.headers)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes the limit mid-stream."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length when
    it has one, else counted chunk by chunk as the app reads it (the read raises
    `BodyTooLarge`, which FastAPI passes on to the error handler)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await error_response(413, f"request body over {self.limit} bytes")(
                scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as err:  # read outside a route (no handler saw it)
            if not started:
                await error_response(413, str(err.detail))(scope, receive, send)
