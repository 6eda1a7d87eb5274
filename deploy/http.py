"""The HTTP API (FastAPI), independent of Ray: `create_api(backend, limits)`.

Routes (OpenAPI at /docs):

    GET  /                                   the playground page
    GET  /healthz                            {"status": "ok", "base": ...}
    GET  /v1/subjects                        finished subjects in storage
    GET  /v1/subjects/{subject_id}           one subject
    GET  /v1/subjects/{subject_id}/samples/{index}   a sample image made after training
                                             (image/png; index 0 .. samples - 1)
    GET  /v1/subjects/{subject_id}/photos/{index}    a training photo's thumbnail
                                             (image/png; index 0 .. photos - 1)
    POST /v1/subjects/{subject_id}/images    generate: image/png, or JSON for several
    POST /v1/images                          the same, subject from the header
                                             `serve_multiplexed_model_id`
    POST /v1/images/generations              OpenAI's images API (openai_api.py)

Status codes: 404 unknown subject or sample; 409 scale set that does not fit the served
base, or a sample that fails its checksum;
413 body over 64 KiB (with or without Content-Length); 422 invalid or out-of-bounds
parameters or subject id, a body that is not JSON, a request over the per-request
cost bound (pixels x steps x images); 503 overloaded (with Retry-After); 504 past the
per-request deadline (cancelled). Every error body is JSON {"error": "<message>"},
declared with each route's statuses in /openapi.json (contract.py); bad input never
yields a 500. In Serve the backend forwards to model replicas (app.py);
tests use a local backend.
"""

import asyncio
import base64
import logging
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .contract import (
    GENERATION_ERRORS,
    LOOKUP_ERRORS,
    MAX_BODY_BYTES,
    PHOTO_ERRORS,
    SAMPLE_ERRORS,
    SUBJECT_ID_HELP,
    SUBJECT_ID_SCHEMA,
    BodyLimit,
    add_http_error_handler,
    error_response,
    errors,
)
from .errors import DeadlinePassed, InvalidRequest, Relayed, ServeError, message, original
from .openai_api import add_openai_route
from .params import GenerationParams, Limits, request_model, resolve, validation_message
from .playground import playground_html
from .store import MAX_SAMPLES, BaseRef, SubjectInfo, check_subject_id

logger = logging.getLogger("tuneqdm.deploy")

SUBJECT_HEADER = "serve_multiplexed_model_id"
MAX_LIST = 1000
__all__ = ["MAX_BODY_BYTES", "SUBJECT_HEADER", "Backend", "Generator", "create_api",
           "error_response", "status_of"]

SubjectPath = Annotated[str, Path(description=SUBJECT_ID_HELP,
                                  json_schema_extra=SUBJECT_ID_SCHEMA)]
SampleIndex = Annotated[int, Path(ge=0, le=MAX_SAMPLES - 1,
                                  description=f"sample number, 0..{MAX_SAMPLES - 1}")]


class PNGResponse(Response):
    """An image/png answer."""

    media_type = "image/png"


class Backend(Protocol):
    """What the API needs: the catalog of subjects and a way to generate."""

    base: BaseRef
    native_size: int

    def list_subjects(self) -> list[SubjectInfo]: ...

    def describe(self, subject_id: str) -> SubjectInfo: ...

    def servable(self, subject_id: str) -> SubjectInfo: ...

    def read_sample(self, subject_id: str, index: int, kind: str = "sample") -> bytes:
        """PNG bytes of the subject's sample `index`, or with kind "photo" of a
        training photo's thumbnail (SubjectStore.read_sample)."""
        ...

    async def generate(self, subject_id: str, params: GenerationParams) -> dict[str, Any]:
        """{"images": [png bytes], "seeds": [...], and optional batch facts:
        "batch_images", "batch_subjects", "replica", "scale_set"}."""
        ...


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


class Generator:
    """One generation request for every image route: subject checks (422, 404/409
    before any model work), parameters, the per-request cost bound (422), the
    backend call under the deadline (504, the call cancelled), errors relayed."""

    def __init__(self, backend: Backend, limits: Limits, request_timeout_s: float | None,
                 max_request_cost: int | None) -> None:
        self.backend = backend
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        self.max_request_cost = max_request_cost

    def check_cost(self, params: GenerationParams) -> None:
        """InvalidRequest when pixels x steps x images passes `max_request_cost`."""
        cost = params.height * params.width * params.num_inference_steps * params.num_images
        if self.max_request_cost is not None and cost > self.max_request_cost:
            raise InvalidRequest(
                f"request cost {params.width}x{params.height} px x "
                f"{params.num_inference_steps} steps x {params.num_images} images = {cost} "
                f"pixel-steps is over the per-request bound max_request_cost="
                f"{self.max_request_cost}: use fewer steps or images, or a smaller size")

    async def __call__(self, subject_id: str,
                       body: dict[str, Any]) -> tuple[GenerationParams, dict[str, Any]]:
        check_subject_id(subject_id)
        # 404 / 409 before any model work (storage I/O: off the event loop)
        info = await run_in_threadpool(self.backend.servable, subject_id)
        params = resolve(body, self.limits, self.backend.native_size, info.token,
                         info.class_noun)
        self.check_cost(params)
        try:
            result = await asyncio.wait_for(self.backend.generate(subject_id, params),
                                            self.request_timeout_s)
        except TimeoutError:  # wait_for has cancelled the call (and Serve the request)
            raise DeadlinePassed(f"the request passed its deadline of "
                                 f"{self.request_timeout_s:g} s (request_timeout_s) and was "
                                 "cancelled") from None
        except Exception as err:
            status = status_of(err)
            if status == 500:
                logger.exception("generation for %s failed", subject_id)
                raise Relayed(500, f"generation failed: {message(err)}") from None
            raise Relayed(status, message(err)) from None
        return params, result


def create_api(backend: Backend, limits: Limits, title: str = "TuneQDM subjects", *,
               request_timeout_s: float | None = None,
               max_request_cost: int | None = None) -> FastAPI:
    """The FastAPI app serving `backend` with requests bounded by `limits`, each
    generation by `max_request_cost` (pixels x steps x images) and cancelled after
    `request_timeout_s` (None: no bound)."""
    app = FastAPI(title=title, version="1",
                  description="Images of personalised subjects from one quantized "
                              "Stable-Diffusion base (TuneQDM, arXiv 2401.04339). Every "
                              "error is JSON {\"error\": \"<one line>\"}. A generation "
                              "request's pixels x steps x images must not pass "
                              f"{max_request_cost or 'no bound'} (422), and it is "
                              f"cancelled after {request_timeout_s or 'no bound'} s (504).")
    _add_error_handling(app)
    _add_catalog_routes(app, backend, limits, {"max_request_cost": max_request_cost,
                                               "request_timeout_s": request_timeout_s})
    generator = Generator(backend, limits, request_timeout_s, max_request_cost)
    _add_image_routes(app, generator, limits)
    add_openai_route(app, generator, limits)
    return app


def _add_error_handling(app: FastAPI) -> None:
    """413 for large bodies, 422 for invalid ones, ServeError's own status else."""
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    add_http_error_handler(app)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                  for e in err.errors()]
        return error_response(422, validation_message(errors), detail=errors)

    @app.exception_handler(ServeError)
    async def on_serve_error(_: Request, err: ServeError):
        return error_response(err.status_code, message(err))


def _add_catalog_routes(app: FastAPI, backend: Backend, limits: Limits,
                        bounds: dict[str, Any]) -> None:
    """GET /, /healthz, /v1/subjects, /v1/subjects/{subject_id} and its samples."""

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
                "native_size": backend.native_size, "limits": {**limits.to_dict(), **bounds}}

    @app.get("/v1/subjects", responses=errors(422))
    async def list_subjects(
            limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": MAX_LIST},
                                        description=f"page size, 1..{MAX_LIST}")] = 100,
            offset: Annotated[int, Query(json_schema_extra={"minimum": 0})] = 0,
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST or offset < 0:
            raise InvalidRequest(f"limit must be in [1, {MAX_LIST}] and offset >= 0")
        subjects = await run_in_threadpool(backend.list_subjects)  # storage I/O
        page = subjects[offset:offset + limit]
        return {"subjects": [s.to_dict() for s in page], "total": len(subjects),
                "offset": offset, "base_fingerprint": backend.base.fingerprint}

    @app.get("/v1/subjects/{subject_id}", responses=LOOKUP_ERRORS)
    async def get_subject(subject_id: SubjectPath) -> dict[str, Any]:
        """One finished subject (also one trained on another base: servable false)."""
        check_subject_id(subject_id)
        return (await run_in_threadpool(backend.describe, subject_id)).to_dict()

    @app.get("/v1/subjects/{subject_id}/samples/{index}", response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {
                 "type": "string", "format": "binary"}}},
                 "description": "the PNG the pipeline made after training"},
                 **SAMPLE_ERRORS})
    async def get_sample(subject_id: SubjectPath, index: SampleIndex) -> PNGResponse:
        """One of the subject's sample images (`samples` in its listing entry says how
        many), checked against its done.json checksum."""
        check_subject_id(subject_id)
        png = await run_in_threadpool(backend.read_sample, subject_id, index)
        return PNGResponse(png, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/subjects/{subject_id}/photos/{index}", response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {
                 "type": "string", "format": "binary"}}},
                 "description": "a thumbnail of a photo the subject was trained on"},
                 **PHOTO_ERRORS})
    async def get_photo(subject_id: SubjectPath, index: SampleIndex) -> PNGResponse:
        """A thumbnail (at most 128 px a side) of one of the subject's training photos
        (`photos` in its listing entry says how many), checksum-checked."""
        check_subject_id(subject_id)
        png = await run_in_threadpool(backend.read_sample, subject_id, index, "photo")
        return PNGResponse(png, headers={"Cache-Control": "no-cache"})


IMAGE_ANSWERS = {200: {"content": {"image/png": {"schema": {"type": "string",
                                                            "format": "binary"}},
                                   "application/json": {}},
                       "description": "one PNG (Accept other than application/json), or "
                                      "JSON with base64 PNGs"},
                 **GENERATION_ERRORS}
HEADER_PARAMETER = {"name": SUBJECT_HEADER, "in": "header", "required": True,
                    "description": f"the subject ({SUBJECT_ID_HELP})",
                    "schema": {"type": "string", **SUBJECT_ID_SCHEMA}}


def _add_image_routes(app: FastAPI, generate: Generator, limits: Limits) -> None:
    """POST /v1/subjects/{subject_id}/images and POST /v1/images (subject in a header)."""
    image_request = request_model(limits)

    async def images(subject_id: str, body: dict[str, Any], request: Request) -> Response:
        header = request.headers.get(SUBJECT_HEADER)
        if header is not None and header != subject_id:
            raise InvalidRequest(f"header {SUBJECT_HEADER}={header!r} names another subject "
                                 f"than the path ({subject_id!r})")
        params, result = await generate(subject_id, body)
        return _image_response(subject_id, params, result, request)

    @app.post("/v1/subjects/{subject_id}/images", responses=IMAGE_ANSWERS)
    async def create_images(subject_id: SubjectPath,
                            body: image_request,  # type: ignore[valid-type]
                            request: Request) -> Response:
        """Generate `num_images` images of the subject (image/png for one, JSON else).
        A `serve_multiplexed_model_id` header, if sent, must name the same subject."""
        return await images(subject_id, body.model_dump(), request)

    @app.post("/v1/images", responses=IMAGE_ANSWERS,
              openapi_extra={"parameters": [HEADER_PARAMETER]})
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
