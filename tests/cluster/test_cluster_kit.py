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
IPS = sys.argv[3].split(",")  # the live workers (a killed node may still look alive)
workers = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] in IPS]

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
    every = cluster.nodes()  # dead ones too: every address ever used is a loopback one
    assert all(n["node_ip"].startswith("127.") and n["node_ip"] != "127.0.0.1"
               for n in every)
    # the live ones (a node an earlier test killed may not be declared dead yet)
    workers = sorted(node.ip for node in cluster.live_workers())
    nodes = [n for n in every if n["state"] == "ALIVE" and n["node_ip"] in
             ("127.0.0.2", *workers)]
    assert len(workers) == 2 and len({n["node_ip"] for n in nodes}) == len(nodes) == 3
    gpus = sorted(n["resources_total"].get("GPU", 0) for n in nodes)
    assert gpus == [0, 1, 1]
    head = next(n for n in nodes if n["is_head_node"])
    assert head["node_ip"] == "127.0.0.2" and head["resources_total"].get("CPU", 0) == 0


def test_each_worker_has_its_own_disk(cluster):
    ips = ",".join(node.ip for node in cluster.live_workers())
    run = subprocess.run([sys.executable, "-c", PROBE, cluster.address, NODE_LOCAL, ips],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    (ip0, gpus0, files0), (ip1, gpus1, files1) = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted((ip0, ip1)) == sorted(node.ip for node in cluster.live_workers())
    assert gpus0 == [0] and gpus1 == [0]  # one logical GPU per node, assigned
    # node 1 cannot see node 0's file (earlier tests may have left files of their own)
    assert "file0" in files0 and "file1" not in files0
    assert "file1" in files1 and "file0" not in files1
