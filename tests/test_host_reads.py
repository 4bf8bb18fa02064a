"""No stalls in M2KD's training step (issue 14.2): after the first batch of an
experience, an iteration reads nothing back from the device. On a GPU each read
(``.item()``, ``.tolist()``, ``bool(tensor)``, ...) waits for every queued kernel;
here the reads are counted on the CPU, at the Python level."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch.overrides import TorchFunctionMode

from avalanche_m2kd import M2KD
from avalanche_m2kd.models import digits_cnn

from helpers import synthetic_stream

HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero", "unique"}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class CountIterations(SupervisedPlugin):
    """Counts host reads over each training iteration but the first of an experience."""

    def __init__(self):
        super().__init__()
        self.per_iteration, self._mode, self._first = [], None, True

    def before_training_exp(self, strategy, **kwargs):
        self._first = True

    def before_training_iteration(self, strategy, **kwargs):
        if not self._first:
            self._mode = HostReads()
            self._mode.__enter__()

    def after_training_iteration(self, strategy, **kwargs):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.per_iteration.append(self._mode.calls)
            self._mode = None
        self._first = False


@pytest.mark.parametrize("kwargs", [dict(aux_layers=("stage1", "stage2")), dict(loss="bce", aux_layers=("stage2",))])
def test_an_m2kd_iteration_reads_nothing_back_from_the_device(kwargs):
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = digits_cnn()
    counter = CountIterations()
    # teacher_cache="off": the augmented-data case (the cache's per-input lookup still reads the device)
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=EvaluationPlugin(loggers=[]), mem_size=6, teacher_cache="off", **kwargs)
    strategy.plugins.insert(0, counter)  # first: it starts counting before every other hook of the iteration
    for exp in bm.train_stream:
        strategy.train(exp)
    assert len(counter.per_iteration) > 5
    assert all(calls == [] for calls in counter.per_iteration), counter.per_iteration[:3]
    assert len(strategy.m2kd.snapshots) == 3
    assert {"mm"} <= set(strategy.m2kd.last_terms) or {"classification", "aux_bce"} <= set(strategy.m2kd.last_terms)


def test_the_counter_sees_a_read():
    """The probe itself can fail: a plugin that reads the loss is counted."""

    class ReadsLoss(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            float(strategy.loss)

    torch.manual_seed(0)
    bm = synthetic_stream(2)
    model = digits_cnn()
    counter = CountIterations()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=EvaluationPlugin(loggers=[]), teacher_cache="off", plugins=[counter, ReadsLoss()])
    strategy.train(bm.train_stream[0])
    assert counter.per_iteration and all("__float__" in calls for calls in counter.per_iteration)
