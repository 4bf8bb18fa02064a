"""Shared helpers for the tests: tiny streams, probes, training loops."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_m2kd.datasets import ImageArrays, make_benchmark


def quiet_evaluator(*metrics):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(*(metrics or (accuracy_metrics(stream=True, experience=True), forgetting_metrics(stream=True))), loggers=[])


def synthetic_arrays(n_classes=6, per_class=12, shape=(1, 8, 8), seed=0, test_per_class=4) -> ImageArrays:
    """Separable random images: each class is a fixed random pattern plus noise."""
    g = np.random.default_rng(seed)
    protos = g.normal(size=(n_classes, *shape)).astype(np.float32)

    def draw(n):
        y = np.repeat(np.arange(n_classes), n)
        x = protos[y] + 0.3 * g.normal(size=(len(y), *shape)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = draw(per_class)
    x_te, y_te = draw(test_per_class)
    return ImageArrays("synthetic", x_tr, y_tr, x_te, y_te)


def synthetic_stream(n_experiences=3, **kw):
    return make_benchmark(synthetic_arrays(**kw), n_experiences)


def train_and_eval(strategy, benchmark, n_train=None):
    """Train on each experience (then evaluate on the whole test stream);
    returns the last metrics dict."""
    result = {}
    for exp in list(benchmark.train_stream)[:n_train]:
        strategy.train(exp)
        result = strategy.eval(benchmark.test_stream)
    return result


def stream_acc(result):
    return next(v for k, v in result.items() if k.startswith("Top1_Acc_Stream"))


def stream_forgetting(result):
    return next(v for k, v in result.items() if k.startswith("StreamForgetting"))


class ModelCopies(SupervisedPlugin):
    """Deep-copies the model at the end of every training experience (place
    it after the plugin whose end-of-experience work should be included)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def after_training_exp(self, strategy, **kwargs):
        self.copies.append(copy.deepcopy(strategy.model).eval())


def through_a_file(state):
    """``state`` saved with ``torch.save`` and read back as checkpoints are,
    with ``weights_only=True`` (plain data and tensors only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def batch_terms(regularizer, model, x, y, current_classes=None):
    """M2KD's loss terms of one batch, as a plain training loop gets them from
    an :class:`~avalanche_m2kd.M2KDRegularizer` (plus ``"total"``)."""
    if current_classes is not None:
        regularizer.current_classes = sorted(int(c) for c in current_classes)
    regularizer.prepare_model(model, x[:1])  # the auxiliary heads are attached once
    with regularizer.taps(model):
        logits = model(x)
    terms = dict(regularizer(x, logits, y, model))
    terms["total"] = regularizer.total(terms) if terms else logits.new_zeros(())
    return terms
