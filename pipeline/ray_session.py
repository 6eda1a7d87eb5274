"""The one way this project connects to Ray: `RaySession`, used by `submit` and `serve`.

    with RaySession(address=None) as session:     a fresh local Ray (in a Ray Job: its cluster)
        session.ray.cluster_resources()
    with RaySession(address="auto") as session:   the cluster; only disconnects on exit

If this process is already connected (a test, a notebook, a driver that connected
itself), that connection is used and left open. Settings shared by every command:
namespace "tuneqdm", worker logs not echoed to the driver, a bounded object store for
a local Ray (results are small; weights travel through storage), and, for a remote
cluster, the settings in FORWARDED_ENV passed on to its workers (a local Ray inherits
the whole environment). Never credentials: the runtime env shows in the dashboard;
nodes should use instance roles (docs/pipeline.md).

Inside a Ray job (`ray job submit --runtime-env-json ...`) the job's runtime env
already reaches every worker, and Ray refuses a `ray.init(runtime_env=...)` that sets
one of its variables again ("Failed to merge the Job's runtime env"); such variables
are therefore not passed a second time (`forwarded_env`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

NAMESPACE = "tuneqdm"
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
FORWARDED_ENV = ("HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "TUNEQDM_CACHE")
# Set by Ray's job supervisor for a job's entrypoint: {"runtime_env": {...}, ...}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The env_vars of the Ray job this process runs in ({} outside a job)."""
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}  # not ours to judge: ray.init reports a malformed job config
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    return dict(env_vars) if isinstance(env_vars, dict) else {}


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """FORWARDED_ENV variables set in `environ`, less those the enclosing Ray job's
    runtime env sets already (its workers get them, and Ray refuses a second)."""
    from_job = job_env_vars(environ)
    return {k: environ[k] for k in FORWARDED_ENV if k in environ and k not in from_job}


def init_kwargs(address: str | None, num_cpus: int | None = None, dashboard: bool = True,
                environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`ray.init` keyword arguments. address None: inside a Ray Job, the job's cluster;
    else a fresh local instance (never someone else's `ray start` on this host) with
    `num_cpus` CPUs (None: all)."""
    environ = os.environ if environ is None else environ
    if address is None and JOB_CONFIG_ENV in environ:
        address = "auto"  # a Ray Job's driver: the cluster the job runs on
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if address is None:
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                      object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
        return kwargs
    kwargs["address"] = address
    env = forwarded_env(environ)
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    return kwargs


class RaySession:
    """Connect to Ray (or reuse this process's connection); on exit, shut down only a
    connection this session made. `local`: the session started its own local Ray."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 dashboard: bool = True) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.owned = False  # this session connected (and disconnects on close)
        self.local = False  # this session started its own local Ray

    @property
    def ray(self):
        import ray

        return ray

    def __enter__(self) -> RaySession:
        import ray

        if not ray.is_initialized():
            kwargs = init_kwargs(self.address, self.num_cpus, self.dashboard)
            ray.init(**kwargs)
            # inside a Ray Job, address None is the job's cluster: not a local Ray
            self.owned, self.local = True, kwargs["address"] == "local"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect if this session connected (a local Ray it started stops)."""
        import ray

        if self.owned:
            ray.shutdown()
            self.owned = False

    def dashboard_url(self) -> str | None:
        """http://host:port of the Ray dashboard, or None when it is not running."""
        from ray._private.worker import get_dashboard_url

        try:
            url = get_dashboard_url() or None
        except Exception:
            url = None
        if url and "://" not in url:
            url = "http://" + url
        return url


def is_connected() -> bool:
    """Whether this process is connected to Ray already."""
    import ray

    return ray.is_initialized()
