"""Mixed precision (issue 14.1): losses and teacher outputs in bf16 agree with
float32 within a stated tolerance; the plugin wraps exactly the student's
forward; fp16's scaler skips a non-finite step instead of raising."""

import pytest
import torch
from avalanche.training import Naive
from torch import nn

from avalanche_m2kd import M2KD, GroupTeacher, TeacherSet
from avalanche_m2kd.losses import M2KDLoss, TeacherOutput
from avalanche_m2kd.models import digits_cnn, icarl_resnet32
from avalanche_m2kd.precision import MixedPrecisionPlugin, check_precision

from helpers import quiet_evaluator, synthetic_stream

# bf16 keeps 8 bits of mantissa (a relative error of 2^-8 per rounding), compounded
# over a ResNet-32's 31 layers. Measured here: 0.46% of the largest logit.
BF16_LOGIT_RELATIVE_TOLERANCE = 0.02
BF16_LOSS_RELATIVE_TOLERANCE = 0.05


def test_teacher_outputs_in_bf16_agree_with_fp32():
    torch.manual_seed(0)
    teachers = [GroupTeacher(icarl_resnet32(num_classes=10), range(10))]
    x = torch.randn(16, 3, 32, 32)
    fp32 = TeacherSet(teachers).run_all(x)[0].logits
    bf16 = TeacherSet(teachers, precision="bf16").run_all(x)[0].logits
    assert bf16.dtype == torch.float32  # outputs come back in float32 (and are cached so)
    assert (bf16 - fp32).abs().max() <= BF16_LOGIT_RELATIVE_TOLERANCE * fp32.abs().max()
    assert not torch.equal(bf16, fp32)  # it did run in reduced precision


@pytest.mark.parametrize("form", ["kl", "bce"])
def test_m2kd_losses_on_bf16_outputs_agree_with_fp32(form):
    torch.manual_seed(0)
    model = icarl_resnet32(num_classes=6)
    snapshot = icarl_resnet32(num_classes=6)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(3, 6, (16,))
    objective = M2KDLoss(form=form)

    def terms(precision):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), torch.no_grad():
            logits, teacher = model(x).float(), snapshot(x).float()[:, :3]
        return objective.terms(logits, y, range(6), [TeacherOutput(teacher)], [[0, 1, 2]], n_outputs=100)

    full, half = terms("fp32"), terms("bf16")
    assert set(full) == set(half)
    for name in full:
        assert half[name].item() == pytest.approx(full[name].item(), rel=BF16_LOSS_RELATIVE_TOLERANCE), name


def test_plugin_autocasts_the_student_forward_only_and_returns_float32():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = digits_cnn()

        def forward(self, x):
            seen["autocast"] = torch.is_autocast_cpu_enabled()
            return self.net(x)

    torch.manual_seed(0)
    bm = synthetic_stream(2)
    model = Probe()
    outputs = []

    class Spy(MixedPrecisionPlugin.__mro__[1]):  # a SupervisedPlugin
        def after_forward(self, strategy, **kwargs):
            outputs.append((strategy.mb_output.dtype, torch.is_autocast_cpu_enabled()))

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                     evaluator=quiet_evaluator(), plugins=[MixedPrecisionPlugin("bf16"), Spy()])
    strategy.train(bm.train_stream[0])
    assert seen["autocast"] is True
    assert outputs and all(dtype == torch.float32 and not inside for dtype, inside in outputs)


@pytest.mark.parametrize("baseline", ["lwf", "icarl"])
def test_avalanche_baselines_run_their_previous_model_outside_the_student_autocast(baseline):
    """What docs/runner.md says of --precision: Avalanche's LwF calls its previous
    model in before_backward and ICaRL in before_forward, both outside the
    plugin's autocast, so those teachers run in float32 (and cost float32's time)
    while the student runs in bf16."""
    from avalanche.training import ICaRL, LwF

    from avalanche_m2kd.models import feature_extractor

    calls, in_iteration = [], [False]

    class Probe(nn.Module):  # records, per module instance, whether autocast was on in a training iteration
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if in_iteration[0]:  # not herding or class means, which ICaRL runs after training
                calls.append((id(self), torch.is_autocast_cpu_enabled()))
            return self.inner(x)

    class Iterations(MixedPrecisionPlugin.__mro__[1]):  # a SupervisedPlugin
        def before_training_iteration(self, strategy, **kwargs):
            in_iteration[0] = True

        def after_training_iteration(self, strategy, **kwargs):
            in_iteration[0] = False

    torch.manual_seed(0)
    bm = synthetic_stream(2)
    common = dict(train_mb_size=8, train_epochs=1, evaluator=quiet_evaluator(), plugins=[MixedPrecisionPlugin("bf16"), Iterations()])
    if baseline == "lwf":
        student = Probe(digits_cnn())
        strategy = LwF(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.05),
                       criterion=nn.CrossEntropyLoss(), alpha=1.0, temperature=2.0, **common)
    else:
        backbone = digits_cnn(num_classes=10)
        student, classifier = Probe(feature_extractor(backbone)), nn.Linear(backbone.feature_dim, 10)
        strategy = ICaRL(feature_extractor=student, classifier=classifier, memory_size=20, buffer_transform=None,
                         fixed_memory=True, optimizer=torch.optim.SGD([*student.parameters(), *classifier.parameters()], lr=0.05),
                         **common)
    strategy.train(bm.train_stream[0])
    calls.clear()
    strategy.train(bm.train_stream[1])
    inside = {}  # is-the-student -> the autocast states its calls saw
    for who, on in calls:
        inside.setdefault(who == id(student), set()).add(on)
    assert inside == {True: {True}, False: {False}}  # the student in bf16, its previous model in float32


def test_fp16_scaler_skips_a_non_finite_step_instead_of_raising():
    """On CPU for the test (the runner allows fp16 on CUDA only): an inf in the
    loss makes the scaler skip the step, lower its scale, and M2KD not raise."""
    torch.manual_seed(0)
    bm = synthetic_stream(3)
    model = digits_cnn()
    precision = MixedPrecisionPlugin("fp16")
    strategy = M2KD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                    evaluator=quiet_evaluator(), plugins=[precision])
    strategy.train(bm.train_stream[0])
    scale = strategy.grad_scaler.get_scale()
    before = {k: v.clone() for k, v in model.state_dict().items() if "weight" in k}

    class Poison(MixedPrecisionPlugin.__mro__[1]):
        def before_backward(self, strategy, **kwargs):
            strategy.loss = strategy.loss * float("inf")

    strategy.plugins.append(Poison())
    strategy.train_epochs = 1
    strategy.train(bm.train_stream[1])  # every step non-finite: all skipped, no exception
    assert strategy.grad_scaler.get_scale() < scale
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if after[k].shape == v.shape)


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="teacher_precision|precision"):
        M2KD(model=digits_cnn(), optimizer=torch.optim.SGD(digits_cnn().parameters(), lr=0.1), teacher_precision="half")
