"""Distillation losses as pure tensor functions.

Nothing here knows about Avalanche, strategies or teachers: every function takes
tensors (and class groups as lists of class ids) and returns a scalar tensor, so
each can be checked against a hand computation.

Conventions
-----------
* A *group* is the ordered list of global class ids that one teacher owns
  (M2KD: the classes first seen in one experience; ED: one stage's classes).
* Student logits are indexed by global class id (column ``c`` is class ``c``).
* Teacher logits for a group are already restricted to that group, in the
  group's order (column ``j`` is class ``group[j]``).
* Every loss is a mean over the batch.
"""

from __future__ import annotations

import math

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Group = Sequence[int]


@dataclass
class TeacherOutput:
    """One teacher's outputs on a batch: logits restricted to its group's
    columns (column ``j`` is class ``group[j]``), the same for each auxiliary
    head, and the tapped feature maps (feature matching only)."""

    logits: Tensor
    aux_logits: List[Tensor] = field(default_factory=list)
    features: List[Tensor] = field(default_factory=list)


# Class groups arrive as Python lists, fixed for a whole experience. Their index
# tensors are built once per device and reused, and every check on them is made
# in Python: a training step then reads nothing back from the device (on a GPU,
# each read is a stall).
@functools.lru_cache(maxsize=1024)
def _cached_index(group: Tuple[int, ...], device: str) -> Tensor:
    return torch.tensor(group, dtype=torch.long, device=device)


def class_position_table(classes: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """``table[c]`` = position of class ``c`` in ``classes`` (a teacher's local
    label, a column of a group), -1 for classes not in it."""
    classes = [int(c) for c in classes]
    table = torch.full((max(classes) + 1,), -1, dtype=torch.long, device=device)
    table[classes] = torch.arange(len(classes), device=device)
    return table


@functools.lru_cache(maxsize=1024)
def _cached_position_table(classes: Tuple[int, ...], device: str) -> Tensor:
    return class_position_table(classes, device)


def _as_index(group: Group | Tensor, device: torch.device) -> Tensor:
    """A long tensor of the class ids (shared and read-only for Python groups)."""
    if isinstance(group, Tensor):
        return group.to(device=device, dtype=torch.long)
    return _cached_index(tuple(int(c) for c in group), str(device))


def _columns(logits: Tensor, classes: Group | Tensor, caller: str) -> Tensor:
    """Index of ``classes`` as columns of ``logits``, checking the width."""
    if isinstance(classes, Tensor):
        largest = int(classes.max()) if classes.numel() else -1
    else:
        classes = [int(c) for c in classes]
        largest = max(classes, default=-1)
    if largest >= logits.shape[1]:
        raise ValueError(
            f"{caller}: logits have {logits.shape[1]} columns but class {largest} is needed; "
            "adapt the model to the experience first (heads grow in Avalanche's model adaptation)"
        )
    return _as_index(classes, logits.device)


def _label_positions(classes: Group, targets: Tensor, caller: str) -> Tensor:
    """Position of each label inside the ordered Python list ``classes``, with
    no read back from the device: a label outside ``classes`` fails a
    ``torch._assert_async`` check (at once on a CPU, asynchronously on a GPU)."""
    classes = tuple(int(c) for c in classes)
    table = _cached_position_table(classes, str(targets.device))
    labels = targets.long()
    inside = (labels >= 0) & (labels < table.numel())
    positions = torch.where(inside, table[labels.clamp(0, table.numel() - 1)], -1)
    torch._assert_async((positions >= 0).all(), f"{caller}: a label is not among the classes {list(classes)}")
    return positions


def group_weights(groups: Sequence[Group]) -> list[float]:
    """M2KD's per-teacher weights ``w_k = |C_k| / sum_j |C_j|``.

    Weighting by class count makes every old class count the same, whatever
    the size of the experience that introduced it.
    """
    sizes = [len(g) for g in groups]
    total = sum(sizes)
    if total == 0:
        raise ValueError("group_weights: all groups are empty")
    return [s / total for s in sizes]


def kl_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    The ``T^2`` factor keeps the gradient scale independent of ``T``
    (Hinton et al.), so loss weights need not change with the temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kl_distillation: student logits {tuple(student_logits.shape)} and teacher "
            f"logits {tuple(teacher_logits.shape)} must have the same shape"
        )
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * t * t


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``-sum_c softmax(teacher/T)_c * log softmax(student/T)_c``, batch mean (no ``T^2``).

    This is ED's distillation term as its authors' code computes it: the KL
    divergence plus the teacher's entropy, a constant for the student.
    """
    return _soft_cross_entropy_rows(student_logits, teacher_logits, float(temperature)).mean()


def _soft_cross_entropy_rows(student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
    p_teacher = F.softmax(teacher_logits / t, dim=1)
    return -(p_teacher * F.log_softmax(student_logits / t, dim=1)).sum(dim=1)


SampleDistillation = Callable[[Tensor, Tensor, float], Tensor]
"""A per-sample distillation loss: ``(student_logits [n, c], teacher_logits
[n, c], temperature) -> [n]`` losses, each already scaled as it enters the
total (ED weighs their batch mean by ``1 - alpha``)."""


def hinton_sample_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * soft_CE(teacher/T, student/T)`` per sample: ED's own term (its
    code's soft cross-entropy, with Hinton's ``T^2``)."""
    t = float(temperature)
    return _soft_cross_entropy_rows(student_logits, teacher_logits, t) * (t * t)


def logit_mse_sample_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Mean squared difference of the logits per sample (logit matching, Ba and
    Caruana 2014); the temperature is not used."""
    return (student_logits - teacher_logits).pow(2).mean(dim=1)


SAMPLE_DISTILLATIONS: Dict[str, SampleDistillation] = {"hinton": hinton_sample_loss, "logit_mse": logit_mse_sample_loss}
"""The per-sample distillation losses known by name."""


def sample_distillation(spec: "str | SampleDistillation") -> SampleDistillation:
    """A :data:`SampleDistillation` from a name in :data:`SAMPLE_DISTILLATIONS` or a callable."""
    if callable(spec):
        return spec
    if spec not in SAMPLE_DISTILLATIONS:
        raise ValueError(f"unknown distillation {spec!r}; choose from {', '.join(SAMPLE_DISTILLATIONS)} or pass a callable")
    return SAMPLE_DISTILLATIONS[spec]


def distill_group_logits(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    groups: Sequence[Group | Tensor],
    temperature: float = 2.0,
    weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """M2KD's multi-model distillation over class groups.

    ``sum_k w_k * T^2 * KL(softmax(g_k/T) || softmax(f[:, C_k]/T))``, batch mean,
    where ``g_k = teacher_logits[k]`` are teacher k's logits on its own group
    ``C_k = groups[k]`` and ``f`` the student's logits over global classes.

    Args:
        student_logits: ``[B, n_classes]`` student logits, column = class id.
        teacher_logits: one ``[B, |C_k|]`` tensor per teacher, in group order.
        groups: the class ids each teacher owns.
        temperature: softmax temperature ``T``.
        weights: per-group weights; default ``group_weights(groups)``.
    """
    if len(teacher_logits) != len(groups):
        raise ValueError(
            f"distill_group_logits: {len(teacher_logits)} teacher outputs for {len(groups)} groups"
        )
    if not groups:
        return student_logits.new_zeros(())
    if weights is None:
        weights = group_weights(groups)
    total = student_logits.new_zeros(())
    for logits_k, group, w in zip(teacher_logits, groups, weights):
        index = _columns(student_logits, group, "distill_group_logits")
        total = total + w * kl_distillation(student_logits.index_select(1, index), logits_k, temperature)
    return total


FeatureDistance = Literal["mse", "attention"]


def attention_map(features: Tensor) -> Tensor:
    """Attention transfer map (Zagoruyko & Komodakis): the channel mean of the
    squared activations, flattened and L2-normalised per sample."""
    if features.dim() < 3:
        raise ValueError("attention_map needs feature maps [B, C, ...], got shape " f"{tuple(features.shape)}")
    att = features.pow(2).mean(dim=1).flatten(1)
    return F.normalize(att, dim=1)


def feature_distance(student: Tensor, teacher: Tensor, kind: FeatureDistance = "mse") -> Tensor:
    """Distance between a student's and a teacher's feature maps, batch mean.

    ``"mse"``: mean squared error over all elements. ``"attention"``: squared L2
    distance between attention maps (see :func:`attention_map`), batch mean.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_distance: student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} differ; feature matching needs the same architecture"
        )
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "attention":
        return (attention_map(student) - attention_map(teacher)).pow(2).sum(dim=1).mean()
    raise ValueError(f"feature_distance: unknown kind {kind!r}; use 'mse' or 'attention'")


def distill_group_features(
    student_features: Tensor,
    teacher_features: Sequence[Tensor],
    weights: Sequence[float],
    kind: FeatureDistance = "mse",
) -> Tensor:
    """``sum_k w_k * d(student, teacher_k)``: feature matching against several teachers."""
    if len(teacher_features) != len(weights):
        raise ValueError("distill_group_features: one weight per teacher is needed")
    total = student_features.new_zeros(())
    for feats, w in zip(teacher_features, weights):
        total = total + w * feature_distance(student_features, feats, kind)
    return total


def education_distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Sequence[Tensor],
    sample_index: Sequence[Tensor],
    groups: Sequence[Group | Tensor],
    alpha: float = 0.3,
    temperature: float = 4.0,
    distillation: "str | SampleDistillation" = "hinton",
) -> Tensor:
    """ED's loss: ``alpha * CE(z, y) + (1 - alpha) * KD``.

    Each sample is distilled only from the teacher of its own stage, on stage
    k's logit slice ``z[C_k]`` only [ED code]; by default
    (``distillation="hinton"``) ``KD = T^2 * soft_CE(teacher_k(x)/T, z[C_k]/T)``.
    KD is averaged over the whole batch (samples of every stage together).

    Args:
        student_logits: ``[B, n_classes]``; column = global class id.
        targets: ``[B]`` global labels.
        teacher_logits: per stage, ``[n_k, |C_k|]`` logits of stage k's teacher
            on the samples ``sample_index[k]`` (stages with no sample may hold
            empty tensors); ``[B, |C_k|]`` on the whole batch where
            ``sample_index[k]`` is a mask.
        sample_index: per stage, the batch positions of its samples (long),
            or a ``[B]`` boolean mask of them: the mask form needs no count
            from the device (see ``TeacherSet.run_routed``).
        groups: per stage, its global class ids (teacher column order).
        alpha: weight of the cross-entropy; ``alpha = 1`` is plain CE.
        temperature: distillation temperature ``T``.
        distillation: the per-sample distillation loss, a name in
            :data:`SAMPLE_DISTILLATIONS` or a :data:`SampleDistillation`
            (ED "combined with distillation algorithms").
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"education_distillation_loss: alpha must be in [0, 1], got {alpha}")
    distill = sample_distillation(distillation)
    ce = F.cross_entropy(student_logits, targets)
    if alpha == 1.0:
        return ce
    kd_sum = student_logits.new_zeros(())
    for logits_k, index_k, group in zip(teacher_logits, sample_index, groups):
        if index_k.numel() == 0:
            continue
        columns = _columns(student_logits, group, "education_distillation_loss")
        if index_k.dtype == torch.bool:  # teacher k ran on the whole batch; its samples are the mask's rows
            student_k = student_logits.index_select(1, columns)
            per_sample = distill(student_k, logits_k.to(student_k.dtype), float(temperature))
            kd_sum = kd_sum + torch.where(index_k, per_sample, per_sample.new_zeros(())).sum()
            continue
        student_k = student_logits.index_select(0, index_k).index_select(1, columns)
        kd_sum = kd_sum + distill(student_k, logits_k.to(student_k.dtype), float(temperature)).sum()
    return alpha * ce + (1.0 - alpha) * kd_sum / student_logits.shape[0]


def class_positions(classes: Sequence[int] | Tensor, targets: Tensor) -> Tensor:
    """Position of each label of ``targets`` inside the ordered ``classes``.

    Raises ``ValueError`` for a label that is not among ``classes``.
    """
    index = _as_index(classes, targets.device)
    size = max(int(index.max()), int(targets.max()) if targets.numel() else 0) + 1
    lookup = torch.full((size,), -1, dtype=torch.long, device=targets.device)
    lookup[index] = torch.arange(index.numel(), device=targets.device)
    positions = lookup[targets.long()]
    if bool((positions < 0).any()):
        bad = sorted({int(y) for y, p in zip(targets.tolist(), positions.tolist()) if p < 0})
        raise ValueError(f"labels {bad} are not among the classes {index.tolist()}")
    return positions


def cross_entropy_over(logits: Tensor, targets: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    """Cross-entropy restricted to the columns ``classes`` (e.g. the classes
    seen so far), batch mean. Columns of other classes do not take part."""
    index = _columns(logits, classes, "cross_entropy_over")
    if isinstance(classes, Tensor):
        positions = class_positions(index, targets)
    else:
        positions = _label_positions(classes, targets, "cross_entropy_over")
    return F.cross_entropy(logits.index_select(1, index), positions)


def group_sigmoid_targets(
    targets: Tensor,
    columns: Sequence[int] | Tensor,
    teacher_logits: Sequence[Tensor],
    groups: Sequence[Group | Tensor],
) -> Tensor:
    """iCaRL-form targets over the classes ``columns``.

    One-hot of ``targets`` over ``columns``; then, for every group ``C_k`` and
    class ``c = C_k[j]``, the column of ``c`` is replaced by
    ``sigmoid(teacher_logits[k][:, j])``: the snapshot that learned ``c``
    supplies its target. Returns ``[B, len(columns)]``.
    """
    device = targets.device
    if isinstance(columns, Tensor):
        columns_t = _as_index(columns, device)
        width = columns_t.numel()
        label_positions = class_positions(columns_t, targets)
        group_positions = [class_positions(columns_t, _as_index(g, device)) for g in groups]
    else:  # Python lists: positions found without reading the device
        columns = [int(c) for c in columns]
        width = len(columns)
        where = {c: i for i, c in enumerate(columns)}
        missing = sorted({int(c) for g in groups for c in g} - set(where))
        if missing:
            raise ValueError(f"group_sigmoid_targets: group classes {missing} are not among the columns {columns}")
        label_positions = _label_positions(columns, targets, "group_sigmoid_targets")
        group_positions = [_as_index([where[int(c)] for c in g], device) for g in groups]
    out = torch.zeros(targets.shape[0], width, device=device, dtype=torch.float32)
    out[torch.arange(targets.shape[0], device=device), label_positions] = 1.0
    for logits_k, positions in zip(teacher_logits, group_positions):
        out[:, positions] = torch.sigmoid(logits_k.float())
    return out


def route_unseen_rows(
    outputs: Sequence[TeacherOutput],
    groups: Sequence[Group],
    newest: TeacherOutput,
    targets: Tensor,
) -> List[TeacherOutput]:
    """Group teachers' outputs with the rows their snapshot cannot judge taken
    from the newest snapshot (M2KD's ``old_targets="informed"`` [ours]).

    ``outputs[k]`` is snapshot ``k``'s output for its own group ``groups[k]``.
    That snapshot saw the classes of groups ``0..k`` only; on a sample of any
    other class (a later group's, or a class being learned now) its view of
    group ``k`` comes from a network that never saw that class as a negative.
    Those rows are replaced by ``newest``'s, whose columns are the classes of
    ``groups`` in order (logits and auxiliary logits; feature maps whole).
    Groups must be in training order (the snapshot of group ``k`` has seen
    groups ``0..k``).
    """
    width = sum(len(g) for g in groups)
    if newest.logits.shape[1] != width:
        raise ValueError(
            f"route_unseen_rows: the newest snapshot's output has {newest.logits.shape[1]} columns, "
            f"the groups hold {width} classes"
        )
    routed: List[TeacherOutput] = []
    seen: List[int] = []
    offset = 0
    for out, group in zip(outputs, groups):
        seen += [int(c) for c in group]
        knows = torch.isin(targets, _as_index(seen, targets.device))  # on the device: no host read

        def pick(own: Tensor, other: Tensor) -> Tensor:
            return torch.where(knows.view(-1, *[1] * (own.dim() - 1)), own, other)

        columns = slice(offset, offset + len(group))
        routed.append(
            TeacherOutput(
                pick(out.logits, newest.logits[:, columns]),
                [pick(a, b[:, columns]) for a, b in zip(out.aux_logits, newest.aux_logits)],
                [pick(f, g) for f, g in zip(out.features, newest.features)],
            )
        )
        offset += len(group)
    return routed


def sigmoid_distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    columns: Sequence[int] | Tensor,
    teacher_logits: Sequence[Tensor],
    groups: Sequence[Group | Tensor],
    n_outputs: Optional[int] = None,
) -> Tensor:
    """iCaRL's classification-plus-distillation loss, routed per group.

    Binary cross-entropy between ``sigmoid(student_logits[:, columns])`` and
    :func:`group_sigmoid_targets`, summed over the columns and divided by
    ``B * n_outputs``.

    ``n_outputs`` is the width iCaRL averages over: its classifier has one
    output per class of the whole stream (100 on CIFAR-100) from the first
    step, and Avalanche's ``ICaRLLossPlugin`` is a mean over all of them. A
    growing head has only the seen columns; dividing by their count instead
    would make every logit's gradient ``n_outputs / len(columns)`` times
    larger (10x at the first of 10 CIFAR-100 steps), and iCaRL's learning rate
    a divergent one. Default ``len(columns)`` (a plain mean over ``columns``).
    """
    target_matrix = group_sigmoid_targets(targets, columns, teacher_logits, groups)
    index = _columns(student_logits, columns, "sigmoid_distillation_loss")
    width = index.numel() if n_outputs is None else int(n_outputs)
    if width < index.numel():
        raise ValueError(
            f"sigmoid_distillation_loss: n_outputs={width} is smaller than the {index.numel()} columns it averages; "
            "pass the number of classes of the whole stream"
        )
    summed = F.binary_cross_entropy_with_logits(
        student_logits.index_select(1, index).float(), target_matrix, reduction="sum"
    )
    return summed / (student_logits.shape[0] * width)


LossForm = Literal["kl", "bce"]
AuxMode = Literal["logits", "features"]


@dataclass(frozen=True)
class M2KDLoss:
    """M2KD's objective as one pure object: teacher outputs with their class
    groups and weights in, named loss terms out (the way Avalanche's
    ``LwFPlugin`` sits on its ``LearningWithoutForgetting`` object).

    Softmax form (``form="kl"``); the strategy's cross-entropy is added by
    the strategy itself:

    * ``aux_ce``: cross-entropy of each auxiliary head over the seen classes,
      summed (read from ``aux_ce_logits`` when given: heads applied to detached
      features train only the heads);
    * ``mm``: :func:`distill_group_logits` of the output from the teachers;
    * ``aux_kd``: the same for each auxiliary head (``aux="logits"``), or
      :func:`distill_group_features` of each tapped feature map (``aux="features"``).

    iCaRL form (``form="bce"``):

    * ``classification``: :func:`sigmoid_distillation_loss` over the seen
      classes, averaged over ``n_outputs`` columns; it replaces the cross-entropy;
    * ``aux_bce``: the same for each auxiliary head (``aux="logits"``), or
      ``aux_kd`` as above (``aux="features"``).

    :meth:`total` weights them: ``classification + aux_ce_weight * aux_ce +
    mm_weight * mm + aux_weight * (aux_kd | aux_bce)``.

    Args (defaults as :class:`~avalanche_m2kd.M2KDPlugin`, which documents why):
        form: ``"kl"`` or ``"bce"``. temperature: ``T`` of the softmax form.
        mm_weight, aux_weight, aux_ce_weight: the weights above.
        aux: ``"logits"`` or ``"features"``. feature_distance: ``"mse"`` or ``"attention"``.
    """

    form: LossForm = "kl"
    temperature: float = 2.0
    mm_weight: float = 0.25
    aux_weight: float = 0.25
    aux_ce_weight: float = 1.0
    aux: AuxMode = "logits"
    feature_distance: FeatureDistance = "mse"

    def __post_init__(self):
        if self.form not in ("kl", "bce"):
            raise ValueError(f"M2KDLoss: loss (form) must be 'kl' or 'bce', got {self.form!r}")
        if self.aux not in ("logits", "features"):
            raise ValueError(f"M2KDLoss: aux must be 'logits' or 'features', got {self.aux!r}")
        if self.feature_distance not in ("mse", "attention"):
            raise ValueError(f"M2KDLoss: feature_distance must be 'mse' or 'attention', got {self.feature_distance!r}")
        if not 0 < self.temperature < math.inf:  # written so that NaN fails too
            raise ValueError(f"M2KDLoss: temperature must be a finite number > 0, got {self.temperature}")
        for name in ("mm_weight", "aux_weight", "aux_ce_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"M2KDLoss: {name} must be a finite number >= 0, got {getattr(self, name)}")

    def terms(
        self,
        logits: Tensor,
        targets: Tensor,
        seen: Sequence[int] | Tensor,
        teacher_outputs: Sequence[TeacherOutput] = (),
        groups: Sequence[Group | Tensor] = (),
        weights: Optional[Sequence[float]] = None,
        aux_logits: Sequence[Tensor] = (),
        features: Sequence[Tensor] = (),
        n_outputs: Optional[int] = None,
        columns: Optional[Sequence[int]] = None,
        aux_ce_logits: Optional[Sequence[Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """The unweighted terms of one batch.

        Args:
            logits: ``[B, n]`` student logits (column = class id).
            targets: ``[B]`` labels.
            seen: the classes seen so far (current experience included).
            teacher_outputs, groups: one teacher output per class group, in
                the same order (empty before the second experience).
            weights: per-group weights, default :func:`group_weights`.
            aux_logits: the student's auxiliary-head logits, one per tapped layer.
            features: the student's tapped feature maps (``aux="features"``).
            n_outputs: ``bce`` only: the width the sigmoid loss averages over
                (the stream's number of classes, as iCaRL's fixed classifier).
            columns: ``bce`` only: the output columns of the classification
                term, default ``seen``; every column of a fixed head gives
                iCaRL's loss (unseen classes with target 0).
            aux_ce_logits: ``kl`` only: the logits ``aux_ce`` reads, one per
                tapped layer; default ``aux_logits`` (deep supervision). The
                distillation terms always read ``aux_logits``.
        """
        if len(teacher_outputs) != len(groups):
            raise ValueError(f"M2KDLoss: {len(teacher_outputs)} teacher outputs for {len(groups)} groups")
        if teacher_outputs and weights is None:
            weights = group_weights(groups)
        terms: Dict[str, Tensor] = {}
        if self.form == "bce":
            terms["classification"] = sigmoid_distillation_loss(
                logits, targets, seen if columns is None else columns, [o.logits for o in teacher_outputs], groups, n_outputs
            )
            if aux_logits:
                terms["aux_bce"] = sum(
                    sigmoid_distillation_loss(a, targets, seen, [o.aux_logits[i] for o in teacher_outputs], groups, n_outputs)
                    for i, a in enumerate(aux_logits)
                )
        elif aux_logits:
            if aux_ce_logits is None:
                aux_ce_logits = aux_logits
            elif len(aux_ce_logits) != len(aux_logits):
                raise ValueError(f"M2KDLoss: {len(aux_ce_logits)} aux_ce_logits for {len(aux_logits)} auxiliary heads")
            terms["aux_ce"] = sum(cross_entropy_over(a, targets, seen) for a in aux_ce_logits)
        if not teacher_outputs:
            return terms
        if self.form == "kl":
            terms["mm"] = distill_group_logits(logits, [o.logits for o in teacher_outputs], groups, self.temperature, weights)
            if aux_logits:
                terms["aux_kd"] = sum(
                    distill_group_logits(a, [o.aux_logits[i] for o in teacher_outputs], groups, self.temperature, weights)
                    for i, a in enumerate(aux_logits)
                )
        if features and self.aux == "features":
            terms["aux_kd"] = sum(
                distill_group_features(f, [o.features[i] for o in teacher_outputs], weights, self.feature_distance)
                for i, f in enumerate(features)
            )
        return terms

    def weight(self, name: str) -> float:
        """The weight of the term ``name`` in :meth:`total`."""
        table = {
            "classification": 1.0,
            "aux_ce": self.aux_ce_weight,
            "mm": self.mm_weight,
            "aux_kd": self.aux_weight,
            "aux_bce": self.aux_weight,
        }
        if name not in table:
            raise KeyError(f"M2KDLoss: unknown term {name!r}")
        return table[name]

    def total(self, terms: Dict[str, Tensor], exclude: Sequence[str] = ()) -> Tensor:
        """The weighted sum of ``terms`` (leaving out the names in ``exclude``)."""
        parts = [self.weight(k) * v for k, v in terms.items() if k not in exclude]
        if not parts:
            raise ValueError("M2KDLoss.total: no terms to add")
        return sum(parts[1:], parts[0])


__all__ = [
    "M2KDLoss",
    "TeacherOutput",
    "attention_map",
    "class_position_table",
    "class_positions",
    "cross_entropy_over",
    "distill_group_features",
    "distill_group_logits",
    "education_distillation_loss",
    "feature_distance",
    "group_sigmoid_targets",
    "group_weights",
    "hinton_sample_loss",
    "logit_mse_sample_loss",
    "sample_distillation",
    "SAMPLE_DISTILLATIONS",
    "SampleDistillation",
    "kl_distillation",
    "route_unseen_rows",
    "sigmoid_distillation_loss",
    "soft_cross_entropy",
]
