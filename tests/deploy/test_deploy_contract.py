"""The API's contract against the LIVE Serve app (started by `tuneqdm-pipeline serve
--detach` on a local Ray, as users start it): schemathesis with all checks finds no
failure in what /openapi.json declares; the official `openai` client drives
POST /v1/images/generations; limits that hold under abuse (a chunked body over 64 KiB,
the per-request deadline, the per-request cost bound). A second app, "slow" at /slow
(a 0.5 s deadline, a 5 s batching window), shows the deadline cancelling a request
before it runs."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from deploy_testkit import PROMPT, STEPS, LocalBackend, assert_close, free_port
from PIL import Image

from deploy.contract import MAX_BODY_BYTES
from tuneqdm_cli.main import main

SLOW = "/slow"
MAX_COST = 32 * 32 * 20  # pixel-steps: 16x16 px x 4 steps x 3 images fits, 32x32x50 not
SCHEMATHESIS_EXAMPLES = 8  # per operation and phase: bounded, about 40 s on 2 cores


@pytest.fixture(scope="module")
def live(trained_output):
    """Base URL of `tuneqdm-pipeline serve` (1 replica) with "slow" beside it."""
    import ray
    from ray import serve

    from deploy.app import ServeSettings, build_app

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False,
                 namespace="tuneqdm-contract-test", log_to_driver=False,
                 configure_logging=False)
    try:
        port = free_port()
        result = CliRunner().invoke(main, [
            "serve", str(trained_output), "--port", str(port), "--replicas", "1",
            "--num-cpus-per-replica", "0.5", "--max-subjects-per-replica", "2",
            "--default-steps", str(STEPS), "--max-steps", "50", "--max-side", "64",
            "--max-images", "3", "--max-request-cost", str(MAX_COST),
            "--request-timeout-s", "120", "--detach"])
        assert result.exit_code == 0, result.output
        slow = ServeSettings(output=str(trained_output), name="slow", route_prefix=SLOW,
                             replicas=1, num_cpus_per_replica=0.5, max_subjects_per_replica=2,
                             batch_wait_ms=5000, request_timeout_s=0.5,
                             limits={"default_steps": STEPS, "max_images": 3})
        serve.run(build_app(slow), name="slow", route_prefix=SLOW)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _schemathesis(url: str, folder, *selection: str) -> str:
    """Run schemathesis on `url`'s /openapi.json (all checks, every phase, bounded);
    its report, asserted free of failures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
         "--checks", "all", "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", "12",
         "--workers", "1", "--warnings", "off", "--request-timeout", "60",
         "--report-dir", str(folder), *selection],
        capture_output=True, text=True, env=env, timeout=600, cwd=folder)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0 and "No issues found" in run.stdout, report
    return run.stdout


@contextlib.contextmanager
def _uvicorn(app):
    """`app` served by uvicorn on a free port in a thread; its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_schemathesis_finds_no_contract_failure(live, trained_output, base_dir, tmp_path):
    """Every operation of the live app but POST /v1/images; that one against the same
    app in this process (uvicorn): Ray Serve's HTTP proxy answers a 500 text/plain
    before the app sees a request whose `serve_multiplexed_model_id` header is not
    UTF-8 (it decodes that header to route; ray/serve/_private/proxy.py), a header
    /openapi.json declares ASCII. docs/deploy.md "Not done"."""
    pytest.importorskip("schemathesis")
    from deploy.engine import Engine
    from deploy.http import create_api
    from deploy.params import Limits
    from deploy.store import SubjectStore

    started = time.monotonic()
    report = _schemathesis(live, tmp_path, "--exclude-path", "/v1/images")
    assert "Tested: 7" in " ".join(report.split()), report[-3000:]
    store = SubjectStore(str(trained_output))
    backend = LocalBackend(store, Engine(base_dir, store.base.fingerprint, capacity=2))
    limits = Limits(default_steps=STEPS, max_steps=50, max_side=64, max_images=3)
    app = create_api(backend, limits, request_timeout_s=120, max_request_cost=MAX_COST)
    with _uvicorn(app) as url:
        report = _schemathesis(url, tmp_path, "--include-path", "/v1/images")
    assert "Tested: 1" in " ".join(report.split()), report[-3000:]
    assert time.monotonic() - started < 300


def test_openai_client_generates_the_subjects_images(live, offline_images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live}/v1", api_key="any string", max_retries=0)
    answer = client.images.generate(model="dog", prompt=PROMPT, n=2, size="16x16",
                                    response_format="b64_json",
                                    extra_body={"seed": 7, "num_inference_steps": STEPS})
    assert answer.created > 1_700_000_000 and len(answer.data) == 2
    references = offline_images("dog", "a photo of sks dog", 7, num_images=2)
    for image, reference in zip(answer.data, references, strict=True):
        assert image.revised_prompt == "a photo of sks dog"
        png = Image.open(io.BytesIO(base64.b64decode(image.b64_json))).convert("RGB")
        assert png.size == (16, 16)
        assert_close(png, reference)
    refused = [
        (openai.UnprocessableEntityError, "hosts no images", {"response_format": "url"}),
        (openai.NotFoundError, "subject 'nobody' not found", {"model": "nobody"}),
        (openai.UnprocessableEntityError, "size '20x16' is invalid", {"size": "20x16"}),
        (openai.UnprocessableEntityError, "num_inference_steps",
         {"extra_body": {"num_inference_steps": 51}})]
    for error, text, change in refused:
        with pytest.raises(error) as raised:
            client.images.generate(**{"model": "cat", "prompt": PROMPT, **change})
        assert text in raised.value.response.json()["error"]


def _chunks(total: int, size: int = 4096):
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def test_chunked_body_over_the_limit_is_413_without_content_length(live):
    """httpx sends a generator body chunked, with no Content-Length."""
    request = httpx.Request("POST", f"{live}/v1/subjects/dog/images",
                            content=_chunks(MAX_BODY_BYTES + 1),
                            headers={"Content-Type": "application/json"})
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    with httpx.Client(timeout=60) as client:
        response = client.send(request)
        assert response.status_code == 413, response.text
        assert response.json() == {"error": f"request body over {MAX_BODY_BYTES} bytes"}
        # just under the limit: read in full, then refused as not being JSON (422)
        small = client.post(f"{live}/v1/subjects/dog/images",
                            content=_chunks(MAX_BODY_BYTES),
                            headers={"Content-Type": "application/json"})
        assert small.status_code == 422 and small.json()["error"]


def test_per_request_cost_bound_names_the_bound_and_the_cost(live):
    with httpx.Client(base_url=live, timeout=120) as client:
        over = client.post("/v1/subjects/cat/images", json={
            "prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 11,
            "num_images": 2, "seed": 1})
        assert over.status_code == 422, over.text
        assert over.json()["error"] == (
            f"request cost 32x32 px x 11 steps x 2 images = 22528 pixel-steps is over the "
            f"per-request bound max_request_cost={MAX_COST}: use fewer steps or images, or a "
            "smaller size")
        assert client.post("/v1/images/generations", json={
            "model": "cat", "prompt": PROMPT, "size": "32x32", "n": 3,
            "num_inference_steps": 10}).status_code == 422
        within = client.post("/v1/subjects/cat/images", json={
            "prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 20,
            "seed": 1})  # exactly the bound
        assert within.status_code == 200, within.text
        limits = client.get("/healthz").json()["limits"]
        assert limits["max_request_cost"] == MAX_COST and limits["request_timeout_s"] == 120


def test_deadline_cancels_the_request_and_answers_504(live):
    from ray import serve

    model = serve.get_deployment_handle("SubjectModel", app_name="slow")
    before = model.stats.remote().result()
    started = time.monotonic()
    response = httpx.post(f"{live}{SLOW}/v1/subjects/dog/images",
                          json={"prompt": PROMPT, "seed": 3}, timeout=60)
    took = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json() == {"error": "the request passed its deadline of 0.5 s "
                                        "(request_timeout_s) and was cancelled"}
    assert 0.5 <= took < 4.5, took  # well before the 5 s batching window closed
    time.sleep(6)  # the window has passed: a request still queued would have run now
    after = model.stats.remote().result()
    assert after["images"] == before["images"] and after["queued_images"] == 0, after
    assert after["batches"] == before["batches"]


def test_errors_of_the_framework_keep_the_one_error_shape(live):
    with httpx.Client(base_url=live, timeout=60) as client:
        wrong_method = client.delete("/v1/subjects")
        assert wrong_method.status_code == 405 and wrong_method.json() == {
            "error": "Method Not Allowed"}
        assert wrong_method.headers["allow"] == "GET"
        assert client.get("/v2/nothing").json() == {"error": "Not Found"}
        not_utf8 = client.post("/v1/subjects/dog/images", content=b"\xff\xfe{",
                               headers={"Content-Type": "application/json"})
        assert not_utf8.status_code == 422 and "error" in not_utf8.json()
        as_text = client.post("/v1/subjects/dog/images", content=b'{"prompt": "x"}',
                              headers={"Content-Type": "text/plain"})
        assert as_text.status_code == 422 and "error" in as_text.json()


def test_openapi_declares_what_the_server_enforces(live):
    spec = httpx.get(f"{live}/openapi.json", timeout=60).json()
    paths = spec["paths"]
    subject = paths["/v1/subjects/{subject_id}/images"]["post"]
    (path_param,) = subject["parameters"]
    assert path_param["schema"]["pattern"] == r"^[a-z0-9][a-z0-9_-]{0,63}$"
    assert path_param["schema"]["maxLength"] == 64
    assert sorted(subject["responses"]) == ["200", "404", "409", "413", "422", "500", "503",
                                            "504"]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for status in ("404", "409", "413", "422", "503", "504"):
        assert subject["responses"][status]["content"]["application/json"]["schema"] == error
    (header,) = paths["/v1/images"]["post"]["parameters"]
    assert header["in"] == "header" and header["required"]
    assert header["name"] == "serve_multiplexed_model_id"
    listing = {p["name"]: p["schema"] for p in paths["/v1/subjects"]["get"]["parameters"]}
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 1000)
    assert listing["offset"]["minimum"] == 0
    assert sorted(paths["/v1/subjects/{subject_id}"]["get"]["responses"]) == [
        "200", "404", "422"]
    sample = paths["/v1/subjects/{subject_id}/samples/{index}"]["get"]
    assert sorted(sample["responses"]) == ["200", "404", "409", "422"]
    assert list(sample["responses"]["200"]["content"]) == ["image/png"]
    assert sample["responses"]["404"]["content"]["application/json"]["schema"] == error
    index = {p["name"]: p["schema"] for p in sample["parameters"]}["index"]
    assert (index["type"], index["minimum"], index["maximum"]) == ("integer", 0, 99)
    openai_body = spec["components"]["schemas"]["OpenAIImageRequest"]["properties"]
    allowed = openai_body["response_format"]["anyOf"][0]
    assert allowed.get("enum", [allowed.get("const")]) == ["b64_json"]
    sizes = openai_body["size"]["pattern"]  # on the property: null has no pattern
    assert sizes.startswith("^(8|16|24|") and sizes.endswith("|64)$")


def test_whole_floats_count_as_integers_and_fractions_do_not(live):
    with httpx.Client(base_url=live, timeout=120) as client:
        whole = client.post("/v1/subjects/dog/images", json={
            "prompt": PROMPT, "seed": 7.0, "num_inference_steps": float(STEPS)})
        assert whole.status_code == 200 and whole.headers["x-seed"] == "7"
        fraction = client.post("/v1/subjects/dog/images", json={"prompt": PROMPT,
                                                                "seed": 7.5})
        assert fraction.status_code == 422 and "seed" in fraction.json()["error"]
    image = np.asarray(Image.open(io.BytesIO(whole.content)).convert("RGB"))
    assert image.shape == (16, 16, 3)

