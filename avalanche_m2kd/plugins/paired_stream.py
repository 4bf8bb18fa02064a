"""Paired runs: every strategy draws the same data order and augmentation."""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from .._random import epoch_seed, seed_globally


class PairedStreamPlugin(SupervisedPlugin, supports_distributed=True):
    """Seeds the global random generators (torch on every device, NumPy,
    Python) at the start of every training epoch from the run's ``seed``, the
    experience and the epoch alone.

    Why: a paired comparison of two strategies at one seed must train both on
    the same batches. Without this, whatever a method draws besides its data
    (a model's initial weights, a head that grows, a teacher trained on the
    side, a fine-tuning pass) moves every later batch, and the paired
    difference then measures two random streams. With it, two strategies
    whose training sets have the same size draw the same sample indices and
    the same augmentation in every epoch. Put it in ``plugins`` of every
    strategy of a comparison (the runner does). Resumed runs stay exact: the
    next epoch's seed does not depend on the past."""

    def __init__(self, seed: int):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"PairedStreamPlugin: seed must be an int, got {seed!r}")
        self.seed = seed

    def before_training_epoch(self, strategy, **kwargs):
        seed_globally(epoch_seed(self.seed, strategy.clock.train_exp_counter, strategy.clock.train_exp_epochs))


__all__ = ["PairedStreamPlugin"]
