"""ray_cluster.yaml passes Ray's own cluster-launcher schema and says what we rely on."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = nodes["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    setup = " ".join(config["setup_commands"])
    assert "pip install -q -e ~/tuneqdm" in setup and "torch==2.13.0" in setup
    assert raw["file_mounts"]["~/tuneqdm"] == "."
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key])
               for key in ("head_start_ray_commands", "worker_start_ray_commands"))
