"""Running the service, and generating without it: the library behind `serve` and
`generate` (the click commands live in tuneqdm_cli/serve.py).

    store = open_store(output, storage_options, base)      the served base + subjects
    runner = ServeRunner(settings, host, port, local, proxy_location)   on a Ray connected
                                                           by the caller
    check_resources(settings, ray.cluster_resources(), strict, say)
    runner.start(say); wait_for_signal(); runner.stop()
    generate_to_files(store, subject_id, prompt, path, ...) one batch, no Ray at all

Connecting to Ray is the caller's (pipeline.ray_session.RaySession): deploy/ never
calls ray.init.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .params import GenerationParams, Limits, check_params, check_strength, resolve
from .settings import ServeSettings
from .store import SubjectStore, check_subject_id

Say = Callable[[str], None]
# `generate` runs for one script, not for the public: wider bounds than the service's
# (also the ranges of its command-line options)
GENERATE_LIMITS = Limits(max_steps=1000, max_side=4096, max_images=64,
                         max_prompt_chars=10_000, max_guidance=100)


# Where Serve runs HTTP proxies: on every node (Ray's default), only on the head (nodes
# that share one network namespace, or a single entry point behind a load balancer),
# or nowhere (handles only).
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


class OutputNotFound(ValueError):
    """The output folder / prefix to serve does not exist."""


class ResourceShortage(ValueError):
    """The cluster cannot hold the replicas asked for."""


def open_store(output: str, storage_options: dict[str, Any],
               base: str | None = None) -> SubjectStore:
    """The subjects and served base of a submit's output. Raises OutputNotFound,
    BaseNotFound, or StorageError."""
    from pipeline.store import Storage

    if not Storage(output, storage_options).exists(""):
        raise OutputNotFound(f"{output} does not exist")
    return SubjectStore(output, storage_options, base)


def local_capacity(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray started with `num_cpus` (None: all) offers; GPUs unchecked."""
    return {"CPU": num_cpus or os.cpu_count() or 1, "GPU": 1e9}


def check_resources(settings: ServeSettings, cluster: dict[str, float], strict: bool,
                    say: Say) -> None:
    """Refuse (strict: a local Ray, which cannot grow; ResourceShortage) or warn about
    replicas that the cluster's CPUs / GPUs cannot hold; Serve would otherwise wait for
    them forever."""
    replicas = settings.min_replicas if settings.autoscaling else settings.replicas
    replicas = max(1, replicas or 0)
    ingress_cpus = settings.ingress_replicas * settings.ingress_num_cpus
    need_cpu = replicas * settings.num_cpus_per_replica + ingress_cpus
    need_gpu = replicas * settings.num_gpus_per_replica
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    problems = []
    if need_cpu > have_cpu + 1e-9:
        problems.append(f"{replicas} replica(s) x {settings.num_cpus_per_replica:g} CPU + "
                        f"ingress {ingress_cpus:g} CPU = {need_cpu:g} CPUs, the cluster "
                        f"has {have_cpu:g}")
    if need_gpu > have_gpu + 1e-9:
        problems.append(f"{replicas} replica(s) x {settings.num_gpus_per_replica:g} GPU = "
                        f"{need_gpu:g} GPUs, the cluster has {have_gpu:g}")
    if not problems:
        return
    text = "; ".join(problems)
    if strict:
        raise ResourceShortage(text)
    say(f"warning: {text}; Serve waits until the cluster grows")


class ServeRunner:
    """One Serve application on the Ray this process is connected to.

    local: Serve runs on a Ray started for this command, so stopping shuts Serve down
    entirely; otherwise only this application is deleted from the cluster.
    """

    def __init__(self, settings: ServeSettings, host: str, port: int, local: bool,
                 proxy_location: str = "EveryNode") -> None:
        if proxy_location not in PROXY_LOCATIONS:
            raise ValueError(f"proxy_location {proxy_location!r} is not one of "
                             f"{', '.join(PROXY_LOCATIONS)}")
        self.settings = settings
        self.host, self.port = host, port
        self.proxy_location = proxy_location
        self.local = local
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.settings.route_prefix.rstrip('/')}"

    def start(self, say: Say) -> None:
        """Start Serve's HTTP proxy and deploy the app (not blocking); check the
        cluster's room first (`check_resources`)."""
        from ray import serve

        from .app import build_app

        serve.start(http_options={"host": self.host, "port": self.port},
                    proxy_location=self.proxy_location)
        say(f"deploying {self.settings.name!r}: base {self.settings.base} from "
            f"{self.settings.output}")
        serve.run(build_app(self.settings), name=self.settings.name,
                  route_prefix=self.settings.route_prefix, blocking=False)

    def stop(self) -> None:
        """Shut Serve down (local) or delete the app (cluster); once."""
        from ray import serve

        if self.stopped:
            return
        self.stopped = True
        if self.local:
            serve.shutdown()
        else:
            with contextlib.suppress(Exception):
                serve.delete(self.settings.name)


def wait_for_signal(poll_s: float = 1.0) -> None:
    """Block until SIGINT or SIGTERM. SIGINT too: a process started in the background
    of a non-interactive shell inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""

    def on_signal(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class GeneratedFile:
    path: Path
    seed: int


def generate_to_files(store: SubjectStore, subject_id: str, prompt: str, out_path: str | Path,
                      *, negative_prompt: str = "", num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, seed: int = 0,
                      height: int | None = None, width: int | None = None,
                      num_images: int = 1, device: str = "auto", dtype: str = "auto",
                      scheduler: str | None = None, threads: int | None = None,
                      strength: float = 1.0
                      ) -> tuple[list[GeneratedFile], GenerationParams]:
    """Images of `subject_id` for `prompt` in one batch, written as PNGs: one to
    `out_path`, several to NAME-0.png .. NAME-(N-1).png. Image j uses seed + j, as
    POST /v1/subjects/{id}/images does, so both give the same images.

    Steps and guidance default to GENERATE_LIMITS' defaults; height and width to the
    base's size. `strength` alpha in [0, 1.5] as in the HTTP API: the subject's scales
    are s0 + alpha (s - s0), 0 the untuned base, 1 the subject. Raises InvalidRequest
    for parameters out of GENERATE_LIMITS (the strength before anything is read),
    SubjectNotFound / SubjectMismatch for the subject, ValueError otherwise.
    """
    from .engine import Engine, GenerationRequest, LoadedSubject

    check_subject_id(subject_id)
    strength = check_strength(strength)
    if threads:
        import torch

        torch.set_num_threads(threads)
    scale_set, info = store.read_scale_set(subject_id)
    engine = Engine(store.local_base_path(), store.base.fingerprint, capacity=1,
                    device=device, dtype=dtype, scheduler=scheduler)
    engine.check_fits(scale_set)
    body = {"prompt": prompt, "negative_prompt": negative_prompt or None,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "seed": seed, "height": height, "width": width, "num_images": num_images,
            "strength": strength}
    params = check_params(resolve(body, GENERATE_LIMITS, engine.native_size, info.token,
                                  info.class_noun), GENERATE_LIMITS)
    result = engine.run([GenerationRequest(LoadedSubject(info, scale_set), params)])[0]
    paths = output_paths(Path(out_path), num_images)
    for path, png in zip(paths, result.png_bytes(), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    files = [GeneratedFile(p, s) for p, s in zip(paths, result.seeds, strict=True)]
    return files, params


def output_paths(path: Path, count: int) -> list[Path]:
    """`path` for one image; NAME-0.png .. NAME-(count-1).png for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{j}{path.suffix or '.png'}") for j in range(count)]
