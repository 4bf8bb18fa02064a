"""On a GPU (issue 14.2): after the first batch of an experience, an M2KD and
an ED training iteration make no host-device synchronisation, checked by
``torch.cuda.set_sync_debug_mode("error")``. The CPU suite counts host reads
instead (``test_host_reads.py``). Run with ``make test-gpu`` on a machine with
CUDA; the default run leaves these out, and without CUDA they fail, not skip."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from avalanche_m2kd import M2KD, EducationDistillation
from avalanche_m2kd.models import digits_cnn, ed_small

from helpers import synthetic_stream

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device: run `make test-gpu` on a GPU machine")
    yield
    torch.cuda.set_sync_debug_mode("default")  # a failed iteration leaves it on


class NoSyncAfterFirstBatch(SupervisedPlugin):
    """Every iteration but the first of an experience runs with synchronising
    CUDA calls turned into errors (the batch's copy to the device comes before)."""

    def __init__(self):
        super().__init__()
        self.checked, self._first, self._on = 0, True, False

    def before_training_exp(self, strategy, **kwargs):
        self._first = True

    def before_training_iteration(self, strategy, **kwargs):
        if not self._first:
            torch.cuda.set_sync_debug_mode("error")
            self._on = True

    def after_training_iteration(self, strategy, **kwargs):
        if self._on:
            torch.cuda.set_sync_debug_mode("default")
            self._on = False
            self.checked += 1
        self._first = False


@pytest.mark.parametrize("kwargs", [dict(aux_layers=("stage1", "stage2")), dict(loss="bce", aux_layers=("stage2",))])
def test_an_m2kd_iteration_does_not_synchronise(kwargs):
    torch.manual_seed(0)
    model = digits_cnn()
    probe = NoSyncAfterFirstBatch()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8, device="cuda",
                    evaluator=EvaluationPlugin(loggers=[]), mem_size=6, teacher_cache="off", **kwargs)
    strategy.plugins.insert(0, probe)
    for exp in synthetic_stream(3).train_stream:
        strategy.train(exp)
    assert probe.checked > 5 and len(strategy.m2kd.snapshots) == 3


def test_an_ed_iteration_with_masked_routing_does_not_synchronise():
    torch.manual_seed(0)
    student = ed_small(1, 8)
    probe = NoSyncAfterFirstBatch()
    strategy = EducationDistillation(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05), train_mb_size=8, device="cuda",
        evaluator=EvaluationPlugin(loggers=[]), teacher_factory=lambda n: digits_cnn(n), teacher_epochs=1,
        revisit=6, teacher_cache="off", teacher_routing="masked",
    )
    strategy.plugins.insert(0, probe)
    for exp in synthetic_stream(3).train_stream:
        strategy.train(exp)
    assert probe.checked > 5 and len(strategy.ed.teachers) == 3
