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


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(aux_layers=("stage1", "stage2")),
        dict(loss="bce", aux_layers=("stage2",)),
        dict(loss="bce", aux_layers=("stage2",), old_targets="informed"),
    ],
)
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


@pytest.mark.parametrize("routing, reads", [("masked", []), ("split", ["tolist"])])
def test_an_ed_iteration_with_masked_routing_reads_nothing_back(routing, reads):
    """ED's default routing reads the per-teacher counts once per batch; the
    masked routing reads nothing (every stage teacher runs on the whole batch)."""
    from avalanche_m2kd import EducationDistillation
    from avalanche_m2kd.models import ed_small

    torch.manual_seed(0)
    bm = synthetic_stream(3)
    student = ed_small(1, 8)
    counter = CountIterations()
    strategy = EducationDistillation(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05), train_mb_size=8,
        evaluator=EvaluationPlugin(loggers=[]), teacher_factory=lambda n: digits_cnn(n), teacher_epochs=1,
        revisit=6, teacher_cache="off", teacher_routing=routing,
    )
    strategy.plugins.insert(0, counter)
    for exp in bm.train_stream:
        strategy.train(exp)
    assert len(counter.per_iteration) > 5
    assert all(calls == reads for calls in counter.per_iteration), counter.per_iteration[:3]
    assert len(strategy.ed.teachers) == 3


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


def test_output_cache_rows_are_looked_up_on_the_device(monkeypatch):
    """Equal inputs share a row within and across batches; a clash of the first
    fingerprint alone gives a new row, never another input's."""
    from avalanche_m2kd import teachers
    from avalanche_m2kd.teachers import OutputCache

    cache = OutputCache(1)
    a, b, c = torch.zeros(1, 3), torch.ones(1, 3), torch.full((1, 3), 2.0)
    ra, rb, ra2 = cache.rows(torch.cat([a, b, a])).tolist()
    assert ra == ra2 and {ra, rb} == {0, 1}
    assert cache.rows(torch.cat([b, c, a, c])).tolist() == [rb, 2, ra, 2]
    assert len(cache) == 3
    real = teachers.input_fingerprints

    def clashing(x):  # every input gets the first fingerprint 7; the second stays exact
        fp = real(x)
        fp[:, 0] = 7
        return fp

    monkeypatch.setattr(teachers, "input_fingerprints", clashing)
    clash = OutputCache(1)
    first = clash.rows(torch.cat([a, b])).tolist()
    assert sorted(first) == [0, 1]
    again = clash.rows(torch.cat([b, a, c])).tolist()
    for row, own in zip(again[:2], first[::-1]):  # found, or a fresh row (a miss): never the other input's
        assert row == own or row >= 2
    assert len(set(again)) == 3 and again[2] not in first


def test_ed_routing_reads_the_device_once_per_batch():
    from torch import nn

    from avalanche_m2kd.teachers import GroupTeacher, TeacherSet

    teachers = TeacherSet([GroupTeacher(nn.Linear(2, 2), [0, 3]), GroupTeacher(nn.Linear(2, 3), [1, 2, 5])])
    y = torch.tensor([5, 0, 3, 3, 1, 2, 0])
    teachers.route(y)  # builds the class table
    with HostReads() as reads:
        index = teachers.route(y)
    assert [i.tolist() for i in index] == [[1, 2, 3, 6], [0, 4, 5]]  # as nonzero() per teacher would give
    assert reads.calls == ["tolist"]
    with pytest.raises(ValueError, match=r"labels \[4, 9\] belong to no teacher's classes \[0, 1, 2, 3, 5\]"):
        teachers.route(torch.tensor([0, 4, 9]))
