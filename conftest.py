"""Test-suite-wide settings for running the tests in parallel (pytest-xdist,
`-n 2 --dist loadgroup` in scripts/test.sh). Tests are handed out in groups that keep
their expensive fixtures to one worker:

- tests/cluster: one group (the multi-node tests share fixed loopback addresses,
  127.0.0.2-4, so they run one after another);
- tests/deploy: one group (every module serves the subjects that one session fixture
  trains through the real pipeline);
- every other test module: its own group (module fixtures are built once).

Under xdist each worker uses one torch thread, so two workers fill the two cores
without oversubscribing them."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

SHARED_GROUPS = ("cluster", "deploy")


def _group(item: pytest.Item) -> str:
    module = item.nodeid.split("::")[0]  # tests/<folder>/test_x.py
    parts = module.split("/")
    if len(parts) > 2 and parts[1] in SHARED_GROUPS:
        return parts[1]
    return module


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
