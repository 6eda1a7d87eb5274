"""Test-suite-wide settings for running the tests in parallel (pytest-xdist, `-n 2` in
scripts/test.sh): the multi-node cluster tests share fixed loopback addresses
(127.0.0.2-4), so they all run in one worker, one after another; every other test
picks free ports and its own Ray, and may run beside them. Under xdist each worker
uses one torch thread, so two workers fill the two cores without oversubscribing
them."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.hookimpl(trylast=True)  # after tests/cluster/conftest.py marks its tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.xdist_group("cluster"))
