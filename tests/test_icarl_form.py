"""Issue 8: M2KD in iCaRL's form, checked against Avalanche's iCaRL pieces."""

from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.losses import ICaRLLossPlugin
from avalanche.training.supervised.icarl import _ICaRLPlugin
from torch import nn
from torch.utils.data import TensorDataset

import torch.nn.functional as F

from avalanche_m2kd import M2KD, M2KDPlugin, M2KDRegularizer
from avalanche_m2kd.losses import M2KDLoss, TeacherOutput
from avalanche_m2kd.datasets import make_benchmark
from avalanche_m2kd.exemplars import icarl_herding_order
from avalanche_m2kd.models import digits_cnn
from avalanche_m2kd.plugins.nme import UNSEEN_SCORE

from helpers import batch_terms, quiet_evaluator, synthetic_arrays, synthetic_stream, train_and_eval


ORDER = [int(c) for c in torch.randperm(100, generator=torch.Generator().manual_seed(1993))]
C1, C2 = ORDER[:10], ORDER[10:20]


def icarl_reference(logits, y, old_logits=None, old_classes=()):
    """Avalanche's ICaRLLossPlugin on logits over all 100 classes."""
    icarl = ICaRLLossPlugin()
    icarl.old_classes = list(old_classes)
    icarl.old_logits = old_logits
    return icarl(logits, y)


@pytest.mark.parametrize("step", [1, 2])
def test_sigmoid_loss_and_gradient_equal_icarl_loss_plugin_on_100_classes(step):
    """Issue 13.1: iCaRL averages its sigmoid loss over all 100 outputs of a
    fixed classifier. Ours, given n_outputs=100, gives the same loss on a
    100-wide head and the same gradient on the seen columns of a growing one
    (averaging over the seen columns alone made it 10x larger at step 1)."""
    g = torch.Generator().manual_seed(step)
    seen = C1 if step == 1 else C1 + C2
    y = torch.tensor(C1 if step == 1 else C2)[torch.randint(0, 10, (16,), generator=g)]
    logits = (3 * torch.randn(16, 100, generator=g)).requires_grad_()
    old = 3 * torch.randn(16, 100, generator=g) if step == 2 else None
    outputs = [TeacherOutput(old[:, C1])] if step == 2 else []
    groups = [C1] if step == 2 else []
    objective = M2KDLoss(form="bce")

    expected = icarl_reference(logits, y, old, C1 if step == 2 else ())
    (expected_grad,) = torch.autograd.grad(expected, logits)

    # a head as wide as the stream: identical loss and gradient
    ours = objective.terms(logits, y, list(range(100)), outputs, groups, n_outputs=100)["classification"]
    (grad,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-9)

    # a growing head (only the seen columns): the same gradient on every seen column
    ours = objective.terms(logits, y, seen, outputs, groups, n_outputs=100)["classification"]
    (grad,) = torch.autograd.grad(ours, logits)
    assert torch.allclose(grad[:, seen], expected_grad[:, seen], atol=1e-9)
    assert grad[:, [c for c in range(100) if c not in seen]].abs().max() == 0
    # the old scale (a mean over the seen columns) was 100 / |seen| times larger
    mean_over_seen = objective.terms(logits, y, seen, outputs, groups)["classification"]
    (grad_mean,) = torch.autograd.grad(mean_over_seen, logits)
    assert torch.allclose(grad_mean[:, seen], grad[:, seen] * 100 / len(seen), atol=1e-7)


def test_sigmoid_form_through_the_plugin_with_two_snapshots():
    """With 2 snapshots, "all" routes each old class's target to the snapshot
    that learned it, "last" to the last snapshot; both equal a hand computation."""
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = digits_cnn()
    strategy = M2KD(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), loss="bce", teacher_inference="plain",
        train_mb_size=8, train_epochs=3, evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
    plugin = strategy.m2kd
    assert plugin.groups == [[0, 1], [2, 3]] and plugin.regularizer.stream_classes == 6
    exp = bm.train_stream[2]
    model.train()
    avalanche_model_adaptation(model, exp)
    model.eval()
    x = torch.stack([exp.dataset[i][0] for i in range(8)])
    y = torch.tensor([int(exp.dataset[i][1]) for i in range(8)])
    with torch.no_grad():
        logits = model(x)[:, :6]
        t0, t1 = plugin.snapshots.teacher(0)(x), plugin.snapshots.teacher(1)(x)

    def hand(target_old):
        target = torch.zeros(8, 6)
        target[torch.arange(8), y] = 1.0
        target[:, :4] = target_old
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / (8 * 6)

    ours_all = batch_terms(plugin.regularizer, model, x, y, current_classes=[4, 5])["classification"]
    expected_all = hand(torch.cat([torch.sigmoid(t0[:, :2]), torch.sigmoid(t1[:, 2:4])], dim=1))
    assert ours_all.item() == pytest.approx(expected_all.item(), rel=1e-5)

    last = M2KDRegularizer(loss="bce", teachers="last", bce_classes=6, teacher_inference="plain", aux_layers=())
    last.groups, last.snapshots = plugin.groups, plugin.snapshots
    ours_last = batch_terms(last, model, x, y, current_classes=[4, 5])["classification"]
    expected_last = hand(torch.sigmoid(t1[:, :4]))
    assert ours_last.item() == pytest.approx(expected_last.item(), rel=1e-5)
    # the two modes do differ here: the snapshots disagree on classes 0 and 1
    assert (torch.sigmoid(t0[:, :2]) - torch.sigmoid(t1[:, :2])).abs().max() > 0.01
    assert abs(expected_all.item() - expected_last.item()) > 1e-5


def test_sigmoid_form_needs_the_stream_width_outside_a_strategy():
    plugin = M2KDPlugin(loss="bce")
    model = digits_cnn(num_classes=4)
    with pytest.raises(ValueError, match="bce_classes"):
        batch_terms(plugin.regularizer, model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))


def test_herding_picks_the_same_exemplars_as_avalanche_icarl():
    torch.manual_seed(0)
    features = torch.randn(40, 6)
    labels = torch.tensor([0] * 25 + [1] * 15)
    data = make_benchmark(
        SimpleNamespace(
            x_train=features.numpy(), y_train=labels.numpy(), x_test=features.numpy(), y_test=labels.numpy(),
            n_classes=2, name="features",
        ),
        1,
    ).train_stream[0].dataset
    # Avalanche's iCaRL herding on the same features: a "model" whose features are the inputs
    plugin = _ICaRLPlugin(memory_size=14, fixed_memory=True)
    plugin.observed_classes = [0, 1]
    strategy = SimpleNamespace(
        experience=SimpleNamespace(benchmark=SimpleNamespace(n_classes_per_exp=[2]), dataset=data),
        clock=SimpleNamespace(train_exp_counter=0),
        model=SimpleNamespace(feature_extractor=nn.Identity()),
        device="cpu",
        eval_mb_size=8,
    )
    plugin.construct_exemplar_set(strategy)
    for label, chosen in zip((0, 1), plugin.x_memory):
        rows = features[labels == label]
        ours = icarl_herding_order(rows, n=7)
        assert len(ours) == 7
        # Avalanche keeps them in dataset order; compare the sets of rows
        assert sorted(map(tuple, chosen.tolist())) == sorted(map(tuple, rows[ours].tolist()))


def test_nme_predictions_equal_a_direct_computation():
    bm = synthetic_stream(3, shape=(1, 8, 8))
    model = digits_cnn()
    strategy = M2KD(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        mem_size=24,
        loss="bce",
        classifier="nme",
        train_mb_size=16,
        evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
    groups = {c: g.buffer for c, g in strategy.replay.storage_policy.buffer_groups.items()}
    assert sorted(groups) == [0, 1, 2, 3]
    # means, computed by hand: normalised features, averaged with the flipped images
    means = {}
    for c, data in groups.items():
        x = torch.stack([data.eval()[i][0] for i in range(len(data))])
        model.eval()
        with torch.no_grad():
            f1 = model.features(x)
            f2 = model.features(torch.flip(x, dims=[3]))
        m = ((f1 / f1.norm(dim=1, keepdim=True)).mean(0) + (f2 / f2.norm(dim=1, keepdim=True)).mean(0)) / 2
        means[c] = m / m.norm()
    for c in means:
        assert torch.allclose(strategy.nme.class_means[c], means[c], atol=1e-5)
    x = torch.stack([bm.test_stream[i].dataset[j][0] for i in range(3) for j in range(4)])
    with torch.no_grad():
        f = model.features(x)
    f = f / f.norm(dim=1, keepdim=True)
    direct = torch.stack([-(f - means[c]).norm(dim=1) for c in range(4)], dim=1).argmax(1)
    scores = strategy.nme.scores(model.features(x).detach(), 6)
    assert torch.equal(scores.argmax(1), direct)
    assert (scores[:, 4:] == UNSEEN_SCORE).all()
    # and the strategy's evaluation uses exactly these scores
    strategy.eval(bm.test_stream)
    test_x = torch.stack([bm.test_stream[i].dataset[j][0] for i in range(3) for j in range(len(bm.test_stream[i].dataset))])
    test_y = torch.tensor([int(bm.test_stream[i].dataset[j][1]) for i in range(3) for j in range(len(bm.test_stream[i].dataset))])
    with torch.no_grad():
        predicted = strategy.nme.scores(model.features(test_x), 6).argmax(1)
    accuracy = next(v for k, v in strategy.evaluator.get_last_metrics().items() if k.startswith("Top1_Acc_Stream"))
    assert accuracy == pytest.approx((predicted == test_y).float().mean().item(), abs=1e-6)


def test_icarl_form_runs_on_class_incremental_benchmark_streams():
    """Avalanche's ICaRL needs nc_benchmark streams; this works on the new API."""
    data = synthetic_arrays(n_classes=6, per_class=12)
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    test = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    train.targets, test.targets = data.y_train.tolist(), data.y_test.tolist()
    bm = class_incremental_benchmark({"train": train, "test": test}, num_experiences=3, class_order=list(range(6)))
    model = digits_cnn()
    strategy = M2KD(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        mem_size=18,
        loss="bce",
        classifier="nme",
        train_mb_size=16,
        train_epochs=3,
        evaluator=quiet_evaluator(),
    )
    train_and_eval(strategy, bm)
    plugin = strategy.m2kd
    assert plugin.groups == [[0, 1], [2, 3], [4, 5]]  # one group per experience of the new API's stream
    assert plugin.regularizer.stream_classes == 6  # the sigmoid loss's width, read from the new API's experience
    assert sorted(strategy.nme.class_means) == list(range(6))
    assert [len(g.buffer) for g in strategy.replay.storage_policy.buffer_groups.values()] == [3] * 6


def test_nme_needs_memory():
    model = digits_cnn()
    with pytest.raises(ValueError, match="mem_size > 0"):
        M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), classifier="nme")


def test_bce_columns_all_trains_every_column_of_a_fixed_head():
    """iCaRL's classifier: one output per class of the stream from the start,
    unseen classes pushed towards 0. ``bce_columns="all"`` gives that loss on
    a fixed head; ``"seen"`` leaves the unseen columns out."""
    from avalanche_m2kd import models

    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = models.create("digits_cnn", num_classes=6)
    strategy = M2KD(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), loss="bce", bce_columns="all",
        teacher_inference="plain", aux_layers=(), train_mb_size=8, train_epochs=2, evaluator=quiet_evaluator(),
    )
    strategy.train(bm.train_stream[0])
    plugin = strategy.m2kd
    exp = bm.train_stream[1]
    x = torch.stack([exp.dataset[i][0] for i in range(8)])
    y = torch.tensor([int(exp.dataset[i][1]) for i in range(8)])
    model.eval()
    with torch.no_grad():
        logits, t0 = model(x), plugin.snapshots.teacher(0)(x)
    target = torch.zeros(8, 6)
    target[torch.arange(8), y] = 1.0
    target[:, :2] = torch.sigmoid(t0[:, :2])  # classes 4 and 5, not seen yet, keep target 0
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / (8 * 6)
    got = batch_terms(plugin.regularizer, model, x, y, current_classes=[2, 3])["classification"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    seen_only = M2KDRegularizer(loss="bce", bce_classes=6, teacher_inference="plain", aux_layers=())
    seen_only.groups, seen_only.snapshots = plugin.groups, plugin.snapshots
    partial = F.binary_cross_entropy_with_logits(logits[:, :4], target[:, :4], reduction="sum") / (8 * 6)
    got_seen = batch_terms(seen_only, model, x, y, current_classes=[2, 3])["classification"]
    assert got_seen.item() == pytest.approx(partial.item(), rel=1e-5) and got_seen.item() < got.item()
    with pytest.raises(ValueError, match="bce_columns must be 'seen' or 'all'"):
        M2KDPlugin(loss="bce", bce_columns="unseen")
