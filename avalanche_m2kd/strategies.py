"""Strategies: Avalanche ``SupervisedTemplate`` subclasses that wire this
library's plugins, the way Avalanche's own ``LwF`` wraps ``LwFPlugin``."""

from __future__ import annotations

from typing import Callable, List, Literal, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from .exemplars import ExemplarReplay, class_balanced_buffer
from .plugins.ed import EducationDistillationPlugin, OptimizerFactory, TeacherSpec
from .plugins.m2kd import M2KDPlugin
from .plugins.nme import NMEClassifierPlugin


class M2KD(SupervisedTemplate):
    """M2KD: a supervised strategy with :class:`~avalanche_m2kd.M2KDPlugin` and
    an optional class-balanced exemplar memory.

    Args:
        model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size,
            device, plugins, evaluator, eval_every: as Avalanche's
            ``SupervisedTemplate``. ``criterion`` is ignored with ``loss="bce"``
            (the plugin is the criterion then).
        mem_size: exemplars kept in total (0 = none, the default).
            Replayed through Avalanche's ``ReplayPlugin`` (as :class:`~avalanche_m2kd.exemplars.ExemplarReplay`) with a class-balanced
            ``ParametricBuffer``.
        exemplar_selection: ``"herding"`` (iCaRL's, default) or ``"random"``.
        feature_layer: module whose output herding and the nearest-mean
            classifier read (default ``"embedding"``, the feature vector of this
            library's models).
        classifier: ``"linear"`` (the trained head, default) or ``"nme"``
            (iCaRL's nearest mean of exemplars, needs ``mem_size > 0``; see
            :class:`~avalanche_m2kd.NMEClassifierPlugin`). ``loss="bce"``,
            herding and ``"nme"`` together are the iCaRL protocol M2KD follows.
        temperature, mm_weight, aux_weight, aux_ce_weight, teachers, aux_layers,
            aux, feature_distance, snapshot_store, prune_ratio, post_prune_epochs,
            loss, head_layers, teacher_cache, batched_teachers,
            teachers_per_batch: the :class:`~avalanche_m2kd.M2KDPlugin`
            arguments, with the same defaults.

    The plugin is available as ``strategy.m2kd`` (snapshots: ``strategy.m2kd.snapshots``).
    The caller's ``plugins`` list is not modified.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: Callable = CrossEntropyLoss(),
        mem_size: int = 0,
        exemplar_selection: Literal["herding", "random"] = "herding",
        feature_layer: str = "embedding",
        classifier: Literal["linear", "nme"] = "linear",
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every: int = -1,
        temperature: float = 2.0,
        mm_weight: float = 0.25,
        aux_weight: float = 0.25,
        aux_ce_weight: float = 1.0,
        teachers: Literal["all", "last"] = "all",
        aux_layers: Sequence[str] = (),
        aux: Literal["logits", "features"] = "logits",
        feature_distance: Literal["mse", "attention"] = "mse",
        snapshot_store: Literal["full", "packnet", "sparse"] = "full",
        prune_ratio: float = 0.75,
        post_prune_epochs: int = 2,
        loss: Literal["kl", "bce"] = "kl",
        head_layers: Optional[Sequence[str]] = None,
        teacher_cache: Literal["auto", "exact", "off"] = "auto",
        batched_teachers: bool = False,
        teachers_per_batch: Optional[int] = None,
    ):
        if mem_size < 0:
            raise ValueError(f"M2KD: mem_size must be >= 0, got {mem_size}")
        if classifier not in ("linear", "nme"):
            raise ValueError(f"M2KD: classifier must be 'linear' or 'nme', got {classifier!r}")
        if classifier == "nme" and mem_size == 0:
            raise ValueError("M2KD: classifier='nme' needs exemplars; set mem_size > 0")
        self.m2kd = M2KDPlugin(
            temperature=temperature,
            mm_weight=mm_weight,
            aux_weight=aux_weight,
            aux_ce_weight=aux_ce_weight,
            teachers=teachers,
            aux_layers=aux_layers,
            aux=aux,
            feature_distance=feature_distance,
            snapshot_store=snapshot_store,
            prune_ratio=prune_ratio,
            post_prune_epochs=post_prune_epochs,
            loss=loss,
            head_layers=head_layers,
            teacher_cache=teacher_cache,
            batched_teachers=batched_teachers,
            teachers_per_batch=teachers_per_batch,
        )
        if self.m2kd.loss == "bce":
            criterion = self.m2kd
        all_plugins: List[BasePlugin] = list(plugins or []) + [self.m2kd]
        self.replay: Optional[ExemplarReplay] = None
        self.nme: Optional[NMEClassifierPlugin] = None
        if mem_size > 0:
            buffer = class_balanced_buffer(mem_size, exemplar_selection, feature_layer)
            self.replay = ExemplarReplay(mem_size, storage_policy=buffer)
            all_plugins.append(self.replay)
            if classifier == "nme":  # after the replay plugin: means of the updated memory
                self.nme = NMEClassifierPlugin(buffer, feature_layer)
                all_plugins.append(self.nme)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size or train_mb_size,
            device=device,
            plugins=all_plugins,
            evaluator=evaluator,
            eval_every=eval_every,
        )


class EducationDistillation(SupervisedTemplate):
    """Education Distillation: a supervised strategy with
    :class:`~avalanche_m2kd.EducationDistillationPlugin` as plugin and
    criterion. Use it with an :class:`~avalanche_m2kd.EDStudent` (for example
    :func:`~avalanche_m2kd.models.ed_resnet20`): the student grows at each
    stage, the optimizer is rebuilt over its new parameters, and
    ``stage_epochs`` / ``stage_lr`` apply per stage.

    Args:
        model, optimizer, train_mb_size, train_epochs, eval_mb_size, device,
            plugins, evaluator, eval_every: as Avalanche's ``SupervisedTemplate``.
        teachers, teacher_factory, teacher_epochs, teacher_optimizer,
            teacher_batch_size, alpha, temperature, revisit, order,
            stage_epochs, stage_lr, teacher_cache: the plugin's arguments,
            same defaults.

    The plugin is ``strategy.ed``. The caller's ``plugins`` list is not modified.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        teachers: Optional[Sequence[TeacherSpec]] = None,
        teacher_factory: Optional[Callable[[int], Module]] = None,
        teacher_epochs: Optional[int] = None,
        teacher_optimizer: Optional[OptimizerFactory] = None,
        teacher_batch_size: Optional[int] = None,
        alpha: float = 0.3,
        temperature: float = 4.0,
        revisit: Union[Literal["all"], int] = "all",
        order: Literal["mixed", "sequential"] = "mixed",
        stage_epochs: Optional[Sequence[int]] = None,
        stage_lr: Optional[Sequence[float]] = None,
        teacher_cache: Literal["auto", "exact", "off"] = "auto",
        train_mb_size: int = 64,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every: int = -1,
    ):
        self.ed = EducationDistillationPlugin(
            teachers=teachers,
            teacher_factory=teacher_factory,
            teacher_epochs=teacher_epochs,
            teacher_optimizer=teacher_optimizer,
            teacher_batch_size=teacher_batch_size,
            alpha=alpha,
            temperature=temperature,
            revisit=revisit,
            order=order,
            stage_epochs=stage_epochs,
            stage_lr=stage_lr,
            teacher_cache=teacher_cache,
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=self.ed,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size or train_mb_size,
            device=device,
            plugins=list(plugins or []) + [self.ed],
            evaluator=evaluator,
            eval_every=eval_every,
        )


__all__ = ["EducationDistillation", "M2KD"]
