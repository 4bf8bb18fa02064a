"""Issue 14.3: training data on the device, augmented a batch at a time with
the distribution of torchvision's per-sample crop and flip."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from avalanche_m2kd.device_data import DeviceBatches, DeviceDataPlugin, random_crop_flip

SIDE, PAD, N = 6, 2, 6000


def _outcomes(images):
    return Counter(tuple(img.flatten().tolist()) for img in images)


def test_crop_and_flip_have_torchvision_distribution():
    torch.manual_seed(0)
    image = torch.arange(1, 2 * SIDE * SIDE + 1, dtype=torch.float32).view(1, 2, SIDE, SIDE)  # every pixel distinct, none 0
    ours = _outcomes(random_crop_flip(image.expand(N, -1, -1, -1), padding=PAD))
    reference = v2.Compose([v2.RandomCrop(SIDE, padding=PAD), v2.RandomHorizontalFlip()])
    theirs = _outcomes(reference(image[0]) for _ in range(N))
    n_outcomes = (2 * PAD + 1) ** 2 * 2  # crop offsets x flips
    assert set(ours) == set(theirs) and len(ours) == n_outcomes
    expected = N / n_outcomes  # 50 here; a count off by more than half is > 7 standard deviations
    for outcome in ours:
        assert 0.5 * expected < ours[outcome] < 1.5 * expected
        assert 0.5 * expected < theirs[outcome] < 1.5 * expected


def test_half_of_the_images_are_mirrored():
    torch.manual_seed(1)
    row = torch.arange(1, SIDE + 1, dtype=torch.float32).view(1, 1, 1, SIDE).expand(N, 1, SIDE, SIDE)
    out = random_crop_flip(row, padding=PAD)[:, 0, SIDE // 2]  # a row that is never padding
    mirrored = [float(r[r > 0][0]) > float(r[r > 0][-1]) for r in out]  # the visible pixels run backwards
    assert abs(sum(mirrored) / N - 0.5) < 0.03
    assert not any(random_crop_flip(row[:500], padding=0, flip=False)[:, 0, 0, 0] != 1)  # no padding, no flip: unchanged


def test_padding_uses_the_fill_of_each_channel():
    torch.manual_seed(2)
    x = torch.full((512, 2, 4, 4), 9.0)
    out = random_crop_flip(x, padding=4, fill=torch.tensor([-1.0, -2.0]))
    values = set(out[:, 0].unique().tolist()) | set(out[:, 1].unique().tolist())
    assert values == {9.0, -1.0, -2.0}
    assert set(out[:, 0].unique().tolist()) == {9.0, -1.0} and set(out[:, 1].unique().tolist()) == {9.0, -2.0}
    with pytest.raises(ValueError, match=r"expected a \[B, C, H, W\] batch"):
        random_crop_flip(torch.zeros(3, 4, 4))


def test_device_batches_cover_every_sample_once_per_pass():
    torch.manual_seed(3)
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    batches = DeviceBatches(x, torch.arange(10), torch.zeros(10, dtype=torch.long), batch_size=4)
    assert len(batches) == 3
    first = [b for b in batches]
    assert [len(b[1]) for b in first] == [4, 4, 2]
    seen = torch.cat([b[1] for b in first])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))  # shuffled
    assert all(torch.equal(b[0].flatten(), b[1].float()) for b in first)  # images follow their labels


def test_a_plugin_that_replaces_the_loader_afterwards_is_refused():
    plugin = DeviceDataPlugin()
    plugin._batches = DeviceBatches(torch.zeros(2, 1, 1, 1), torch.zeros(2), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="another plugin replaced the training loader with a list"):
        plugin.before_training_epoch(SimpleNamespace(dataloader=[]))


def test_runner_device_data_moves_augmentation_off_the_datasets():
    from benchmarks.compare import build_parser, prepare_data, resolve_config

    args = ["--preset", "fmnist-quick", "--dataset", "digits", "--model", "digits_cnn", "--strategies", "naive", "--device-data"]
    config = resolve_config(build_parser().parse_args(args))
    config["augment"] = True
    data, benchmark, _, augmentation = prepare_data(config)
    sample = benchmark.train_stream[0].dataset[0][0]
    again = benchmark.train_stream[0].dataset[0][0]
    assert torch.equal(sample, again)  # the dataset no longer augments
    assert augmentation.on_device and augmentation.buffer_transform is None
    (plugin,) = augmentation.last_plugins()
    assert isinstance(plugin, DeviceDataPlugin) and plugin.augment and plugin.padding == 4
    black = torch.zeros(1, 1, 1, dtype=torch.from_numpy(data.x_train[:1]).dtype)
    normalized_black = (black.float() / (255.0 if black.dtype == torch.uint8 else 1.0) - float(data.x_train.mean())) / float(data.x_train.std())
    assert torch.allclose(plugin.fill, normalized_black.flatten(), atol=1e-3)


def _device_strategy(plugin, augment=True):
    from avalanche.training import Naive

    from avalanche_m2kd.models import digits_cnn
    from helpers import quiet_evaluator

    model = digits_cnn()
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=8, train_epochs=2,
                 evaluator=quiet_evaluator(), plugins=[plugin, DeviceDataPlugin(augment=augment, padding=2)])


def test_device_augmentation_turns_the_teacher_cache_off_instead_of_filling_it(recwarn):
    """Issue 28.5: the cache used to fill for an epoch, then warn that inputs
    do not recur. Device augmentation is known up front: no cache, no warning;
    'exact' is refused; without augmentation the cache is used."""
    from avalanche_m2kd import M2KDPlugin
    from helpers import synthetic_stream

    bm = synthetic_stream(n_experiences=2, shape=(1, 8, 8))
    plugin = M2KDPlugin(teacher_cache="auto")
    strategy = _device_strategy(plugin)
    for exp in bm.train_stream:
        strategy.train(exp, num_workers=0)
        assert plugin.regularizer.teacher_set is None or plugin.regularizer.teacher_set.cache is None
    assert not [w for w in recwarn if "cannot help" in str(w.message)]
    strict = _device_strategy(M2KDPlugin(teacher_cache="exact"))
    strict.train(bm.train_stream[0], num_workers=0)
    with pytest.raises(ValueError, match="cannot cache inputs augmented on the device"):
        strict.train(bm.train_stream[1], num_workers=0)
    plain_plugin = M2KDPlugin(teacher_cache="auto")
    caches = []

    from avalanche.core import SupervisedPlugin

    class Look(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            caches.append(plain_plugin.regularizer.teacher_set is not None and plain_plugin.regularizer.teacher_set.cache is not None)

    plain = _device_strategy(plain_plugin, augment=False)
    plain.plugins.append(Look())
    for exp in bm.train_stream:
        plain.train(exp, num_workers=0)
    assert caches == [False, False, True, True]


def test_ed_stage_teachers_train_on_the_device_augmentation(monkeypatch):
    """The dataset no longer augments under device data: the stage teachers get
    the plugin's batch augmentation instead of unaugmented images."""
    from avalanche_m2kd import EducationDistillationPlugin, models
    from avalanche_m2kd.plugins import ed as ed_module
    from helpers import synthetic_stream

    seen = {}
    real = ed_module.train_group_teacher

    def spy(*args, augment=None, **kwargs):
        seen["augment"] = augment
        return real(*args, augment=augment, **kwargs)

    monkeypatch.setattr(ed_module, "train_group_teacher", spy)
    student = models.ed_small(1, 8)
    plugin = EducationDistillationPlugin(teacher_factory=lambda n: models.digits_cnn(num_classes=n), teacher_epochs=1)
    device_data = DeviceDataPlugin(augment=True, padding=2)
    from avalanche.training import Naive

    from helpers import quiet_evaluator

    strategy = Naive(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.01), criterion=plugin,
                     train_mb_size=8, train_epochs=1, evaluator=quiet_evaluator(), plugins=[plugin, device_data])
    strategy.train(synthetic_stream(n_experiences=2, shape=(1, 8, 8)).train_stream[0], num_workers=0)
    assert seen["augment"] is not None and seen["augment"] == device_data.batch_augmentation
