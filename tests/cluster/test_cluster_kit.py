"""The cluster fixture itself: loopback addresses, logical GPUs, disks that differ."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster_kit import NODE_LOCAL

PROBE = r"""
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
LOCAL = sys.argv[2]
workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]

@ray.remote(num_cpus=1, num_gpus=1)
def write(name, local):
    path = os.path.join(local, name)
    with open(path, "w") as f:
        f.write(name)
    return ray.util.get_node_ip_address(), ray.get_gpu_ids(), sorted(os.listdir(local))

out = []
for i, node in enumerate(sorted(workers, key=lambda n: n["NodeManagerAddress"])):
    strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    out.append(ray.get(write.options(scheduling_strategy=strategy).remote(f"file{i}", LOCAL)))
print(json.dumps(out))
"""


def test_nodes_are_on_loopback_with_logical_gpus(cluster):
    nodes = cluster.nodes()
    assert len(nodes) == 3
    assert sorted(n["node_ip"] for n in nodes) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert all(n["node_ip"].startswith("127.") for n in nodes)
    gpus = sorted(n["resources_total"].get("GPU", 0) for n in nodes)
    assert gpus == [0, 1, 1]
    head = next(n for n in nodes if n["is_head_node"])
    assert head["resources_total"].get("CPU", 0) == 0


def test_each_worker_has_its_own_disk(cluster):
    run = subprocess.run([sys.executable, "-c", PROBE, cluster.address, NODE_LOCAL],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    (ip0, gpus0, files0), (ip1, gpus1, files1) = json.loads(run.stdout.strip().splitlines()[-1])
    assert (ip0, ip1) == ("127.0.0.3", "127.0.0.4")
    assert gpus0 == [0] and gpus1 == [0]  # one logical GPU per node, assigned
    assert files0 == ["file0"] and files1 == ["file1"]  # node 1 cannot see node 0's file
