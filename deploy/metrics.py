"""The app's own metrics, exported through Ray's Prometheus endpoint next to Serve's.

ray.util.metrics in the replicas; Ray's metrics agent on each node serves them at
http://<node>:<metrics_export_port>/metrics with the prefix `ray_`, e.g.
`ray_tuneqdm_batch_images_bucket`. What they mean and what to watch: docs/deploy.md.

    tuneqdm_batch_images          histogram  images per UNet batch
    tuneqdm_batch_subjects        histogram  distinct subjects per UNet batch
    tuneqdm_scale_set_loads       counter    scale sets read from storage (cache misses)
    tuneqdm_bank_misses           counter    subjects copied into a bank slot
    tuneqdm_queued_images         gauge      images waiting in a replica's batcher
    tuneqdm_request_seconds       histogram  HTTP request latency, tag `status`
"""

from __future__ import annotations

from ray.util import metrics

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ReplicaMetrics:
    """The model replica's metrics (create inside the replica: Ray actors only)."""

    def __init__(self) -> None:
        self.batch_images = metrics.Histogram(
            "tuneqdm_batch_images", description="images per UNet batch",
            boundaries=BATCH_BOUNDARIES)
        self.batch_subjects = metrics.Histogram(
            "tuneqdm_batch_subjects", description="distinct subjects per UNet batch",
            boundaries=BATCH_BOUNDARIES)
        self.scale_set_loads = metrics.Counter(
            "tuneqdm_scale_set_loads",
            description="scale sets read from storage (Serve's multiplexed cache missed)")
        self.bank_misses = metrics.Counter(
            "tuneqdm_bank_misses", description="subjects copied into a bank slot")
        self.queued_images = metrics.Gauge(
            "tuneqdm_queued_images", description="images waiting in the replica's batcher")

    def batch(self, images: int, subjects: int, bank_writes: int) -> None:
        """One UNet batch of `images` images, `subjects` distinct, `bank_writes` new slots."""
        self.batch_images.observe(images)
        self.batch_subjects.observe(subjects)
        if bank_writes:
            self.bank_misses.inc(bank_writes)


class IngressMetrics:
    """The ingress's request latency by HTTP status."""

    def __init__(self) -> None:
        self.request_seconds = metrics.Histogram(
            "tuneqdm_request_seconds", description="HTTP request latency by status",
            boundaries=LATENCY_BOUNDARIES, tag_keys=("status", "route"))

    def request(self, seconds: float, status: int, route: str) -> None:
        self.request_seconds.observe(seconds, tags={"status": str(status), "route": route})
