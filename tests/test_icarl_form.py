"""Issue 8: M2KD in iCaRL's form, checked against Avalanche's iCaRL pieces."""

import copy
from types import SimpleNamespace

import pytest
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.losses import ICaRLLossPlugin
from avalanche.training.supervised.icarl import _ICaRLPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_m2kd import M2KD, M2KDPlugin
from avalanche_m2kd.datasets import make_benchmark
from avalanche_m2kd.exemplars import icarl_herding_order
from avalanche_m2kd.models import digits_cnn
from avalanche_m2kd.plugins.nme import UNSEEN_SCORE

from helpers import quiet_evaluator, synthetic_arrays, synthetic_stream, train_and_eval, stream_acc


def first_experience(plugin, model, bm):
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=plugin,
        train_mb_size=16,
        plugins=[plugin],
        evaluator=quiet_evaluator(),
    )
    strategy.train(bm.train_stream[0])
    return strategy


def test_bce_with_one_previous_experience_all_equals_last_equals_avalanche_icarl():
    bm = synthetic_stream(3)
    model = digits_cnn()
    plugin_all = M2KDPlugin(loss="bce")
    first_experience(plugin_all, model, bm)
    plugin_last = M2KDPlugin(loss="bce", teachers="last")
    plugin_last.groups = copy.deepcopy(plugin_all.groups)
    plugin_last.snapshots = plugin_all.snapshots
    exp = bm.train_stream[1]
    model.train()
    avalanche_model_adaptation(model, exp)
    assert model.head.classifier.out_features == 4  # exactly the seen classes 0..3
    x = torch.stack([exp.dataset[i][0] for i in range(12)])
    y = torch.tensor([int(exp.dataset[i][1]) for i in range(12)])
    model.eval()
    assert set(y.tolist()) == {2}  # the batch holds one of the experience's classes ...
    terms_all = plugin_all.compute_losses(model, x, y, current_classes=[2, 3])  # ... the loss covers both
    terms_last = plugin_last.compute_losses(model, x, y, current_classes=[2, 3])
    assert torch.allclose(terms_all["classification"], terms_last["classification"], atol=1e-7)
    # Avalanche's ICaRLLossPlugin on the same batch, logits and old model
    icarl = ICaRLLossPlugin()
    icarl.old_model = plugin_all.snapshots.teacher(0)
    icarl.old_classes = [0, 1]
    icarl.before_forward(SimpleNamespace(mb_x=x))
    with torch.no_grad():
        logits = model(x)
        expected = icarl(logits, y)
        ours = plugin_all.classification_loss(logits, y, plugin_all._build_teachers("cpu").run_all(x))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    assert terms_all["classification"].item() == pytest.approx(expected.item(), abs=1e-6)


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
    result = strategy.eval(bm.test_stream)
    assert result  # ran with the NME output in place


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
    result = train_and_eval(strategy, bm)
    assert stream_acc(result) > 0.5  # separable toy data: well above chance (1/6)
    assert sorted(strategy.nme.class_means) == list(range(6))


def test_nme_needs_memory():
    model = digits_cnn()
    with pytest.raises(ValueError, match="mem_size > 0"):
        M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), classifier="nme")
