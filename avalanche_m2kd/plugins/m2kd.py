"""M2KD as an Avalanche plugin: multi-model, multi-level distillation from every
previous snapshot (Zhou et al., BMVC 2020)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from .._cache import CacheMode, check_cache_mode, decide_cache, end_epoch, start_epoch
from .._experience import (
    accumulate_nonfinite,
    batch_augmentation,
    check_batch,
    check_finite_terms,
    check_is_criterion,
    check_listed_once,
    check_model_accepts,
    check_nonfinite_flags,
    check_output_width,
    check_stream,
    stream_class_count,
)
from .._random import own_generator, own_random_stream
from ..distributed import average_batchnorm_statistics
from ..losses import AuxMode, LossForm, M2KDLoss, TeacherOutput, group_weights, route_unseen_rows
from ..precision import Precision, check_precision, scaler_skips_non_finite
from ..snapshots import PackNetSnapshotStore, StoreKind, head_module_names, make_snapshot_store
from ..taps import AUX_ATTRIBUTE, FeatureTaps, attach_auxiliary_heads, resolve_modules
from ..teachers import GroupTeacher, TeacherInference, TeacherSet, check_inference, draw_teachers

TeacherMode = Literal["all", "last"]


_TEACHER_DRAWS = 0x74647277  # salts of the plugin's own random streams (see _random)
_FINETUNE_STREAM = 0x706B6674


@dataclass
class _Batch:
    """What one training iteration needs between the plugin's hooks."""

    model: nn.Module
    seen: List[int]
    outputs: List[TeacherOutput]
    groups: List[List[int]]
    weights: List[float]
    features: List[Tensor] = field(default_factory=list)
    terms: Optional[Dict[str, Tensor]] = None
    checked: bool = False  # inputs and labels checked on this batch: check its loss terms at once too


class M2KDPlugin(SupervisedPlugin, supports_distributed=True):
    """Multi-model and multi-level knowledge distillation (M2KD).

    At experience ``t`` the model ``f`` is distilled from the snapshots
    ``g_1 .. g_{t-1}`` of itself taken at the end of every earlier experience
    [paper]. Snapshot ``g_k`` teaches only the logits of the classes ``C_k`` it
    introduced [ours]:

    ``L_MM = sum_k w_k T^2 KL(softmax(g_k(x)[C_k]/T) || softmax(f(x)[C_k]/T))``,
    ``w_k = |C_k| / |C_<t|``.

    Multi-level distillation [paper] taps the modules named in ``aux_layers``:
    each gets an auxiliary head (global pooling + growing linear layer over the
    seen classes) trained with cross-entropy and distilled, group by group, from
    the same head of every snapshot [ours]; or, with ``aux="features"``, the
    feature maps are matched directly. Auxiliary heads are registered on the
    model as ``model.m2kd_aux`` (so the optimizer, ``state_dict`` and snapshots
    include them) and are never used at inference.

    Total (``loss="kl"``): ``CE + aux_ce_weight * sum_l CE_l + mm_weight * L_MM
    + aux_weight * L_AUX``, where CE is the strategy's criterion. The math
    lives in :class:`~avalanche_m2kd.losses.M2KDLoss` (``plugin.objective``);
    the plugin runs the teachers and calls it from Avalanche's hooks.

    With ``loss="bce"`` (iCaRL's form) the classification loss itself becomes a
    per-class sigmoid cross-entropy over the seen classes whose targets are one-hot
    for the current classes and ``sigmoid(g_k(x)[c])`` for each old class
    ``c`` in ``C_k``. It replaces the cross-entropy, so the plugin must also be
    the strategy's ``criterion`` (the :class:`~avalanche_m2kd.M2KD` strategy
    does this).

    Args:
        temperature: distillation temperature ``T``. Default 2 [ours]: the LwF
            convention.
        mm_weight: weight of ``L_MM``. Default 0.25 [ours]: at ``T = 2`` this
            makes ``teachers="last"`` exactly as strong as Avalanche's LwF at its
            default ``alpha = 1`` (whose KL has no ``T^2``), so comparisons
            start from the same strength; weight 1 over-regularises on
            Split-Digits with exemplars (measured). Unused with ``loss="bce"``
            (distillation is inside the classification loss).
        aux_weight: weight of the auxiliary distillation ``L_AUX`` (summed over
            tapped layers). Default 0.25 [ours], as ``mm_weight``. With
            ``loss="bce"`` it weights each auxiliary head's per-class sigmoid loss.
        aux_ce_weight: weight of the auxiliary heads' cross-entropy (deep
            supervision). Default 1 [ours]. Unused with ``aux="features"`` or
            ``loss="bce"``.
        aux_supervision: what the auxiliary heads' cross-entropy trains.
            ``"deep"`` (default [ours], deep supervision): the heads and the
            layers below them, so every tapped stage is pushed to separate the
            classes on its own; ``"probe"``: the heads only (they read detached
            features, as linear probes), so the backbone moves only through the
            classification loss and the distillation terms. Distillation of the
            heads reaches the backbone either way. Softmax form only.
        teachers: ``"all"`` = M2KD (every snapshot teaches its own group);
            ``"last"`` = the single-teacher ablation (the last snapshot teaches
            all old classes, as LwF; the store then releases each older
            snapshot, so it holds one). Default ``"all"`` [paper].
        old_targets: which snapshot judges group ``C_k`` on a sample. ``"owner"``
            (default [paper, as we read it]): snapshot ``k``, on every sample.
            ``"informed"`` [ours]: snapshot ``k`` on samples of the classes it
            saw (groups ``1..k``), the newest snapshot on the others (later
            groups' exemplars and the current classes), because snapshot ``k``
            never saw those as negatives (see
            :func:`~avalanche_m2kd.losses.route_unseen_rows`). It runs the
            newest snapshot once more per batch over all old classes, uncached.
            Only with ``teachers="all"`` (with ``"last"`` the two agree) and
            without ``teachers_per_batch``.
        aux_layers: dotted module names to tap (e.g. ``("stage1", "stage2")``).
            Empty (default) disables multi-level distillation.
        aux: ``"logits"`` (auxiliary heads, default [ours]) or ``"features"``
            (feature-map matching).
        feature_distance: ``"mse"`` (default [ours]) or ``"attention"``
            (attention transfer); used with ``aux="features"``.
        snapshot_store: ``"full"`` (default [ours]: exact teachers and no
            constraint on training; small models make the memory moot),
            ``"packnet"`` (the paper's mask-based pruning as we read it) or
            ``"sparse"``. See :mod:`avalanche_m2kd.snapshots`.
        prune_ratio: for ``packnet``, the fraction of free weights pruned (left
            free) after each experience; for ``sparse``, the fraction of each
            weight tensor dropped. Default 0.75 [ours] (PackNet's own setting).
        post_prune_epochs: epochs of fine-tuning after ``packnet`` pruning,
            training only the weights the new snapshot keeps. They run through
            the strategy's own training loop, so the data (replay included), the
            loss (every plugin's terms included) and the hooks are those of the
            experience. Default 2 [ours]: on Split-Digits one epoch after pruning
            75% left the digits CNN at chance on its own classes, two recovered
            it fully (measured); PackNet uses 10.
        post_prune_lr: learning rate of that fine-tuning. Default None = the
            rate of the experience's last epoch [ours] (PackNet fine-tunes at a
            low rate; a scheduler plugin that resets the rate at the end of the
            experience must not turn the fine-tune into a step at the base rate).
        loss: ``"kl"`` (softmax form, default [ours]: composes with any
            criterion and with Avalanche's LwF baseline) or ``"bce"`` (iCaRL's
            per-class sigmoid form, recommended without a large exemplar memory
            because a softmax head lets new classes crowd out old ones).
        bce_classes: ``loss="bce"``: the number of outputs the sigmoid loss
            averages over. Default None = the stream's number of classes, read
            from the experience's benchmark [iCaRL]: iCaRL's classifier has one
            output per class from the first step, so its learning rate (2.0)
            assumes that scale; averaging over the seen columns of a growing head
            would multiply every gradient by (stream classes / seen classes).
        bce_columns: ``loss="bce"``: the output columns of the classification
            term. ``"seen"`` (default): the classes seen so far (a growing head);
            ``"all"``: every column of the model's output, not-yet-seen classes
            with target 0, as iCaRL's fixed classifier is trained [iCaRL] (give
            the model a fixed head over the stream's classes).
        head_layers: names of the classifier heads, stored per snapshot rather
            than pruned. Default: every ``IncrementalClassifier``, else the last
            ``nn.Linear``.
        teacher_cache: ``"auto"`` (default) stores every snapshot's outputs per
            training input and reuses them in later epochs when the training
            transform is deterministic (checked by reading samples twice), exact
            by construction; ``"exact"`` insists (random augmentation is an
            error); ``"off"`` never caches. Feature maps (``aux="features"``)
            are not cached.
        batched_teachers: evaluate all snapshots in one ``torch.func.vmap`` pass
            over their stacked weights instead of a Python loop. Same outputs
            (to float rounding). Default False [ours]: on a 2-core CPU it does
            not pay (see the README's speed table).
        teachers_per_batch: if set (``k``), each batch draws ``k`` snapshots with
            replacement, with probability ``w_k``, and weights each drawn one by
            its count over ``k``: the expected loss equals the full multi-model
            loss, at ``k`` teacher forwards per batch (see
            :func:`~avalanche_m2kd.teachers.draw_teachers`). ``loss="kl"`` only.
            Default None (every snapshot, every batch).
        teacher_precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the
            precision of the snapshots' forward passes (their outputs come back in
            float32). bf16 halves their cost on CPUs with bf16 units and GPUs.
        teacher_inference: ``"fused"`` (default [ours]) runs each snapshot with
            its BatchNorm folded into the convolutions and channels-last images,
            about 1.2x faster on CPUs (README speed table), equal to float rounding; ``"plain"``
            runs the snapshots as stored, bit for bit; ``"compiled"`` runs the
            fused copies through ``torch.compile``, faster again after a first
            batch that waits for the compiler (see
            :class:`~avalanche_m2kd.teachers.TeacherSet`; not with ``batched_teachers``).
        check_batches: check every batch (finite inputs, labels inside the
            head, finite loss terms) at once, instead of the first batch of each
            experience only. Default False [ours]: each check reads values back
            from the device, a stall per batch on a GPU. Then the other batches'
            loss terms are checked on the device and read once per epoch, and
            the runner checks its data sets once before training.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        mm_weight: float = 0.25,
        aux_weight: float = 0.25,
        aux_ce_weight: float = 1.0,
        aux_supervision: Literal["deep", "probe"] = "deep",
        teachers: TeacherMode = "all",
        old_targets: Literal["owner", "informed"] = "owner",
        aux_layers: Sequence[str] = (),
        aux: AuxMode = "logits",
        feature_distance: Literal["mse", "attention"] = "mse",
        snapshot_store: StoreKind = "full",
        prune_ratio: float = 0.75,
        post_prune_epochs: int = 2,
        post_prune_lr: Optional[float] = None,
        loss: LossForm = "kl",
        bce_classes: Optional[int] = None,
        bce_columns: Literal["seen", "all"] = "seen",
        head_layers: Optional[Sequence[str]] = None,
        teacher_cache: CacheMode = "auto",
        batched_teachers: bool = False,
        teachers_per_batch: Optional[int] = None,
        teacher_precision: Precision = "fp32",
        teacher_inference: TeacherInference = "fused",
        check_batches: bool = False,
    ):
        super().__init__()
        check_cache_mode("M2KDPlugin", teacher_cache)
        check_precision(teacher_precision, "M2KDPlugin")
        check_inference(teacher_inference, "M2KDPlugin")
        if batched_teachers and teacher_inference == "compiled":
            raise ValueError("M2KDPlugin: batched_teachers runs a vmap that is not compiled; use teacher_inference='fused' with it")
        try:
            self.objective = M2KDLoss(loss, temperature, mm_weight, aux_weight, aux_ce_weight, aux, feature_distance)
        except ValueError as err:  # the loss object validates the arguments it holds
            raise ValueError(f"M2KDPlugin: {err}") from None
        if teachers_per_batch is not None:
            if teachers_per_batch < 1:
                raise ValueError(f"M2KDPlugin: teachers_per_batch must be >= 1, got {teachers_per_batch}")
            if loss != "kl":
                raise ValueError("M2KDPlugin: teachers_per_batch needs loss='kl' (with 'bce' teachers supply targets, not terms)")
        if aux_supervision not in ("deep", "probe"):
            raise ValueError(f"M2KDPlugin: aux_supervision must be 'deep' or 'probe', got {aux_supervision!r}")
        if aux_supervision == "probe" and loss != "kl":
            raise ValueError(
                "M2KDPlugin: aux_supervision='probe' needs loss='kl' (with 'bce' each auxiliary head has one sigmoid "
                "loss that both classifies and distils); leave it 'deep'"
            )
        if teachers not in ("all", "last"):
            raise ValueError(f"M2KDPlugin: teachers must be 'all' or 'last', got {teachers!r}")
        if old_targets not in ("owner", "informed"):
            raise ValueError(f"M2KDPlugin: old_targets must be 'owner' or 'informed', got {old_targets!r}")
        if old_targets == "informed" and teachers_per_batch is not None:
            raise ValueError("M2KDPlugin: old_targets='informed' needs every snapshot each batch; leave teachers_per_batch unset")
        if isinstance(aux_layers, str):
            aux_layers = (aux_layers,)
        if post_prune_epochs < 0:
            raise ValueError(f"M2KDPlugin: post_prune_epochs must be >= 0, got {post_prune_epochs}")
        if post_prune_lr is not None and post_prune_lr <= 0:
            raise ValueError(f"M2KDPlugin: post_prune_lr must be > 0, got {post_prune_lr}")
        if bce_classes is not None and bce_classes < 1:
            raise ValueError(f"M2KDPlugin: bce_classes must be >= 1, got {bce_classes}")
        self.aux_supervision = aux_supervision
        self.teachers = teachers
        self.old_targets = old_targets
        self.aux_layers = list(aux_layers)
        self.post_prune_epochs = int(post_prune_epochs)
        self.post_prune_lr = post_prune_lr
        self.bce_classes = bce_classes
        if bce_columns not in ("seen", "all"):
            raise ValueError(f"M2KDPlugin: bce_columns must be 'seen' or 'all', got {bce_columns!r}")
        self.bce_columns = bce_columns
        self.teacher_cache = teacher_cache
        self.batched_teachers = bool(batched_teachers)
        self.teachers_per_batch = teachers_per_batch
        self.teacher_precision = teacher_precision
        self.teacher_inference = teacher_inference
        self.check_batches = bool(check_batches)
        self.snapshots = make_snapshot_store(snapshot_store, prune_ratio, head_layers)
        self.groups: List[List[int]] = []
        """Classes introduced by each finished experience (``C_1, C_2, ...``)."""
        self.current_classes: List[int] = []
        self.last_terms: Dict[str, Tensor] = {}
        """Unweighted loss terms of the last training iteration (detached)."""
        self._stream_classes: Optional[int] = None
        self._teacher_set: Optional[TeacherSet] = None
        self._draws: Optional[torch.Generator] = None
        self._newest_set: Optional[TeacherSet] = None  # old_targets="informed": the newest snapshot over all old classes
        self._taps: Optional[FeatureTaps] = None
        self._taps_model: Optional[nn.Module] = None
        self._batch: Optional[_Batch] = None
        self._checked_this_experience = False
        self._nonfinite: Dict[str, Tensor] = {}
        self._epoch_lrs: List[float] = []

    # -- configuration ---------------------------------------------------------------
    @property
    def loss(self) -> LossForm:
        return self.objective.form

    @property
    def temperature(self) -> float:
        return self.objective.temperature

    @property
    def aux(self) -> AuxMode:
        return self.objective.aux

    @property
    def teacher_set(self) -> Optional[TeacherSet]:
        """The frozen teachers rebuilt for the experience being trained (None
        outside training or before the second experience)."""
        return self._teacher_set

    @property
    def uses_aux_heads(self) -> bool:
        return bool(self.aux_layers) and self.aux == "logits"

    def seen_classes(self, extra: Sequence[int] = ()) -> List[int]:
        """Classes of finished experiences, the current one and ``extra``."""
        seen = {c for g in self.groups for c in g}
        seen.update(self.current_classes)
        seen.update(int(c) for c in extra)
        return sorted(seen)

    def _seen_before(self) -> List[int]:
        return sorted({c for g in self.groups for c in g})

    def config(self) -> dict:
        """Every constructor argument (for result files and checkpoints)."""
        o = self.objective
        return {
            "temperature": o.temperature,
            "mm_weight": o.mm_weight,
            "aux_weight": o.aux_weight,
            "aux_ce_weight": o.aux_ce_weight,
            "aux_supervision": self.aux_supervision,
            "teachers": self.teachers,
            "old_targets": self.old_targets,
            "aux_layers": list(self.aux_layers),
            "aux": o.aux,
            "feature_distance": o.feature_distance,
            "snapshot_store": self.snapshots.kind,
            "prune_ratio": getattr(self.snapshots, "prune_ratio", None),
            "post_prune_epochs": self.post_prune_epochs,
            "post_prune_lr": self.post_prune_lr,
            "loss": o.form,
            "bce_classes": self.bce_classes,
            "bce_columns": self.bce_columns,
            "head_layers": self.snapshots.head_layers,
            "teacher_cache": self.teacher_cache,
            "batched_teachers": self.batched_teachers,
            "teachers_per_batch": self.teachers_per_batch,
            "teacher_precision": self.teacher_precision,
            "teacher_inference": self.teacher_inference,
            "check_batches": self.check_batches,
        }

    # -- model preparation ---------------------------------------------------------
    def prepare_model(self, model: nn.Module, example: Tensor) -> None:
        """Check ``aux_layers`` and attach the auxiliary heads (once).

        ``example`` is one input (with or without batch dimension) used to read
        the tapped layers' channel counts. Called by the plugin before the first
        training experience; call it yourself to use :meth:`compute_losses`
        outside a strategy.
        """
        resolve_modules(model, self.aux_layers)
        heads = set(head_module_names(model, self.snapshots.head_layers))
        named_heads = [n for n in self.aux_layers if n in heads or any(n.startswith(h + ".") for h in heads)]
        if named_heads:
            raise ValueError(
                f"M2KDPlugin: aux_layers {named_heads} name the classifier head; tap intermediate layers "
                "(the output is distilled already), e.g. the backbone's stages"
            )
        if self.uses_aux_heads:
            attach_auxiliary_heads(model, self.aux_layers, example)
        self.snapshots.bind(model)

    def _student_taps(self, model: nn.Module) -> Optional[FeatureTaps]:
        if not self.aux_layers:
            return None
        if self._taps is None or self._taps_model is not model:
            self._taps = FeatureTaps(model, self.aux_layers)
            self._taps_model = model
        return self._taps

    def teacher_groups(self) -> List[List[int]]:
        """The class group each teacher of the next experience owns."""
        if len(self.snapshots) == 0:
            return []
        if self.teachers == "all":
            return [list(g) for g in self.groups]
        return [self._seen_before()]

    def build_teachers(self, device: torch.device | str = "cpu", cache: bool = False) -> Optional[TeacherSet]:
        """The frozen teachers of the next experience, rebuilt from the snapshot
        store (None before the first snapshot): every snapshot owning its
        group, or the last one owning every old class (``teachers="last"``)."""
        n = len(self.snapshots)
        if n == 0:
            return None
        indices = list(range(n)) if self.teachers == "all" else [n - 1]
        modules = [self.snapshots.teacher(k, device) for k in indices]
        return self._teacher_set_of(
            [GroupTeacher(m, g) for m, g in zip(modules, self.teacher_groups())], device, cache, self.batched_teachers
        )

    def _teacher_set_of(self, teachers: List[GroupTeacher], device, cache: bool = False, batched: bool = False) -> TeacherSet:
        return TeacherSet(
            teachers,
            feature_layers=self.aux_layers,
            aux_logits=self.uses_aux_heads,
            batched=batched,
            cache=cache,
            precision=self.teacher_precision,
            inference=self.teacher_inference,
        ).to(device)

    def _build_newest(self, teacher_set: Optional[TeacherSet], device: torch.device | str) -> Optional[TeacherSet]:
        """``old_targets="informed"``: the newest snapshot of ``teacher_set``
        (its last teacher's module, not rebuilt) over every old class (None
        when routing changes nothing: one snapshot, or ``teachers="last"``)."""
        if self.old_targets != "informed" or self.teachers != "all" or teacher_set is None or len(teacher_set) < 2:
            return None
        module = teacher_set.teachers[-1].module
        return self._teacher_set_of([GroupTeacher(module, [c for g in self.groups for c in g])], device)

    def _run_teachers(
        self, teacher_set: Optional[TeacherSet], x: Tensor, y: Tensor, newest_set: Optional[TeacherSet] = None
    ) -> tuple:
        """Outputs, groups and weights of the teachers this batch uses."""
        if teacher_set is None:
            return [], [], []
        groups = teacher_set.groups
        chosen, weights = draw_teachers(group_weights(groups), self.teachers_per_batch, self._draws)
        outputs, chosen_groups = teacher_set.run_all(x, chosen), [groups[j] for j in chosen]
        if newest_set is not None:
            outputs = route_unseen_rows(outputs, chosen_groups, newest_set.run(0, x), y)
        return outputs, chosen_groups, weights

    def _n_outputs(self) -> Optional[int]:
        if self.loss != "bce":
            return None
        n = self.bce_classes or self._stream_classes
        if n is None:
            raise ValueError(
                "M2KDPlugin(loss='bce'): the number of classes of the stream is unknown (the experience has no "
                "benchmark to read it from); pass bce_classes=N"
            )
        return n

    def _terms(self, batch: _Batch, logits: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        if batch.terms is None:
            heads = getattr(batch.model, AUX_ATTRIBUTE) if self.uses_aux_heads else None
            aux_logits = heads(batch.features) if heads is not None else []
            probes = None
            if heads is not None and self.aux_supervision == "probe":  # a second pass: pooling and a linear layer, cheap
                probes = heads([f.detach() for f in batch.features])
            batch.terms = self.objective.terms(
                logits,
                targets,
                batch.seen,
                batch.outputs,
                batch.groups,
                batch.weights,
                aux_logits=aux_logits,
                features=batch.features if self.aux == "features" else (),
                n_outputs=self._n_outputs(),
                columns=range(logits.shape[1]) if self.loss == "bce" and self.bce_columns == "all" else None,
                aux_ce_logits=probes,
            )
        return batch.terms

    # -- the loss outside a strategy ----------------------------------------------------------
    def compute_losses(
        self, model: nn.Module, x: Tensor, y: Tensor, current_classes: Optional[Sequence[int]] = None
    ) -> Dict[str, Tensor]:
        """Forward ``model`` on ``(x, y)`` and return :class:`M2KDLoss`'s terms
        plus ``"total"`` (their weighted sum, without the strategy's
        cross-entropy in the softmax form).

        ``current_classes``: the classes of the experience the batch comes from
        (outside training the plugin otherwise knows only the batch's labels).
        Teachers are rebuilt from the snapshot store unless an experience is
        being trained. For tests, notebooks and custom training loops.
        """
        if current_classes is not None:
            self.current_classes = sorted(int(c) for c in current_classes)
        self.prepare_model(model, x[:1])
        training = self._teacher_set is not None
        teacher_set = self._teacher_set if training else self.build_teachers(x.device)
        newest_set = self._newest_set if training else self._build_newest(teacher_set, x.device)
        taps = self._student_taps(model)
        if taps is None:
            logits, features = model(x), []
        else:
            with taps:
                logits = model(x)
                features = taps.features()
        outputs, groups, weights = self._run_teachers(teacher_set, x, y, newest_set)
        batch = _Batch(model, self.seen_classes(torch.unique(y).tolist()), outputs, groups, weights, features)
        terms = dict(self._terms(batch, logits, y))
        terms["total"] = self.objective.total(terms) if terms else logits.new_zeros(())
        return terms

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The criterion for ``loss="bce"`` (pass the plugin as ``criterion``).

        During training: the ``classification`` term of the current batch; in
        evaluation, the plain one-hot sigmoid loss over all outputs.
        """
        if self._batch is None:
            one_hot = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, one_hot)
        return self._terms(self._batch, logits, targets)["classification"]

    # -- Avalanche hooks ---------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        check_listed_once("M2KDPlugin", self, strategy)
        if self.loss == "bce":
            check_is_criterion("M2KDPlugin(loss='bce')", self, strategy, "the M2KD strategy")

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        experience = strategy.experience
        self.current_classes = check_stream("M2KDPlugin", strategy, self._seen_before())
        if self.loss == "bce" and self.bce_classes is None:
            self._stream_classes = stream_class_count(experience) or self._stream_classes
        example = torch.as_tensor(experience.dataset.eval()[0][0])
        if not self.groups:  # once: the model accepts the stream's inputs
            check_model_accepts("M2KDPlugin", strategy.model, example.to(next(strategy.model.parameters()).device), experience)
        self.prepare_model(strategy.model, example)

    def before_training_exp(self, strategy, **kwargs):
        self.snapshots.bind(strategy.model)
        cache = len(self.snapshots) > 0 and decide_cache(
            "M2KDPlugin", self.teacher_cache, strategy.experience.dataset,
            returns_features=self.aux == "features" and bool(self.aux_layers), batch_augmented=batch_augmentation(strategy) is not None,
        )
        self._teacher_set = self.build_teachers(strategy.device, cache=cache)
        self._newest_set = self._build_newest(self._teacher_set, strategy.device)
        # teachers_per_batch: sampled on a generator of its own, so the data stream stays paired
        self._draws = own_generator(_TEACHER_DRAWS) if self.teachers_per_batch is not None else None
        self._checked_this_experience = False
        self._nonfinite = {}

    def before_training_epoch(self, strategy, **kwargs):
        start_epoch(self._teacher_set)
        self._epoch_lrs = [g["lr"] for g in strategy.optimizer.param_groups]

    def after_training_epoch(self, strategy, **kwargs):
        end_epoch("M2KDPlugin", self.teacher_cache, self._teacher_set, strategy.clock.train_exp_epochs)
        check_nonfinite_flags("M2KDPlugin", self._nonfinite, strategy.experience)  # one device read per epoch

    def before_forward(self, strategy, **kwargs):
        taps = self._student_taps(strategy.model)
        if taps is not None:
            taps.attach()

    def after_forward(self, strategy, **kwargs):
        features: List[Tensor] = []
        if self._taps is not None:
            self._taps.detach()
            features = [f.float() for f in self._taps.features()]  # bf16 under autocast
        checked = not self._checked_this_experience or self.check_batches
        if not self._checked_this_experience:
            check_output_width("M2KDPlugin", strategy, max(self.seen_classes()) + 1)
            self._checked_this_experience = True
        elif self.check_batches:
            check_batch("M2KDPlugin", strategy.experience, strategy.mb_x, strategy.mb_y, strategy.mb_output.shape[-1])
        outputs, groups, weights = self._run_teachers(self._teacher_set, strategy.mb_x, strategy.mb_y, self._newest_set)
        self._batch = _Batch(strategy.model, self.seen_classes(), outputs, groups, weights, features, checked=checked)

    def before_backward(self, strategy, **kwargs):
        batch, self._batch = self._batch, None
        if batch is None:
            return
        terms = self._terms(batch, strategy.mb_output, strategy.mb_y)
        if not scaler_skips_non_finite(strategy):  # fp16: the scaler skips non-finite steps itself
            if batch.checked:
                check_finite_terms("M2KDPlugin", terms, strategy.experience)
            else:
                accumulate_nonfinite(self._nonfinite, terms)  # read at the end of the epoch
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        extra = [k for k in terms if k != "classification"]
        if extra:
            strategy.loss += self.objective.total(terms, exclude=("classification",))

    def before_update(self, strategy, **kwargs):
        self.snapshots.before_update(strategy.model)

    def after_update(self, strategy, **kwargs):
        self.snapshots.after_update(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        self.snapshots.prune(model)
        if isinstance(self.snapshots, PackNetSnapshotStore) and self.post_prune_epochs > 0:
            self._finetune_after_pruning(strategy)
        newest = self.snapshots.add(model)
        if self.teachers == "last":  # the older snapshots never teach again
            for k in range(newest):
                if not self.snapshots.released(k):
                    self.snapshots.release(k)
        self.groups.append(list(self.current_classes))
        self.current_classes = []
        self._teacher_set = self._newest_set = None
        self._batch = None

    # -- internals ------------------------------------------------------------------------
    def _finetune_after_pruning(self, strategy) -> None:
        """PackNet's post-pruning fine-tuning: only the weights the new
        snapshot keeps are trained, through the strategy's own training loop
        (its data, every plugin's loss terms and hooks), at ``post_prune_lr``."""
        store = self.snapshots
        assert isinstance(store, PackNetSnapshotStore)
        optimizer = strategy.optimizer
        saved = [g["lr"] for g in optimizer.param_groups]
        rates = [self.post_prune_lr] * len(saved) if self.post_prune_lr is not None else (self._epoch_lrs or saved)
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        store.begin_finetune()
        strategy.model.train()
        try:
            with own_random_stream(_FINETUNE_STREAM):  # its batches leave the run's data stream where full snapshots leave it
                for _ in range(self.post_prune_epochs):
                    strategy.training_epoch()
                    check_nonfinite_flags("M2KDPlugin", self._nonfinite, strategy.experience)
        finally:
            store.end_finetune()
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr
        average_batchnorm_statistics(strategy.model)  # ranks fine-tuned on different shards (no-op in one process)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plugin's whole state: configuration, class groups and snapshots
        (tensors and plain values; save with ``torch.save``). The auxiliary
        heads live in the model's own ``state_dict``."""
        return {
            "format": "avalanche_m2kd.M2KDPlugin/1",
            "config": self.config(),
            "groups": [list(g) for g in self.groups],
            "stream_classes": self._stream_classes,
            "snapshots": self.snapshots.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; the configuration must match
        (an option the saved state predates counts as saved at its default)."""
        if state.get("format") != "avalanche_m2kd.M2KDPlugin/1":
            raise ValueError("not an M2KDPlugin state (missing or unknown 'format')")
        now = self.config()
        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items()}
        saved = {**{k: v for k, v in now.items() if k in defaults and v == defaults[k]}, **state["config"]}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in {**saved, **now} if saved.get(k) != now.get(k)}
            raise ValueError(f"M2KDPlugin state was saved with another configuration (saved, current): {diff}")
        self.groups = [list(g) for g in state["groups"]]
        self._stream_classes = state.get("stream_classes")
        self.snapshots.load_state_dict(state["snapshots"])
        self._teacher_set = self._newest_set = None


__all__ = ["M2KDPlugin"]
