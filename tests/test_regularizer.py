"""M2KD as a regularization object (issue 28.1 and 28.4): usable in a plain
PyTorch loop, arguments that do not apply refused, the library's defaults the
runner's."""

import pytest
import torch
import torch.nn.functional as F
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn
from torch.utils.data import DataLoader

from avalanche_m2kd import M2KD, M2KDPlugin, M2KDRegularizer
from avalanche_m2kd.losses import M2KDLoss, TeacherOutput
from avalanche_m2kd.models import digits_cnn

from avalanche_m2kd.datasets import make_benchmark

from helpers import synthetic_arrays, synthetic_stream


def _plain_loop(reg, model, stream, probe=None):
    for exp in stream:
        reg.pre_adapt(model, exp)
        avalanche_model_adaptation(model, exp)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y, *_ in DataLoader(exp.dataset, batch_size=8, shuffle=True):
            with reg.taps(model):
                logits = model(x)
            terms = reg(x, logits, y, model)
            loss = reg.total(terms) + (F.cross_entropy(logits, y) if reg.loss == "kl" else 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if probe is not None:
                probe(reg, terms)
        reg.post_adapt(model, exp)


def test_a_plain_loop_trains_with_every_snapshot_and_reuses_its_teachers():
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model, reg = digits_cnn(), M2KDRegularizer(teacher_inference="plain")
    seen = []

    def probe(reg, terms):
        seen.append((len(reg.groups), id(reg.teacher_set), sorted(terms)))

    _plain_loop(reg, model, bm.train_stream, probe)
    assert reg.aux_layers == ["stage1", "stage2"]  # "auto": the backbone's first two stages
    assert reg.groups == [[0, 1], [2, 3], [4, 5]] and len(reg.snapshots) == 3
    by_experience = {}
    for k, teacher_id, names in seen:
        by_experience.setdefault(k, set()).add((teacher_id, tuple(names)))
    assert by_experience[0] == {(id(None), ("aux_ce",))}  # no snapshot yet: deep supervision only
    for k in (1, 2):  # one teacher set per experience, built on its first call and reused
        assert len(by_experience[k]) == 1
        ((teacher_id, names),) = by_experience[k]
        assert teacher_id != id(None) and names == ("aux_ce", "aux_kd", "mm")
    # after the loop: the terms of a batch are M2KD's loss on the snapshots, computed by hand
    exp = bm.train_stream[2]
    x = torch.stack([exp.dataset[i][0] for i in range(6)])
    y = torch.tensor([int(exp.dataset[i][1]) for i in range(6)])
    reg.groups, reg.current_classes = reg.groups[:2], [4, 5]  # as during experience 3
    reg.snapshots.release(2)
    model.eval()
    with reg.taps(model):
        logits = model(x)
    got = reg(x, logits, y, model)["mm"]
    with torch.no_grad():
        outputs = [TeacherOutput(reg.snapshots.teacher(k)(x)[:, g]) for k, g in enumerate(reg.groups)]
    want = M2KDLoss().terms(logits, y, range(6), outputs, reg.groups)["mm"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_a_forward_outside_the_taps_is_named():
    bm = synthetic_stream(2)
    model, reg = digits_cnn(), M2KDRegularizer()
    reg.pre_adapt(model, bm.train_stream[0])
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match=r"inside `with regularizer.taps\(model\):`"):
        reg(x, model(x), y, model)
    with pytest.raises(RuntimeError, match=r"call pre_adapt\(model, experience\)"):
        M2KDRegularizer()(x, model(x), y, model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="bce", mm_weight=0.5), "mm_weight=0.5 applies only with loss='kl'"),
        (dict(loss="bce", aux_ce_weight=0.5), "aux_ce_weight=0.5 applies only with loss='kl' with auxiliary heads"),
        (dict(aux_layers=(), aux_weight=1.0), "aux_weight=1.0 applies only with tapped layers"),
        (dict(aux_layers=(), aux="features"), "aux='features' applies only with tapped layers"),
        (dict(feature_distance="attention"), "feature_distance='attention' applies only with aux='features'"),
        (dict(aux="features", aux_ce_weight=2.0), "aux_ce_weight=2.0 applies only with loss='kl' with auxiliary heads"),
        (dict(prune_ratio=0.5), "prune_ratio=0.5 applies only with snapshot_store='packnet' or 'sparse'"),
        (dict(bce_columns="all"), "bce_columns='all' applies only with loss='bce'"),
        (dict(bce_classes=10), "bce_classes=10 applies only with loss='bce'"),
    ],
)
def test_an_argument_that_does_not_apply_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        M2KDRegularizer(**kwargs)
    with pytest.raises(ValueError, match="M2KDPlugin: " + message.split("=")[0]):
        M2KDPlugin(**kwargs)


def test_the_plugin_refuses_options_of_other_forms_and_a_regularizer_with_arguments():
    with pytest.raises(ValueError, match="post_prune_epochs and post_prune_lr apply only with snapshot_store='packnet'"):
        M2KDPlugin(snapshot_store="sparse", post_prune_epochs=1)
    with pytest.raises(ValueError, match="give a regularizer or its arguments"):
        M2KDPlugin(M2KDRegularizer(), temperature=3.0)
    reg = M2KDRegularizer(temperature=3.0)
    assert M2KDPlugin(reg).regularizer is reg
    assert M2KDPlugin(prune_ratio=0.5, snapshot_store="packnet", post_prune_epochs=1).config()["post_prune_epochs"] == 1


def test_auto_layers_on_a_model_without_named_stages_warn_and_train_without_heads():
    bm = synthetic_stream(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    reg = M2KDRegularizer()
    with pytest.warns(UserWarning, match="names no layers to tap"):
        reg.pre_adapt(model, bm.train_stream[0])
    assert reg.aux_layers == [] and not hasattr(model, "m2kd_aux")
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    assert sorted(reg(x, model(x), y, model)) == []  # no snapshot, no heads: nothing to add


def test_the_library_defaults_are_the_runners():
    """``M2KD()`` is the runner's ``m2kd``, ``M2KD(loss="bce")`` its
    ``m2kd-bce``: one place defines each default (issue 28.4)."""
    from test_compare import build_on_digits_shape

    for name, kwargs in (("m2kd", {}), ("m2kd-bce", {"loss": "bce"}), ("m2kd-last", {"teachers": "last"})):
        _, runner = build_on_digits_shape(name, "--mem-size", "0")
        model = digits_cnn()
        library = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
        assert library.m2kd.config() == runner.m2kd.config(), name


@pytest.mark.parametrize("options", [{}, {"teachers": "last"}, {"loss": "bce", "old_targets": "informed"}, {"batched_teachers": True}])
def test_snapshot_heads_read_drops_rows_without_changing_training(options):
    """snapshot_heads="read" keeps in each snapshot's heads only the rows its
    teacher is read at: every loss and every trained weight equals the run that
    keeps whole heads, bit for bit, and the store holds less. The class order
    puts the largest class first, so the heads grow to every row at once."""
    bm = make_benchmark(synthetic_arrays(), 3, class_order=[5, 0, 3, 1, 4, 2])
    runs = {}
    for heads in ("read", "whole"):
        torch.manual_seed(0)
        model, reg, losses, held = digits_cnn(), M2KDRegularizer(snapshot_heads=heads, **options), [], []

        def probe(r, terms):
            losses.append(r.total(terms).item())
            held.append(r.snapshots.nbytes())  # teachers="last" holds one snapshot, which drops rows until it has seen every class

        _plain_loop(reg, model, bm.train_stream, probe)
        runs[heads] = losses, [p.detach().clone() for p in model.parameters()], sum(held)
    (read_losses, read_weights, read_bytes), (whole_losses, whole_weights, whole_bytes) = runs["read"], runs["whole"]
    assert read_losses == whole_losses and len(read_losses) == 9  # 3 batches of 8 in each of 3 experiences
    assert all(torch.equal(a, b) for a, b in zip(read_weights, whole_weights))
    assert read_bytes < whole_bytes
