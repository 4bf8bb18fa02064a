"""Issue 14.5: teachers run as BatchNorm-folded, channels-last copies (the
default ``inference="fused"``): the same outputs to float rounding, the
teachers' own modules untouched, and ``"plain"`` bit for bit; ``"compiled"``
runs the fused copies through ``torch.compile`` (issue 14.4)."""

import pytest
import torch
from torch import nn

from avalanche_m2kd import GroupTeacher, TeacherSet
from avalanche_m2kd.models import digits_cnn, icarl_resnet32
from avalanche_m2kd.taps import attach_auxiliary_heads
from avalanche_m2kd.teachers import fold_batchnorm

# float32 rounding compounded over 31 folded layers; measured here: about 1e-6 of the largest logit
FOLD_RELATIVE_TOLERANCE = 1e-4


def _trained_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics that are not the identity (as a trained teacher has)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 1)
    return model.eval()


def test_folding_removes_every_batchnorm_after_a_convolution_and_keeps_the_function():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _trained_statistics(icarl_resnet32(num_classes=10), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 31
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert {n for n, _ in model.named_modules()} == {n for n, _ in folded.named_modules()}  # taps still find layers
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= FOLD_RELATIVE_TOLERANCE * want.abs().max()
    assert not torch.equal(got, want)  # it did change the arithmetic
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_only_a_batchnorm_fed_by_a_convolution_used_once_is_folded():
    conv = nn.Conv2d(2, 2, 3, padding=1)

    class Shared(nn.Module):  # the same convolution twice: folding one use would change the other
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    after_relu = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.BatchNorm2d(2))
    for model in (Shared(), after_relu):
        folded = fold_batchnorm(_trained_statistics(model, torch.randn(4, 2, 6, 6)))
        assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1


def test_a_module_fx_cannot_trace_runs_unchanged():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: symbolic tracing fails
                x = -x
            return self.bn(self.conv(x))

    model = _trained_statistics(Branchy(), torch.randn(4, 1, 6, 6))
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_fused_teacher_set_matches_plain_on_logits_aux_logits_and_features():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _trained_statistics(icarl_resnet32(num_classes=6), x)
    attach_auxiliary_heads(model, ["stage1", "stage2"], x[0])
    teachers = [GroupTeacher(model, [0]), GroupTeacher(model, [1])]  # the auxiliary heads start 2 classes wide
    with_aux = dict(feature_layers=["stage1", "stage2"], aux_logits=True)
    plain = TeacherSet(teachers, inference="plain", **with_aux).run_all(x)
    fused = TeacherSet(teachers, **with_aux).run_all(x)
    with torch.no_grad():
        assert torch.equal(plain[1].logits, model(x)[:, 1:2])  # "plain" is the module, bit for bit
    for p, f in zip(plain, fused):
        for a, b in zip([p.logits, *p.aux_logits], [f.logits, *f.aux_logits]):
            assert (a - b).abs().max() <= FOLD_RELATIVE_TOLERANCE * a.abs().max()
    plain_features = TeacherSet(teachers, feature_layers=["stage2"], inference="plain").run_all(x)[0].features[0]
    fused_features = TeacherSet(teachers, feature_layers=["stage2"]).run_all(x)[0].features[0]
    assert (fused_features - plain_features).abs().max() <= FOLD_RELATIVE_TOLERANCE * plain_features.abs().max()
    batched = TeacherSet(teachers, batched=True, **with_aux).run_all(x)
    assert all(torch.allclose(b.logits, f.logits, atol=1e-5) for b, f in zip(batched, fused))


def test_unknown_inference_is_named():
    with pytest.raises(ValueError, match="teacher_inference must be one of 'fused', 'plain', 'compiled', got 'fast'"):
        TeacherSet([GroupTeacher(nn.Linear(2, 2), [0, 1])], inference="fast")
    from avalanche_m2kd import M2KDPlugin

    with pytest.raises(ValueError, match="M2KDPlugin: teacher_inference"):
        M2KDPlugin(teacher_inference="fast")


def test_a_plugin_state_of_another_configuration_names_the_key_and_an_older_state_reads_at_the_default():
    from avalanche_m2kd import M2KDPlugin

    state = M2KDPlugin().state_dict()
    with pytest.raises(ValueError, match=r"'teacher_inference': \('fused', 'plain'\)"):
        M2KDPlugin(teacher_inference="plain").load_state_dict(state)
    del state["config"]["teacher_inference"]  # a state saved before the option existed: read at the default
    M2KDPlugin().load_state_dict(state)
    with pytest.raises(ValueError, match=r"'teacher_inference': \(None, 'plain'\)"):
        M2KDPlugin(teacher_inference="plain").load_state_dict(state)


def test_compiled_teachers_match_fused_on_logits_aux_logits_and_features_without_recompiling():
    import torch._dynamo

    from avalanche_m2kd import M2KDPlugin

    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    layers = ["stage1", "stage2"]
    models = []
    for _ in range(2):  # two snapshots: the same shapes, other weights
        model = _trained_statistics(digits_cnn(num_classes=2), x)
        attach_auxiliary_heads(model, layers, x[0])
        models.append(model)
    teachers = [GroupTeacher(models[0], [0]), GroupTeacher(models[1], [1])]  # the auxiliary heads start 2 wide
    with_aux = dict(feature_layers=layers, aux_logits=True)
    fused = TeacherSet(teachers, **with_aux).run_all(x)
    compiled_set = TeacherSet(teachers, inference="compiled", **with_aux)
    torch._dynamo.reset()
    compiled = compiled_set.run_all(x)
    for f, c in zip(fused, compiled):
        for a, b in zip([f.logits, *f.aux_logits], [c.logits, *c.aux_logits]):
            assert (a - b).abs().max() <= FOLD_RELATIVE_TOLERANCE * a.abs().max()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_set.run_all(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # the second batch reuses it
    features = TeacherSet(teachers, feature_layers=["stage2"], inference="compiled").run_all(x)[0].features[0]
    plain_features = TeacherSet(teachers, feature_layers=["stage2"], inference="plain").run_all(x)[0].features[0]
    assert (features - plain_features).abs().max() <= FOLD_RELATIVE_TOLERANCE * plain_features.abs().max()
    plugin = M2KDPlugin(aux_layers=layers, teacher_inference="compiled")
    assert plugin.config()["teacher_inference"] == "compiled"


def test_compiled_teachers_name_the_fix_when_the_compiler_fails(monkeypatch):
    import torch._dynamo.exc

    from avalanche_m2kd import teachers as teachers_module

    def failing_compile(module):
        def run(x):
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

        return run

    monkeypatch.setattr(teachers_module.torch, "compile", failing_compile)
    teacher_set = TeacherSet([GroupTeacher(nn.Linear(2, 2), [0, 1])], inference="compiled")
    with pytest.raises(RuntimeError, match="install a C\\+\\+ compiler .* or use teacher_inference='fused'"):
        teacher_set.run_all(torch.randn(3, 2))


def test_compiled_and_batched_teachers_are_refused_up_front():
    from avalanche_m2kd import M2KDPlugin

    pair = [GroupTeacher(nn.Linear(2, 2), [0]), GroupTeacher(nn.Linear(2, 2), [1])]
    with pytest.raises(ValueError, match="batched teachers .* not compiled"):
        TeacherSet(pair, batched=True, inference="compiled")
    with pytest.raises(ValueError, match="M2KDPlugin: batched_teachers .* use teacher_inference='fused'"):
        M2KDPlugin(batched_teachers=True, teacher_inference="compiled")


def test_compiled_teachers_that_give_wrong_numbers_fall_back_to_the_uncompiled_copy(monkeypatch):
    """torch.compile gave NaN and 1e35 logits under ATEN_CPU_CAPABILITY=avx2 on
    an AVX-512 machine: the first batch of each shape is checked against the
    uncompiled copy, and a wrong compiled teacher warns and runs uncompiled."""
    def broken_compile(module):
        return lambda x: tuple(t * float("nan") if isinstance(t, torch.Tensor) else t for t in module(x))

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    teacher = GroupTeacher(_trained_statistics(digits_cnn(num_classes=2), x), [0, 1])
    fused = TeacherSet([teacher]).run_all(x)[0].logits
    compiled = TeacherSet([teacher], inference="compiled")
    with pytest.warns(RuntimeWarning, match="differ from the uncompiled teacher's"):
        first = compiled.run_all(x)[0].logits
    again = compiled.run_all(x[:4])[0].logits  # another shape: no second check, no second warning
    assert torch.isfinite(first).all() and (first - fused).abs().max() <= FOLD_RELATIVE_TOLERANCE * fused.abs().max()
    assert torch.equal(again, first[:4]) or (again - first[:4]).abs().max() <= 1e-6
