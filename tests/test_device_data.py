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
