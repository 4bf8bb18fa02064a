"""Snapshot stores: exact rebuilds, frozen weights, memory accounting."""

import copy

import pytest
import torch
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_m2kd import M2KDPlugin, make_snapshot_store
from avalanche_m2kd.datasets import split_digits
from avalanche_m2kd.models import cifar_resnet32, digits_cnn
from avalanche_m2kd.snapshots import (
    PackNetSnapshotStore,
    class_row_layers,
    head_module_names,
    load_state_reshaped,
    prunable_weight_names,
    state_nbytes,
)

from avalanche_m2kd.taps import FeatureTaps, attach_auxiliary_heads

from helpers import ModelCopies, quiet_evaluator, seed_everything


def test_prunable_weights_exclude_heads():
    model = digits_cnn()
    names = prunable_weight_names(model)
    assert "head.classifier.weight" not in names
    assert "stage1.0.weight" in names and "embedding.1.weight" in names
    fixed = digits_cnn(num_classes=10)  # nn.Linear head: the last Linear is the head
    assert head_module_names(fixed) == ["head"]
    assert "head.weight" not in prunable_weight_names(fixed)
    with pytest.raises(ValueError, match="not found"):
        head_module_names(fixed, ["nope"])


def test_load_state_reshaped_restores_a_smaller_head():
    model = digits_cnn(num_classes=4)
    old = copy.deepcopy(model.state_dict())
    grown = digits_cnn(num_classes=7)
    load_state_reshaped(grown, old)
    x = torch.randn(3, 1, 8, 8)
    model.eval(), grown.eval()
    assert torch.equal(model(x), grown(x))
    assert grown.head.out_features == 4
    with pytest.raises(ValueError, match="architecture"):
        load_state_reshaped(grown, {"bogus": torch.zeros(1)})


@pytest.mark.parametrize("kind", ["full", "sparse", "packnet"])
def test_teacher_is_frozen_eval_copy(kind):
    model = digits_cnn(num_classes=10)
    store = make_snapshot_store(kind, prune_ratio=0.5)
    store.prune(model)
    store.add(model)
    teacher = store.teacher(0)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher is not model
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    if kind == "sparse":
        assert not torch.equal(teacher(x), model(x))  # approximate by design
    else:
        assert torch.allclose(teacher(x), model(x), atol=1e-6)  # packnet: the model itself was pruned


def test_packnet_frozen_weights_bit_identical_and_teachers_exact():
    """Issue 2, item 3: with SGD momentum and weight decay, weights frozen by
    earlier experiences do not move; teacher(k) rebuilt three experiences later
    equals a full copy taken at the end of experience k (after pruning and
    post-prune fine-tuning)."""
    seed_everything(0)
    bm = split_digits()
    model = digits_cnn()
    plugin = M2KDPlugin(snapshot_store="packnet", prune_ratio=0.6, post_prune_epochs=1, aux_layers=("stage2",))
    copies = ModelCopies()
    strategy = SupervisedTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
        train_mb_size=32,
        train_epochs=2,
        eval_mb_size=256,
        plugins=[plugin, copies],  # copies run after the plugin's pruning and fine-tuning
        evaluator=quiet_evaluator(),
    )
    for exp in list(bm.train_stream)[:4]:
        strategy.train(exp)
    store = plugin.snapshots
    assert isinstance(store, PackNetSnapshotStore)
    assert len(store) == 4
    # frozen weights: bit-identical to their values when their snapshot was taken
    live = dict(model.named_parameters())
    for k, snapshot_model in enumerate(copies.copies):
        old = dict(snapshot_model.named_parameters())
        for name, owner in store.owners.items():
            mask = owner == k + 1
            assert mask.any()
            assert torch.equal(live[name][mask], old[name][mask]), f"{name} owned by snapshot {k} moved"
    # teacher(0), rebuilt at experience 3, behaves like the copy taken at the end of experience 0
    # at the classes it teaches (the store keeps only those rows of its heads)
    x = torch.stack([bm.test_stream[i].dataset[j][0] for i in range(4) for j in range(8)])
    for k in (0, 1):
        teacher, group = store.teacher(k), plugin.groups[k]
        expected = copies.copies[k](x)
        got = teacher(x)
        assert got.shape == expected.shape
        assert torch.allclose(got[:, group], expected[:, group], atol=1e-6)
        with torch.no_grad():
            feats_t = teacher.stage2(teacher.stage1(x))
            feats_c = copies.copies[k].stage2(copies.copies[k].stage1(x))
            aux_t, aux_c = teacher.m2kd_aux([feats_t])[0], copies.copies[k].m2kd_aux([feats_c])[0]
            assert torch.allclose(aux_t[:, group], aux_c[:, group], atol=1e-6)
    # capacity: each experience kept 40% of the free weights
    assert store.free_fraction() == pytest.approx(0.6**4, abs=0.01)


def _ten_snapshots(kind, prune_ratio):
    torch.manual_seed(0)
    model = cifar_resnet32(num_classes=100)
    store = make_snapshot_store(kind, prune_ratio=prune_ratio)
    for _ in range(10):
        store.prune(model)
        with torch.no_grad():  # stand-in for training: move every weight and statistic
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        store.add(model)
    return model, store


def test_memory_packnet_sparse_full_with_ten_resnet32_snapshots():
    """Issue 2, item 4."""
    _, full = _ten_snapshots("full", 0.75)
    assert len(full) == 10
    assert full.nbytes() == full.full_copy_nbytes()
    _, packnet = _ten_snapshots("packnet", 0.75)
    assert packnet.nbytes() <= packnet.full_copy_nbytes() / 15
    _, sparse = _ten_snapshots("sparse", 0.9)
    assert sparse.nbytes() <= sparse.full_copy_nbytes() / 5
    # the three stores agree on what full copies would take
    assert packnet.full_copy_nbytes() == full.full_copy_nbytes() == sparse.full_copy_nbytes()


def test_sparse_keeps_the_largest_weights():
    model = digits_cnn(num_classes=10)
    store = make_snapshot_store("sparse", prune_ratio=0.75)
    store.add(model)
    name = "stage1.0.weight"
    original = model.state_dict()[name]
    rebuilt = store.snapshot_state(0)[name]
    kept = rebuilt != 0
    assert kept.sum().item() == round(0.25 * original.numel())
    assert torch.equal(rebuilt[kept], original[kept])
    assert original.abs()[kept].min() >= original.abs()[~kept].max()


def test_store_state_dict_round_trip_and_kind_check():
    model, store = _ten_snapshots("packnet", 0.75)
    clone = make_snapshot_store("packnet", prune_ratio=0.75)
    clone.load_state_dict(copy.deepcopy(store.state_dict()))
    clone.bind(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone.teacher(3)(x), store.teacher(3)(x))
    assert clone.nbytes() == store.nbytes()
    with pytest.raises(ValueError, match="kind"):
        make_snapshot_store("full").load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match="unknown kind"):
        make_snapshot_store("zip")
    with pytest.raises(IndexError):
        store.teacher(10)


@pytest.mark.parametrize("kind", ["full", "sparse", "packnet"])
def test_a_released_snapshot_frees_its_tensors_and_cannot_teach(kind):
    model, store = _ten_snapshots(kind, 0.75)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = store.teacher(9)(x)
    held, one = store.nbytes(), store.nbytes() - sum(
        t.numel() * t.element_size() for k in range(9) for t in store._snapshots[k].values()
    )
    for k in range(9):
        store.release(k)
    assert store.nbytes() == one < held
    assert len(store) == 10 and store.released(3) and not store.released(9)
    with pytest.raises(ValueError, match="snapshot 3 was released"):
        store.teacher(3)
    clone = make_snapshot_store(kind, prune_ratio=0.75)
    clone.load_state_dict(copy.deepcopy(store.state_dict()))
    clone.bind(model)
    with torch.no_grad():
        assert torch.equal(store.teacher(9)(x), want) and torch.equal(clone.teacher(9)(x), want)
    assert clone.released(3)
    with pytest.raises(IndexError):
        store.release(10)


def test_m2kd_with_the_last_teacher_holds_one_snapshot():
    from avalanche_m2kd import M2KD

    from helpers import synthetic_stream

    bm = synthetic_stream(3)
    stores = {}
    for teachers in ("all", "last"):
        seed_everything(0)
        model = digits_cnn()
        strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                        evaluator=quiet_evaluator(), teachers=teachers)
        for exp in bm.train_stream:
            strategy.train(exp)
        stores[teachers] = strategy.m2kd.snapshots
    all_, last = stores["all"], stores["last"]
    assert len(last) == 3 and [last.released(k) for k in range(3)] == [True, True, False]
    newest = state_nbytes(last.state_dict()["snapshots"][2])
    assert last.nbytes() == newest and all_.nbytes() > 2 * newest


def test_class_row_layers_are_each_heads_output_layer():
    model = digits_cnn()
    attach_auxiliary_heads(model, ["stage1", "stage2"], torch.randn(1, 8, 8))
    assert class_row_layers(model) == [
        "head.classifier", "m2kd_aux.heads.stage1.classifier.classifier", "m2kd_aux.heads.stage2.classifier.classifier"
    ]
    model.head = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 5))  # a custom head's hidden layer stays whole
    assert class_row_layers(model, ["head"]) == ["head.2", "m2kd_aux.heads.stage1.classifier.classifier",
                                                 "m2kd_aux.heads.stage2.classifier.classifier"]


def _heads_out(teacher, x):
    """The main head's and each auxiliary head's logits, side by side."""
    with torch.no_grad(), FeatureTaps(teacher, ["stage1", "stage2"]) as taps:
        out = teacher(x)
        return torch.stack([out] + teacher.m2kd_aux(taps.features()))


@pytest.mark.parametrize("kind", ["full", "packnet", "sparse"])
def test_keep_head_rows_keeps_the_taught_columns_bit_for_bit(kind):
    """A snapshot keeps only the head rows of the classes it will be read at:
    those columns are computed exactly as before (main and auxiliary heads),
    the others read 0 (or the growing head's mask value), the store holds less,
    and the rows survive a save and load."""
    bm = split_digits(5, class_order=[9, 4, 0, 1, 2, 3, 5, 6, 7, 8])
    exp = bm.train_stream[0]  # classes 9 and 4: every head grows to 10 rows at once
    torch.manual_seed(0)
    model = digits_cnn()
    x = torch.stack([exp.dataset[i][0] for i in range(16)])
    attach_auxiliary_heads(model, ["stage1", "stage2"], x[0])
    avalanche_model_adaptation(model, exp)
    store = make_snapshot_store(kind)
    store.add(model)
    before, held = _heads_out(store.teacher(0), x), store.nbytes()
    store.keep_head_rows(0, [4, 9])
    after = _heads_out(store.teacher(0), x)
    assert torch.equal(after[:, :, [4, 9]], before[:, :, [4, 9]])
    others = [c for c in range(10) if c not in (4, 9)]
    assert torch.equal(after[0][:, others], before[0][:, others])  # the growing head masks classes it never saw
    assert (after[1:][:, :, others] == 0).all() and (before[1:][:, :, others] != 0).all()
    dropped = 8 * (128 + 1 + 32 + 1 + 64 + 1) * 4  # 8 rows of float32 weights and bias in 3 layers of 128, 32, 64 inputs
    assert held - store.nbytes() == dropped - 3 * (2 * 8 + 8)  # less the kept rows' indices and each layer's height
    clone = make_snapshot_store(kind)
    clone.load_state_dict(store.state_dict())
    clone.bind(model)
    assert torch.equal(_heads_out(clone.teacher(0), x), after)
    store.keep_head_rows(0, [9])  # rows can be dropped further
    assert torch.equal(_heads_out(store.teacher(0), x)[:, :, 9], before[:, :, 9])
    with pytest.raises(ValueError, match=r"classes \[4\] were dropped already"):
        store.keep_head_rows(0, [4, 9])
    store.add(model)
    with pytest.raises(ValueError, match="has 10 rows, none for class 12"):
        store.keep_head_rows(1, [12])
    held = store.nbytes()
    store.keep_head_rows(1, range(10))  # every row read: kept whole, no index stored
    assert store.nbytes() == held
    store.release(1)
    with pytest.raises(ValueError, match="released"):
        store.keep_head_rows(1, [4])
