"""Education Distillation as an Avalanche plugin (Feng et al., arXiv 2311.13811)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.storage_policy import ParametricBuffer, RandomExemplarsSelectionStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._cache import CacheMode, check_cache_mode, decide_cache, end_epoch, start_epoch
from .._experience import (
    accumulate_nonfinite,
    batch_augmentation,
    check_batch,
    check_finite_terms,
    check_is_criterion,
    check_listed_once,
    check_nonfinite_flags,
    check_stream,
    experience_index,
)
from .._errors import CheckpointError
from .._random import own_random_stream
from ..distributed import broadcast_module
from ..exemplars import StreamSamples, buffer_state, load_buffer
from ..losses import SampleDistillation, TeacherOutput, sample_distillation
from ..precision import Precision, check_precision, scaler_skips_non_finite
from ..teachers import (
    GroupTeacher,
    Routing,
    TeacherInference,
    TeacherSet,
    check_inference,
    check_routing,
    group_teachers,
    train_group_teacher,
)
from .kd import routed_distillation_loss

TeacherSpec = Union[GroupTeacher, Tuple[nn.Module, Sequence[int]]]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

TEACHER_MILESTONES = (150 / 240, 180 / 240, 210 / 240)
"""ED's teacher schedule [code]: the rate is multiplied by 0.1 at epochs 150,
180 and 210 of 240, here as fractions of the teacher's epochs."""


def default_teacher_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD, lr 0.05, momentum 0.9, weight decay 5e-4: ED's teacher settings [code]."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def teacher_milestones(epochs: int) -> List[int]:
    """:data:`TEACHER_MILESTONES` for ``epochs`` epochs (rounded; those at 0 or
    at the end are dropped): ``[150, 180, 210]`` for 240."""
    return [m for m in (round(epochs * f) for f in TEACHER_MILESTONES) if 0 < m < epochs]


def default_teacher_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """ED's step schedule [code], stepped once per teacher epoch: x0.1 at
    :func:`teacher_milestones`."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, teacher_milestones(epochs), gamma=0.1)


_TEACHER_STREAM = 0x65647463  # salt of the stage teachers' own random stream (see _random)


class StageSequentialLoader:
    """Iterates the stages' data one stage after another (each shuffled on its
    own), so that every batch holds one stage: the authors' order [code]."""

    def __init__(self, datasets: Sequence, batch_size: int, shuffle: bool = True, num_workers: int = 0):
        self.datasets = [d for d in datasets if len(d) > 0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers

    def __iter__(self):
        for data in self.datasets:
            yield from DataLoader(
                data,
                batch_size=self.batch_size,
                shuffle=self.shuffle,
                num_workers=self.num_workers,
                collate_fn=getattr(data, "collate_fn", None),
            )

    def __len__(self) -> int:
        return sum(math.ceil(len(d) / self.batch_size) for d in self.datasets)


class EducationDistillationPlugin(SupervisedPlugin, supports_distributed=True):
    """Education Distillation: one specialist teacher per stage, each sample
    distilled from the teacher of its own stage, while the student grows
    (with :class:`~avalanche_m2kd.EDStudent`).

    Stages are training experiences. For a sample of stage ``k`` the loss is
    ``alpha * CE(z, y) + (1 - alpha) * T^2 * softCE(teacher_k(x)/T, z[C_k]/T)``,
    with the softmax over stage ``k``'s logit slice only [ED code] (the
    distillation term is swappable: ``distillation``). The plugin
    is the strategy's criterion (pass ``criterion=plugin``, as the
    :class:`~avalanche_m2kd.EducationDistillation` strategy does); in
    evaluation it is plain cross-entropy.

    Args:
        teachers: one frozen teacher per stage: ``GroupTeacher`` objects or
            ``(module, classes)`` pairs, where ``module`` outputs ``len(classes)``
            logits for the global ``classes`` in that order (local labels).
        teacher_factory: instead of ``teachers``: ``factory(n_classes)`` builds an
            untrained teacher; the plugin trains stage ``k``'s teacher on
            experience ``k``'s data alone (local labels) before the student
            trains on it [ED code].
        teacher_epochs: epochs of that training. Default None = the student's
            epochs for the stage [ours] (the authors train teachers 240 epochs).
        teacher_optimizer: ``factory(params) -> Optimizer`` for teacher training.
            Default :func:`default_teacher_optimizer` [code].
        teacher_batch_size: default None = the strategy's batch size.
        teacher_scheduler: ``factory(optimizer, epochs)`` returning the
            learning-rate scheduler of teacher training, stepped once per epoch.
            Default :func:`default_teacher_scheduler` [code]: x0.1 at 5/8, 3/4
            and 7/8 of the epochs (150, 180, 210 of 240).
        teacher_precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the
            precision of the teachers' forward passes while the student learns.
        teacher_inference: ``"fused"`` (default [ours]: BatchNorm folded into
            the convolutions, channels-last images, outputs equal to float
            rounding), ``"plain"`` or ``"compiled"``, as in
            :class:`~avalanche_m2kd.teachers.TeacherSet`.
        alpha: weight of the cross-entropy. Default 0.3 [code]; 1 is plain
            cross-entropy (teachers are then neither trained nor run).
        temperature: default 4 [code].
        distillation: the per-sample distillation loss on each stage's logit
            slice: ``"hinton"`` (default, the code's ``T^2``-scaled soft
            cross-entropy), ``"logit_mse"``, or any callable
            ``(student [n, c], teacher [n, c], T) -> [n]`` (ED "combined with
            distillation algorithms"; see :data:`avalanche_m2kd.losses.SAMPLE_DISTILLATIONS`).
        revisit: data of earlier stages used at each stage: ``"all"`` (default,
            as the authors' code) or an exemplar memory size (class-balanced,
            random; ``0`` = a strict continual-learning run with no old data) for
            comparisons with continual-learning methods [ours].
        order: ``"mixed"`` (default [ours]: stages shuffled together, each sample
            routed to its teacher) or ``"sequential"`` (each epoch walks stage by
            stage, as the authors' code does).
        stage_epochs: epochs per stage (a list indexed by experience; the last
            value repeats). Default None = the strategy's ``train_epochs``.
        stage_lr: learning rate per stage (same indexing), set when the stage
            starts. Default None = unchanged.
        teacher_cache: ``"auto"`` (default) keeps each stage teacher's outputs
            per training input and reuses them in later epochs when the training
            transform is deterministic; ``"exact"`` insists; ``"off"`` never
            caches (see :class:`~avalanche_m2kd.M2KDPlugin`).
        teacher_routing: ``"split"`` (default [ours]) runs each stage teacher
            on the samples of its own stage only, which takes one read of the
            per-teacher counts from the device per batch; ``"masked"`` runs
            every stage teacher on the whole batch and keeps each sample's own
            teacher by a mask: no read (no stall on a GPU), but each teacher
            sees all ``B`` samples. The losses are equal.
        check_batches: check every batch (finite inputs, labels inside the
            student's outputs, a finite loss) at once, instead of the first
            batch of each stage only. Default False [ours]: each check reads
            values back from the device, a stall per batch on a GPU. Then a
            non-finite loss is flagged on the device and read once per epoch
            (as ``M2KDPlugin``'s option).

    When the student's parameters change (it grew), the optimizer is rebuilt
    over exactly the model's parameters, momentum reset [code].
    """

    def __init__(
        self,
        teachers: Optional[Sequence[TeacherSpec]] = None,
        teacher_factory: Optional[Callable[[int], nn.Module]] = None,
        teacher_epochs: Optional[int] = None,
        teacher_optimizer: Optional[OptimizerFactory] = None,
        teacher_batch_size: Optional[int] = None,
        teacher_scheduler: Optional[SchedulerFactory] = None,
        teacher_precision: Precision = "fp32",
        teacher_inference: TeacherInference = "fused",
        alpha: float = 0.3,
        temperature: float = 4.0,
        distillation: Union[str, SampleDistillation] = "hinton",
        revisit: Union[Literal["all"], int] = "all",
        order: Literal["mixed", "sequential"] = "mixed",
        stage_epochs: Optional[Sequence[int]] = None,
        stage_lr: Optional[Sequence[float]] = None,
        teacher_cache: CacheMode = "auto",
        teacher_routing: Routing = "split",
        check_batches: bool = False,
    ):
        super().__init__()
        check_cache_mode("EducationDistillationPlugin", teacher_cache)
        check_routing(teacher_routing, "EducationDistillationPlugin")
        check_precision(teacher_precision, "EducationDistillationPlugin")
        check_inference(teacher_inference, "EducationDistillationPlugin")
        if (teachers is None) == (teacher_factory is None):
            raise ValueError("EducationDistillationPlugin: give either teachers or teacher_factory (exactly one)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EducationDistillationPlugin: alpha must be in [0, 1], got {alpha}")
        if not 0 < temperature < math.inf:  # NaN fails too
            raise ValueError(f"EducationDistillationPlugin: temperature must be a finite number > 0, got {temperature}")
        if not (revisit == "all" or (isinstance(revisit, int) and revisit >= 0)):
            raise ValueError(f"EducationDistillationPlugin: revisit must be 'all' or a memory size >= 0, got {revisit!r}")
        if order not in ("mixed", "sequential"):
            raise ValueError(f"EducationDistillationPlugin: order must be 'mixed' or 'sequential', got {order!r}")
        if stage_epochs is not None and (not stage_epochs or min(stage_epochs) < 1):
            raise ValueError("EducationDistillationPlugin: stage_epochs must be a non-empty list of positive counts")
        self.teachers: List[GroupTeacher] = group_teachers(teachers or [], "EducationDistillationPlugin")
        self.teacher_factory = teacher_factory
        self.teacher_epochs = teacher_epochs
        self.teacher_optimizer = teacher_optimizer or default_teacher_optimizer
        self.teacher_batch_size = teacher_batch_size
        self.teacher_scheduler = teacher_scheduler or default_teacher_scheduler
        self.teacher_precision = teacher_precision
        self.teacher_inference = teacher_inference
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.distillation = distillation
        self._distill = sample_distillation(distillation)  # unknown names fail here, before training
        self.revisit = revisit
        self.order = order
        self.stage_epochs = list(stage_epochs) if stage_epochs is not None else None
        self.stage_lr = list(stage_lr) if stage_lr is not None else None
        self.teacher_cache = teacher_cache
        self.teacher_routing = teacher_routing
        self.check_batches = bool(check_batches)
        self._checked_this_stage = False
        self._nonfinite: dict = {}
        self.stage_classes: List[List[int]] = []
        """Classes of each finished stage."""
        self.teacher_lrs: List[List[float]] = []
        """Per teacher the plugin trained, the learning rate of each epoch."""
        self.current_classes: List[int] = []
        self._finished_data: List = []  # each finished stage's training data (revisit="all")
        self._stage_data: List = []  # the parts trained on at the current stage, stage order
        self._memory: Optional[ParametricBuffer] = None
        if isinstance(revisit, int) and revisit > 0:
            self._memory = ParametricBuffer(revisit, groupby="class", selection_strategy=RandomExemplarsSelectionStrategy())
        self._params_after_last_stage: Optional[set] = None
        self._teacher_set: Optional[TeacherSet] = None
        self._routed: Optional[Tuple[List[Tensor], List[TeacherOutput]]] = None

    @property
    def stage(self) -> int:
        """Index of the stage being trained (= finished stages so far)."""
        return len(self.stage_classes)

    @property
    def teacher_set(self) -> Optional[TeacherSet]:
        """Teachers of the stages up to the current one, while training."""
        return self._teacher_set

    # -- the loss ----------------------------------------------------------------------
    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return routed_distillation_loss(
            logits, targets, self._routed, self._teacher_set, self.alpha, self.temperature, self._distill
        )

    # -- Avalanche hooks --------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        check_listed_once("EducationDistillationPlugin", self, strategy)
        check_is_criterion("EducationDistillationPlugin", self, strategy, "the EducationDistillation strategy")

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        seen = [c for g in self.stage_classes for c in g]
        self.current_classes = check_stream("EducationDistillationPlugin", strategy, seen)
        if self.teacher_factory is None:
            self._check_given_teacher(strategy.experience)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        old = self._old_stage_data()
        self._stage_data = old + [strategy.adapted_dataset]
        if self.order == "mixed":
            for part in old:
                strategy.adapted_dataset = strategy.adapted_dataset.concat(part)

    def before_training_exp(self, strategy, **kwargs):
        s = self.stage
        if self.alpha < 1.0:
            if self.teacher_factory is not None and len(self.teachers) == s:
                with own_random_stream(_TEACHER_STREAM + s):  # the student's data stream stays paired with other methods
                    self.teachers.append(self._train_teacher(strategy))
            self._check_teacher_width(strategy, self.teachers[s])
            cache = decide_cache("EducationDistillationPlugin", self.teacher_cache, strategy.experience.dataset,
                                 batch_augmented=batch_augmentation(strategy) is not None)
            self._teacher_set = TeacherSet(
                self.teachers[: s + 1], cache=cache, precision=self.teacher_precision, inference=self.teacher_inference
            ).to(strategy.device)
        self._rebuild_optimizer_if_grown(strategy, self._params_after_last_stage)
        self._checked_this_stage = False
        if self.stage_epochs is not None:
            strategy.train_epochs = self.stage_epochs[min(s, len(self.stage_epochs) - 1)]
        if self.stage_lr is not None:
            for group in strategy.optimizer.param_groups:
                group["lr"] = self.stage_lr[min(s, len(self.stage_lr) - 1)]
        if self.order == "sequential":
            strategy.dataloader = StageSequentialLoader(self._stage_data, strategy.train_mb_size, shuffle=True)

    def before_training_epoch(self, strategy, **kwargs):
        start_epoch(self._teacher_set)
        self._nonfinite = {}

    def after_training_epoch(self, strategy, **kwargs):
        end_epoch("EducationDistillationPlugin", self.teacher_cache, self._teacher_set, strategy.clock.train_exp_epochs)
        check_nonfinite_flags("EducationDistillationPlugin", self._nonfinite, strategy.experience)  # one read per epoch

    def after_forward(self, strategy, **kwargs):
        if self.check_batches or not self._checked_this_stage:
            check_batch("EducationDistillationPlugin", strategy.experience, strategy.mb_x, strategy.mb_y, strategy.mb_output.shape[-1])
            self._checked_this_stage = True
        if self._teacher_set is not None:
            self._routed = self._teacher_set.run_routed(strategy.mb_x, strategy.mb_y, self.teacher_routing)

    def before_backward(self, strategy, **kwargs):
        if scaler_skips_non_finite(strategy):  # fp16: the scaler skips non-finite steps itself
            return
        terms = {"training": strategy.loss}
        if self.check_batches:
            check_finite_terms("EducationDistillationPlugin", terms, strategy.experience)
        else:
            accumulate_nonfinite(self._nonfinite, terms)

    def after_training_iteration(self, strategy, **kwargs):
        self._routed = None

    def after_training_exp(self, strategy, **kwargs):
        if self.revisit == "all":
            self._finished_data.append(strategy.experience.dataset)
        if self._memory is not None:
            self._memory.post_adapt(strategy, strategy.experience)
        self._stage_data = []
        self._params_after_last_stage = {id(p) for p in strategy.model.parameters()}
        self.stage_classes.append(list(self.current_classes))
        self.current_classes = []
        self._teacher_set = None
        self._routed = None

    # -- internals ------------------------------------------------------------------------------
    def _old_stage_data(self) -> List:
        if self.revisit == "all":
            return list(self._finished_data)
        if self._memory is None or len(self._memory.buffer) == 0:
            return []
        buffer = self._memory.buffer
        targets = [int(t) for t in buffer.targets]
        parts = []
        for classes in self.stage_classes:
            idx = [i for i, t in enumerate(targets) if t in set(classes)]
            if idx:
                parts.append(buffer.subset(idx))
        return parts

    def _check_given_teacher(self, experience) -> None:
        s = self.stage
        stream = getattr(experience, "origin_stream", None)
        if stream is not None and len(stream) != len(self.teachers):
            raise ValueError(
                f"EducationDistillationPlugin: {len(self.teachers)} teachers for a stream of {len(stream)} "
                "experiences; give one teacher per stage (experience)."
            )
        if s >= len(self.teachers):
            raise ValueError(f"EducationDistillationPlugin: stage {s} has no teacher ({len(self.teachers)} given)")
        owned = sorted(self.teachers[s].classes)
        if owned != self.current_classes:
            raise ValueError(
                f"EducationDistillationPlugin: teacher {s} covers classes {owned} but experience "
                f"{experience_index(experience)} has classes {self.current_classes}"
            )

    def _check_teacher_width(self, strategy, teacher: GroupTeacher) -> None:
        x = strategy.experience.dataset.eval()[0][0].unsqueeze(0).to(strategy.device)
        teacher.module.to(strategy.device)
        with torch.no_grad():
            width = teacher.module(x).shape[1]
        if width != len(teacher.classes):
            raise ValueError(
                f"EducationDistillationPlugin: teacher {self.stage} outputs {width} logits but covers "
                f"{len(teacher.classes)} classes {teacher.classes}; a stage teacher predicts its own classes "
                "(local labels 0..n-1)"
            )

    def _train_teacher(self, strategy) -> GroupTeacher:
        """Trains stage ``s``'s specialist on the experience's own data (local labels)."""
        classes = list(self.current_classes)
        teacher = self.teacher_factory(len(classes)).to(strategy.device)
        epochs = self.teacher_epochs if self.teacher_epochs is not None else self._student_epochs(strategy)
        self.teacher_lrs.append([])
        trained = train_group_teacher(
            teacher,
            strategy.experience.dataset,
            classes,
            epochs,
            self.teacher_optimizer,
            self.teacher_scheduler,
            self.teacher_batch_size or strategy.train_mb_size,
            strategy.device,
            lrs=self.teacher_lrs[-1],
            augment=batch_augmentation(strategy),  # device data: the dataset no longer augments, the plugin does
        )
        broadcast_module(trained.module)  # every rank distils from the same teacher (no-op in a single process)
        return trained

    def _student_epochs(self, strategy) -> int:
        if self.stage_epochs is not None:
            return self.stage_epochs[min(self.stage, len(self.stage_epochs) - 1)]
        return strategy.train_epochs

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plugin's own state as plain data and tensors (``torch.save`` it):
        the stage classes, the teachers (classes, columns, weights), the teacher
        learning rates, how many stages finished and the revisit memory as
        sample ids. The student lives in the model's ``state_dict``."""
        return {
            "format": "avalanche_m2kd.EducationDistillationPlugin/1",
            "stage_classes": [list(c) for c in self.stage_classes],
            "teacher_lrs": [list(r) for r in self.teacher_lrs],
            "teachers": [{"classes": t.classes, "columns": t.columns, "state": t.module.state_dict()} for t in self.teachers],
            "finished": len(self._finished_data),
            "memory": buffer_state(self._memory) if self._memory is not None else None,
        }

    def load_state_dict(self, state: dict, experiences: Sequence = (), model: Optional[nn.Module] = None,
                        samples: Optional[Callable] = None) -> None:
        """Restore :meth:`state_dict`. ``experiences``: the training stream
        (finished stages and the revisit memory are found there by sample id);
        ``model``: the student, already grown and loaded (the next stage then
        rebuilds the optimizer only if it grows again); trained teachers are
        rebuilt with ``teacher_factory`` on the model's device."""
        if state.get("format", "avalanche_m2kd.EducationDistillationPlugin/1") != "avalanche_m2kd.EducationDistillationPlugin/1":
            raise ValueError("not an EducationDistillationPlugin state (unknown 'format')")
        device = next(model.parameters()).device if model is not None else "cpu"
        given = len(self.teachers)
        for i, saved in enumerate(state["teachers"]):
            if i < given:
                self.teachers[i].module.load_state_dict(saved["state"])
                continue
            if self.teacher_factory is None:
                raise CheckpointError(f"ED: the state has {len(state['teachers'])} teachers, this plugin {given}")
            module = self.teacher_factory(len(saved["classes"])).to(device)
            module.load_state_dict(saved["state"])
            self.teachers.append(GroupTeacher(module, saved["classes"], saved["columns"]))
        self.stage_classes = [list(x) for x in state["stage_classes"]]
        self.teacher_lrs = [list(x) for x in state["teacher_lrs"]]
        samples = samples or StreamSamples(experiences)
        self._finished_data = [experiences[i].dataset for i in range(state["finished"])]
        if state["memory"] is not None:
            load_buffer(self._memory, state["memory"], samples)
        if self.stage_classes and model is not None:
            self._params_after_last_stage = {id(q) for q in model.parameters()}

    @staticmethod
    def _rebuild_optimizer_if_grown(strategy, previous: Optional[set]) -> None:
        """Rebuild when the model's parameters differ from the last stage's (it
        grew; Avalanche re-maps same-named parameters and keeps their momentum)
        or from the optimizer's."""
        optimizer, model = strategy.optimizer, strategy.model
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        in_model = {id(p) for p in model.parameters()}
        if in_optimizer == in_model and (previous is None or previous == in_model):
            return
        if len(optimizer.param_groups) != 1:
            raise ValueError(
                "EducationDistillationPlugin rebuilds the optimizer when the student grows and supports one "
                f"parameter group; this optimizer has {len(optimizer.param_groups)}"
            )
        # Avalanche's own update (ED's code makes a new optimizer): the grown model's parameters,
        # the discarded head's removed, a fresh state; the name -> parameter map keeps Avalanche's bookkeeping in step
        strategy.optimized_param_id = update_optimizer(
            optimizer, dict(model.named_parameters()), optimized_params=strategy.optimized_param_id,
            reset_state=True, remove_params=True,
        )


__all__ = ["EducationDistillationPlugin", "StageSequentialLoader", "default_teacher_optimizer"]
