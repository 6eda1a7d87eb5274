"""Test-suite-wide settings for running the tests in parallel (pytest-xdist,
`-n 2` in scripts/test.sh). Tests are handed out in units that keep their expensive
fixtures to one worker:

- tests/cluster: one unit (the multi-node tests share one cluster on fixed loopback
  addresses, 127.0.0.2 and up, so they run one after another);
- tests/deploy: one unit (every module serves the subjects that one session fixture
  trains through the real pipeline);
- every other test module: a unit of its own (module fixtures are built once).

pytest-xdist's own `--dist loadgroup` would do this from marks, but it renames node ids
through an attribute that pytest 9.2 no longer reads, so the marks have no effect;
a scheduler of our own (xdist's LoadScopeScheduling with our units) does it instead.

Under xdist each worker uses one torch thread, so two workers fill the two cores
without oversubscribing them."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

SHARED_UNITS = ("cluster", "deploy")


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its folder for tests/cluster and
    tests/deploy, else its module."""
    module = nodeid.split("::")[0]  # tests/<folder>/test_x.py
    parts = module.split("/")
    if len(parts) > 2 and parts[1] in SHARED_UNITS:
        return "/".join(parts[:2])
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        """Whole units to workers, as they become free."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    # units in collection order (tests/cluster, the longest, among the first), not
    # xdist's default of most tests first, which started the multi-node group late and
    # left it running alone at the end
    config.option.loadscopereorder = False
    return UnitScheduling(config, log)
