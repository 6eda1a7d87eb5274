"""The HTTP API without Ray (FastAPI TestClient, a local engine): routes, response
formats, and a status with a readable message for every kind of bad input."""

from __future__ import annotations

import base64
import io
import json

import pytest
from deploy_testkit import PROMPT, SAMPLES, STEPS, LocalBackend, assert_close
from fastapi.testclient import TestClient
from PIL import Image

from deploy.engine import Engine
from deploy.errors import Overloaded
from deploy.http import MAX_BODY_BYTES, create_api
from deploy.params import MAX_SEED, Limits
from deploy.store import SubjectStore

LIMITS = Limits(max_steps=50, default_steps=STEPS, max_side=64, max_images=3,
                max_prompt_chars=200)


@pytest.fixture(scope="module")
def backend(trained_output, base_dir):
    store = SubjectStore(str(trained_output))
    return LocalBackend(store, Engine(base_dir, store.base.fingerprint, capacity=2))


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_api(backend, LIMITS)) as test_client:
        yield test_client


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_one_image_is_a_png_equal_to_offline_generation(client, offline_images):
    response = client.post("/v1/subjects/dog/images",
                           json={"prompt": PROMPT, "seed": 7, "num_inference_steps": STEPS})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7" and response.headers["x-subject-id"] == "dog"
    image = _png(response.content)
    assert image.size == (16, 16)  # the base's native size
    assert_close(image, offline_images("dog", "a photo of sks dog", 7)[0])


def test_several_images_come_as_json_with_their_seeds(client, offline_images):
    response = client.post("/v1/subjects/cat/images",
                           json={"prompt": "{token} {class_noun}, red", "seed": 40,
                                 "num_images": 2, "guidance_scale": 1.0, "height": 16,
                                 "width": 16})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["subject_id"] == "cat" and body["seed"] == 40
    assert [i["seed"] for i in body["images"]] == [40, 41]
    reference = offline_images("cat", "zwx cat, red", 40, num_images=2, guidance=1.0)
    for item, ref in zip(body["images"], reference, strict=True):
        assert_close(_png(base64.b64decode(item["png_base64"])), ref)
    # one image as JSON on request; a random seed is reported
    single = client.post("/v1/subjects/cat/images", json={"prompt": "x"},
                         headers={"Accept": "application/json"})
    assert single.status_code == 200 and 0 <= single.json()["seed"] <= MAX_SEED


def test_subject_from_the_multiplexing_header(client):
    ok = client.post("/v1/images", json={"prompt": "x", "seed": 1},
                     headers={"serve_multiplexed_model_id": "backpack"})
    assert ok.status_code == 200 and ok.headers["x-subject-id"] == "backpack"
    same = client.post("/v1/subjects/backpack/images", json={"prompt": "x", "seed": 1},
                       headers={"serve_multiplexed_model_id": "backpack"})
    assert same.content == ok.content
    other = client.post("/v1/subjects/dog/images", json={"prompt": "x"},
                        headers={"serve_multiplexed_model_id": "cat"})
    assert other.status_code == 422 and "names another subject" in other.json()["error"]
    none = client.post("/v1/images", json={"prompt": "x"})
    assert none.status_code == 422 and "serve_multiplexed_model_id" in none.json()["error"]


def test_listing_and_describing_subjects(client, backend):
    listing = client.get("/v1/subjects").json()
    by_id = {s["subject_id"]: s for s in listing["subjects"]}
    assert sorted(by_id) == ["alien", "backpack", "cat", "dog"]  # halfway never finished
    assert listing["total"] == 4 and listing["base_fingerprint"] == backend.base.fingerprint
    dog = by_id["dog"]
    assert (dog["class_noun"], dog["token"], dog["method"], dog["bits"]) == (
        "dog", "sks", "tuneqdm", 4)
    assert dog["servable"] and dog["trained_at"] and not by_id["alien"]["servable"]
    page = client.get("/v1/subjects", params={"limit": 2, "offset": 1}).json()
    assert [s["subject_id"] for s in page["subjects"]] == ["backpack", "cat"]
    assert client.get("/v1/subjects/cat").json()["token"] == "zwx"
    assert client.get("/v1/subjects/alien").json()["servable"] is False
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["base"]["quant_config"]["bits"] == 4


def test_samples_are_served_as_png_with_bounded_indices(client, trained_output):
    """GET /v1/subjects/{id}/samples/{n}: the bytes `submit` wrote, image/png; every
    bad index or id a 4xx in the one error shape, never a path outside the folder."""
    dog = client.get("/v1/subjects/dog").json()
    assert (dog["samples"], dog["training_photos"]) == (SAMPLES, 2)
    assert client.get("/v1/subjects/alien").json()["samples"] == 0
    folder = trained_output / "subjects" / "dog" / "samples"
    for index in range(SAMPLES):
        answer = client.get(f"/v1/subjects/dog/samples/{index}")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert answer.content == (folder / f"{index:02d}.png").read_bytes()
        assert _png(answer.content).size == (16, 16)
    bad = [("dog/samples/2", 404, f"'dog' has no sample 2 (its samples: 0..{SAMPLES - 1})"),
           ("alien/samples/0", 404, "has no sample 0 (its samples: none)"),
           ("halfway/samples/0", 404, "not found"),
           ("nobody/samples/0", 404, "not found"),
           ("dog/samples/100", 422, "index: Input should be less than or equal to 99"),
           ("dog/samples/-1", 422, "index: Input should be greater than or equal to 0"),
           ("dog/samples/1.5", 422, "index"),
           ("dog/samples/..%2F..%2Fmeta.json", 404, "Not Found"),  # no route matches
           ("Dog!/samples/0", 422, "is invalid: use 1-64 characters")]
    for path, status, expected in bad:
        answer = client.get(f"/v1/subjects/{path}")
        assert answer.status_code == status, (path, answer.text)
        assert expected in answer.json()["error"], (path, answer.json())
    assert client.get("/v1/subjects/dog/samples/../meta.json").status_code == 404


def test_training_photo_thumbnails_are_served(client, trained_output):
    """GET /v1/subjects/{id}/photos/{n}: thumbnails of the photos it was trained on
    (at most 128 px a side, written by submit and listed in done.json)."""
    dog = client.get("/v1/subjects/dog").json()
    assert dog["photos"] == dog["training_photos"] == 2
    folder = trained_output / "subjects" / "dog" / "photos"
    for index in range(2):
        answer = client.get(f"/v1/subjects/dog/photos/{index}")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert answer.content == (folder / f"{index:02d}.png").read_bytes()
        assert max(_png(answer.content).size) <= 128
    for path, status, expected in [
            ("dog/photos/2", 404, "'dog' has no photo 2 (its photos: 0..1)"),
            ("alien/photos/0", 404, "has no photo 0 (its photos: none)"),
            ("dog/photos/100", 422, "index: Input should be less than or equal to 99"),
            ("Dog!/photos/0", 422, "is invalid: use 1-64 characters")]:
        answer = client.get(f"/v1/subjects/{path}")
        assert answer.status_code == status, (path, answer.text)
        assert expected in answer.json()["error"], (path, answer.json())


def test_openapi_shows_the_bounds_and_playground_is_served(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/subjects/{subject_id}/images" in schema["paths"]
    fields = schema["components"]["schemas"]["ImageRequest"]["properties"]
    steps = fields["num_inference_steps"]["anyOf"][0]
    assert steps["maximum"] == 50 and steps["minimum"] == 1
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "TuneQDM playground" in page.text
    assert 'const ROOT = "";' in page.text and 'max="50"' in page.text


BAD_BODIES = [
    ({}, "prompt: Field required"),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "x" * 201}, "prompt: String should have at most 200 characters"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 51}, "less than or equal to 50"),
    ({"prompt": "x", "num_inference_steps": "5"}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
    ({"prompt": "x", "height": 20}, "multiple of 8"),
    ({"prompt": "x", "width": 0}, "width"),
    ({"prompt": "x", "width": 72}, "less than or equal to 64"),
    ({"prompt": "x", "num_images": 4}, "num_images"),
    ({"prompt": "x", "num_images": True}, "num_images"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed"),
    ({"prompt": "x", "seed": MAX_SEED, "num_images": 2}, "passes the largest seed"),
    ({"prompt": "x", "sampler": "euler"}, "sampler: Extra inputs are not permitted"),
    ({"prompt": ["x"]}, "prompt"),
    ({"prompt": "x", "strength": 1.6}, "strength: Input should be less than or equal to 1.5"),
    ({"prompt": "x", "strength": -0.1}, "strength: Input should be greater than or equal to 0"),
    ({"prompt": "x", "strength": "1"}, "strength"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_BODIES)
def test_bad_parameters_are_422_with_a_message(client, body, expected):
    response = client.post("/v1/subjects/dog/images", json=body)
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]


def test_strength_zero_is_the_base_and_one_is_the_subject(client):
    def png(subject: str, **extra) -> bytes:
        response = client.post(f"/v1/subjects/{subject}/images",
                               json={"prompt": "a photo", "seed": 3, **extra})
        assert response.status_code == 200, response.text
        return response.content

    # alpha 0: every subject's scales are the base's, so the images are the same bytes
    assert png("dog", strength=0.0) == png("cat", strength=0)
    assert png("dog", strength=1.0) == png("dog")  # the default is the subject as today
    assert png("dog", strength=0.5) not in (png("dog"), png("dog", strength=0.0))
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ImageRequest"]
    strength = schema["properties"]["strength"]
    assert (strength["minimum"], strength["maximum"], strength["default"]) == (0.0, 1.5, 1.0)
    page = client.get("/").text  # the playground's slider and image count
    assert 'id="strength" type="range" min="0" max="1.5"' in page
    assert 'id="count" type="number" min="1" max="3"' in page


@pytest.mark.parametrize("raw", ['{"prompt": "x", "guidance_scale": NaN}', "{not json",
                                 "[1, 2]", ""])
def test_malformed_bodies_are_422(client, raw):
    response = client.post("/v1/subjects/dog/images", content=raw,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]


@pytest.mark.parametrize(("subject", "status", "expected"), [
    ("nobody", 404, "subject 'nobody' not found"),
    ("halfway", 404, "subject 'halfway' not found"),
    ("alien", 409, "trained on base 000000000000"),
    ("Dog", 422, "subject id 'Dog' is invalid"),
    ("a" * 65, 422, "is invalid"),
    ("-dash", 422, "is invalid"),
    ("%2E%2E", 422, "subject id '..' is invalid"),
])
def test_subject_errors(client, subject, status, expected):
    response = client.post(f"/v1/subjects/{subject}/images", json={"prompt": "x"})
    assert response.status_code == status, response.text
    body = response.json()
    assert expected in body["error"]
    described = client.get(f"/v1/subjects/{subject}")
    assert described.status_code == (200 if status == 409 else status)


def test_oversized_body_overload_and_internal_errors(client, backend):
    huge = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 1)})
    response = client.post("/v1/subjects/dog/images", content=huge,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over 65536 bytes" in response.json()["error"]
    assert client.get("/v1/subjects", params={"limit": 0}).status_code == 422
    try:
        backend.fail_with = Overloaded("replica is busy: 64 images already queued")
        busy = client.post("/v1/subjects/dog/images", json={"prompt": "x"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "replica is busy" in busy.json()["error"]
        backend.fail_with = RuntimeError("CUDA out of memory")
        broken = client.post("/v1/subjects/dog/images", json={"prompt": "x"})
        assert broken.status_code == 500
        assert broken.json()["error"] == "generation failed: CUDA out of memory"
    finally:
        backend.fail_with = None
