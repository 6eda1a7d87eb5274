"""The Serve application on a local Ray (num_cpus=2, replicas with fractional CPUs),
three subjects trained by the pipeline, HTTP on 127.0.0.1.

Two apps share the Serve instance: "tuneqdm" at / (started by `tuneqdm-pipeline serve
--detach`, 2 model replicas, 2 subjects each) and "solo" at /solo (1 replica, 2
subjects, small queue) for batching, eviction and overload checks that need to know
which replica answers."""

from __future__ import annotations

import asyncio
import io
import shutil

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from deploy_testkit import PROMPT, SAMPLES, STEPS, assert_close, free_port
from PIL import Image

from tuneqdm_cli.main import main

SOLO = "/solo"


METRICS_PORT: list[int] = []  # Ray's Prometheus endpoint, when the fixture started Ray


@pytest.fixture(scope="module")
def server(trained_output):
    """Base URL of the running Serve instance (both apps deployed)."""
    import ray
    from ray import serve

    from deploy.app import ServeSettings, build_app

    started = not ray.is_initialized()
    if started:
        METRICS_PORT.append(free_port())
        ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False,
                 namespace="tuneqdm-deploy-test", log_to_driver=False,
                 configure_logging=False, _metrics_export_port=METRICS_PORT[0],
                 _system_config={"metrics_report_interval_ms": 1000})
    try:
        port = free_port()
        result = CliRunner().invoke(main, [
            "serve", str(trained_output), "--port", str(port), "--replicas", "2",
            "--num-cpus-per-replica", "0.5", "--max-subjects-per-replica", "2",
            "--default-steps", str(STEPS), "--max-steps", "50", "--max-side", "64",
            "--max-images", "3", "--detach"])
        assert result.exit_code == 0, result.output
        assert f"serving at http://127.0.0.1:{port}/" in result.output
        solo = ServeSettings(output=str(trained_output), name="solo", route_prefix=SOLO,
                             replicas=1, num_cpus_per_replica=0.5, max_subjects_per_replica=2,
                             max_batch_images=4, max_queued_images=4, batch_wait_ms=100,
                             limits={"default_steps": STEPS, "max_images": 3})
        serve.run(build_app(solo), name="solo", route_prefix=SOLO)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def _image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def _solo_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("SubjectModel", app_name="solo").stats.remote().result()


def test_each_subject_over_http_equals_offline_generation(http, offline_images):
    replicas = set()
    for subject, words in (("dog", "sks dog"), ("cat", "zwx cat"), ("backpack", "qvt backpack")):
        response = http.post(f"/v1/subjects/{subject}/images",
                             json={"prompt": PROMPT, "seed": 5})
        assert_close(_image(response), offline_images(subject, f"a photo of {words}", 5)[0])
        assert response.headers["x-seed"] == "5"
        replicas.add(response.headers["x-replica"])
    again = http.post("/v1/subjects/dog/images", json={"prompt": PROMPT, "seed": 5})
    assert again.headers["x-scale-set"] == "cached"  # routed to the replica holding dog
    several = http.post("/v1/images", json={"prompt": PROMPT, "seed": 8, "num_images": 2},
                        headers={"serve_multiplexed_model_id": "cat"})
    assert several.status_code == 200, several.text
    assert [i["seed"] for i in several.json()["images"]] == [8, 9]


async def _post_all(base_url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return await asyncio.gather(*[
            client.post(f"{SOLO}/v1/subjects/{subject}/images", json=body)
            for subject, body in requests])


def test_concurrent_mix_of_subjects_is_batched_and_equals_one_at_a_time(server, http):
    requests = [("dog", {"prompt": PROMPT, "seed": 1}), ("cat", {"prompt": PROMPT, "seed": 2}),
                ("dog", {"prompt": "{token} {class_noun} on grass", "seed": 3})]
    alone = [_image(http.post(f"{SOLO}/v1/subjects/{s}/images", json=b)) for s, b in requests]
    mixed_batches = 0
    for _ in range(3):  # concurrent requests normally share a batch; a loaded CI may split
        responses = asyncio.run(_post_all(server, requests))
        for response, reference in zip(responses, alone, strict=True):
            assert_close(_image(response), np.asarray(reference).astype(np.int16))
        mixed_batches += any(int(r.headers["x-batch-subjects"]) >= 2 for r in responses)
        if mixed_batches:
            break
    assert mixed_batches, [dict(r.headers) for r in responses]
    assert _solo_stats()["largest_batch"] >= 2


def test_cache_evicts_beyond_its_limit_and_reloads(http, offline_images):
    def state(subject: str, seed: int = 4) -> str:
        response = http.post(f"{SOLO}/v1/subjects/{subject}/images",
                             json={"prompt": PROMPT, "seed": seed})
        assert response.status_code == 200, response.text
        return response.headers["x-scale-set"]

    state("dog")
    state("cat")
    assert state("dog") == "cached"
    loads = _solo_stats()["loads"]
    assert state("backpack") == "loaded"  # third subject: the LRU one (cat) goes
    stats = _solo_stats()
    assert stats["loads"] == loads + 1 and sorted(stats["bank_resident"]) == ["backpack", "dog"]
    assert state("cat") == "loaded"  # reloaded from storage, evicting dog
    response = http.post(f"{SOLO}/v1/subjects/cat/images", json={"prompt": PROMPT, "seed": 6})
    assert_close(_image(response), offline_images("cat", "a photo of zwx cat", 6)[0])
    stats = _solo_stats()
    assert sorted(stats["bank_resident"]) == ["backpack", "cat"]
    assert stats["bank_capacity"] == 2 and stats["bank_writes"] >= 4


@pytest.mark.parametrize(("path", "body", "headers", "status", "expected"), [
    ("/v1/subjects/nobody/images", {"prompt": "x"}, {}, 404, "subject 'nobody' not found"),
    ("/v1/subjects/halfway/images", {"prompt": "x"}, {}, 404, "not found"),
    ("/v1/subjects/alien/images", {"prompt": "x"}, {}, 409, "trained on base 000000000000"),
    ("/v1/subjects/NOT_OK/images", {"prompt": "x"}, {}, 422, "is invalid"),
    ("/v1/subjects/dog/images", {"prompt": "x", "num_inference_steps": 51}, {}, 422,
     "less than or equal to 50"),
    ("/v1/subjects/dog/images", {"prompt": "x", "height": 12}, {}, 422, "multiple of 8"),
    ("/v1/subjects/dog/images", {"prompt": "x", "num_images": 4}, {}, 422, "num_images"),
    ("/v1/subjects/dog/images", {"prompt": ""}, {}, 422, "prompt"),
    ("/v1/subjects/dog/images", {"prompt": "x"}, {"serve_multiplexed_model_id": "cat"}, 422,
     "names another subject"),
    ("/v1/images", {"prompt": "x"}, {"serve_multiplexed_model_id": "nobody"}, 404,
     "not found"),
    ("/v1/images", {"prompt": "x"}, {"serve_multiplexed_model_id": "../etc"}, 422,
     "is invalid"),
])
def test_errors_through_serve(http, path, body, headers, status, expected):
    response = http.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]


def test_listing_health_and_oversized_body_through_serve(http):
    assert http.get("/healthz").json()["status"] == "ok"
    listing = http.get("/v1/subjects").json()
    assert {s["subject_id"]: s["servable"] for s in listing["subjects"]} == {
        "alien": False, "backpack": True, "cat": True, "dog": True}
    assert http.get("/v1/subjects/halfway").status_code == 404
    huge = http.post("/v1/subjects/dog/images", content=b"{" + b" " * 70_000 + b"}",
                     headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    assert http.get(f"{SOLO}/").text.count('const ROOT = "/solo";') == 1


def test_generate_command_gives_the_served_image(http, trained_output, tmp_path):
    served = http.post("/v1/subjects/backpack/images",
                       json={"prompt": "{token} {class_noun} on a table", "seed": 12})
    result = CliRunner().invoke(main, [
        "generate", str(trained_output), "backpack", "{token} {class_noun} on a table",
        "-o", str(tmp_path / "bp.png"), "--steps", str(STEPS), "--seed", "12"])
    assert result.exit_code == 0, result.output
    assert "bp.png  (seed 12, 16x16, 4 steps)" in result.output
    offline = np.asarray(Image.open(tmp_path / "bp.png").convert("RGB")).astype(np.int16)
    assert_close(_image(served), offline)


def test_overload_answers_503_with_retry_after(server):
    body = {"prompt": PROMPT, "num_images": 3, "num_inference_steps": 20, "seed": 0}
    responses = asyncio.run(_post_all(server, [("dog", body)] * 8))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, [r.text for r in responses]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium / chromedriver not installed (scripts/setup-browser.sh)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_playground_in_headless_chromium(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chromium()
    try:
        browser.set_page_load_timeout(60)
        browser.get(server + "/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: "subject(s) ready" in b.find_element(By.ID, "status").text)
        select = Select(browser.find_element(By.ID, "subject"))
        assert sorted(o.get_attribute("value") for o in select.options) == [
            "backpack", "cat", "dog"]
        select.select_by_value("cat")
        # the subject's samples appear next to the prompt, loaded from the samples route
        wait.until(lambda b: b.execute_script(
            "const imgs = [...document.querySelectorAll('#samples img')];"
            "return imgs.length === arguments[0] && imgs.every((i) => i.complete"
            " && i.naturalWidth === 16"
            " && i.src.endsWith('/v1/subjects/cat/samples/' + imgs.indexOf(i)));", SAMPLES))
        assert "zwx cat" in browser.find_element(By.ID, "subject-facts").text
        # and its training photos, as thumbnails from the photos route
        wait.until(lambda b: b.execute_script(
            "const imgs = [...document.querySelectorAll('#photos img')];"
            "return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth > 0"
            " && i.src.endsWith('/v1/subjects/cat/photos/' + imgs.indexOf(i)));"))
        note = browser.find_element(By.ID, "photos-note").text
        assert f"{SAMPLES} sample(s)" in note and "Trained on 2 photo(s) (above" in note
        for field, value in (("steps", STEPS), ("seed", 21), ("size", 16)):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(str(value))
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.execute_script(
            "const i = document.getElementById('result');"
            "return !i.hidden && i.complete && i.naturalWidth;") == 16)
        assert browser.find_element(By.ID, "status").text.startswith("seed 21,")
        assert "batch: 1 image(s), 1 subject(s)" in browser.find_element(By.ID, "status").text

        # several images at once, at strength 0 (the slider set by script, as a user drags)
        count = browser.find_element(By.ID, "count")
        count.clear()
        count.send_keys("2")
        browser.execute_script("const s = document.getElementById('strength');"
                               "s.value = '0'; s.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "strength-value").text == "0"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.execute_script(
            "const imgs = document.querySelectorAll('#gallery img');"
            "return imgs.length === 2 && [...imgs].every((i) => !i.hidden && i.complete"
            " && i.naturalWidth === 16);"))
        assert "batch: 2 image(s)" in browser.find_element(By.ID, "status").text
        history = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#history li")]
        assert len(history) == 2 and history[0].startswith("cat, strength 0, 2 image(s)")
        assert history[1].startswith("cat, strength 1, 1 image(s), seed 21")
        assert all("batch: " in line for line in history)

        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("500")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "Error 422" in b.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status")
        assert "num_inference_steps" in status.text and status.get_attribute("class") == "error"
    finally:
        browser.quit()


def test_app_metrics_on_rays_prometheus_endpoint(server, http):
    """The app's own metrics next to Serve's, after a few requests."""
    import time

    if not METRICS_PORT:
        pytest.skip("Ray was started elsewhere: its metrics port is not known")
    for seed in range(3):
        assert http.post("/v1/subjects/dog/images", json={"prompt": "x", "seed": seed}
                         ).status_code == 200
    assert http.post("/v1/subjects/nobody/images", json={"prompt": "x"}).status_code == 404
    last_request = time.monotonic()
    wanted = ("ray_tuneqdm_batch_images_count", "ray_tuneqdm_batch_subjects_bucket",
              "ray_tuneqdm_scale_set_loads", "ray_tuneqdm_bank_misses",
              "ray_tuneqdm_queued_images", 'ray_tuneqdm_request_seconds_count{',
              "ray_serve_num_http_requests")
    text, deadline = "", time.monotonic() + 120  # exported every few seconds
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics", timeout=10).text
        if all(name in text for name in wanted) and 'status="404"' in text:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_tuneqdm_batch_images_count")]
    assert sum(counts) >= 3  # one batch per sequential request at least
    assert any('status="200"' in line and "tuneqdm_request_seconds_count" in line
               for line in text.splitlines())
    # Idle past the 20 s after which Ray's metrics agent drops a gauge nobody set
    # (two default export intervals; the agent keeps its default): the replicas keep
    # setting the queue gauge, so it reads 0 rather than vanishing.
    time.sleep(max(0.0, last_request + 24 - time.monotonic()))
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics", timeout=10).text
    queued = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_tuneqdm_queued_images{")]
    assert queued and all(value == 0 for value in queued), queued
