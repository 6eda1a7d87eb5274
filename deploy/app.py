"""The Ray Serve application: a thin FastAPI ingress and the subject model replicas.

    HTTP --> Ingress (FastAPI, http.py; cheap: validation, catalog, routing)
               | handle.options(multiplexed_model_id=<subject id>).generate
               v
             SubjectModel replicas, each:
               - loads the quantized base ONCE (Engine), with a ScaleBank of
                 `max_subjects_per_replica` preallocated slots;
               - loads a subject's scale set on first use from storage through
                 `@serve.multiplexed` (checksum, fingerprint and shape checked; LRU
                 of the same size), so Serve routes a subject's requests to replicas
                 that already hold it;
               - batches concurrent requests of ANY subjects into one UNet batch
                 with its own asyncio batcher (batcher.py; `@serve.batch` would split
                 them by subject).

`build_app(ServeSettings(...))` is the typed seam between the CLI (or a Serve config
file: `deploy.app:app_builder`) and Serve.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from .batcher import MixedBatcher
from .engine import Engine, GenerationRequest, LoadedSubject
from .errors import InvalidRequest
from .http import create_api
from .metrics import IngressMetrics, ReplicaMetrics
from .params import GenerationParams
from .settings import ServeSettings
from .store import SubjectCatalog, SubjectInfo, SubjectStore, check_subject_id

GAUGE_REFRESH_S = 1.0  # Ray exports at most once a second: as often as it can look


def _short_replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


@serve.deployment(name="SubjectModel", health_check_period_s=10)
class SubjectModel:
    """One replica: the base loaded once, subjects multiplexed, requests batched."""

    def __init__(self, settings: ServeSettings) -> None:
        import torch

        threads = settings.torch_threads or max(1, int(settings.num_cpus_per_replica))
        torch.set_num_threads(threads)  # Ray sets 1 thread in workers (docs/design.md §6)
        self.settings = settings
        self.store = SubjectStore(settings.output, settings.storage_options, settings.base)
        self.engine = Engine(self.store.local_base_path(), self.store.base.fingerprint,
                             capacity=settings.max_subjects_per_replica,
                             device=settings.device, dtype=settings.dtype,
                             scheduler=settings.scheduler,
                             cache_weights=settings.cache_weights)
        self.metrics = ReplicaMetrics()
        self.batcher = MixedBatcher(
            self._run_batch, key=lambda r: r.params.batch_key, subject=lambda r: r.subject.key,
            images=lambda r: r.params.num_images, max_batch_images=settings.max_batch_images,
            max_distinct=settings.max_subjects_per_replica,
            wait_s=settings.batch_wait_ms / 1000, max_queued_images=settings.max_queued_images)
        self.replica = _short_replica_id()
        self.loads = 0
        # Serve calls __init__ on the replica's event loop.
        self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())

        async def load_subject(subject_id: str) -> LoadedSubject:
            """Serve's model loader: storage -> checked ScaleSet (host memory)."""
            scale_set, info = await asyncio.to_thread(self.store.read_scale_set, subject_id)
            self.engine.check_fits(scale_set)
            self.loads += 1
            self.metrics.scale_set_loads.inc()
            return LoadedSubject(info, scale_set, on_evict=self.engine.bank.demote)

        # Wired at init time so the cache size can come from the settings; Serve
        # detects multiplexed loaders stored on the instance.
        self.get_subject = serve.multiplexed(
            max_num_models_per_replica=settings.max_subjects_per_replica)(load_subject)

    def _run_batch(self, requests: list[GenerationRequest]) -> list:
        """Engine.run on the batch thread, with the batch's metrics."""
        writes = self.engine.bank.writes
        results = self.engine.run(requests)
        if results:
            self.metrics.batch(results[0].batch_images, results[0].batch_subjects,
                               self.engine.bank.writes - writes)
        self.metrics.queued_images.set(self.batcher.queued_images)
        return results

    async def _refresh_gauges(self) -> None:
        """Set the queue gauge every GAUGE_REFRESH_S, busy or idle.

        Ray (2.60) drops a gauge from its Prometheus endpoint once it has not been set
        for two export intervals (20 s by default), so an idle replica would vanish
        from the dashboard instead of reading 0 (docs/deploy.md, Metrics).
        """
        while True:
            self.metrics.queued_images.set(self.batcher.queued_images)
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def generate(self, params: GenerationParams) -> dict[str, Any]:
        """Images for the request's multiplexed subject id."""
        subject_id = serve.get_multiplexed_model_id()
        if not subject_id:
            raise InvalidRequest("no subject: call with multiplexed_model_id=<subject id>")
        check_subject_id(subject_id)
        subject = await self.get_subject(subject_id)
        state = "loaded" if subject.fresh else "cached"
        subject.fresh = False
        self.metrics.queued_images.set(self.batcher.queued_images + params.num_images)
        result = await self.batcher.submit(GenerationRequest(subject, params))
        pngs = await asyncio.to_thread(result.png_bytes)
        return {"images": pngs, "seeds": list(result.seeds),
                "batch_images": result.batch_images, "batch_subjects": result.batch_subjects,
                "replica": self.replica, "scale_set": state}

    async def stats(self) -> dict[str, Any]:
        """This replica's cache and batching counters."""
        stats = self.batcher.stats
        return {"replica": self.replica, "loads": self.loads,
                "bank_writes": self.engine.bank.writes,
                "bank_resident": [key[0] for key in self.engine.bank.resident()],
                "bank_capacity": self.engine.bank.capacity,
                "bank_bytes_per_slot": self.engine.bank.bytes_per_slot,
                "batches": stats.batches, "images": stats.images,
                "largest_batch": stats.largest_batch, "recent_batch_sizes": stats.sizes[-50:],
                "queued_images": self.batcher.queued_images}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose batch loop died is replaced."""
        if not self.batcher.healthy():
            raise RuntimeError("the batch loop stopped")

    def __del__(self) -> None:
        gauges = getattr(self, "_gauges", None)
        if gauges is not None:
            gauges.cancel()
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()


class ServeBackend:
    """http.Backend for the ingress: storage catalog + the model deployment's handle."""

    def __init__(self, model: DeploymentHandle, store: SubjectStore, ttl_s: float) -> None:
        self.model = model
        self.store = store
        self.catalog = SubjectCatalog(store, ttl_s)
        self.base = store.base
        self.native_size = native_size(store)

    def list_subjects(self) -> list[SubjectInfo]:
        return self.catalog.list_subjects()

    def describe(self, subject_id: str) -> SubjectInfo:
        return self.store.describe(subject_id)

    def servable(self, subject_id: str) -> SubjectInfo:
        return self.catalog.servable(subject_id)

    def read_sample(self, subject_id: str, index: int, kind: str = "sample") -> bytes:
        return self.store.read_sample(subject_id, index, kind)

    async def generate(self, subject_id: str, params: GenerationParams) -> dict[str, Any]:
        handle = self.model.options(multiplexed_model_id=subject_id)
        response = handle.generate.remote(params)
        try:
            return await response
        except asyncio.CancelledError:  # the deadline passed: the replica drops it too
            response.cancel()
            raise


def native_size(store: SubjectStore) -> int:
    """The served base's image side in pixels (pipeline.store.native_size)."""
    from pipeline.store import native_size as base_native_size

    return base_native_size(store.storage, store.base.address)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """FastAPI front: validates, answers catalog queries, forwards generation."""

    def __init__(self, model: DeploymentHandle, settings: ServeSettings) -> None:
        self.settings = settings
        store = SubjectStore(settings.output, settings.storage_options, settings.base)
        self.backend = ServeBackend(model, store, settings.catalog_ttl_s)

    def __serve_build_asgi_app__(self):
        settings = self.settings
        app = create_api(self.backend, settings.request_limits(),
                         request_timeout_s=settings.request_timeout_s,
                         max_request_cost=settings.max_request_cost)
        metrics = IngressMetrics()

        @app.middleware("http")
        async def record_latency(request, call_next):
            start = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            metrics.request(time.perf_counter() - start, response.status_code,
                            getattr(route, "path", "other"))
            return response

        return app


def build_app(settings: ServeSettings) -> Application:
    """The Serve application for `settings` (deploy it with serve.run)."""
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus_per_replica,
                              "num_gpus": settings.num_gpus_per_replica},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
    }
    if settings.autoscaling:
        model_options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        model_options["num_replicas"] = settings.replicas
    model = SubjectModel.options(**model_options).bind(settings)
    ingress = Ingress.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        max_ongoing_requests=max(256, 4 * settings.max_ongoing_requests))
    return ingress.bind(model, settings)


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve config files: `import_path: deploy.app:app_builder`, `args:` the
    ServeSettings fields."""
    return build_app(ServeSettings(**args))
