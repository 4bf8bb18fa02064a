"""Class-incremental streams from in-memory arrays.

Every loader returns :class:`ImageArrays` (float32 images ``[N, C, H, W]``,
int64 labels); :func:`make_benchmark` turns them into an Avalanche
``nc_benchmark`` stream (which Avalanche's ``ICaRL`` also accepts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from torch.utils.data import TensorDataset

DATA_SPLIT_SEED = 0
"""Seed of the train/test split of data sets that ship without one (digits):
fixed, so that every run and seed sees the same split."""


@dataclass
class ImageArrays:
    """A labelled image data set held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: List[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


def load_digits_arrays(test_fraction: float = 0.3) -> ImageArrays:
    """scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes),
    scaled to [0, 1], split stratified with :data:`DATA_SPLIT_SEED`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=DATA_SPLIT_SEED
    )
    return ImageArrays("digits", x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])


def make_benchmark(
    data: ImageArrays,
    n_experiences: int,
    class_order: Optional[Sequence[int]] = None,
    train_transform=None,
    eval_transform=None,
):
    """An Avalanche class-incremental ``nc_benchmark`` over ``data``, classes
    taken in ``class_order`` (default: natural order) and split evenly
    (the remainder goes to the last experiences, as ``nc_benchmark`` does)."""
    order = list(range(data.n_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != sorted(set(np.unique(data.y_train).tolist())):
        raise ValueError(
            f"class order must be a permutation of the data set's classes {sorted(set(data.y_train.tolist()))}"
        )
    if not 1 <= n_experiences <= len(order):
        raise ValueError(f"n_experiences must be between 1 and {len(order)} (the number of classes), got {n_experiences}")
    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(data.x_train)), torch.from_numpy(data.y_train))
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(data.x_test)), torch.from_numpy(data.y_test))
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=order,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def split_digits(n_experiences: int = 5, class_order: Optional[Sequence[int]] = None):
    """Split-Digits: scikit-learn's digits as a class-incremental stream
    (default 5 experiences of 2 classes, natural order). No download."""
    return make_benchmark(load_digits_arrays(), n_experiences, class_order)


__all__ = ["DATA_SPLIT_SEED", "ImageArrays", "load_digits_arrays", "make_benchmark", "split_digits"]
