"""What the methods do, one step at a time (issue 12.1).

No test here compares two training runs: which method ends higher depends on
the CPU's float kernels. Method comparisons are benchmarks
(``python -m benchmarks.compare``: several seeds, the same seeds for every
method, the paired difference). These tests check the mechanism each method
relies on, on a single gradient step whose direction does not depend on
rounding: a small step along the gradient of a smooth loss lowers it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn

from avalanche_m2kd import M2KD, EducationDistillationPlugin, M2KDPlugin, M2KDRegularizer
from avalanche_m2kd.losses import M2KDLoss, TeacherOutput, kl_distillation
from avalanche_m2kd.models import digits_cnn
from avalanche_m2kd.plugins.kd import routed_distillation_loss
from avalanche_m2kd.teachers import TeacherSet

from helpers import batch_terms, quiet_evaluator, synthetic_stream


def trained_two_experiences(**kwargs):
    """An M2KD strategy after two experiences of a 3-experience toy stream."""
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = digits_cnn()
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train_mb_size=8,
                    train_epochs=2, evaluator=quiet_evaluator(), **kwargs)
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
    exp = bm.train_stream[2]
    model.train()
    avalanche_model_adaptation(model, exp)
    x = torch.stack([exp.dataset[i][0] for i in range(12)])
    y = torch.tensor([int(exp.dataset[i][1]) for i in range(12)])
    return strategy, model, x, y


def group_kl(model, plugin, x):
    """KL of the student's group logits from each snapshot's, per group."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        out = []
        for k, group in enumerate(plugin.groups):
            teacher = plugin.snapshots.teacher(k)(x)
            out.append(kl_distillation(logits[:, group], teacher[:, group], plugin.regularizer.temperature).item())
    return out


def test_one_m2kd_step_moves_each_group_towards_its_own_snapshot():
    strategy, model, x, y = trained_two_experiences()
    plugin = strategy.m2kd
    # make the student differ from its snapshots, as training on new classes does
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = group_kl(model, plugin, x)
    assert min(before) > 1e-4
    model.train()
    terms = batch_terms(plugin.regularizer, model, x, y, current_classes=[4, 5])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    terms["mm"].backward()
    optimizer.step()
    after = group_kl(model, plugin, x)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_one_sigmoid_step_moves_old_class_outputs_towards_their_snapshot_targets():
    strategy, model, x, y = trained_two_experiences(loss="bce")
    plugin = strategy.m2kd
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        targets = torch.cat([torch.sigmoid(plugin.snapshots.teacher(k)(x)[:, g]) for k, g in enumerate(plugin.groups)], 1)

    def distance():
        model.eval()
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(model(x)[:, :4], targets).item()

    before = distance()
    model.train()
    loss = batch_terms(plugin.regularizer, model, x, y, current_classes=[4, 5])["classification"]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert distance() < before


def test_one_ed_step_with_alpha_below_one_moves_group_logits_towards_the_stage_teacher():
    torch.manual_seed(0)
    student = nn.Linear(6, 5)
    t0, t1 = nn.Linear(6, 2), nn.Linear(6, 3)
    plugin = EducationDistillationPlugin(teachers=[(t0, [0, 1]), (t1, [2, 3, 4])], alpha=0.3, temperature=4.0)
    teachers = TeacherSet(plugin.teachers)
    x, y = torch.randn(16, 6), torch.tensor([0, 1, 2, 3, 4, 2, 3, 1] * 2)

    def distance():
        with torch.no_grad():
            z = student(x)
            index = teachers.route(y)
            return [
                kl_distillation(z[i][:, g], t(x[i]), 4.0).item()
                for i, g, t in zip(index, ([0, 1], [2, 3, 4]), (t0, t1))
            ]

    before = distance()
    routed = teachers.run_routed(x, y)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    # the distillation part alone (alpha < 1): the cross-entropy part is checked in test_losses
    loss = routed_distillation_loss(student(x), y, routed, teachers, 0.3, 4.0, "hinton") - 0.3 * F.cross_entropy(student(x), y)
    loss.backward()
    optimizer.step()
    after = distance()
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_all_and_last_differ_with_two_snapshots_and_each_equals_its_definition():
    """With one snapshot "all" and "last" are the same by construction; with
    two they are not. Each equals M2KDLoss on the snapshots it names."""
    strategy, model, x, y = trained_two_experiences(aux_layers=(), teacher_inference="plain")
    plugin = strategy.m2kd
    last = M2KDRegularizer(teachers="last", teacher_inference="plain", aux_layers=())
    last.groups, last.snapshots = copy.deepcopy(plugin.groups), plugin.snapshots
    model.eval()
    got_all = batch_terms(plugin.regularizer, model, x, y, current_classes=[4, 5])["mm"].item()
    got_last = batch_terms(last, model, x, y, current_classes=[4, 5])["mm"].item()
    with torch.no_grad():
        logits = model(x)
        t0, t1 = plugin.snapshots.teacher(0)(x), plugin.snapshots.teacher(1)(x)
    objective = M2KDLoss()
    want_all = objective.terms(logits, y, range(6), [TeacherOutput(t0[:, :2]), TeacherOutput(t1[:, 2:4])], [[0, 1], [2, 3]])["mm"]
    want_last = objective.terms(logits, y, range(6), [TeacherOutput(t1[:, :4])], [[0, 1, 2, 3]])["mm"]
    assert got_all == pytest.approx(want_all.item(), rel=1e-5, abs=1e-9)
    assert got_last == pytest.approx(want_last.item(), rel=1e-5, abs=1e-9)
    assert abs(got_all - got_last) > 1e-4


def test_informed_old_targets_route_the_samples_a_snapshot_never_saw_to_the_newest():
    """old_targets="informed": snapshot 0 judges its classes only on samples of
    classes it saw; on the others the newest snapshot's columns stand in. The
    plugin's classification term equals M2KDLoss on the rows routed by hand."""
    strategy, model, _, _ = trained_two_experiences(aux_layers=(), teacher_inference="plain", loss="bce", old_targets="informed")
    plugin = strategy.m2kd
    bm = synthetic_stream(3)
    samples = [bm.train_stream[e].dataset[i] for e in range(3) for i in range(4)]  # old classes' samples and new ones
    x = torch.stack([s[0] for s in samples])
    y = torch.tensor([int(s[1]) for s in samples])
    current = sorted({int(c) for c in bm.train_stream[2].classes_in_this_experience})
    model.eval()
    got = batch_terms(plugin.regularizer, model, x, y, current_classes=current)["classification"].item()
    (g0, g1), seen = plugin.groups, sorted(plugin.groups[0] + plugin.groups[1] + current)
    with torch.no_grad():
        logits = model(x)
        t0, t1 = plugin.snapshots.teacher(0)(x), plugin.snapshots.teacher(1)(x)
    knows = torch.isin(y, torch.tensor(g0)).unsqueeze(1)
    routed = [TeacherOutput(torch.where(knows, t0[:, g0], t1[:, g0])), TeacherOutput(t1[:, g1])]
    objective, n = M2KDLoss(form="bce"), plugin.regularizer.stream_classes
    want = objective.terms(logits, y, seen, routed, [g0, g1], n_outputs=n)["classification"].item()
    owner = objective.terms(logits, y, seen, [TeacherOutput(t0[:, g0]), TeacherOutput(t1[:, g1])], [g0, g1], n_outputs=n)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert abs(got - owner["classification"].item()) > 1e-5  # it does change the targets
    assert not knows.all() and knows.any()


def test_informed_old_targets_are_refused_with_sampled_teachers():
    with pytest.raises(ValueError, match="old_targets='informed' needs every snapshot"):
        M2KDPlugin(old_targets="informed", teachers_per_batch=1)
    with pytest.raises(ValueError, match="old_targets must be 'owner' or 'informed'"):
        M2KDPlugin(old_targets="newest")
