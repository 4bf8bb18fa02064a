"""What the speed and growth benchmarks share: a synthetic Split-CIFAR-shaped
stream and a plugin that times training iterations and epochs."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict, List, Sequence

from avalanche.core import SupervisedPlugin


def synthetic_split_cifar(per_class: Sequence[int], augment: bool = False, seed: int = 0):
    """A class-incremental stream of random 3x32x32 uint8 images, two classes
    per experience: experience ``e`` has ``per_class[e]`` training images of
    each of its classes. The test set holds one image per class (the benchmarks
    only train; the stream needs every class in it). ``augment`` adds random
    crop and flip to the training transform."""
    import numpy as np

    from avalanche_m2kd import datasets

    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(count, 2 * e + k) for e, count in enumerate(per_class) for k in (0, 1)]).astype(np.int64)
    x = rng.integers(0, 255, (len(y), 3, 32, 32), dtype=np.uint8)
    first = np.unique(y, return_index=True)[1]
    data = datasets.ImageArrays("synthetic", x, y, x[first], y[first])
    return datasets.make_benchmark(data, len(per_class), None, *datasets.make_transforms(data, augment=augment))


class IterationTimer(SupervisedPlugin):
    """Wall time of every training iteration (forward, losses, backward, step
    and plugin hooks; data loading excluded) and every training epoch (data
    loading included), kept per experience index."""

    def __init__(self):
        super().__init__()
        self.iterations: Dict[int, List[float]] = defaultdict(list)
        self.epochs: Dict[int, List[float]] = defaultdict(list)

    def before_training_iteration(self, strategy, **kwargs):
        self._iteration_start = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        self.iterations[strategy.experience.current_experience].append(time.perf_counter() - self._iteration_start)

    def before_training_epoch(self, strategy, **kwargs):
        self._epoch_start = time.perf_counter()

    def after_training_epoch(self, strategy, **kwargs):
        self.epochs[strategy.experience.current_experience].append(time.perf_counter() - self._epoch_start)
