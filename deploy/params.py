"""Generation parameters: their bounds, the HTTP request body, prompt placeholders.

Every request is bounded (steps, image side, images per request, prompt length) so
that no single request can hold a replica for long or exhaust its memory. The JSON
body model is built from the service's `Limits`, so /docs shows the real bounds and a
value outside them is a 422 before any work starts.

A prompt may name the subject through placeholders, filled from its meta.json:
`{token}` (the rare identifier word, "sks") and `{class_noun}` ("dog"); nothing else
in the prompt is interpreted (no str.format).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from tuneqdm.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS

from .errors import InvalidRequest

# Seeds stay exact in JavaScript numbers, so the playground can show and replay them.
MAX_SEED = 2**53 - 1
# Strength alpha: the subject's scales are s0 + alpha (s - s0) (tuneqdm ScaleTable.select);
# 0 is the untuned base, 1 the subject, above 1 an exaggerated subject.
MAX_STRENGTH = 1.5
STRENGTH_BOUNDS: dict[str, Any] = {"ge": 0.0, "le": MAX_STRENGTH, "allow_inf_nan": False}
PLACEHOLDERS = ("{token}", "{class_noun}")


def whole_number(value: Any) -> Any:
    """3.0 -> 3: JSON Schema's "integer" is any number with no fraction, so a client
    generated from /openapi.json may send one; strings, booleans, 2.5 stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integer fields of a strict request body that take 3.0 as 3 (see whole_number); the
# validator wraps the whole type so that Field bounds stay JSON-Schema keywords.
WholeInt = Annotated[int, BeforeValidator(whole_number)]
OptionalWholeInt = Annotated[int | None, BeforeValidator(whole_number)]


@dataclass(frozen=True)
class Limits:
    """Bounds of one request, and the defaults of omitted fields.

    Sides are pixels and must be multiples of `side_multiple` (8: the VAE's factor
    times what diffusers' pipeline checks).
    """

    max_steps: int = 100
    default_steps: int = DEFAULT_STEPS
    max_side: int = 1024
    min_side: int = 8
    side_multiple: int = 8
    max_images: int = 4
    max_prompt_chars: int = 1000
    max_guidance: float = 30.0
    default_guidance: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps >= 1, "max_steps", self.max_steps, ">= 1"),
            (1 <= self.default_steps <= self.max_steps, "default_steps", self.default_steps,
             f"in [1, max_steps={self.max_steps}]"),
            (self.side_multiple >= 1, "side_multiple", self.side_multiple, ">= 1"),
            (self.min_side >= self.side_multiple and self.min_side % self.side_multiple == 0,
             "min_side", self.min_side, f"a multiple of {self.side_multiple}"),
            (self.max_side >= self.min_side and self.max_side % self.side_multiple == 0,
             "max_side", self.max_side,
             f">= min_side={self.min_side} and a multiple of {self.side_multiple}"),
            (self.max_images >= 1, "max_images", self.max_images, ">= 1"),
            (self.max_prompt_chars >= 1, "max_prompt_chars", self.max_prompt_chars, ">= 1"),
            (0 <= self.default_guidance <= self.max_guidance, "default_guidance",
             self.default_guidance, f"in [0, max_guidance={self.max_guidance}]"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise ValueError(f"limit {name}={value!r} is invalid: must be {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GenerationParams:
    """One request's resolved parameters (placeholders filled, defaults applied).

    Requests with equal `batch_key` can share one UNet batch whatever their subjects,
    prompts, seeds, image counts and strengths: the sampling loop is shared, so steps,
    guidance and size must agree.
    """

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = Limits.default_steps
    guidance_scale: float = Limits.default_guidance
    seed: int = 0
    height: int = 512
    width: int = 512
    num_images: int = 1
    strength: float = 1.0
    seeds: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        # image j uses seed + j, as tuneqdm.generate does for num_images_per_prompt
        object.__setattr__(self, "seeds", tuple(self.seed + j for j in range(self.num_images)))

    @property
    def batch_key(self) -> tuple[int, float, int, int]:
        return (self.num_inference_steps, float(self.guidance_scale), self.height, self.width)


def request_model(limits: Limits) -> type[BaseModel]:
    """The JSON body of POST /v1/subjects/{id}/images, with `limits` as its bounds."""
    side = {"ge": limits.min_side, "le": limits.max_side, "multiple_of": limits.side_multiple}
    return create_model(
        "ImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="Parameters of one generation request.",
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars,
                           description="Text prompt; {token} and {class_noun} are replaced "
                                       "by the subject's identifier word and class noun.",
                           examples=["a photo of {token} {class_noun} on the beach"])),
        negative_prompt=(str | None, Field(None, max_length=limits.max_prompt_chars)),
        num_inference_steps=(OptionalWholeInt, Field(None, ge=1, le=limits.max_steps,
                                               description=f"default {limits.default_steps}")),
        guidance_scale=(float | None, Field(None, ge=0.0, le=limits.max_guidance,
                                            allow_inf_nan=False,
                                            description="classifier-free guidance; <= 1 "
                                                        f"turns it off; default "
                                                        f"{limits.default_guidance}")),
        seed=(OptionalWholeInt, Field(None, ge=0, le=MAX_SEED,
                                description="image j uses seed + j; omitted: random, "
                                            "returned with the result")),
        height=(OptionalWholeInt, Field(None, **side, description="default: the model's size")),
        width=(OptionalWholeInt, Field(None, **side, description="default: the model's size")),
        num_images=(WholeInt, Field(1, ge=1, le=limits.max_images)),
        strength=(float, Field(1.0, **STRENGTH_BOUNDS,
                               description="the subject's strength alpha: scales "
                                           "s0 + alpha (s - s0); 0 the untuned base, 1 the "
                                           "subject")),
    )


def check_strength(value: float) -> float:
    """`value` if it is a strength the HTTP API accepts (a finite number in [0,
    MAX_STRENGTH]), else InvalidRequest in the words of its 422 ("strength: Input
    should be less than or equal to 1.5"). For callers that skip `request_model`."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Annotated[float, Field(**STRENGTH_BOUNDS)]).validate_python(value)
    except ValidationError as err:
        errors = [{**error, "loc": ("strength",)} for error in err.errors()]
        raise InvalidRequest(validation_message(errors)) from None


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    """Replace {token} and {class_noun}; every other character is kept as is."""
    return template.replace("{token}", token).replace("{class_noun}", class_noun)


def resolve(body: dict[str, Any], limits: Limits, native_size: int, token: str,
            class_noun: str) -> GenerationParams:
    """GenerationParams from a request body already checked by `request_model`.

    Raises InvalidRequest for what the model cannot express (the seed range of
    several images, a size that is not the model's multiple).
    """
    seed = body.get("seed")
    num_images = body.get("num_images", 1)
    if seed is None:
        seed = random.SystemRandom().randrange(0, MAX_SEED - limits.max_images)
    if seed + num_images - 1 > MAX_SEED:
        raise InvalidRequest(f"seed {seed} with {num_images} images passes the largest seed "
                             f"{MAX_SEED}: use a smaller seed")
    steps = body.get("num_inference_steps") or limits.default_steps
    guidance = body.get("guidance_scale")
    for side in ("height", "width"):
        if body.get(side) is None and not limits.min_side <= native_size <= limits.max_side:
            raise InvalidRequest(f"the model's native size {native_size} px is outside "
                                 f"[{limits.min_side}, {limits.max_side}]: give {side}")
    return GenerationParams(
        prompt=fill_prompt(body["prompt"], token, class_noun),
        negative_prompt=body.get("negative_prompt") or "",
        num_inference_steps=steps,
        guidance_scale=limits.default_guidance if guidance is None else float(guidance),
        seed=seed,
        height=body.get("height") or native_size,
        width=body.get("width") or native_size,
        num_images=num_images,
        strength=float(body.get("strength", 1.0)),
    )


def check_params(params: GenerationParams, limits: Limits) -> GenerationParams:
    """Raise InvalidRequest unless `params` respects `limits` (for callers that do not
    go through `request_model`: the `generate` command, direct engine use)."""
    model = request_model(limits)
    body = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or None,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": float(params.guidance_scale), "seed": params.seed,
            "height": params.height, "width": params.width, "num_images": params.num_images,
            "strength": float(params.strength)}
    from pydantic import ValidationError

    try:
        model.model_validate(body)
    except ValidationError as err:
        raise InvalidRequest(validation_message(err.errors())) from None
    return params


def validation_message(errors: list[dict[str, Any]]) -> str:
    """'num_inference_steps: Input should be less than or equal to 100; ...'"""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
