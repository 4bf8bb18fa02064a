"""Single- and multi-teacher knowledge distillation for a student that learns
every class at once: the baselines ED's claim is measured against."""

from __future__ import annotations

import math

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor

from .._experience import check_is_criterion
from ..losses import SampleDistillation, TeacherOutput, education_distillation_loss, sample_distillation
from ..precision import Precision, check_precision
from ..teachers import TeacherInference, TeacherSet, check_inference, group_teachers

Routed = Tuple[List[Tensor], List[TeacherOutput]]


def routed_distillation_loss(
    logits: Tensor,
    targets: Tensor,
    routed: Optional[Routed],
    teacher_set: Optional[TeacherSet],
    alpha: float,
    temperature: float,
    distillation: Union[str, SampleDistillation],
) -> Tensor:
    """``alpha * CE + (1 - alpha) * KD`` with each sample distilled from the
    teacher owning its label (``routed``: :meth:`TeacherSet.run_routed`'s
    result); plain cross-entropy when nothing was routed (evaluation)."""
    if routed is None or teacher_set is None:
        return F.cross_entropy(logits, targets)
    index, outputs = routed
    return education_distillation_loss(
        logits, targets, [o.logits for o in outputs], index, teacher_set.groups, alpha, temperature, distillation
    )


class RoutedDistillationPlugin(SupervisedPlugin, supports_distributed=True):
    """Knowledge distillation from fixed, already trained teachers, each
    owning a set of classes: every training sample is distilled from the
    teacher that owns its label, on that teacher's slice of the student's
    logits, with ED's loss ``alpha * CE + (1 - alpha) * KD``.

    One teacher owning every class is Hinton's single-teacher distillation;
    one teacher per class group (ED's stage teachers) is multi-teacher
    distillation, i.e. ED without its growing student and stages. The plugin
    is the strategy's criterion (pass ``criterion=plugin`` and the plugin in
    ``plugins``).

    Args:
        teachers: ``GroupTeacher`` objects or ``(module, classes)`` pairs
            (``module`` outputs ``len(classes)`` logits in that order); no class
            may belong to two teachers.
        alpha: weight of the cross-entropy, default 0.3 (ED's code, for a
            comparison at ED's settings).
        temperature: default 4 (ED's code).
        distillation: per-sample loss, ``"hinton"`` (default) or another name in
            :data:`avalanche_m2kd.losses.SAMPLE_DISTILLATIONS`, or a callable.
        teacher_precision: precision of the teachers' forward passes (default fp32).
        teacher_inference: ``"fused"`` (default), ``"plain"`` or ``"compiled"``, as in
            :class:`~avalanche_m2kd.teachers.TeacherSet`.
    """

    def __init__(
        self,
        teachers: Sequence,
        alpha: float = 0.3,
        temperature: float = 4.0,
        distillation: Union[str, SampleDistillation] = "hinton",
        teacher_precision: Precision = "fp32",
        teacher_inference: TeacherInference = "fused",
    ):
        super().__init__()
        if not teachers:
            raise ValueError("RoutedDistillationPlugin: give at least one teacher")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"RoutedDistillationPlugin: alpha must be in [0, 1], got {alpha}")
        if not 0 < temperature < math.inf:  # NaN fails too
            raise ValueError(f"RoutedDistillationPlugin: temperature must be a finite number > 0, got {temperature}")
        check_precision(teacher_precision, "RoutedDistillationPlugin")
        check_inference(teacher_inference, "RoutedDistillationPlugin")
        self.teachers = group_teachers(teachers, "RoutedDistillationPlugin")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.distillation = distillation
        self._distill = sample_distillation(distillation)
        self.teacher_precision = teacher_precision
        self.teacher_inference = teacher_inference
        self._teacher_set: Optional[TeacherSet] = None
        self._routed: Optional[Routed] = None

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return routed_distillation_loss(
            logits, targets, self._routed, self._teacher_set, self.alpha, self.temperature, self._distill
        )

    def before_training(self, strategy, **kwargs):
        check_is_criterion("RoutedDistillationPlugin", self, strategy, "the strategy")

    def before_training_exp(self, strategy, **kwargs):
        if self.alpha < 1.0:
            self._teacher_set = TeacherSet(
                self.teachers, cache=False, precision=self.teacher_precision, inference=self.teacher_inference
            ).to(strategy.device)

    def after_forward(self, strategy, **kwargs):
        if self._teacher_set is not None and strategy.is_training:
            self._routed = self._teacher_set.run_routed(strategy.mb_x, strategy.mb_y)

    def after_training_iteration(self, strategy, **kwargs):
        self._routed = None

    def after_training_exp(self, strategy, **kwargs):
        self._teacher_set = None


__all__ = ["RoutedDistillationPlugin", "routed_distillation_loss"]
