"""Education Distillation: the growing student, the plugin and the strategy."""

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn

from avalanche_m2kd import EducationDistillation, EducationDistillationPlugin, GroupTeacher, models
from avalanche_m2kd.datasets import split_digits
from avalanche_m2kd.losses import education_distillation_loss
from avalanche_m2kd.models import ed_resnet20, ed_small, ed_wrn16_2, load_student_state

from helpers import quiet_evaluator, through_a_file


@pytest.fixture(scope="module")
def digits3():
    return split_digits(3)


def test_student_grows_heads_and_depth_with_the_stages(digits3):
    student = ed_small(1, 8).train()
    sizes, depths = [], []
    for exp in digits3.train_stream:  # classes 3 / 3 / 4
        avalanche_model_adaptation(student, exp)
        sizes.append(student.head.out_features)
        depths.append(student.depth)
        assert int(student.head.classifier.active_units.sum()) == sizes[-1]
    assert sizes == [3, 6, 10]
    assert depths == [1, 2, 3]
    student.eval()
    avalanche_model_adaptation(student, digits3.train_stream[2])
    assert student.depth == 3  # evaluation never grows the student


def test_feature_shapes_at_each_depth():
    student = ed_resnet20()
    x = torch.randn(2, 3, 32, 32)
    shapes = []
    for depth, classes in ((1, 2), (2, 6), (3, 10)):
        student.grow_to(depth, classes)
        shapes.append(tuple(student.features(x).shape))
        assert student(x).shape == (2, classes)
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert ed_resnet20().head.classifier.classifier.in_features == 1024  # TR1: 64 channels x 4 x 4 after 8x8 pooling
    assert student.head.body[0].__class__ is nn.BatchNorm2d  # TR3: BN, pool, linear


def test_growth_keeps_earlier_weights_and_discards_the_old_head():
    student = ed_resnet20()
    before = copy.deepcopy(student.state_dict())
    old_head = student.head
    assert student.grow_to(2, 6)
    after = student.state_dict()
    kept = [k for k in before if k.startswith(("stem.", "body.0."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert student.head is not old_head
    ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in ids for p in old_head.parameters())
    assert after["head.body.0.weight"].shape == (64, 32, 1, 1)  # TR2 replaced TR1 (64 x 16 x 1 x 1)
    assert not student.grow_to(2)  # no-op


def test_final_resnet20_student_is_the_target_plus_one_batchnorm():
    student = ed_resnet20()
    student.grow_to(3, 10)
    target = models.cifar_resnet20(num_classes=10)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(student) == count(target) + 2 * 64  # TR3's BatchNorm: weight and bias
    wrn = ed_wrn16_2()
    wrn.grow_to(3, 100)
    assert wrn(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_student_state_survives_a_fresh_rebuild():
    torch.manual_seed(0)
    student = ed_small(1, 8)
    student.grow_to(2, 6)
    state = copy.deepcopy(student.state_dict())
    torch.manual_seed(1)
    fresh = load_student_state(ed_small(1, 8), state)
    x = torch.randn(3, 1, 8, 8)
    student.eval(), fresh.eval()
    assert torch.equal(student(x), fresh(x))
    student.grow_to(3, 10), fresh.grow_to(3, 10)  # the pending group's initial weights travel too
    assert torch.equal(student.body[2][0].conv1.weight, fresh.body[2][0].conv1.weight)


class Recorder(SupervisedPlugin):
    """Labels of every training batch, teacher states per epoch, optimizer check."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin
        self.labels = []
        self.epochs = []
        self.teacher_states = []
        self.optimizer_matches_model = []

    def before_training_exp(self, strategy, **kwargs):
        self.labels.append(set())
        self.epochs.append(0)
        self.momentum_at_start = None

    def before_training_iteration(self, strategy, **kwargs):
        self.labels[-1].update(strategy.mb_y.tolist())
        if self.plugin.order == "sequential":
            stages = {next(i for i, g in enumerate(self.plugin.teacher_set.groups) if y in g) for y in strategy.mb_y.tolist()}
            assert len(stages) == 1, "sequential order mixes stages in a batch"

    def _teachers(self):
        ts = self.plugin.teacher_set
        return [(t.module.training, copy.deepcopy(t.module.state_dict())) for t in ts.teachers] if ts else []

    def before_training_epoch(self, strategy, **kwargs):
        self._start = self._teachers()
        if self.epochs[-1] == 0:  # after every plugin's before_training_exp
            in_opt = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
            self.optimizer_matches_model.append(in_opt == {id(p) for p in strategy.model.parameters()})
            self.fresh_state = len(strategy.optimizer.state) == 0

    def after_training_epoch(self, strategy, **kwargs):
        self.epochs[-1] += 1
        self.teacher_states.append((self._start, self._teachers()))


def ed_strategy(student, extra=(), lr=3e-3, epochs=2, **kwargs):
    kwargs.setdefault("teacher_factory", lambda n: models.digits_cnn(n))
    kwargs.setdefault("teacher_optimizer", lambda p: torch.optim.Adam(p, lr=lr))
    return EducationDistillation(
        model=student,
        optimizer=torch.optim.Adam(student.parameters(), lr=lr),
        train_mb_size=32,
        train_epochs=epochs,
        plugins=list(extra),
        evaluator=quiet_evaluator(),
        **kwargs,
    )


def test_teachers_frozen_optimizer_rebuilt_revisit_zero_is_strict(digits3):
    """Items 1 (optimizer), 4 (teachers frozen) and 6 (revisit=0 uses no old data)."""
    student = ed_small(1, 8)
    strategy = ed_strategy(student, revisit=0, stage_epochs=[1, 2, 1])
    recorder = Recorder(strategy.ed)
    strategy.plugins.insert(0, recorder)
    for exp in digits3.train_stream:
        strategy.train(exp)
        assert {id(p) for g in strategy.optimizer.param_groups for p in g["params"]} == {id(p) for p in student.parameters()}
    assert recorder.optimizer_matches_model == [True, True, True]
    assert recorder.fresh_state  # the optimizer was rebuilt (momentum reset) when the student grew
    assert [sorted(s) for s in recorder.labels] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert recorder.epochs == [1, 2, 1]
    for start, end in recorder.teacher_states:
        for (train0, state0), (train1, state1) in zip(start, end):
            assert not train0 and not train1
            assert any("running_mean" in k for k in state0)
            assert all(torch.equal(state0[k], state1[k]) for k in state0)
    assert len(strategy.ed.teachers) == 3
    assert [t.classes for t in strategy.ed.teachers] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert all(not p.requires_grad for t in strategy.ed.teachers for p in t.module.parameters())


def test_revisit_all_and_memory_and_sequential_order(digits3):
    student = ed_small(1, 8)
    strategy = ed_strategy(student, revisit="all", order="sequential", epochs=1)
    recorder = Recorder(strategy.ed)
    strategy.plugins.insert(0, recorder)
    for exp in digits3.train_stream:
        strategy.train(exp)
    assert [sorted(s) for s in recorder.labels] == [list(range(3)), list(range(6)), list(range(10))]
    strategy = ed_strategy(ed_small(1, 8), revisit=30, epochs=1)
    recorder = Recorder(strategy.ed)
    strategy.plugins.insert(0, recorder)
    for exp in digits3.train_stream:
        strategy.train(exp)
    assert [sorted(s) for s in recorder.labels] == [list(range(3)), list(range(6)), list(range(10))]


def test_routed_loss_sends_each_sample_to_its_stage_teacher():
    """The loss ED's plugin computes from its stage teachers: each sample is
    distilled from the teacher owning its label; nothing routed (evaluation)
    gives plain cross-entropy."""
    from avalanche_m2kd.plugins.kd import routed_distillation_loss
    from avalanche_m2kd.teachers import TeacherSet

    torch.manual_seed(0)
    t0, t1 = nn.Linear(4, 2), nn.Linear(4, 3)
    plugin = EducationDistillationPlugin(teachers=[(t0, [0, 1]), (t1, [2, 3, 4])], alpha=0.4, temperature=2.0)
    teachers = TeacherSet(plugin.teachers)
    x = torch.randn(5, 4)
    y = torch.tensor([3, 0, 4, 1, 2])
    logits = torch.randn(5, 5)
    got = routed_distillation_loss(logits, y, teachers.run_routed(x, y), teachers, 0.4, 2.0, "hinton")
    with torch.no_grad():
        i0, i1 = torch.tensor([1, 3]), torch.tensor([0, 2, 4])
        expected = education_distillation_loss(logits, y, [t0(x[i0]), t1(x[i1])], [i0, i1], [[0, 1], [2, 3, 4]], 0.4, 2.0)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.equal(plugin(logits, y), nn.functional.cross_entropy(logits, y))  # outside training


def test_masked_routing_runs_every_teacher_on_the_batch_and_keeps_the_same_loss():
    torch.manual_seed(0)
    from avalanche_m2kd.teachers import TeacherSet, group_teachers

    t0, t1 = nn.Linear(4, 2), nn.Linear(4, 3)
    teachers = TeacherSet(group_teachers([(t0, [0, 1]), (t1, [2, 3, 4])], "test"))
    x, y, logits = torch.randn(5, 4), torch.tensor([3, 0, 4, 1, 2]), torch.randn(5, 5)
    masks, outputs = teachers.run_routed(x, y, "masked")
    assert [m.tolist() for m in masks] == [[False, True, False, True, False], [True, False, True, False, True]]
    assert [o.logits.shape for o in outputs] == [(5, 2), (5, 3)]  # every teacher on the whole batch
    index, split_outputs = teachers.run_routed(x, y)
    for mask, idx, whole, own in zip(masks, index, outputs, split_outputs):
        assert torch.allclose(whole.logits[mask], own.logits, atol=1e-6)
    groups = [[0, 1], [2, 3, 4]]
    split = education_distillation_loss(logits, y, [o.logits for o in split_outputs], index, groups)
    masked = education_distillation_loss(logits, y, [o.logits for o in outputs], masks, groups)
    assert masked.item() == pytest.approx(split.item(), abs=1e-6)
    with pytest.raises(RuntimeError, match="belongs to no teacher"):
        teachers.run_routed(x, torch.tensor([0, 7, 2, 2, 1]), "masked")
    with pytest.raises(ValueError, match="teacher_routing must be one of 'split', 'masked', got 'both'"):
        EducationDistillationPlugin(teachers=[(t0, [0, 1])], teacher_routing="both")


def test_masked_routing_trains_the_same_student(digits3):
    """The two routings give the same training run up to float rounding (the
    teachers see other batch sizes). SGD, not Adam: Adam's step divides by the
    gradient's own size, so it turns last-bit differences in tiny gradients
    into whole steps."""
    finals = []
    for routing in ("split", "masked"):
        torch.manual_seed(0)
        student = ed_small(1, 8)
        strategy = EducationDistillation(
            model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05), train_mb_size=32, train_epochs=1,
            evaluator=quiet_evaluator(), teacher_factory=lambda n: models.digits_cnn(n),
            teacher_optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), teacher_routing=routing, teacher_cache="off",
        )
        for exp in list(digits3.train_stream)[:2]:
            strategy.train(exp)
        finals.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
    assert finals[0].shape == finals[1].shape
    assert torch.allclose(finals[0], finals[1], atol=1e-4), (finals[0] - finals[1]).abs().max()


def test_bad_teachers_are_clear_errors(digits3):
    ok = lambda n: models.digits_cnn(n)
    two = [(ok(3), [0, 1, 2]), (ok(3), [3, 4, 5])]
    with pytest.raises(ValueError, match="2 teachers for a stream of 3"):
        ed_strategy(ed_small(1, 8), teachers=two, teacher_factory=None).train(digits3.train_stream[0])
    wrong = [(ok(3), [0, 1, 3]), (ok(3), [2, 4, 5]), (ok(4), [6, 7, 8, 9])]
    with pytest.raises(ValueError, match=r"covers classes \[0, 1, 3\] but experience 0 has classes \[0, 1, 2\]"):
        ed_strategy(ed_small(1, 8), teachers=wrong, teacher_factory=None).train(digits3.train_stream[0])
    wide = [(ok(5), [0, 1, 2]), (ok(3), [3, 4, 5]), (ok(4), [6, 7, 8, 9])]
    with pytest.raises(ValueError, match="outputs 5 logits but covers 3 classes"):
        ed_strategy(ed_small(1, 8), teachers=wide, teacher_factory=None).train(digits3.train_stream[0])
    with pytest.raises(ValueError, match="exactly one"):
        EducationDistillationPlugin()
    with pytest.raises(ValueError, match="revisit"):
        EducationDistillationPlugin(teacher_factory=ok, revisit=-1)
    with pytest.raises(ValueError, match="criterion"):
        from avalanche.training import Naive

        model = ed_small(1, 8)
        Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), evaluator=quiet_evaluator(),
              plugins=[EducationDistillationPlugin(teacher_factory=ok)]).train(digits3.train_stream[0])


def test_more_experiences_than_groups_only_resizes_the_head():
    """The documented rule: one group per experience, then head-only growth."""
    bm = split_digits(5)
    student = ed_small(1, 8)
    strategy = ed_strategy(student, revisit=20, epochs=1)
    depths, widths = [], []
    for exp in bm.train_stream:
        strategy.train(exp)
        depths.append(student.depth)
        widths.append(student.head.out_features)
    assert depths == [1, 2, 3, 3, 3]
    assert widths == [2, 4, 6, 8, 10]


def test_given_teachers_are_used_without_training(digits3):
    teachers = []
    for exp in digits3.train_stream:
        classes = sorted(exp.classes_in_this_experience)
        teachers.append(GroupTeacher(models.digits_cnn(len(classes)), classes, columns=range(len(classes))))
    before = [copy.deepcopy(t.module.state_dict()) for t in teachers]
    strategy = ed_strategy(ed_small(1, 8), teachers=teachers, teacher_factory=None, epochs=1)
    for exp in digits3.train_stream:
        strategy.train(exp)
    for t, state in zip(teachers, before):
        assert all(torch.equal(v, t.module.state_dict()[k]) for k, v in state.items())


def test_the_plugin_owns_its_state_and_restores_it(digits3):
    """Issue 28.3: state_dict() / load_state_dict() on the plugin itself (the
    checkpoint uses them): teachers, stage classes and the revisit memory."""
    student = ed_small(1, 8)
    ed = EducationDistillation(
        model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05),
        teacher_factory=lambda n: models.digits_cnn(num_classes=n), teacher_epochs=1, revisit=6,
        train_mb_size=16, train_epochs=1, evaluator=quiet_evaluator())
    experiences = list(digits3.train_stream)
    for exp in experiences[:2]:
        ed.train(exp, num_workers=0)
    state = ed.ed.state_dict()
    assert state["stage_classes"] == ed.ed.stage_classes and len(state["teachers"]) == 2 and state["finished"] == 0
    assert sum(len(g["ids"]) for g in state["memory"]["groups"].values()) == 6

    fresh = EducationDistillationPlugin(teacher_factory=lambda n: models.digits_cnn(num_classes=n), revisit=6)
    fresh.load_state_dict(through_a_file(state), experiences, student)
    assert fresh.stage_classes == ed.ed.stage_classes
    for a, b in zip(fresh.teachers, ed.ed.teachers):
        assert a.classes == b.classes and all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    restored = fresh.state_dict()["memory"]
    assert restored == state["memory"]
    with pytest.raises(ValueError, match="not an EducationDistillationPlugin state"):
        fresh.load_state_dict({"format": "something else"})

