"""Training data held on the training device, augmented there a batch at a time.

A ``DataLoader`` with per-sample transforms crops and flips one image at a time
on the CPU and copies every batch to the device; on a GPU that feeds the model
slower than it trains. :class:`DeviceDataPlugin` instead gathers the
experience's (already adapted) training set once, moves it to the device, and
draws shuffled batches there; :func:`random_crop_flip` augments a whole batch
with tensor indexing, with the distribution of torchvision's
``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.utils.data import DataLoader


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    fill: Optional[Tensor] = None,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Each image of ``x`` (``[B, C, H, W]``) padded by ``padding`` on every
    side with ``fill`` (per channel; default 0), cropped back to ``H x W`` at
    an offset drawn uniformly from ``0..2*padding`` on each axis, and mirrored
    horizontally with probability 1/2 (``flip=True``); all on ``x``'s device.

    Passing the normalised value of a black pixel as ``fill`` gives, on
    normalised images, the distribution of torchvision's crop-then-normalise."""
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip: expected a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    device = x.device
    padded = x.new_empty(b, c, h + 2 * padding, w + 2 * padding)
    padded[:] = (fill.to(device=device, dtype=x.dtype).view(1, c, 1, 1) if fill is not None else 0)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = torch.arange(w, device=device).expand(b, w)
    if flip:
        mirrored = torch.rand(b, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    cols = left[:, None] + cols  # [B, W]
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class DeviceBatches:
    """Shuffled mini-batches ``[x, y, t]`` of tensors already on the device,
    each sample once per pass, the last batch possibly smaller; ``augment``
    (a function of a batch of images) is applied to every batch."""

    def __init__(self, x: Tensor, y: Tensor, t: Tensor, batch_size: int, augment=None, shuffle: bool = True):
        self.x, self.y, self.t = x, y, t
        self.batch_size = int(batch_size)
        self.augment = augment
        self.shuffle = shuffle

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[List[Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, device=self.y.device) if self.shuffle else torch.arange(n, device=self.y.device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            x = self.x[index]
            yield [self.augment(x) if self.augment is not None else x, self.y[index], self.t[index]]


def gather_dataset(dataset, device: torch.device | str, batch_size: int = 1024) -> List[Tensor]:
    """``[x, y, t]`` of a whole Avalanche dataset (its current transforms), on ``device``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None))
    parts = [list(batch) for batch in loader]
    if not parts:
        raise ValueError("DeviceDataPlugin: the training set of this experience is empty")
    if len(parts[0]) < 3:
        raise ValueError("DeviceDataPlugin: expected (x, y, task label) samples from an Avalanche dataset")
    return [torch.cat([p[i] for p in parts]).to(device) for i in range(3)]


class DeviceDataPlugin(SupervisedPlugin):
    """Holds each experience's training set on the strategy's device and feeds
    the strategy from there, augmented a batch at a time.

    Args:
        augment: random crop with padding and horizontal flip (default True,
            CIFAR's augmentation); the dataset's own transforms must then leave
            images unaugmented (the runner's ``--device-data`` does this).
        padding: crop padding (default 4 [CIFAR protocol]).
        fill: per-channel padding value, in the images' (normalised) space;
            default 0. Give the normalised black pixel to match torchvision's
            pad-then-normalise.
        flip: mirror half of the images (default True).

    It replaces the strategy's training loader in ``before_training_exp``
    (after the dataset adaptation, so replayed exemplars are included); a
    strategy whose loader is not a plain one (batch-mode replay, ED's
    sequential order) is refused.
    """

    def __init__(self, augment: bool = True, padding: int = 4, fill: Optional[Tensor] = None, flip: bool = True):
        super().__init__()
        if padding < 0:
            raise ValueError(f"DeviceDataPlugin: padding must be >= 0, got {padding}")
        self.augment = augment
        self.padding = int(padding)
        self.fill = None if fill is None else torch.as_tensor(fill, dtype=torch.float32).flatten()
        self.flip = flip
        self._batches: Optional[DeviceBatches] = None

    @property
    def batch_augmentation(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The augmentation this plugin applies to training batches (None
        without ``augment``): other plugins that train on the same data (ED's
        stage teachers) or cache outputs per input (the teacher cache) read it."""
        return self._augment if self.augment else None

    def _augment(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.padding, self.fill, self.flip)

    def before_training_exp(self, strategy, **kwargs):
        from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader

        if not isinstance(strategy.dataloader, (DataLoader, TaskBalancedDataLoader)):
            raise ValueError(
                f"DeviceDataPlugin replaces the training loader, but this strategy uses a "
                f"{type(strategy.dataloader).__name__}; use concat replay / ED's mixed order, or drop the plugin"
            )
        x, y, t = gather_dataset(strategy.adapted_dataset, strategy.device)
        self._batches = DeviceBatches(x, y, t, strategy.train_mb_size, self._augment if self.augment else None)
        strategy.dataloader = self._batches

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.dataloader is not self._batches:  # a plugin after this one replaced the loader
            raise ValueError(
                f"DeviceDataPlugin: another plugin replaced the training loader with a "
                f"{type(strategy.dataloader).__name__}; use concat replay / ED's mixed order, or drop DeviceDataPlugin"
            )

    def after_training_exp(self, strategy, **kwargs):
        self._batches = None  # frees the device copy


__all__ = ["DeviceBatches", "DeviceDataPlugin", "gather_dataset", "random_crop_flip"]
