"""A pytest plugin: per test, the XLA backend compilations of this process by function name (count, seconds),
written to /tmp/ct/tally_<worker>.json at the end (jax's monitoring event /jax/core/compile/backend_compile_duration;
subprocesses and notebook kernels are not counted). The "c" session's run, from the repository root:
    mkdir -p /tmp/ct && PYTHONPATH=benchmarks/suite_time_2026-12-06 bash scripts/test.sh -p compile_tally \
      --junitxml=/tmp/ct/junit.xml"""
import collections
import json
import os

import pytest
from jax._src import monitoring

_current = {"test": None}
_tally = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))


def _listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        entry = _tally[_current["test"]][kw.get("fun_name", "?")]
        entry[0] += 1
        entry[1] += duration


monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    yield


def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"/tmp/ct/tally_{worker}.json", "w") as f:
        json.dump({k: dict(v) for k, v in _tally.items()}, f)
