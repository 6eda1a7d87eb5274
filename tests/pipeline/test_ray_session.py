"""The one Ray-session helper: which settings reach a remote cluster's workers, and
a driver inside a Ray job whose runtime env already sets them (Ray refuses to merge a
variable set twice: the `ray job submit --runtime-env-json ... -- tuneqdm-pipeline`
traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.ray_session import (
    FORWARDED_ENV,
    JOB_CONFIG_ENV,
    LOCAL_OBJECT_STORE_BYTES,
    forwarded_env,
    init_kwargs,
    job_env_vars,
)

ENV = {"HF_HUB_OFFLINE": "1", "AWS_DEFAULT_REGION": "eu-west-1", "TUNEQDM_CACHE": "/c",
       "AWS_SECRET_ACCESS_KEY": "never", "PATH": "/bin"}


def _job(env_vars) -> str:
    return json.dumps({"runtime_env": {"env_vars": env_vars} if env_vars is not None else {},
                       "metadata": {}})


def test_outside_a_job_the_listed_settings_are_forwarded_and_nothing_else():
    assert FORWARDED_ENV == ("HF_HUB_OFFLINE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                             "TUNEQDM_CACHE")
    assert forwarded_env(ENV) == {"HF_HUB_OFFLINE": "1", "AWS_DEFAULT_REGION": "eu-west-1",
                                  "TUNEQDM_CACHE": "/c"}
    assert forwarded_env({}) == {}


def test_inside_a_job_the_variables_it_sets_are_not_passed_again():
    inside = {**ENV, JOB_CONFIG_ENV: _job({"HF_HUB_OFFLINE": "1", "OTHER": "x"})}
    assert job_env_vars(inside) == {"HF_HUB_OFFLINE": "1", "OTHER": "x"}
    assert forwarded_env(inside) == {"AWS_DEFAULT_REGION": "eu-west-1", "TUNEQDM_CACHE": "/c"}
    every = {**ENV, JOB_CONFIG_ENV: _job({k: "v" for k in FORWARDED_ENV})}
    assert forwarded_env(every) == {}
    assert init_kwargs("auto", environ=every) == {"namespace": "tuneqdm",
                                                  "log_to_driver": False, "address": "auto"}
    # a job without env_vars, or a config Ray itself will judge: forward as usual
    for config in (_job(None), "not json", json.dumps(["x"])):
        assert forwarded_env({**ENV, JOB_CONFIG_ENV: config}) == forwarded_env(ENV)


def test_local_and_remote_init_settings():
    local = init_kwargs(None, num_cpus=3, dashboard=False, environ=ENV)
    assert local == {"namespace": "tuneqdm", "log_to_driver": False, "address": "local",
                     "num_cpus": 3, "include_dashboard": False,
                     "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    assert init_kwargs(None, environ=ENV)["dashboard_host"] == "127.0.0.1"
    remote = init_kwargs("ray://head:10001", environ=ENV)
    assert remote["address"] == "ray://head:10001"
    assert remote["runtime_env"] == {"env_vars": forwarded_env(ENV)}
    assert "object_store_memory" not in remote and "num_cpus" not in remote


DRIVER = """
import json, os, sys
import ray
from pipeline.ray_session import RaySession

address = sys.argv[1]
try:  # what the CLI did before: the job's variable passed a second time
    ray.init(address=address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    print("old: connected")
except ValueError as err:
    print("old: refused:", "Failed to merge the Job's runtime env" in str(err))
with RaySession(address) as session:
    @ray.remote(num_cpus=0)
    def seen():
        return {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "AWS_DEFAULT_REGION")}
    print("new: " + json.dumps(ray.get(seen.remote(), timeout=120)))
print("connected after exit:", ray.is_initialized())
"""


def test_a_driver_inside_a_job_connects_and_its_workers_get_every_setting(ray_session,
                                                                         tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AWS_DEFAULT_REGION": "eu-west-1",
           JOB_CONFIG_ENV: _job({"HF_HUB_OFFLINE": "1"})}
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(script), address], env=env, timeout=240,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "old: refused: True" in lines
    assert 'new: {"HF_HUB_OFFLINE": "1", "AWS_DEFAULT_REGION": "eu-west-1"}' in lines
    assert "connected after exit: False" in lines


def test_a_job_driver_without_address_joins_the_jobs_cluster():
    inside = {**ENV, JOB_CONFIG_ENV: _job({"HF_HUB_OFFLINE": "1"})}
    kwargs = init_kwargs(None, environ=inside)
    assert kwargs["address"] == "auto"  # not a fresh local Ray on the head
    assert "num_cpus" not in kwargs and "object_store_memory" not in kwargs
    assert init_kwargs(None, environ=ENV)["address"] == "local"
