"""Options that change what runs (issues 12, 13): each checked against what it promises."""

import inspect

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import initialize_icarl_net, make_icarl_net

from avalanche_m2kd import M2KD, EducationDistillation, M2KDPlugin, models
from avalanche_m2kd.plugins.ed import teacher_milestones

from helpers import quiet_evaluator, synthetic_stream


class LossAndRateSpy(SupervisedPlugin):
    """Adds a constant term to every loss and records the rate of every step."""

    def __init__(self):
        super().__init__()
        self.rates, self.losses_with_term = [], 0

    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss + 7.0
        self.losses_with_term += 1

    def before_update(self, strategy, **kwargs):
        self.rates.append(strategy.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("post_prune_lr", [None, 0.003])
def test_packnet_fine_tune_runs_at_a_controlled_rate_inside_the_same_loss(post_prune_lr):
    """Issue 13.5: a scheduler that resets the rate at the end of the experience
    (placed before M2KD, as in the runner) must not set the fine-tune's rate;
    other plugins' loss terms take part in the fine-tune."""
    from avalanche.training.plugins import LRSchedulerPlugin

    torch.manual_seed(0)
    bm = synthetic_stream(2)
    model = models.digits_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = LRSchedulerPlugin(torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], gamma=0.1), reset_lr=True)
    spy = LossAndRateSpy()
    strategy = M2KD(model=model, optimizer=optimizer, train_mb_size=8, train_epochs=2, evaluator=quiet_evaluator(),
                    plugins=[scheduler, spy], snapshot_store="packnet", post_prune_epochs=1, post_prune_lr=post_prune_lr)
    strategy.train(bm.train_stream[0])
    per_epoch = len(spy.rates) // 3  # two training epochs, then one fine-tune epoch
    assert spy.rates[:per_epoch] == [0.1] * per_epoch and spy.rates[per_epoch : 2 * per_epoch] == pytest.approx([0.01] * per_epoch)
    expected = 0.01 if post_prune_lr is None else post_prune_lr  # the last epoch's rate, or the one given
    assert spy.rates[2 * per_epoch :] == pytest.approx([expected] * per_epoch)
    assert spy.losses_with_term == len(spy.rates)  # the spy's term was in every fine-tune step too
    assert optimizer.param_groups[0]["lr"] == 0.1  # the scheduler's reset stands after the fine-tune


def test_ed_teachers_follow_the_step_schedule():
    assert teacher_milestones(240) == [150, 180, 210]
    assert teacher_milestones(8) == [5, 6, 7]
    torch.manual_seed(0)
    bm = synthetic_stream(2)
    student = models.ed_small(1, 8)
    strategy = EducationDistillation(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05),
        teacher_factory=lambda n: models.digits_cnn(num_classes=n), teacher_epochs=8, train_mb_size=8,
        evaluator=quiet_evaluator(),
    )
    strategy.train(bm.train_stream[0])
    assert strategy.ed.teacher_lrs[0] == pytest.approx([0.05] * 5 + [0.005, 0.0005, 0.00005])


def test_icarl_resnet32_is_avalanches_icarl_net():
    """Same architecture and forward as Avalanche's make_icarl_net: weights
    copied in order give bit-identical outputs; features can be negative."""
    torch.manual_seed(0)
    ours = models.create("resnet32_icarl", num_classes=100)
    theirs = make_icarl_net(100)
    theirs.apply(initialize_icarl_net)
    assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in theirs.state_dict().values()]
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert (ours.features(x) < 0).any()  # no ReLU after the last block
        assert (models.create("resnet32").features(x) >= 0).all()


def test_config_records_every_constructor_argument():
    """Result files and checkpoints record the whole configuration (issue 12.4)."""
    plugin = M2KDPlugin(teacher_cache="off", batched_teachers=True, teachers_per_batch=2, teacher_precision="bf16")
    arguments = [p for p in inspect.signature(M2KDPlugin).parameters if p != "regularizer"]  # the plugin's and the regularizer's
    config = plugin.config()
    assert sorted(config) == sorted(arguments)
    assert config["teacher_cache"] == "off" and config["batched_teachers"] is True
    assert config["teachers_per_batch"] == 2 and config["teacher_precision"] == "bf16"


def test_aux_features_with_the_sigmoid_form_keeps_multi_level_distillation():
    """aux='features' with loss='bce' used to drop the feature term silently."""
    torch.manual_seed(0)
    bm = synthetic_stream(2)
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), loss="bce", aux="features", aux_layers=("stage1",))
    for exp in bm.train_stream:
        strategy.train(exp)
    assert set(strategy.m2kd.last_terms) == {"classification", "aux_kd"}
    assert strategy.m2kd.last_terms["aux_kd"].item() > 0


def test_strategies_take_the_plugins_arguments_from_the_plugin():
    m2kd_args = set(inspect.signature(M2KD.__init__).parameters)
    assert {p for p in inspect.signature(M2KDPlugin.__init__).parameters if p != "self"} <= m2kd_args
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), temperature=3.0,
                    teachers="last", evaluator=quiet_evaluator())
    assert strategy.m2kd.regularizer.temperature == 3.0 and strategy.m2kd.regularizer.teachers == "last"
    assert strategy.train_mb_size == EducationDistillation.__init__.__signature__.parameters["train_mb_size"].default
    with pytest.raises(TypeError, match="temprature"):
        M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), temprature=3.0)


def test_teachers_per_batch_inside_a_strategy_uses_k_teachers_per_batch():
    torch.manual_seed(0)
    bm = synthetic_stream(4)
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), teachers_per_batch=1)
    calls = []

    class Count(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            teacher_set = strategy.m2kd.regularizer.teacher_set
            if teacher_set is not None:
                original = teacher_set.run_all
                teacher_set.run_all = lambda x, idx=None: calls.append(list(idx)) or original(x, idx)

    strategy.plugins.insert(0, Count())
    for exp in bm.train_stream:
        strategy.train(exp)
    assert calls and all(len(c) == 1 for c in calls)  # one snapshot per batch
    assert {c[0] for c in calls} == {0, 1, 2}  # drawn from all three over the last experience


def test_explicit_head_layers_are_stored_per_snapshot_not_pruned():
    torch.manual_seed(0)
    bm = synthetic_stream(2)
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), snapshot_store="packnet", post_prune_epochs=0,
                    head_layers=("head", "embedding.1"))
    strategy.train(bm.train_stream[0])
    store = strategy.m2kd.snapshots
    assert "embedding.1.weight" not in store.owners  # a head: never pruned or frozen
    assert "embedding.1.weight" in store.snapshot_state(0) and "stage1.0.weight" in store.owners


def test_random_exemplar_selection_fills_a_class_balanced_memory():
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), mem_size=12, exemplar_selection="random")
    for exp in bm.train_stream:
        strategy.train(exp)
    groups = strategy.replay.storage_policy.buffer_groups
    assert sorted(groups) == list(range(6)) and [len(g.buffer) for g in groups.values()] == [2] * 6


def test_informed_old_targets_train_through_the_strategy_with_auxiliary_heads():
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = models.digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), loss="bce", aux_layers=("stage1", "stage2"), old_targets="informed")
    for k, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        strategy.m2kd.regularizer.build_teachers("cpu")
        newest = strategy.m2kd.regularizer.informed_teachers
        assert (newest is None) == (k < 1)  # routing needs two snapshots
    assert newest.groups == [[c for g in strategy.m2kd.groups for c in g]]  # the newest snapshot over every old class
    assert set(strategy.m2kd.last_terms) == {"classification", "aux_bce"}
    assert all(torch.isfinite(v) for v in strategy.m2kd.last_terms.values())
    assert strategy.m2kd.config()["old_targets"] == "informed"
