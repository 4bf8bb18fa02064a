"""Options and compositions that had no test (issue 28.5): M2KD beside
Avalanche's LwFPlugin, batch-mode replay, ED's stage_lr and teacher_batch_size."""

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import LwFPlugin

from avalanche_m2kd import M2KD, EducationDistillation, M2KDPlugin, models
from helpers import quiet_evaluator, synthetic_stream


class BatchSizes(SupervisedPlugin):
    """Records each training batch's size."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def before_update(self, strategy, **kwargs):
        self.sizes.append(len(strategy.mb_y))


class LossAt(SupervisedPlugin):
    """The loss as it stands when this plugin's before_backward runs."""

    def __init__(self):
        super().__init__()
        self.values = []

    def before_backward(self, strategy, **kwargs):
        self.values.append(float(strategy.loss))


def test_m2kd_composes_with_avalanches_lwf_plugin():
    """Both add their terms to one loss: LwF's term is the loss after it minus
    the loss before it, and M2KD's terms are there too."""
    bm = synthetic_stream(n_experiences=2, shape=(1, 8, 8))
    model = models.digits_cnn()
    m2kd, before, after = M2KDPlugin(teacher_cache="off"), LossAt(), LossAt()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8, train_epochs=2,
                     evaluator=quiet_evaluator(), plugins=[m2kd, before, LwFPlugin(alpha=1.0, temperature=2.0), after])
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
    first = len(before.values) // 2  # the second experience's batches
    lwf_terms = [b - a for a, b in zip(before.values[first:], after.values[first:])]
    assert max(lwf_terms) > 0 and float(m2kd.last_terms["mm"]) > 0


def test_batch_mode_replay_puts_a_memory_batch_beside_every_data_batch():
    bm = synthetic_stream(n_experiences=2, shape=(1, 8, 8))
    model = models.digits_cnn()
    sizes = BatchSizes()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), mem_size=8, memory_replay="batch",
                    train_mb_size=4, train_epochs=1, evaluator=quiet_evaluator(), plugins=[sizes])
    strategy.train(bm.train_stream[0], num_workers=0)
    first = list(sizes.sizes)
    strategy.train(bm.train_stream[1], num_workers=0)
    assert set(first) == {4} and set(sizes.sizes[len(first):]) == {8}  # 4 data + 4 memory from the second experience on


def test_ed_stage_lr_and_teacher_batch_size_reach_the_training(monkeypatch):
    from avalanche_m2kd.plugins import ed as ed_module

    batch_sizes = []
    real = ed_module.train_group_teacher

    def spy(module, dataset, classes, epochs, opt, sched, batch_size, *args, **kwargs):
        batch_sizes.append(batch_size)
        return real(module, dataset, classes, epochs, opt, sched, batch_size, *args, **kwargs)

    monkeypatch.setattr(ed_module, "train_group_teacher", spy)
    student = models.ed_small(1, 8)
    lrs = []

    class Rates(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            lrs.append(strategy.optimizer.param_groups[0]["lr"])

    ed = EducationDistillation(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
        teacher_factory=lambda n: models.digits_cnn(num_classes=n), teacher_epochs=1, teacher_batch_size=5,
        stage_lr=[0.1, 0.02], train_mb_size=8, train_epochs=1, evaluator=quiet_evaluator(), plugins=[Rates()])
    for exp in synthetic_stream(n_experiences=3, shape=(1, 8, 8)).train_stream:
        ed.train(exp, num_workers=0)
    assert batch_sizes == [5, 5, 5]
    assert lrs == [0.1, 0.02, 0.02]  # the last rate holds for later stages
