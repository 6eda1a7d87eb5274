"""The HTTP API (FastAPI), independent of Ray: `create_api(backend, limits)`.

Routes (OpenAPI at /docs):

    GET  /                                   the playground page
    GET  /healthz                            {"status": "ok", "base": ...}
    GET  /v1/subjects                        finished subjects in storage
    GET  /v1/subjects/{subject_id}           one subject
    POST /v1/subjects/{subject_id}/images    generate: image/png, or JSON for several
    POST /v1/images                          the same, subject from the header
                                             `serve_multiplexed_model_id`

Status codes: 404 unknown subject; 409 scale set that does not fit the served base;
413 body over 64 KiB; 422 invalid or out-of-bounds parameters or subject id; 503
overloaded (with Retry-After). Every error body is JSON {"error": "<message>"}; bad
input never yields a 500. In Serve the backend forwards to model replicas (app.py);
tests use a local backend.
"""

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .errors import InvalidRequest, ServeError, message, original
from .params import GenerationParams, Limits, request_model, resolve, validation_message
from .playground import playground_html
from .store import BaseRef, SubjectInfo, check_subject_id

logger = logging.getLogger("tuneqdm.deploy")

SUBJECT_HEADER = "serve_multiplexed_model_id"
MAX_BODY_BYTES = 64 * 1024
MAX_LIST = 1000


class Backend(Protocol):
    """What the API needs: the catalog of subjects and a way to generate."""

    base: BaseRef
    native_size: int

    def list_subjects(self) -> list[SubjectInfo]: ...

    def describe(self, subject_id: str) -> SubjectInfo: ...

    def servable(self, subject_id: str) -> SubjectInfo: ...

    async def generate(self, subject_id: str, params: GenerationParams) -> dict[str, Any]:
        """{"images": [png bytes], "seeds": [...], and optional batch facts:
        "batch_images", "batch_subjects", "replica", "scale_set"}."""
        ...


def error_response(status: int, text: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": text, **extra}, status_code=status, headers=headers)


def status_of(error: BaseException) -> int:
    """HTTP status of an error raised here or in a replica (ServeError subclasses,
    Serve's back-pressure), 500 for anything else."""
    error = original(error)
    if isinstance(error, ServeError):
        return error.status_code
    name = type(error).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError"):
        return 503
    return 500


def create_api(backend: Backend, limits: Limits, title: str = "TuneQDM subjects") -> FastAPI:
    """The FastAPI app serving `backend` with requests bounded by `limits`."""
    app = FastAPI(title=title, version="1",
                  description="Images of personalised subjects from one quantized "
                              "Stable-Diffusion base (TuneQDM, arXiv 2401.04339).")
    _add_error_handling(app)
    _add_catalog_routes(app, backend, limits)
    _add_image_routes(app, backend, limits)
    return app


def _add_error_handling(app: FastAPI) -> None:
    """413 for large bodies, 422 for invalid ones, ServeError's own status else."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable]):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                  for e in err.errors()]
        return error_response(422, validation_message(errors), detail=errors)

    @app.exception_handler(ServeError)
    async def on_serve_error(_: Request, err: ServeError):
        return error_response(err.status_code, message(err))


def _add_catalog_routes(app: FastAPI, backend: Backend, limits: Limits) -> None:
    """GET /, /healthz, /v1/subjects and /v1/subjects/{subject_id}."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(request: Request) -> HTMLResponse:
        return HTMLResponse(playground_html(request.scope.get("root_path", ""), limits,
                                            backend.native_size))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        base = backend.base
        return {"status": "ok", "base": {"address": base.address,
                                         "fingerprint": base.fingerprint,
                                         "source": base.source,
                                         "quant_config": base.quant_config},
                "native_size": backend.native_size, "limits": limits.to_dict()}

    @app.get("/v1/subjects")
    async def list_subjects(limit: int = 100, offset: int = 0) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST or offset < 0:
            raise InvalidRequest(f"limit must be in [1, {MAX_LIST}] and offset >= 0")
        subjects = await run_in_threadpool(backend.list_subjects)  # storage I/O
        page = subjects[offset:offset + limit]
        return {"subjects": [s.to_dict() for s in page], "total": len(subjects),
                "offset": offset, "base_fingerprint": backend.base.fingerprint}

    @app.get("/v1/subjects/{subject_id}")
    async def get_subject(subject_id: str) -> dict[str, Any]:
        """One finished subject (also one trained on another base: servable false)."""
        check_subject_id(subject_id)
        return (await run_in_threadpool(backend.describe, subject_id)).to_dict()


def _add_image_routes(app: FastAPI, backend: Backend, limits: Limits) -> None:
    """POST /v1/subjects/{subject_id}/images and POST /v1/images (subject in a header)."""
    image_request = request_model(limits)

    async def images(subject_id: str, body: dict[str, Any], request: Request) -> Response:
        header = request.headers.get(SUBJECT_HEADER)
        if header is not None and header != subject_id:
            raise InvalidRequest(f"header {SUBJECT_HEADER}={header!r} names another subject "
                                 f"than the path ({subject_id!r})")
        check_subject_id(subject_id)
        # 404 / 409 before any model work (storage I/O: off the event loop)
        info = await run_in_threadpool(backend.servable, subject_id)
        params = resolve(body, limits, backend.native_size, info.token, info.class_noun)
        try:
            result = await backend.generate(subject_id, params)
        except Exception as err:
            status = status_of(err)
            if status == 500:
                logger.exception("generation for %s failed", subject_id)
                return error_response(500, f"generation failed: {message(err)}")
            return error_response(status, message(err))
        return _image_response(subject_id, params, result, request)

    @app.post("/v1/subjects/{subject_id}/images",
              responses={200: {"content": {"image/png": {}, "application/json": {}},
                               "description": "one PNG, or JSON with base64 PNGs"}})
    async def create_images(subject_id: str, body: image_request,  # type: ignore[valid-type]
                            request: Request) -> Response:
        """Generate `num_images` images of the subject (image/png for one, JSON else)."""
        return await images(subject_id, body.model_dump(), request)

    @app.post("/v1/images",
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def create_images_by_header(body: image_request,  # type: ignore[valid-type]
                                      request: Request) -> Response:
        """Like /v1/subjects/{id}/images, the subject from `serve_multiplexed_model_id`."""
        subject_id = request.headers.get(SUBJECT_HEADER)
        if not subject_id:
            raise InvalidRequest(f"name the subject in the path or the {SUBJECT_HEADER} "
                                 "header")
        return await images(subject_id, body.model_dump(), request)


def _image_response(subject_id: str, params: GenerationParams, result: dict[str, Any],
                    request: Request) -> Response:
    pngs: list[bytes] = result["images"]
    facts = {k: result[k] for k in ("batch_images", "batch_subjects", "replica", "scale_set")
             if result.get(k) is not None}
    accept = request.headers.get("accept", "")
    wants_json = "application/json" in accept and "image/png" not in accept
    if len(pngs) == 1 and not wants_json:
        headers = {"X-Seed": str(params.seed), "X-Subject-Id": subject_id}
        headers.update({f"X-{k.replace('_', '-').title()}": str(v) for k, v in facts.items()})
        return Response(pngs[0], media_type="image/png", headers=headers)
    return JSONResponse({
        "subject_id": subject_id,
        "seed": params.seed,
        "images": [{"seed": seed, "png_base64": base64.b64encode(png).decode()}
                   for seed, png in zip(params.seeds, pngs, strict=True)],
        **facts,
    })
