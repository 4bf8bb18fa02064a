"""Exact-value tests of the pure loss functions, against plain-Python math."""

import math

import pytest
import torch
import torch.nn.functional as F

from avalanche_m2kd.losses import (
    M2KDLoss,
    attention_map,
    class_positions,
    cross_entropy_over,
    distill_group_features,
    distill_group_logits,
    education_distillation_loss,
    feature_distance,
    group_sigmoid_targets,
    group_weights,
    TeacherOutput,
    kl_distillation,
    route_unseen_rows,
    sigmoid_distillation_loss,
    soft_cross_entropy,
)


def softmax(values, t=1.0):
    exps = [math.exp(v / t) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


STUDENT = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.0, -0.5, 1.5, 2.0, 1.0]]


def test_group_weights_are_class_fractions():
    assert group_weights([[0, 1], [2, 3, 4]]) == [0.4, 0.6]
    with pytest.raises(ValueError):
        group_weights([[], []])


def test_kl_distillation_matches_hand_computation_with_t_squared():
    s = [[1.0, 2.0, 0.5]]
    t = [[0.3, -1.0, 2.0]]
    expected = 4.0 * kl(softmax(t[0], 2.0), softmax(s[0], 2.0))  # T = 2, T^2 = 4
    got = kl_distillation(torch.tensor(s), torch.tensor(t), 2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_distill_group_logits_routes_groups_weights_and_temperature():
    groups = [[0, 1], [2, 3, 4]]
    teacher = [
        [[0.5, 1.5], [1.0, 0.0]],  # snapshot 1, its own classes 0 and 1
        [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]],  # snapshot 2, classes 2, 3, 4
    ]
    temperature = 3.0
    weights = [2 / 5, 3 / 5]
    expected = 0.0
    for b in range(2):
        for k, group in enumerate(groups):
            s_slice = [STUDENT[b][c] for c in group]
            expected += weights[k] * temperature**2 * kl(softmax(teacher[k][b], temperature), softmax(s_slice, temperature))
    expected /= 2  # batch mean
    got = distill_group_logits(torch.tensor(STUDENT), [torch.tensor(t) for t in teacher], groups, temperature)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_distill_group_logits_custom_weights_and_non_contiguous_group():
    groups = [[4, 0]]  # order matters: teacher column j is class groups[k][j]
    teacher = [torch.tensor([[1.0, -1.0], [0.0, 2.0]])]
    expected = 0.0
    for b in range(2):
        expected += 0.5 * 4.0 * kl(softmax(teacher[0][b].tolist(), 2.0), softmax([STUDENT[b][4], STUDENT[b][0]], 2.0))
    got = distill_group_logits(torch.tensor(STUDENT), teacher, groups, 2.0, weights=[0.5])
    assert got.item() == pytest.approx(expected / 2, abs=1e-6)


def test_distill_group_logits_is_zero_when_student_matches_teacher():
    s = torch.tensor(STUDENT)
    got = distill_group_logits(s, [s[:, [0, 1]], s[:, [2, 3, 4]]], [[0, 1], [2, 3, 4]])
    assert got.item() == pytest.approx(0.0, abs=1e-7)


def test_distill_group_logits_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="teacher outputs"):
        distill_group_logits(torch.zeros(1, 3), [torch.zeros(1, 2)], [[0, 1], [2]])


def test_soft_cross_entropy_matches_hand_computation():
    s, t = [0.2, 1.0, -0.3], [1.0, 0.0, 0.5]
    p_t = softmax(t, 4.0)
    p_s = softmax(s, 4.0)
    expected = -sum(a * math.log(b) for a, b in zip(p_t, p_s))
    assert soft_cross_entropy(torch.tensor([s]), torch.tensor([t]), 4.0).item() == pytest.approx(expected, abs=1e-6)


def test_feature_distance_mse_and_attention():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # [1, 2 channels, 1, 2]
    b = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    assert feature_distance(a, b, "mse").item() == pytest.approx((1 + 0 + 1 + 0) / 4)
    # attention: channel mean of squares per position, L2-normalised
    att_a = [(1 + 0) / 2, (4 + 1) / 2]
    att_b = [(0 + 1) / 2, (4 + 1) / 2]
    na, nb = math.hypot(*att_a), math.hypot(*att_b)
    expected = sum((x / na - y / nb) ** 2 for x, y in zip(att_a, att_b))
    assert feature_distance(a, b, "attention").item() == pytest.approx(expected, abs=1e-6)
    assert attention_map(a).norm().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same architecture"):
        feature_distance(a, b[:, :1])
    with pytest.raises(ValueError, match="unknown kind"):
        feature_distance(a, b, "cosine")


def test_distill_group_features_weights_each_teacher():
    a = torch.ones(2, 3, 2, 2)
    t1, t2 = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 3.0)
    got = distill_group_features(a, [t1, t2], [0.25, 0.75])
    assert got.item() == pytest.approx(0.25 * 1.0 + 0.75 * 4.0)


def test_cross_entropy_over_seen_classes_ignores_other_columns():
    logits = torch.tensor(STUDENT)
    targets = torch.tensor([3, 1])
    seen = [1, 3, 4]
    expected = 0.0
    for b, y in enumerate([3, 1]):
        p = softmax([STUDENT[b][c] for c in seen])
        expected -= math.log(p[seen.index(y)])
    assert cross_entropy_over(logits, targets, seen).item() == pytest.approx(expected / 2, abs=1e-6)
    with pytest.raises(ValueError, match=r"labels \[0\]"):
        class_positions(seen, torch.tensor([0]))


def _two_stage_batch():
    """Student logits, labels and stage teachers: sample 0 belongs to stage 0,
    samples 1 and 2 to stage 1 (teachers give local logits)."""
    z = torch.tensor(STUDENT + [[0.3, 0.1, -0.2, 0.0, 0.4]])
    y = torch.tensor([1, 3, 4])
    groups = [[0, 1], [2, 3, 4]]
    t0 = torch.tensor([[0.2, 1.1]])
    t1 = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 2.0]])
    index = [torch.tensor([0]), torch.tensor([1, 2])]
    return z, y, groups, t0, t1, index


def test_education_distillation_loss_routes_each_sample_to_its_stage_teacher():
    z, y, groups, t0, t1, index = _two_stage_batch()
    alpha, temperature = 0.3, 4.0
    rows = z.tolist()
    ce = 0.0
    for b, label in enumerate(y.tolist()):
        ce -= math.log(softmax(rows[b])[label])
    ce /= 3
    kd = 0.0
    for stage, idx in enumerate(index):
        teacher = (t0, t1)[stage]
        for j, b in enumerate(idx.tolist()):
            p_t = softmax(teacher[j].tolist(), temperature)
            p_s = softmax([rows[b][c] for c in groups[stage]], temperature)
            kd -= sum(a * math.log(q) for a, q in zip(p_t, p_s))
    kd /= 3
    expected = alpha * ce + (1 - alpha) * temperature**2 * kd
    got = education_distillation_loss(z, y, [t0, t1], index, groups, alpha, temperature)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_education_distillation_with_masks_equals_the_split_form():
    """A teacher run on the whole batch, its samples kept by a mask (no count read
    from the device), gives the loss of the teacher run on its own samples."""
    z, y, groups, t0, t1, index = _two_stage_batch()
    split = education_distillation_loss(z, y, [t0, t1], index, groups, 0.3, 4.0)
    b = z.shape[0]
    masks, full = [], []
    for teacher, idx in zip((t0, t1), index):
        mask = torch.zeros(b, dtype=torch.bool)
        mask[idx] = True
        whole = torch.full((b, teacher.shape[1]), 1e4)  # rows of other stages' samples: large, and ignored
        whole[idx] = teacher
        masks.append(mask)
        full.append(whole)
    masked = education_distillation_loss(z, y, full, masks, groups, 0.3, 4.0)
    assert masked.item() == pytest.approx(split.item(), abs=1e-6)
    masks[1][index[1][0]] = False  # one sample fewer distilled: the mask is what counts
    assert education_distillation_loss(z, y, full, masks, groups, 0.3, 4.0).item() != pytest.approx(split.item(), abs=1e-4)


def test_education_distillation_alpha_one_is_exactly_cross_entropy():
    z = torch.tensor(STUDENT)
    y = torch.tensor([1, 3])
    teachers = [torch.randn(1, 2), torch.randn(1, 3)]
    index = [torch.tensor([0]), torch.tensor([1])]
    got = education_distillation_loss(z, y, teachers, index, [[0, 1], [2, 3, 4]], alpha=1.0)
    assert torch.equal(got, F.cross_entropy(z, y))
    with pytest.raises(ValueError, match="alpha"):
        education_distillation_loss(z, y, teachers, index, [[0, 1], [2, 3, 4]], alpha=1.5)


def test_education_distillation_takes_another_per_sample_loss():
    """ED "combined with distillation algorithms": logit matching in place of
    the soft cross-entropy, routed by stage the same way."""
    z, y, groups, t0, t1, index = _two_stage_batch()
    rows = z.tolist()
    ce = -sum(math.log(softmax(rows[b])[label]) for b, label in enumerate(y.tolist())) / 3
    mse = 0.0
    for stage, idx in enumerate(index):
        for j, b in enumerate(idx.tolist()):
            teacher = (t0, t1)[stage][j].tolist()
            mse += sum((rows[b][c] - t) ** 2 for c, t in zip(groups[stage], teacher)) / len(teacher)
    expected = 0.3 * ce + 0.7 * mse / 3
    got = education_distillation_loss(z, y, [t0, t1], index, groups, 0.3, 4.0, distillation="logit_mse")
    assert got.item() == pytest.approx(expected, abs=1e-5)
    calls = []

    def custom(student, teacher, temperature):
        calls.append((tuple(student.shape), temperature))
        return student.new_ones(student.shape[0])

    got = education_distillation_loss(z, y, [t0, t1], index, groups, 0.5, 2.0, distillation=custom)
    assert got.item() == pytest.approx(0.5 * ce + 0.5, abs=1e-5) and calls == [((1, 2), 2.0), ((2, 3), 2.0)]
    with pytest.raises(ValueError, match="unknown distillation 'dkd'; choose from hinton, logit_mse"):
        education_distillation_loss(z, y, [t0, t1], index, groups, distillation="dkd")


def test_group_sigmoid_targets_take_each_old_class_from_its_own_snapshot():
    y = torch.tensor([4, 2])
    columns = [0, 1, 2, 3, 4]
    teacher = [torch.tensor([[0.0, 1.0], [-1.0, 2.0]]), torch.tensor([[3.0], [0.5]])]  # groups [0,1] and [3]
    targets = group_sigmoid_targets(y, columns, teacher, [[0, 1], [3]])
    expected = [
        [sigmoid(0.0), sigmoid(1.0), 0.0, sigmoid(3.0), 1.0],
        [sigmoid(-1.0), sigmoid(2.0), 1.0, sigmoid(0.5), 0.0],
    ]
    assert torch.allclose(targets, torch.tensor(expected), atol=1e-6)


def test_sigmoid_distillation_loss_matches_hand_computation():
    logits = torch.tensor(STUDENT)
    y = torch.tensor([2, 3])
    columns = [0, 1, 2, 3]  # class 4 unseen: not part of the loss
    teacher = [torch.tensor([[0.5, -0.5], [1.0, 0.0]])]
    targets = [[sigmoid(0.5), sigmoid(-0.5), 1.0, 0.0], [sigmoid(1.0), sigmoid(0.0), 0.0, 1.0]]
    expected = 0.0
    for b in range(2):
        for j, c in enumerate(columns):
            p = sigmoid(STUDENT[b][c])
            t = targets[b][j]
            expected -= t * math.log(p) + (1 - t) * math.log(1 - p)
    expected /= 2 * len(columns)
    got = sigmoid_distillation_loss(logits, y, columns, teacher, [[0, 1]])
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_labels_outside_the_classes_fail_without_a_device_read():
    """The hot path checks labels with torch._assert_async (immediate on a CPU):
    a label above the classes, or negative, is refused, not mapped to a column."""
    logits = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="a label is not among the classes"):
        cross_entropy_over(logits, torch.tensor([3, 5, 4]), [3, 5])
    with pytest.raises(RuntimeError, match="a label is not among the classes"):
        cross_entropy_over(logits, torch.tensor([3, -2, 5]), [3, 5])


def test_route_unseen_rows_gives_each_snapshot_only_the_samples_of_classes_it_saw():
    groups = [[5, 1], [3], [0]]  # training order: snapshot 0 saw {5, 1}, snapshot 1 also {3}, snapshot 2 also {0}
    y = torch.tensor([1, 3, 0, 7])  # a sample of each group, then a class being learned now
    own = [
        TeacherOutput(torch.tensor([[10.0, 11], [12, 13], [14, 15], [16, 17]]), [torch.full((4, 2), 1.0)], [torch.full((4, 2, 2), 1.0)]),
        TeacherOutput(torch.tensor([[20.0], [21], [22], [23]]), [torch.full((4, 1), 2.0)], [torch.full((4, 2, 2), 2.0)]),
        TeacherOutput(torch.tensor([[30.0], [31], [32], [33]]), [torch.full((4, 1), 3.0)], [torch.full((4, 2, 2), 3.0)]),
    ]
    newest_logits = -torch.arange(16.0).view(4, 4)  # columns: classes 5, 1, 3, 0
    newest = TeacherOutput(newest_logits, [-torch.ones(4, 4)], [-torch.ones(4, 2, 2)])
    routed = route_unseen_rows(own, groups, newest, y)
    # group [5, 1]: only the sample of class 1 is snapshot 0's; the others are the newest's columns 0:2
    assert torch.equal(routed[0].logits, torch.tensor([[10.0, 11], [-4, -5], [-8, -9], [-12, -13]]))
    # group [3]: snapshot 1 saw classes 5, 1, 3 (rows 0, 1); rows 2, 3 from the newest's column 2
    assert torch.equal(routed[1].logits, torch.tensor([[20.0], [21], [-10], [-14]]))
    # group [0]: snapshot 2 saw every old class; only the new class's row comes from the newest
    assert torch.equal(routed[2].logits, torch.tensor([[30.0], [31], [32], [-15]]))
    assert torch.equal(routed[0].aux_logits[0][:, 0], torch.tensor([1.0, -1, -1, -1]))
    assert torch.equal(routed[1].features[0][:, 0, 0], torch.tensor([2.0, 2, -1, -1]))
    with pytest.raises(ValueError, match="4 columns, the groups hold 3 classes"):
        route_unseen_rows(own[:2], groups[:2], newest, y)


def test_m2kd_loss_reads_the_heads_cross_entropy_from_aux_ce_logits():
    """``aux_ce`` is the cross-entropy of ``aux_ce_logits`` when given (the
    probes), of ``aux_logits`` otherwise; a count that does not match is an error."""
    heads = [torch.tensor([[2.0, 0.0, 5.0]]), torch.tensor([[0.0, 1.0, 5.0]])]
    probes = [torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[1.0, 1.0, 5.0]])]
    targets, seen = torch.tensor([0]), [0, 1]
    ce = lambda z: -math.log(softmax(z)[0])  # column 2 is not seen
    objective = M2KDLoss()
    assert objective.terms(heads[0], targets, seen, aux_logits=heads)["aux_ce"].item() == pytest.approx(
        ce([2.0, 0.0]) + ce([0.0, 1.0]), abs=1e-6
    )
    assert objective.terms(heads[0], targets, seen, aux_logits=heads, aux_ce_logits=probes)["aux_ce"].item() == pytest.approx(
        2 * ce([0.0, 0.0]), abs=1e-6
    )
    with pytest.raises(ValueError, match="1 aux_ce_logits for 2 auxiliary heads"):
        objective.terms(heads[0], targets, seen, aux_logits=heads, aux_ce_logits=probes[:1])
