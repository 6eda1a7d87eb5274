"""`POST /v1/images/generations`: OpenAI's images API over the same generation path,
so clients that speak it (the official `openai` package among them) need only a
base URL:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.images.generate(model="my-dog", prompt="a photo of {token} {class_noun}",
                           n=2, size="64x64", response_format="b64_json",
                           extra_body={"seed": 7, "num_inference_steps": 25})

`model` is the subject id; `size` is "WxH" within the service's bounds (default: the
base's native size); images come back inline only (`b64_json`: this server hosts no
files, so `url` is a 422 saying so). Every field of our own request body except
prompt / num_images / height / width (seed, num_inference_steps, guidance_scale,
negative_prompt, and any added to params.request_model later) is accepted as an
extra body field with the same bounds. The answer is OpenAI's
`{"created": <unix s>, "data": [{"b64_json", "revised_prompt"}]}` (revised_prompt:
the prompt with {token} and {class_noun} filled in), plus each image's `seed`.
"""

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from .contract import GENERATION_ERRORS, SUBJECT_ID_HELP, SUBJECT_ID_SCHEMA
from .errors import InvalidRequest
from .params import GenerationParams, Limits, WholeInt, request_model

Generate = Callable[[str, dict[str, Any]], Awaitable[tuple[GenerationParams, dict[str, Any]]]]
REPLACED = ("prompt", "num_images", "height", "width")  # by OpenAI's prompt / n / size


class OpenAIImage(BaseModel):
    """One image of the answer."""

    b64_json: str = Field(description="the PNG, base64")
    revised_prompt: str = Field(description="the prompt as generated (placeholders filled)")
    seed: int = Field(description="this image's seed (ours, not OpenAI's)")


class OpenAIImagesResponse(BaseModel):
    """OpenAI's images answer."""

    created: int = Field(description="unix time in seconds")
    data: list[OpenAIImage]


def side_pattern(limits: Limits) -> str:
    """A JSON-Schema pattern of "WxH" with both sides in [min_side, max_side] and
    multiples of side_multiple: the alternation of the allowed numbers."""
    sides = range(limits.min_side, limits.max_side + 1, limits.side_multiple)
    numbers = "|".join(str(side) for side in sides)
    return f"^({numbers})x({numbers})$"


def _no_url(value: Any) -> Any:
    if value == "url":
        raise ValueError("'url' is not supported: this server hosts no images; use "
                         "'b64_json' (the default)")
    return value


def openai_request_model(limits: Limits) -> type[BaseModel]:
    """OpenAI's images request, bounded by `limits`, plus our own fields."""
    ours = request_model(limits).model_fields
    extras = {name: (info.annotation, info) for name, info in ours.items()
              if name not in REPLACED}
    return create_model(
        "OpenAIImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="OpenAI's images request; model is the subject id.",
        __validators__={"no_url": field_validator("response_format", mode="before")(
            _no_url)},
        model=(str, Field(description=SUBJECT_ID_HELP, json_schema_extra=SUBJECT_ID_SCHEMA)),
        prompt=(str, ours["prompt"]),
        n=(WholeInt, Field(1, ge=1, le=limits.max_images, description="images")),
        size=(str | None, Field(None, description="WxH in pixels; default: the model's "
                                                  "size", examples=["64x64"],
                                json_schema_extra={"pattern": side_pattern(limits)})),
        response_format=(Literal["b64_json"] | None,
                         Field(None, description="b64_json only: images come inline")),
        user=(str | None, Field(None, max_length=256, description="accepted, unused")),
        **extras,
    )


def parse_size(size: str | None, limits: Limits) -> dict[str, int]:
    """{"height", "width"} for "WxH" (nothing for None); InvalidRequest naming the
    bounds otherwise."""
    if size is None:
        return {}
    width, _, height = size.partition("x")
    sides = (width, height)
    ok = all(s.isdigit() and limits.min_side <= int(s) <= limits.max_side
             and int(s) % limits.side_multiple == 0 for s in sides)
    if not ok:
        shown = size if len(size) <= 40 else size[:37] + "..."
        raise InvalidRequest(f"size {shown!r} is invalid: use WxH with each side in "
                             f"[{limits.min_side}, {limits.max_side}] px and a multiple of "
                             f"{limits.side_multiple}")
    return {"width": int(width), "height": int(height)}


def add_openai_route(app: FastAPI, generate: Generate, limits: Limits) -> None:
    """POST /v1/images/generations on `app`, generating through `generate`."""
    request = openai_request_model(limits)

    @app.post("/v1/images/generations", tags=["OpenAI-compatible"],
              responses={200: {"model": OpenAIImagesResponse}, **GENERATION_ERRORS})
    async def openai_images(body: request) -> JSONResponse:  # type: ignore[valid-type]
        """OpenAI's images API: `model` is the subject id; seed, num_inference_steps,
        guidance_scale and negative_prompt come as extra body fields."""
        fields = body.model_dump(exclude={"model", "n", "size", "response_format", "user"})
        ours = {**fields, "num_images": body.n, **parse_size(body.size, limits)}
        params, result = await generate(body.model, ours)
        answer = OpenAIImagesResponse(created=int(time.time()), data=[
            OpenAIImage(b64_json=base64.b64encode(png).decode(), revised_prompt=params.prompt,
                        seed=seed)
            for seed, png in zip(params.seeds, result["images"], strict=True)])
        return JSONResponse(answer.model_dump())
