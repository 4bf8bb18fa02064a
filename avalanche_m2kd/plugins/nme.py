"""Nearest-mean-of-exemplars classification (iCaRL) as an Avalanche plugin."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import NCMClassifier
from avalanche.training.storage_policy import BalancedExemplarsBuffer
from torch import Tensor

from ..exemplars import extract_features
from ..taps import FeatureTaps

UNSEEN_SCORE = -1.0e4
"""Score of classes with no exemplar mean: never predicted."""


def exemplar_class_means(model, groups: Dict[int, object], feature_layer: str, device, flip: bool = True) -> Dict[int, Tensor]:
    """iCaRL's class means: per class, the mean of the L2-normalised features
    of its exemplars, averaged with the mean over horizontally flipped images
    (image inputs, ``flip=True``), then L2-normalised."""
    means = {}
    for label, data in groups.items():
        feats = extract_features(model, data, feature_layer, device)
        mean = (feats / feats.norm(dim=1, keepdim=True)).mean(dim=0)
        if flip and data.eval()[0][0].dim() == 3:  # image inputs: average with the mirrored view
            flipped = extract_features(model, data, feature_layer, device, flip=True)
            mean = (mean + (flipped / flipped.norm(dim=1, keepdim=True)).mean(dim=0)) / 2
        means[int(label)] = mean / mean.norm()
    return means


class NMEClassifierPlugin(SupervisedPlugin, supports_distributed=True):
    """Classifies by the nearest mean of exemplars (iCaRL) at evaluation.

    After each training experience (and after the memory was updated: place
    it after the replay plugin) the class means of the exemplars held by
    ``storage_policy`` are computed with :func:`exemplar_class_means`; in
    evaluation the model's output is replaced by Avalanche's
    ``NCMClassifier`` scores (minus the Euclidean distance between the
    L2-normalised feature and each class mean) on the features of
    ``feature_layer``. Classes with no mean score :data:`UNSEEN_SCORE`.
    Training is unaffected.

    Args:
        storage_policy: a class-balanced Avalanche buffer (``ParametricBuffer``
            with ``groupby="class"``), whose ``buffer_groups`` map class -> data.
        feature_layer: module whose output is the feature vector (default
            ``"embedding"``).
        flip: average means with horizontally flipped images (default True, as iCaRL).
    """

    def __init__(self, storage_policy: BalancedExemplarsBuffer, feature_layer: str = "embedding", flip: bool = True):
        super().__init__()
        self.storage_policy = storage_policy
        self.feature_layer = feature_layer
        self.flip = flip
        self.ncm = NCMClassifier(normalize=True)
        self.class_means: Dict[int, Tensor] = {}
        self._taps: Optional[FeatureTaps] = None
        self._taps_model = None

    def after_training_exp(self, strategy, **kwargs):
        groups = {label: g.buffer for label, g in self.storage_policy.buffer_groups.items() if len(g.buffer)}
        if not groups:
            return
        self.class_means = exemplar_class_means(strategy.model, groups, self.feature_layer, strategy.device, self.flip)
        self.ncm.replace_class_means_dict(self.class_means)

    def scores(self, features: Tensor, width: int) -> Tensor:
        """NME scores for a batch of features, ``width`` columns wide."""
        raw = self.ncm(features.flatten(1))
        out = torch.full((features.shape[0], max(width, raw.shape[1])), UNSEEN_SCORE, device=features.device)
        known = torch.as_tensor(sorted(self.class_means), device=features.device)
        out[:, known] = raw[:, known]
        return out

    def before_eval_forward(self, strategy, **kwargs):
        if self.class_means:
            if self._taps is None or self._taps_model is not strategy.model:
                self._taps = FeatureTaps(strategy.model, [self.feature_layer])
                self._taps_model = strategy.model
            self._taps.attach()

    def after_eval_forward(self, strategy, **kwargs):
        if self.class_means and self._taps is not None:
            self._taps.detach()
            features = self._taps.features()[0].float()  # bf16 under mixed precision
            strategy.mb_output = self.scores(features, strategy.mb_output.shape[1])


__all__ = ["NMEClassifierPlugin", "UNSEEN_SCORE", "exemplar_class_means"]
