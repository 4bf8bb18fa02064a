"""Deciding whether teacher outputs may be cached, and watching that they pay off."""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ._random import global_random_untouched

CacheMode = Literal["auto", "exact", "off"]
MIN_HIT_RATE = 0.5
"""Below this share of recurring inputs in an epoch after the first, the
inputs are evidently not repeating (a random transform went unnoticed)."""


def transform_is_deterministic(dataset, samples: int = 32) -> bool:
    """Whether ``dataset`` (in its training transforms) gives bit-identical
    items when read twice: ``samples`` items spread over it, each read twice.
    The reads leave the global random generators as they were: a random
    transform draws, and the run's data order and augmentation must not move."""
    data = dataset.train() if hasattr(dataset, "train") else dataset
    n = len(data)
    if n == 0:
        return True
    with global_random_untouched():
        for i in torch.linspace(0, n - 1, min(samples, n)).long().tolist():
            a, b = data[i][0], data[i][0]
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
                return False
    return True


def check_cache_mode(owner: str, mode: str) -> None:
    if mode not in ("auto", "exact", "off"):
        raise ValueError(f"{owner}: teacher_cache must be 'auto', 'exact' or 'off', got {mode!r}")


def decide_cache(owner: str, mode: CacheMode, dataset, returns_features: bool = False, batch_augmented: bool = False) -> bool:
    """``auto``: cache when the training transform is deterministic and no
    plugin augments whole batches on the device (``batch_augmented``: the
    inputs then never recur); ``exact``: the same, but random augmentation (or
    feature maps) is an error; ``off``."""
    if mode == "off":
        return False
    if batch_augmented:
        if mode == "exact":
            raise ValueError(f"{owner}: teacher_cache='exact' cannot cache inputs augmented on the device (DeviceDataPlugin); use 'off'")
        return False
    if returns_features:
        if mode == "exact":
            raise ValueError(f"{owner}: teacher_cache='exact' does not store feature maps (aux='features'); use 'off'")
        return False
    if transform_is_deterministic(dataset):
        return True
    if mode == "exact":
        raise ValueError(
            f"{owner}: teacher_cache='exact' needs a deterministic training transform, but reading the same "
            "samples twice gave different inputs (random augmentation); use teacher_cache='off' or 'auto'"
        )
    return False


def check_hit_rate(owner: str, mode: CacheMode, cache, epoch: int) -> bool:
    """After an epoch: False (stop caching) when inputs do not recur."""
    if cache is None or epoch < 1 or cache.hits + cache.misses == 0:
        return True
    if cache.hit_rate() >= MIN_HIT_RATE:
        return True
    message = (
        f"{owner}: only {cache.hit_rate():.0%} of the inputs of epoch {epoch + 1} were seen in earlier epochs; "
        "the training transform looks random, so the teacher cache cannot help"
    )
    if mode == "exact":
        raise RuntimeError(message + "; use teacher_cache='off'")
    warnings.warn(message + "; caching switched off for this experience", RuntimeWarning)
    return False


def start_epoch(teacher_set) -> None:
    """Count the cache's hits and misses per epoch."""
    if teacher_set is not None and teacher_set.cache is not None:
        teacher_set.cache.hits = teacher_set.cache.misses = 0


def end_epoch(owner: str, mode: CacheMode, teacher_set, epoch: int) -> None:
    """Drop the cache when its inputs did not recur (see :func:`check_hit_rate`)."""
    if teacher_set is not None and not check_hit_rate(owner, mode, teacher_set.cache, epoch):
        teacher_set.cache = None
