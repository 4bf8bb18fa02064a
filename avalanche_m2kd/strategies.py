"""Strategies: Avalanche ``SupervisedTemplate`` subclasses that wire this
library's plugins, the way Avalanche's own ``LwF`` wraps ``LwFPlugin``."""

from __future__ import annotations

import inspect
from typing import Callable, List, Literal, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from .exemplars import ExemplarReplay, ReplayMode, class_balanced_buffer
from .plugins.ed import EducationDistillationPlugin
from .plugins.m2kd import M2KDPlugin
from .plugins.nme import NMEClassifierPlugin


DEFAULT_TRAIN_MB_SIZE = 64
"""Mini-batch size of both strategies when none is given [ours]: ED's reading of
its authors' code (whose 4 is a debugging value); iCaRL's CIFAR protocol uses 128."""


def _template_args(
    train_mb_size: int,
    train_epochs: int,
    eval_mb_size: Optional[int],
    device,
    evaluator,
    eval_every: int,
) -> dict:
    return dict(
        train_mb_size=train_mb_size,
        train_epochs=train_epochs,
        eval_mb_size=eval_mb_size or train_mb_size,
        device=device,
        evaluator=evaluator,
        eval_every=eval_every,
    )


def _takes_plugin_arguments(strategy: type, plugin: type) -> type:
    """Give ``strategy.__init__`` the signature of its own keyword arguments
    plus ``plugin``'s (its ``**plugin_args``), so that ``help()`` and
    Avalanche's check of unexpected keyword arguments see every argument,
    while the plugin's signature stays their only definition."""
    init = strategy.__init__
    own = [p for p in inspect.signature(init).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own}
    extra = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(plugin.__init__).parameters.items()
        if name != "self" and name not in names and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    init.__signature__ = inspect.signature(init).replace(parameters=own + extra)
    return strategy


class M2KD(SupervisedTemplate):
    """M2KD: a supervised strategy with :class:`~avalanche_m2kd.M2KDPlugin` and
    an optional class-balanced exemplar memory.

    Args:
        model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size,
            device, plugins, evaluator, eval_every: as Avalanche's
            ``SupervisedTemplate`` (``train_mb_size`` defaults to
            :data:`DEFAULT_TRAIN_MB_SIZE`). ``criterion`` (default
            cross-entropy) is refused with ``loss="bce"``, whose plugin is the criterion.
        mem_size: exemplars kept in total (0 = none, the default), in a
            class-balanced Avalanche ``ParametricBuffer``.
        memory_replay: how the memory is replayed (see
            :class:`~avalanche_m2kd.exemplars.ExemplarReplay`): ``"concat"``
            (default [iCaRL]: exemplars join the training data) or ``"batch"``
            (a memory batch beside every data batch).
        exemplar_selection: ``"herding"`` (iCaRL's, default) or ``"random"``.
        feature_layer: module whose output herding and the nearest-mean
            classifier read (default ``"embedding"``, the feature vector of this
            library's models).
        classifier: ``"linear"`` (the trained head, default) or ``"nme"``
            (iCaRL's nearest mean of exemplars, needs ``mem_size > 0``; see
            :class:`~avalanche_m2kd.NMEClassifierPlugin`). ``loss="bce"``,
            herding and ``"nme"`` together are the iCaRL protocol M2KD follows.
        **plugin_args: the :class:`~avalanche_m2kd.M2KDPlugin` arguments: its
            own (``post_prune_epochs``, ...) and its
            :class:`~avalanche_m2kd.M2KDRegularizer`'s (``temperature``,
            ``loss``, ``aux_layers``, ``snapshot_store``, ...), with their defaults.

    The plugin is available as ``strategy.m2kd`` (its regularizer:
    ``strategy.m2kd.regularizer``; snapshots: ``strategy.m2kd.snapshots``).
    The caller's ``plugins`` list is not modified.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: Optional[Callable] = None,
        mem_size: int = 0,
        memory_replay: ReplayMode = "concat",
        exemplar_selection: Literal["herding", "random"] = "herding",
        feature_layer: str = "embedding",
        classifier: Literal["linear", "nme"] = "linear",
        train_mb_size: int = DEFAULT_TRAIN_MB_SIZE,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every: int = -1,
        **plugin_args,
    ):
        if mem_size < 0:
            raise ValueError(f"M2KD: mem_size must be >= 0, got {mem_size}")
        if classifier not in ("linear", "nme"):
            raise ValueError(f"M2KD: classifier must be 'linear' or 'nme', got {classifier!r}")
        if classifier == "nme" and mem_size == 0:
            raise ValueError("M2KD: classifier='nme' needs exemplars; set mem_size > 0")
        self.m2kd = M2KDPlugin(**plugin_args)
        if self.m2kd.loss == "bce":
            if criterion is not None:  # it would be replaced: say so instead of ignoring it
                raise ValueError("M2KD(loss='bce'): the sigmoid loss is the criterion (the plugin); leave criterion unset")
            criterion = self.m2kd
        elif criterion is None:
            criterion = CrossEntropyLoss()
        all_plugins: List[BasePlugin] = list(plugins or []) + [self.m2kd]
        self.replay: Optional[ExemplarReplay] = None
        self.nme: Optional[NMEClassifierPlugin] = None
        if mem_size > 0:
            buffer = class_balanced_buffer(mem_size, exemplar_selection, feature_layer)
            self.replay = ExemplarReplay(mem_size, storage_policy=buffer, mode=memory_replay)
            all_plugins.append(self.replay)
            if classifier == "nme":  # after the replay plugin: means of the updated memory
                self.nme = NMEClassifierPlugin(buffer, feature_layer)
                all_plugins.append(self.nme)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            plugins=all_plugins,
            **_template_args(train_mb_size, train_epochs, eval_mb_size, device, evaluator, eval_every),
        )


_takes_plugin_arguments(M2KD, M2KDPlugin)


class EducationDistillation(SupervisedTemplate):
    """Education Distillation: a supervised strategy with
    :class:`~avalanche_m2kd.EducationDistillationPlugin` as plugin and
    criterion. Use it with an :class:`~avalanche_m2kd.EDStudent` (for example
    :func:`~avalanche_m2kd.models.ed_resnet20`): the student grows at each
    stage, the optimizer is rebuilt over its new parameters, and
    ``stage_epochs`` / ``stage_lr`` apply per stage.

    Args:
        model, optimizer, train_mb_size, train_epochs, eval_mb_size, device,
            plugins, evaluator, eval_every: as Avalanche's ``SupervisedTemplate``
            (``train_mb_size`` defaults to :data:`DEFAULT_TRAIN_MB_SIZE`).
        **plugin_args: the :class:`~avalanche_m2kd.EducationDistillationPlugin`
            arguments (``teachers`` or ``teacher_factory``, ``alpha``,
            ``temperature``, ``revisit``, ...), with the plugin's defaults.

    The plugin is ``strategy.ed``. The caller's ``plugins`` list is not modified.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        train_mb_size: int = DEFAULT_TRAIN_MB_SIZE,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every: int = -1,
        **plugin_args,
    ):
        self.ed = EducationDistillationPlugin(**plugin_args)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=self.ed,
            plugins=list(plugins or []) + [self.ed],
            **_template_args(train_mb_size, train_epochs, eval_mb_size, device, evaluator, eval_every),
        )


_takes_plugin_arguments(EducationDistillation, EducationDistillationPlugin)

__all__ = ["DEFAULT_TRAIN_MB_SIZE", "EducationDistillation", "M2KD"]
