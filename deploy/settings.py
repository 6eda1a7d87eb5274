"""`ServeSettings`: everything `tuneqdm-pipeline serve` configures, in one typed place.

The CLI, a Serve config file (`deploy.app:app_builder`) and tests build the app from
it; its field defaults, and those of `params.Limits` for requests, are the serving
defaults (docs/design.md §5). No Ray import here: the CLI reads these defaults for
its help without loading Serve.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneqdm.schedulers import scheduler_name

from .params import Limits


class ServeSettings(BaseModel):
    """Everything `tuneqdm-pipeline serve` configures (all replicas share it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(description="the submit's --output: local folder or s3:// prefix")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    base: str | None = Field(None, description="base address under bases/; default: the "
                                               "only one, or the last submit's")
    name: str = "tuneqdm"
    route_prefix: str = "/"
    replicas: int | None = Field(1, ge=1, description="fixed replica count")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    max_subjects_per_replica: int = Field(16, ge=1, le=4096)
    max_batch_images: int = Field(8, ge=1, le=1024)
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000)
    max_queued_images: int = Field(64, ge=1)
    max_ongoing_requests: int = Field(64, ge=1, description="per model replica")
    max_queued_requests: int = Field(512, ge=-1, description="per handle; -1: no limit")
    device: str = "auto"
    dtype: str = "auto"
    cache_weights: bool = Field(
        False, description="keep the base's centred integer weights expanded in the "
                           "compute dtype (tuneqdm/inference.py): faster generation for "
                           "about 4 bytes per weight in fp32, 2 in bf16 (docs/benchmarks.md)")
    scheduler: str | None = Field(None, description="sampler of every replica (ddim, pndm, "
                                                    "euler, dpm-solver); default: the base's")
    torch_threads: int | None = Field(None, ge=1)
    catalog_ttl_s: float = Field(10.0, ge=0)
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="per-request deadline: a generation still running after "
                                 "it is cancelled and answered 504; None: no deadline")
    max_request_cost: int | None = Field(
        512 * 512 * 50 * 4, ge=1,
        description="per-request bound on height x width x steps x images (422 over it), "
                    "so that one client cannot fill a replica's queue with the largest "
                    "requests; default: 4 images of 512x512 px at 50 steps; None: no bound")
    limits: dict[str, Any] = Field(default_factory=dict, description="Limits fields")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return None if value is None else scheduler_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and (self.min_replicas is None or self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas for autoscaling")
        if autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas "
                             f"{self.max_replicas}")
        limits = self.request_limits()
        if limits.max_images > self.max_batch_images:
            raise ValueError(f"max_images {limits.max_images} > max_batch_images "
                             f"{self.max_batch_images}: one request must fit a batch")
        if self.max_queued_images < self.max_batch_images:
            raise ValueError(f"max_queued_images {self.max_queued_images} < "
                             f"max_batch_images {self.max_batch_images}")
        return self

    def request_limits(self) -> Limits:
        return Limits(**self.limits)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None
