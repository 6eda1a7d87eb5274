"""What a run needs to be right on a multi-node Ray cluster (docs/design.md §3).

- Storage every node sees: on a cluster of more than one node (or a driver outside
  the cluster's nodes), a local `--output` folder would scatter the run over private
  disks (the base on one node, scale sets on others, the summary on the driver's), so
  it is refused up front unless `--shared-output` declares it mounted on every node
  at the same path (NFS, say). s3:// is always fine.
- Photos read where they are: local photo paths are read on the driver and their
  bytes shipped with the job (`ray.put` once per job, `PhotoShipper`); s3:// photos
  are read by the actors themselves.
"""

from __future__ import annotations

from typing import Any

from .manifest import Job
from .photos import local_photo_bytes
from .settings import SubmitError
from .store import Storage


def cluster_node_count(ray) -> tuple[int, bool]:
    """(alive nodes, whether this driver runs on one of them)."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    try:
        own = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray client driver has no node of its own
        own = None
    return len(alive), own in alive


def check_output_reachable(ray, storage: Storage, shared_output: bool) -> None:
    """SubmitError if a local `storage` root cannot be shared by every node."""
    if storage.remote or shared_output:
        return
    nodes, on_a_node = cluster_node_count(ray)
    if nodes <= 1 and on_a_node:
        return
    where = f"{nodes} nodes" if nodes > 1 else "a node other than this driver's"
    raise SubmitError(
        f"--output {storage.root} is a local folder, but this Ray cluster has {where}: "
        "each node would write its part (the base, the scale sets) to its own disk and "
        "the driver would see none of it. Use storage every node reaches: --output "
        "s3://bucket/prefix (credentials from the environment or a profile), or "
        "--shared-output if this folder is mounted on every node at the same path "
        "(NFS, say)")


class PhotoShipper:
    """Each job's local photos, read on the driver and put in Ray's object store once
    per job (retries reuse it; `drop` releases it when the job is over)."""

    def __init__(self, ray) -> None:
        self.ray = ray
        self.refs: dict[str, Any] = {}

    def ref(self, job: Job) -> Any:
        """ObjectRef of {photo path: bytes} for `job`'s local photos."""
        if job.job_id not in self.refs:
            self.refs[job.job_id] = self.ray.put(local_photo_bytes(job))
        return self.refs[job.job_id]

    def drop(self, job: Job) -> None:
        self.refs.pop(job.job_id, None)
