import multiprocessing.process
import os
import subprocess
import sys
import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
os.environ.setdefault("M2KD_QUICK", "1")
# One torch thread per test process: at two threads torch becomes erratic and
# several times slower as soon as any other process runs (make test runs two
# pytest workers instead; see the Makefile).
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest

TRAINED_KEY = "avalanche_m2kd/trained"
"""The pytest cache entry listing the tests that took an optimizer step in
the last full run: those are the ``training`` tests, which CI runs a second
time under another CPU kernel set (ATEN_CPU_CAPABILITY=avx2), as another
machine would pick."""


@pytest.fixture(autouse=True)
def _record_training(request, monkeypatch):
    """Marks the test's report when a torch optimizer stepped during it, or
    when it started a child process (the runner, a notebook's kernel, --jobs
    workers, torchrun: in this suite they all train)."""
    stepped = []

    def flag(*args, **kwargs):
        stepped.append(True)

    def flagging(original):
        def start(self, *args, **kwargs):
            flag()
            return original(self, *args, **kwargs)

        return start

    handle = register_optimizer_step_post_hook(flag)
    monkeypatch.setattr(subprocess.Popen, "__init__", flagging(subprocess.Popen.__init__))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", flagging(multiprocessing.process.BaseProcess.start))
    try:
        yield
    finally:
        handle.remove()
        if stepped:
            request.node.user_properties.append(("trained", True))


def pytest_collection_modifyitems(config, items):
    """Derived, not listed: a test is ``training`` if it stepped an optimizer
    in the last full run (the cache); with no such record (a fresh clone),
    every test counts, so nothing that trains is left out."""
    trained = config.cache.get(TRAINED_KEY, None) if getattr(config, "cache", None) is not None else None
    for item in items:
        if trained is None or item.nodeid in trained:
            item.add_marker(pytest.mark.training)


class _TrainedRecorder:
    def __init__(self):
        self.trained, self.seen = set(), set()

    def pytest_runtest_logreport(self, report):  # on the controller too under pytest-xdist
        if report.when == "teardown":  # the fixture marks the test as it ends, after the call's report
            self.seen.add(report.nodeid)
            if ("trained", True) in report.user_properties:
                self.trained.add(report.nodeid)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a plain run) keeps the record
        config._m2kd_trained = _TrainedRecorder()
        config.pluginmanager.register(config._m2kd_trained, "m2kd-trained")


def pytest_sessionfinish(session, exitstatus):
    recorder = getattr(session.config, "_m2kd_trained", None)
    if recorder is None or getattr(session.config, "cache", None) is None or not recorder.seen:
        return
    previous = set(session.config.cache.get(TRAINED_KEY, []))
    # tests not run this time keep their old verdict; the ones run are re-decided
    session.config.cache.set(TRAINED_KEY, sorted((previous - recorder.seen) | recorder.trained))
