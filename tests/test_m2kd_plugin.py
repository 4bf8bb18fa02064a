"""M2KDPlugin inside Avalanche strategies: teachers, errors, state."""

import copy

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_m2kd import M2KD, M2KDPlugin
from avalanche_m2kd.losses import distill_group_logits
from avalanche_m2kd.models import digits_cnn

from helpers import batch_terms, quiet_evaluator, seed_everything, synthetic_arrays, synthetic_stream, through_a_file


def make_strategy(plugin, model=None, epochs=1, extra=()):
    model = model or digits_cnn()
    return SupervisedTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=16,
        train_epochs=epochs,
        eval_mb_size=64,
        plugins=[plugin, *extra],
        evaluator=quiet_evaluator(),
    )


def batch_of(experience, n=16):
    items = [experience.dataset[i] for i in range(n)]
    return torch.stack([i[0] for i in items]), torch.tensor([int(i[1]) for i in items])


class TeacherProbe(SupervisedPlugin):
    """Records the teachers' state at the start and end of every epoch."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin
        self.records = []

    def _snapshot(self):
        ts = self.plugin.regularizer.teacher_set
        if ts is None:
            return None
        return [
            (t.module.training, any(p.requires_grad for p in t.module.parameters()), copy.deepcopy(t.module.state_dict()))
            for t in ts.teachers
        ]

    def before_training_epoch(self, strategy, **kwargs):
        self._start = self._snapshot()

    def after_training_epoch(self, strategy, **kwargs):
        self.records.append((self._start, self._snapshot()))


def test_teachers_frozen_in_eval_mode_and_unchanged_by_training():
    """Issue 2, item 2: BatchNorm statistics and weights of every teacher are
    unchanged after an epoch of training the student."""
    bm = synthetic_stream(3)
    plugin = M2KDPlugin(aux_layers=("stage1",))
    probe = TeacherProbe(plugin)
    strategy = make_strategy(plugin, extra=[probe])
    for exp in bm.train_stream:
        strategy.train(exp)
    with_teachers = [r for r in probe.records if r[0] is not None]
    assert len(with_teachers) == 2  # experiences 2 and 3
    assert len(with_teachers[-1][0]) == 2  # two snapshots teach at experience 3
    for start, end in with_teachers:
        for (train0, grad0, state0), (train1, grad1, state1) in zip(start, end):
            assert not train0 and not train1
            assert not grad0 and not grad1
            bn_keys = [k for k in state0 if "running_mean" in k or "running_var" in k]
            assert bn_keys
            for key in state0:
                assert torch.equal(state0[key], state1[key]), key


def test_plugin_loss_equals_group_distillation_of_its_snapshots():
    """The plugin's multi-model term is distill_group_logits over the stored
    snapshots, each on its own class group."""
    bm = synthetic_stream(3)
    model = digits_cnn()
    plugin = M2KDPlugin(temperature=3.0, teacher_inference="plain", aux_layers=())  # the snapshots as stored: the definition, exactly
    strategy = make_strategy(plugin, model)
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
    assert plugin.groups == [[0, 1], [2, 3]]
    x, y = batch_of(bm.train_stream[2])
    model.train()
    avalanche_model_adaptation(model, bm.train_stream[2])
    model.eval()  # deterministic student outputs for the comparison
    terms = batch_terms(plugin.regularizer, model, x, y)
    with torch.no_grad():
        student = model(x)
        teachers = [plugin.snapshots.teacher(k)(x)[:, g] for k, g in enumerate(plugin.groups)]
    expected = distill_group_logits(student, teachers, plugin.groups, 3.0)
    assert terms["mm"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["total"].item() == pytest.approx(0.25 * expected.item(), rel=1e-5)


def test_aux_features_mode_and_fixed_linear_head():
    bm = synthetic_stream(3)
    model = digits_cnn(num_classes=6)  # fixed nn.Linear head
    plugin = M2KDPlugin(aux_layers=("stage1", "stage2"), aux="features", feature_distance="attention", snapshot_store="packnet")
    strategy = make_strategy(plugin, model)
    for exp in bm.train_stream:
        strategy.train(exp)
    assert not hasattr(model, "m2kd_aux")  # no heads in feature-matching mode
    assert set(plugin.last_terms) == {"mm", "aux_kd"}
    assert plugin.last_terms["aux_kd"].item() > 0
    assert len(plugin.snapshots) == 3


def test_bad_aux_layer_lists_valid_names():
    bm = synthetic_stream(2)
    strategy = make_strategy(M2KDPlugin(aux_layers=("stage9",)))
    with pytest.raises(ValueError) as err:
        strategy.train(bm.train_stream[0])
    message = str(err.value)
    assert "'stage9'" in message and "stage1" in message and "stage2" in message and "embedding" in message


def test_output_width_too_small_is_a_clear_error():
    bm = synthetic_stream(3)
    strategy = make_strategy(M2KDPlugin(), digits_cnn(num_classes=4))
    strategy.train(bm.train_stream[0])
    strategy.train(bm.train_stream[1])
    with pytest.raises(ValueError, match="outputs 4 logits.*class ids up to 5"):
        strategy.train(bm.train_stream[2])


def test_task_incremental_use_is_rejected():
    data = synthetic_arrays()
    train = TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train))
    test = TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    bm = nc_benchmark(train, test, n_experiences=3, task_labels=True, shuffle=False)
    strategy = make_strategy(M2KDPlugin())
    strategy.train(bm.train_stream[0])  # task 0 alone is fine
    with pytest.raises(ValueError, match="task-incremental"):
        strategy.train(bm.train_stream[1])

    class MultiHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Flatten()
            self.head = MultiHeadClassifier(64)

        def forward(self, x, task_labels=None):
            return self.head(self.body(x), task_labels)

    with pytest.raises(ValueError, match="MultiTaskModule"):
        make_strategy(M2KDPlugin(), MultiHead()).train(synthetic_stream(2).train_stream[0])


def test_repeated_classes_are_rejected():
    bm = synthetic_stream(2)
    strategy = make_strategy(M2KDPlugin())
    strategy.train(bm.train_stream[0])
    with pytest.raises(ValueError, match="repeats classes"):
        strategy.train(bm.train_stream[0])


def test_bce_plugin_must_be_the_criterion():
    bm = synthetic_stream(2)
    with pytest.raises(ValueError, match="criterion=plugin"):
        make_strategy(M2KDPlugin(loss="bce")).train(bm.train_stream[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(teachers="some"), "teachers"),
        (dict(aux="maps"), "aux"),
        (dict(loss="mse"), "loss"),
        (dict(temperature=0), "temperature"),
        (dict(mm_weight=-1), "mm_weight"),
        (dict(snapshot_store="zip"), "snapshot_store"),
        (dict(snapshot_store="packnet", prune_ratio=1.0), "prune_ratio"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M2KDPlugin(**kwargs)


def test_state_dict_round_trip_gives_the_same_losses():
    """Issue 2, item 7: snapshots, owners, class groups and auxiliary heads
    survive state_dict / torch.save / load_state_dict."""
    seed_everything(0)
    bm = synthetic_stream(3)
    model = digits_cnn()
    config = dict(aux_layers=("stage1", "stage2"), snapshot_store="packnet", prune_ratio=0.5)
    plugin = M2KDPlugin(**config)
    strategy = make_strategy(plugin, model)
    for exp in list(bm.train_stream)[:2]:
        strategy.train(exp)
    x, y = batch_of(bm.train_stream[2])
    model.train()
    avalanche_model_adaptation(model, bm.train_stream[2])
    saved = through_a_file({"plugin": plugin.state_dict(), "model": model.state_dict()})

    fresh_model = digits_cnn()
    fresh = M2KDPlugin(**config)
    fresh.regularizer.prepare_model(fresh_model, x[:1])  # attaches auxiliary heads
    # the heads grew with the classes: replay the same adaptations, then load
    for exp in list(bm.train_stream)[:3]:
        avalanche_model_adaptation(fresh_model, exp)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["plugin"])
    assert fresh.groups == plugin.groups == [[0, 1], [2, 3]]
    assert torch.equal(fresh.snapshots.owners["stage1.0.weight"], plugin.snapshots.owners["stage1.0.weight"])
    model.eval(), fresh_model.eval()
    original = batch_terms(plugin.regularizer, model, x, y)
    restored = batch_terms(fresh.regularizer, fresh_model, x, y)
    for key in original:
        assert torch.allclose(original[key], restored[key], atol=1e-6), key
    with pytest.raises(ValueError, match="configuration"):
        M2KDPlugin(snapshot_store="full").load_state_dict(saved["plugin"])


def test_m2kd_strategy_wires_plugin_and_memory_without_touching_caller_list():
    extra = []
    model = digits_cnn()
    strategy = M2KD(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        mem_size=20,
        plugins=extra,
        evaluator=quiet_evaluator(),
        train_mb_size=16,
    )
    assert extra == []
    assert strategy.m2kd in strategy.plugins and strategy.replay in strategy.plugins
    bm = synthetic_stream(3)
    for exp in bm.train_stream:
        strategy.train(exp)
    buffer = strategy.replay.storage_policy.buffer
    counts = torch.bincount(torch.tensor([int(t) for t in buffer.targets]), minlength=6)
    assert len(buffer) == 20 and counts.tolist() == [4, 4, 3, 3, 3, 3]  # 20 shared by 6 classes
    with pytest.raises(ValueError, match="mem_size"):
        M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), mem_size=-1)


def test_aux_supervision_decides_whether_the_heads_cross_entropy_reaches_the_backbone():
    """``aux_supervision="probe"``: the auxiliary heads' cross-entropy has the
    value of deep supervision, and the same gradient on the heads, but none on
    the backbone."""
    bm = synthetic_stream(2)
    seed_everything(0)
    model = digits_cnn()
    x, y = batch_of(bm.train_stream[0])
    avalanche_model_adaptation(model, bm.train_stream[0])
    grads = {}
    for supervision in ("deep", "probe"):
        plugin = M2KDPlugin(aux_layers=("stage1", "stage2"), aux_supervision=supervision)
        model.zero_grad(set_to_none=True)
        terms = batch_terms(plugin.regularizer, model, x, y, current_classes=[0, 1])  # heads attached once, on the first call
        assert set(terms) == {"aux_ce", "total"}  # no teacher yet: the heads' cross-entropy alone
        terms["aux_ce"].backward()
        grads[supervision] = (terms["aux_ce"].item(), {n: p.grad for n, p in model.named_parameters()})
    (deep_value, deep), (probe_value, probe) = grads["deep"], grads["probe"]
    assert probe_value == pytest.approx(deep_value, rel=1e-6)
    heads = [n for n in deep if n.startswith("m2kd_aux.")]
    assert heads and all(torch.allclose(probe[n], deep[n], atol=1e-7) for n in heads)
    stage1 = [n for n in deep if n.startswith("stage1.")]
    assert stage1 and all(deep[n].abs().sum() > 0 for n in stage1)
    assert all(probe[n] is None or not probe[n].any() for n in stage1)


def test_aux_supervision_is_checked():
    with pytest.raises(ValueError, match="aux_supervision must be 'deep' or 'probe'"):
        M2KDPlugin(aux_supervision="detached")
    with pytest.raises(ValueError, match="aux_supervision='probe' applies only with loss='kl'"):
        M2KDPlugin(loss="bce", aux_supervision="probe")
    assert M2KDPlugin(aux_supervision="probe").config()["aux_supervision"] == "probe"


def test_auxiliary_heads_draw_from_their_own_random_stream():
    """Building and growing the auxiliary heads leaves the global generator
    where the same model without them leaves it, and their weights still
    follow the global seed."""
    bm = synthetic_stream(2)
    example = batch_of(bm.train_stream[0], 1)[0]

    def grown(layers, seed=3):
        seed_everything(seed)
        model = digits_cnn()
        M2KDPlugin(aux_layers=layers).regularizer.prepare_model(model, example)
        avalanche_model_adaptation(model, bm.train_stream[0])
        avalanche_model_adaptation(model, bm.train_stream[1])  # the main head and the heads grow
        return model, torch.get_rng_state()

    _, without = grown(())
    (first, with_heads), (second, _) = grown(("stage1", "stage2")), grown(("stage1", "stage2"))
    assert torch.equal(with_heads, without)
    head = "heads.stage1.classifier.classifier.weight"
    assert first.m2kd_aux.state_dict()[head].shape[0] == max(bm.train_stream[1].classes_in_this_experience) + 1  # grown
    assert torch.equal(first.m2kd_aux.state_dict()[head], second.m2kd_aux.state_dict()[head])
    other, _ = grown(("stage1", "stage2"), seed=4)
    assert not torch.equal(other.m2kd_aux.state_dict()[head], first.m2kd_aux.state_dict()[head])


def test_probe_heads_leave_the_first_experience_as_without_heads():
    """Trained as probes, the auxiliary heads change nothing in the network
    before a teacher exists: the same data order, the same steps, the same
    weights as without auxiliary layers (deep supervision does change them)."""
    bm = synthetic_stream(2)
    trained = {}
    for name, kwargs in {"none": {}, "probe": {"aux_supervision": "probe"}, "deep": {}}.items():
        seed_everything(0)
        layers = () if name == "none" else ("stage1", "stage2")
        strategy = make_strategy(M2KDPlugin(aux_layers=layers, **kwargs))
        strategy.train(bm.train_stream[0])
        trained[name] = {k: v for k, v in strategy.model.state_dict().items() if not k.startswith("m2kd_aux.")}
    assert all(torch.equal(trained["probe"][k], v) for k, v in trained["none"].items())
    assert not all(torch.equal(trained["deep"][k], v) for k, v in trained["none"].items())
