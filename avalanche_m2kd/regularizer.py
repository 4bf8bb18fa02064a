"""M2KD as a regularization object, in the shape of Avalanche's
``LearningWithoutForgetting``: it owns the snapshots, the class groups, the
teachers and the auxiliary heads, and returns M2KD's loss terms for a batch.
:class:`~avalanche_m2kd.M2KDPlugin` calls it from Avalanche's hooks; a plain
PyTorch loop can call it directly (see :class:`M2KDRegularizer`)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Dict, Iterator, List, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._cache import CacheMode, check_cache_mode
from ._experience import check_class_incremental, check_model_accepts, check_new_classes, experience_classes, stream_class_count
from ._random import own_generator
from .losses import AuxMode, LossForm, M2KDLoss, group_weights, route_unseen_rows
from .precision import Precision, check_precision
from .snapshots import StoreKind, head_module_names, make_snapshot_store
from .taps import AUX_ATTRIBUTE, FeatureTaps, attach_auxiliary_heads, resolve_modules
from .teachers import GroupTeacher, TeacherInference, TeacherSet, check_inference, draw_teachers

TeacherMode = Literal["all", "last"]
AuxLayers = Union[Sequence[str], Literal["auto"]]

AUX_LAYERS_ATTRIBUTE = "m2kd_aux_layers"
"""A model names the layers ``aux_layers="auto"`` taps in this attribute (this
library's backbones: their first two stages)."""

_TEACHER_DRAWS = 0x74647277  # salt of the teacher draws' own random stream (see _random)
_OWNER = "M2KDRegularizer"


class M2KDRegularizer:
    """Multi-model and multi-level knowledge distillation (M2KD) as a loss
    object: distils a model from every earlier snapshot of itself.

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
    + aux_weight * L_AUX``, where CE is the caller's cross-entropy. With
    ``loss="bce"`` (iCaRL's form) the classification loss itself is a per-class
    sigmoid cross-entropy over the seen classes whose targets are one-hot for
    the current classes and ``sigmoid(g_k(x)[c])`` for each old class ``c`` in
    ``C_k``: the ``classification`` term replaces the cross-entropy. The math
    is :class:`~avalanche_m2kd.losses.M2KDLoss` (``regularizer.objective``).

    In a plain loop (an Avalanche stream, no strategy)::

        reg = M2KDRegularizer(loss="bce")
        for experience in benchmark.train_stream:
            reg.pre_adapt(model, experience)          # classes, auxiliary heads
            avalanche_model_adaptation(model, experience)
            optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
            for x, y in DataLoader(experience.dataset, batch_size=128, shuffle=True):
                with reg.taps(model):                 # records the tapped layers
                    logits = model(x)
                loss = reg.total(reg(x, logits, y, model))  # loss="kl": + cross-entropy
                optimizer.zero_grad(); loss.backward(); optimizer.step()
            reg.post_adapt(model, experience)         # the snapshot

    The teachers are built on the first call of an experience and reused by
    every later call. ``snapshot_store="packnet"`` constrains training: call
    ``reg.snapshots.before_update(model)`` and ``after_update(model)`` around
    each optimizer step (the plugin does), and fine-tune after pruning
    yourself if you want it.

    An argument that does not apply to the chosen form (``mm_weight`` with
    ``loss="bce"``, ``prune_ratio`` with ``snapshot_store="full"``, the
    auxiliary options with ``aux_layers=()``, ...) is refused if given a value
    other than its default, instead of being ignored.

    Args:
        temperature: distillation temperature ``T``. Default 2 [ours]: the LwF
            convention.
        mm_weight: weight of ``L_MM``. Default 0.25 [ours]: at ``T = 2`` this
            makes ``teachers="last"`` exactly as strong as Avalanche's LwF at its
            default ``alpha = 1`` (whose KL has no ``T^2``), so comparisons
            start from the same strength; weight 1 over-regularises on
            Split-Digits with exemplars (measured). ``loss="kl"`` only.
        aux_weight: weight of the auxiliary distillation ``L_AUX`` (summed over
            tapped layers). Default 0.25 [ours], as ``mm_weight``. With
            ``loss="bce"`` it weights each auxiliary head's per-class sigmoid loss.
        aux_ce_weight: weight of the auxiliary heads' cross-entropy (deep
            supervision). Default 1 [ours]. ``loss="kl"`` with ``aux="logits"`` only.
        aux_supervision: what the auxiliary heads' cross-entropy trains.
            ``"deep"`` (default [ours], deep supervision): the heads and the
            layers below them, so every tapped stage is pushed to separate the
            classes on its own; ``"probe"``: the heads only (they read detached
            features, as linear probes), so the backbone moves only through the
            classification loss and the distillation terms. Distillation of the
            heads reaches the backbone either way. ``loss="kl"`` only.
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
            Only with ``teachers="all"`` and without ``teachers_per_batch``.
        aux_layers: dotted module names to tap (e.g. ``("stage1", "stage2")``);
            ``()`` disables multi-level distillation. Default ``"auto"``
            [paper: M2KD is multi-level]: the layers the model names in its
            ``m2kd_aux_layers`` attribute (this library's backbones: their first
            two stages, as the runner uses); a model without one trains without
            auxiliary heads, with a warning.
        aux: ``"logits"`` (auxiliary heads, default [ours]) or ``"features"``
            (feature-map matching).
        feature_distance: ``"mse"`` (default [ours]) or ``"attention"``
            (attention transfer); ``aux="features"`` only.
        snapshot_store: ``"full"`` (default [ours]: exact teachers and no
            constraint on training; small models make the memory moot),
            ``"packnet"`` (the paper's mask-based pruning as we read it) or
            ``"sparse"``. See :mod:`avalanche_m2kd.snapshots`.
        prune_ratio: for ``packnet``, the fraction of free weights pruned (left
            free) after each experience; for ``sparse``, the fraction of each
            weight tensor dropped. Default 0.75 [ours] (PackNet's own setting).
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
        snapshot_heads: which rows of a snapshot's heads (main and auxiliary)
            the store keeps. ``"read"`` (default [ours]): the rows of the classes
            its teacher is read at (its own group; every old class for the
            newest snapshot with ``teachers="last"`` or
            ``old_targets="informed"``), which is all M2KD reads, so the loss is
            unchanged; a growing head holds a row per class id up to the largest
            seen, so this takes PackNet snapshots of a CIFAR-100 ResNet-32 from
            1.80 to 1.43 bytes per parameter. A rebuilt teacher then
            predicts 0 at the other classes. ``"whole"``: every row, for
            analyses that read a snapshot at classes it does not teach.
        teacher_cache: ``"auto"`` (default) stores every snapshot's outputs per
            training input and reuses them in later epochs when the training
            transform is deterministic (the plugin checks by reading samples
            twice), exact by construction; ``"exact"`` insists (random
            augmentation is an error); ``"off"`` never caches. Feature maps
            (``aux="features"``) are not cached. A plain loop does not cache.
        batched_teachers: evaluate all snapshots in one ``torch.func.vmap`` pass
            over their stacked weights instead of a Python loop. Same outputs
            (to float rounding). Default False [ours]: on a 2-core CPU it does
            not pay (see the README's speed table).
        teachers_per_batch: if set (``k``), each batch draws ``k`` snapshots with
            replacement, with probability ``w_k``, and weights each drawn one by
            its count over ``k``: the expected loss equals the full multi-model
            loss, at ``k`` teacher forwards per batch (see
            :func:`~avalanche_m2kd.teachers.draw_teachers`); the draws use a
            random stream of their own. ``loss="kl"`` only. Default None
            (every snapshot, every batch).
        teacher_precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the
            precision of the snapshots' forward passes (their outputs come back in
            float32). bf16 halves their cost on CPUs with bf16 units and GPUs.
        teacher_inference: ``"fused"`` (default [ours]) runs each snapshot with
            its BatchNorm folded into the convolutions and channels-last images,
            about 1.2x faster on CPUs (README speed table), equal to float
            rounding; ``"plain"`` runs the snapshots as stored, bit for bit;
            ``"compiled"`` runs the fused copies through ``torch.compile``
            (checked against the uncompiled copy on the first batch of each
            shape; not with ``batched_teachers``).
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
        aux_layers: AuxLayers = "auto",
        aux: AuxMode = "logits",
        feature_distance: Literal["mse", "attention"] = "mse",
        snapshot_store: StoreKind = "full",
        prune_ratio: float = 0.75,
        loss: LossForm = "kl",
        bce_classes: Optional[int] = None,
        bce_columns: Literal["seen", "all"] = "seen",
        head_layers: Optional[Sequence[str]] = None,
        snapshot_heads: Literal["read", "whole"] = "read",
        teacher_cache: CacheMode = "auto",
        batched_teachers: bool = False,
        teachers_per_batch: Optional[int] = None,
        teacher_precision: Precision = "fp32",
        teacher_inference: TeacherInference = "fused",
    ):
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_cache_mode(_OWNER, teacher_cache)
        check_precision(teacher_precision, _OWNER)
        check_inference(teacher_inference, _OWNER)
        for name, value, allowed in (
            ("aux_supervision", aux_supervision, ("deep", "probe")),
            ("teachers", teachers, ("all", "last")),
            ("old_targets", old_targets, ("owner", "informed")),
            ("bce_columns", bce_columns, ("seen", "all")),
            ("snapshot_heads", snapshot_heads, ("read", "whole")),
        ):
            if value not in allowed:
                raise ValueError(f"{_OWNER}: {name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        try:
            self.objective = M2KDLoss(loss, temperature, mm_weight, aux_weight, aux_ce_weight, aux, feature_distance)
        except ValueError as err:  # the loss object validates the arguments it holds
            raise ValueError(f"{_OWNER}: {err}") from None
        if isinstance(aux_layers, str) and aux_layers != "auto":
            aux_layers = (aux_layers,)
        given["aux_layers"] = aux_layers
        _refuse_what_does_not_apply(given)
        if teachers_per_batch is not None and teachers_per_batch < 1:
            raise ValueError(f"{_OWNER}: teachers_per_batch must be >= 1, got {teachers_per_batch}")
        if old_targets == "informed" and teachers_per_batch is not None:
            raise ValueError(f"{_OWNER}: old_targets='informed' needs every snapshot each batch; leave teachers_per_batch unset")
        if batched_teachers and teacher_inference == "compiled":
            raise ValueError(f"{_OWNER}: batched_teachers runs a vmap that is not compiled; use teacher_inference='fused' with it")
        if bce_classes is not None and bce_classes < 1:
            raise ValueError(f"{_OWNER}: bce_classes must be >= 1, got {bce_classes}")
        self.aux_supervision = aux_supervision
        self.teachers = teachers
        self.old_targets = old_targets
        self.aux_layers_argument: AuxLayers = aux_layers if aux_layers == "auto" else tuple(aux_layers)
        self.aux_layers: Optional[List[str]] = None if aux_layers == "auto" else list(aux_layers)
        """The tapped layers (None until ``"auto"`` is resolved on the first model)."""
        self.bce_classes = bce_classes
        self.bce_columns = bce_columns
        self.snapshot_heads = snapshot_heads
        self.teacher_cache = teacher_cache
        self.batched_teachers = bool(batched_teachers)
        self.teachers_per_batch = teachers_per_batch
        self.teacher_precision = teacher_precision
        self.teacher_inference = teacher_inference
        self.snapshots = make_snapshot_store(snapshot_store, prune_ratio, head_layers)
        self.groups: List[List[int]] = []
        """Classes introduced by each finished experience (``C_1, C_2, ...``)."""
        self.current_classes: List[int] = []
        self.stream_classes: Optional[int] = None
        self._teacher_set: Optional[TeacherSet] = None
        self._newest_set: Optional[TeacherSet] = None  # old_targets="informed": the newest snapshot over all old classes
        self._draws: Optional[torch.Generator] = None
        self._taps: Optional[FeatureTaps] = None

    # -- configuration ----------------------------------------------------------------
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
    def uses_aux_heads(self) -> bool:
        """Whether auxiliary heads are (or, for an unresolved ``"auto"``, may be) attached."""
        return self.aux == "logits" and (self.aux_layers is None or bool(self.aux_layers))

    @property
    def teacher_set(self) -> Optional[TeacherSet]:
        """The frozen teachers of the experience being trained (None before the
        first call of an experience, or before the first snapshot)."""
        return self._teacher_set

    @property
    def informed_teachers(self) -> Optional[TeacherSet]:
        """``old_targets="informed"``: the newest snapshot over every old class,
        judging the rows a group's owner never saw (None otherwise, or before
        the second snapshot)."""
        return self._newest_set

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
            "aux_layers": self.aux_layers_argument if self.aux_layers_argument == "auto" else list(self.aux_layers_argument),
            "aux": o.aux,
            "feature_distance": o.feature_distance,
            "snapshot_store": self.snapshots.kind,
            "prune_ratio": getattr(self.snapshots, "prune_ratio", None),
            "loss": o.form,
            "bce_classes": self.bce_classes,
            "bce_columns": self.bce_columns,
            "head_layers": self.snapshots.head_layers,
            "snapshot_heads": self.snapshot_heads,
            "teacher_cache": self.teacher_cache,
            "batched_teachers": self.batched_teachers,
            "teachers_per_batch": self.teachers_per_batch,
            "teacher_precision": self.teacher_precision,
            "teacher_inference": self.teacher_inference,
        }

    def seen_classes(self, extra: Sequence[int] = ()) -> List[int]:
        """Classes of finished experiences, the current one and ``extra``."""
        return sorted({c for g in self.groups for c in g} | set(self.current_classes) | {int(c) for c in extra})

    def old_classes(self) -> List[int]:
        """Classes of the finished experiences."""
        return sorted({c for g in self.groups for c in g})

    # -- the experience's start --------------------------------------------------------
    def pre_adapt(self, model: nn.Module, experience) -> None:
        """Start a training experience: check that it is class-incremental and
        brings new classes, read the stream's class count (``loss="bce"``),
        check the model on one input and attach the auxiliary heads (before the
        optimizer is made, so that it trains them)."""
        check_class_incremental(_OWNER, model, experience)
        self.current_classes = check_new_classes(_OWNER, experience, self.old_classes())
        if self.loss == "bce" and self.bce_classes is None:
            self.stream_classes = stream_class_count(experience) or self.stream_classes
        example = torch.as_tensor(experience.dataset.eval()[0][0]).to(next(model.parameters()).device)
        if not self.groups:  # once: the model accepts the stream's inputs
            check_model_accepts(_OWNER, model, example, experience)
        self.prepare_model(model, example)
        self.end_teachers()

    def prepare_model(self, model: nn.Module, example: Tensor) -> None:
        """Resolve and check ``aux_layers`` and attach the auxiliary heads
        (once). ``example`` is one input (with or without batch dimension),
        used to read the tapped layers' channel counts."""
        if self.aux_layers is None:
            self.aux_layers = list(getattr(model, AUX_LAYERS_ATTRIBUTE, ()))
            if not self.aux_layers:
                warnings.warn(
                    f"{_OWNER}: aux_layers='auto' but {type(model).__name__} names no layers to tap (no "
                    f"'{AUX_LAYERS_ATTRIBUTE}' attribute); training without auxiliary heads. Pass aux_layers=(...) "
                    "for multi-level distillation, or aux_layers=() to silence this",
                    stacklevel=3,
                )
        resolve_modules(model, self.aux_layers)
        heads = set(head_module_names(model, self.snapshots.head_layers))
        named_heads = [n for n in self.aux_layers if n in heads or any(n.startswith(h + ".") for h in heads)]
        if named_heads:
            raise ValueError(
                f"{_OWNER}: aux_layers {named_heads} name the classifier head; tap intermediate layers "
                "(the output is distilled already), e.g. the backbone's stages"
            )
        if self.uses_aux_heads:
            attach_auxiliary_heads(model, self.aux_layers, example)
        self.snapshots.bind(model)

    # -- teachers -----------------------------------------------------------------------
    def teacher_groups(self) -> List[List[int]]:
        """The class group each teacher of the current experience owns."""
        if len(self.snapshots) == 0:
            return []
        return [list(g) for g in self.groups] if self.teachers == "all" else [self.old_classes()]

    def build_teachers(self, device: torch.device | str = "cpu", cache: bool = False) -> Optional[TeacherSet]:
        """Rebuild the current experience's frozen teachers from the snapshot
        store (every snapshot owning its group, or the last one owning every
        old class) and keep them for the following calls; None before the
        first snapshot. ``cache``: store their outputs per input (use only
        when the inputs recur bit for bit; the plugin decides)."""
        self.end_teachers()
        n = len(self.snapshots)
        if n == 0:
            return None
        indices = list(range(n)) if self.teachers == "all" else [n - 1]
        teachers = [GroupTeacher(self.snapshots.teacher(k, device), g) for k, g in zip(indices, self.teacher_groups())]
        self._teacher_set = self._set_of(teachers, device, cache, self.batched_teachers)
        if self.old_targets == "informed" and self.teachers == "all" and n > 1:  # the newest snapshot, not rebuilt
            self._newest_set = self._set_of([GroupTeacher(teachers[-1].module, self.old_classes())], device)
        self._draws = own_generator(_TEACHER_DRAWS) if self.teachers_per_batch is not None else None
        return self._teacher_set

    def end_teachers(self) -> None:
        """Release the teachers (the next call rebuilds them)."""
        self._teacher_set = self._newest_set = None

    def _set_of(self, teachers: List[GroupTeacher], device, cache: bool = False, batched: bool = False) -> TeacherSet:
        return TeacherSet(
            teachers,
            feature_layers=self.aux_layers or (),
            aux_logits=self.uses_aux_heads,
            batched=batched,
            cache=cache,
            precision=self.teacher_precision,
            inference=self.teacher_inference,
        ).to(device)

    # -- the loss -----------------------------------------------------------------------
    def taps(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context to run the model's forward in: it records the tapped
        layers' outputs for the next call (a no-op without ``aux_layers``)."""
        if not self.aux_layers:
            return contextlib.nullcontext()
        if self._taps is None or self._taps.model is not model:
            self._taps = FeatureTaps(model, self.aux_layers)
        return self._taps

    def __call__(self, x: Tensor, logits: Tensor, y: Tensor, model: nn.Module) -> Dict[str, Tensor]:
        """The unweighted loss terms of one batch (:meth:`M2KDLoss.terms`), by
        name; weigh them with :meth:`total`. ``logits`` come from ``model``'s
        forward on ``x``, run inside :meth:`taps` when layers are tapped."""
        if self.aux_layers is None:
            raise RuntimeError(f"{_OWNER}: call pre_adapt(model, experience) before the first batch")
        features = self._features(model)
        if self._teacher_set is None and len(self.snapshots) > 0:
            self.build_teachers(x.device)
        outputs, groups, weights = [], [], []
        if self._teacher_set is not None:
            chosen, weights = draw_teachers(group_weights(self._teacher_set.groups), self.teachers_per_batch, self._draws)
            outputs, groups = self._teacher_set.run_all(x, chosen), [self._teacher_set.groups[j] for j in chosen]
            if self._newest_set is not None:
                outputs = route_unseen_rows(outputs, groups, self._newest_set.run(0, x), y)
        heads = getattr(model, AUX_ATTRIBUTE) if self.uses_aux_heads else None
        probes = None
        if heads is not None and self.aux_supervision == "probe":  # a second pass: pooling and a linear layer, cheap
            probes = heads([f.detach() for f in features])
        return self.objective.terms(
            logits,
            y,
            self.seen_classes(torch.unique(y).tolist() if not self.current_classes else ()),
            outputs,
            groups,
            weights,
            aux_logits=heads(features) if heads is not None else [],
            features=features if self.aux == "features" else (),
            n_outputs=self._n_outputs(),
            columns=range(logits.shape[1]) if self.loss == "bce" and self.bce_columns == "all" else None,
            aux_ce_logits=probes,
        )

    def total(self, terms: Dict[str, Tensor], exclude: Sequence[str] = ()) -> Tensor:
        """The weighted sum of ``terms`` (without those named in ``exclude``)."""
        return self.objective.total(terms, exclude)

    def _features(self, model: nn.Module) -> List[Tensor]:
        if not self.aux_layers:
            return []
        taps = self._taps
        if taps is None or taps.model is not model or not taps.outputs:
            raise RuntimeError(
                f"{_OWNER}: the tapped layers {self.aux_layers} recorded nothing for this batch; run the "
                "model's forward inside `with regularizer.taps(model):`"
            )
        features = [f.float() for f in taps.features()]  # bf16 under autocast
        taps.outputs = {}  # one batch's features serve one call
        return features

    def _n_outputs(self) -> Optional[int]:
        if self.loss != "bce":
            return None
        n = self.bce_classes or self.stream_classes
        if n is None:
            raise ValueError(
                f"{_OWNER}(loss='bce'): the number of classes of the stream is unknown (the experience has no "
                "benchmark to read it from); pass bce_classes=N"
            )
        return n

    # -- the experience's end ----------------------------------------------------------
    def post_adapt(self, model: nn.Module, experience=None) -> int:
        """End a training experience: snapshot the model (pruned first with
        ``packnet``), release the snapshots that never teach again
        (``teachers="last"``), record the experience's classes and drop the
        head rows no teacher will read (``snapshot_heads="read"``). Returns the
        snapshot's index."""
        if not self.current_classes:
            if experience is None:
                raise RuntimeError(f"{_OWNER}: post_adapt needs the experience (pre_adapt was not called)")
            self.current_classes = check_new_classes(_OWNER, experience, self.old_classes())
        self.end_teachers()
        newest = self.snapshots.add(model)
        if self.teachers == "last":
            for k in range(newest):
                if not self.snapshots.released(k):
                    self.snapshots.release(k)
        self.groups.append(list(self.current_classes))
        self.current_classes = []
        if self.snapshot_heads == "read":
            self._drop_unread_rows(newest)
        return newest

    def _drop_unread_rows(self, newest: int) -> None:
        """Keep in the newest snapshot's heads the rows of the classes its
        teacher is read at, and, once it is no longer the newest, cut a
        snapshot that read every old class down to its own group."""
        newest_reads_all = self.teachers == "last" or self.old_targets == "informed"
        self.snapshots.keep_head_rows(newest, self.old_classes() if newest_reads_all else self.groups[newest])
        if newest_reads_all and self.teachers == "all" and newest > 0:
            self.snapshots.keep_head_rows(newest - 1, self.groups[newest - 1])

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Configuration, class groups and snapshots (tensors and plain values;
        save with ``torch.save``). The auxiliary heads live in the model's own
        ``state_dict``."""
        return {
            "format": "avalanche_m2kd.M2KDRegularizer/1",
            "config": self.config(),
            "groups": [list(g) for g in self.groups],
            "stream_classes": self.stream_classes,
            "snapshots": self.snapshots.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; the configuration must match
        (an option the saved state predates counts as saved at its default)."""
        if state.get("format") not in ("avalanche_m2kd.M2KDRegularizer/1", "avalanche_m2kd.M2KDPlugin/1"):
            raise ValueError("not an M2KD state (missing or unknown 'format')")
        now = self.config()
        saved = {**{k: v for k, v in now.items() if v == _defaults().get(k, _MISSING)}, **_known(state["config"])}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in {**saved, **now} if saved.get(k) != now.get(k)}
            raise ValueError(f"M2KD state was saved with another configuration (saved, current): {diff}")
        self.groups = [list(g) for g in state["groups"]]
        self.stream_classes = state.get("stream_classes")
        self.snapshots.load_state_dict(state["snapshots"])
        self.end_teachers()


_MISSING = object()


def _defaults() -> dict:
    return {n: p.default for n, p in inspect.signature(M2KDRegularizer.__init__).parameters.items() if n != "self"}


def _known(config: dict) -> dict:
    """A saved configuration without the plugin's own options (states saved
    before the regularizer existed held them)."""
    return {k: v for k, v in config.items() if k in _defaults()}


# Options that apply only to some forms: (option, the condition under which it applies, what to change).
_APPLIES_WHEN = (
    ("mm_weight", lambda a: a["loss"] == "kl", "loss='kl' (with 'bce' distillation is inside the classification loss)"),
    ("aux_ce_weight", lambda a: a["loss"] == "kl" and a["aux"] == "logits" and a["aux_layers"] != (),
     "loss='kl' with auxiliary heads"),
    ("aux_supervision", lambda a: a["loss"] == "kl" and a["aux"] == "logits" and a["aux_layers"] != (),
     "loss='kl' with auxiliary heads (with 'bce' each head has one sigmoid loss that both classifies and distils)"),
    ("teachers_per_batch", lambda a: a["loss"] == "kl", "loss='kl' (with 'bce' teachers supply targets, not terms)"),
    ("aux_weight", lambda a: a["aux_layers"] != (), "tapped layers (aux_layers)"),
    ("aux", lambda a: a["aux_layers"] != (), "tapped layers (aux_layers)"),
    ("feature_distance", lambda a: a["aux"] == "features" and a["aux_layers"] != (), "aux='features'"),
    ("prune_ratio", lambda a: a["snapshot_store"] in ("packnet", "sparse"), "snapshot_store='packnet' or 'sparse'"),
    ("bce_classes", lambda a: a["loss"] == "bce", "loss='bce'"),
    ("bce_columns", lambda a: a["loss"] == "bce", "loss='bce'"),
)


def _refuse_what_does_not_apply(arguments: dict) -> None:
    defaults = _defaults()
    for name, applies, when in _APPLIES_WHEN:
        if arguments[name] != defaults[name] and not applies(arguments):
            raise ValueError(f"{_OWNER}: {name}={arguments[name]!r} applies only with {when}; leave it at its default")


__all__ = ["AUX_LAYERS_ATTRIBUTE", "M2KDRegularizer"]
