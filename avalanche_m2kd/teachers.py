"""Frozen teachers that each own a class group: the machinery M2KD's snapshots
and ED's stage teachers share.

A :class:`GroupTeacher` is a frozen module plus the global classes it owns and
the output columns where it predicts them (M2KD's snapshots predict global
classes, so ``columns == classes``; ED's stage teachers predict local labels,
so ``columns == range(len(classes))``). A :class:`TeacherSet` runs them:
either every teacher on the whole batch (M2KD) or each sample through the
teacher of its own group (ED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from .snapshots import freeze
from .taps import AUX_ATTRIBUTE, FeatureTaps


@dataclass
class TeacherOutput:
    """One teacher's outputs on a batch, restricted to its group's columns."""

    logits: Tensor
    aux_logits: List[Tensor] = field(default_factory=list)
    features: List[Tensor] = field(default_factory=list)


class GroupTeacher:
    """A frozen module owning the global classes ``classes``, predicted at its
    output columns ``columns`` (same order)."""

    def __init__(self, module: nn.Module, classes: Sequence[int], columns: Optional[Sequence[int]] = None):
        self.module = freeze(module)
        self.classes = [int(c) for c in classes]
        self.columns = [int(c) for c in (self.classes if columns is None else columns)]
        if len(self.columns) != len(self.classes):
            raise ValueError(
                f"GroupTeacher: {len(self.classes)} classes but {len(self.columns)} output columns"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"GroupTeacher: repeated classes in {self.classes}")
        self._column_index: Optional[Tensor] = None

    def column_index(self, device: torch.device) -> Tensor:
        if self._column_index is None or self._column_index.device != device:
            self._column_index = torch.as_tensor(self.columns, dtype=torch.long, device=device)
        return self._column_index


class TeacherSet:
    """Runs a list of :class:`GroupTeacher` under ``no_grad``.

    Args:
        teachers: the teachers, one per class group (groups must be disjoint).
        feature_layers: module names tapped in every teacher (M2KD's
            ``aux_layers``); their outputs come back as ``features``.
        aux_logits: also return the teachers' auxiliary-head logits (teachers
            must then carry M2KD's auxiliary heads).
    """

    def __init__(self, teachers: Sequence[GroupTeacher], feature_layers: Sequence[str] = (), aux_logits: bool = False):
        self.teachers = list(teachers)
        self.feature_layers = list(feature_layers)
        self.aux_logits = aux_logits
        seen: set[int] = set()
        for t in self.teachers:
            overlap = seen.intersection(t.classes)
            if overlap:
                raise ValueError(f"TeacherSet: class groups overlap on classes {sorted(overlap)}")
            seen.update(t.classes)
        if aux_logits and not feature_layers:
            raise ValueError("TeacherSet: aux_logits needs feature_layers")
        self._taps = [FeatureTaps(t.module, self.feature_layers) if self.feature_layers else None for t in self.teachers]
        self._class_to_teacher: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def groups(self) -> List[List[int]]:
        return [t.classes for t in self.teachers]

    def to(self, device: torch.device | str) -> "TeacherSet":
        for t in self.teachers:
            t.module.to(device)
        return self

    @torch.no_grad()
    def run(self, index: int, x: Tensor) -> TeacherOutput:
        """Teacher ``index`` on ``x``."""
        teacher = self.teachers[index]
        taps = self._taps[index]
        if taps is None:
            out = teacher.module(x)
            features: List[Tensor] = []
        else:
            with taps:
                out = teacher.module(x)
                features = taps.features()
        columns = teacher.column_index(out.device)
        aux: List[Tensor] = []
        if self.aux_logits:
            heads = getattr(teacher.module, AUX_ATTRIBUTE)
            aux = [a.index_select(1, columns) for a in heads(features)]
        return TeacherOutput(out.index_select(1, columns), aux, features)

    def run_all(self, x: Tensor) -> List[TeacherOutput]:
        """Every teacher on the whole batch (M2KD)."""
        return [self.run(i, x) for i in range(len(self))]

    def route(self, targets: Tensor) -> List[Tensor]:
        """Batch positions of the samples each teacher owns (by label).

        Raises ``ValueError`` for a label no teacher owns.
        """
        device = targets.device
        if self._class_to_teacher is None or self._class_to_teacher.device != device:
            size = max(max(t.classes) for t in self.teachers) + 1
            table = torch.full((size,), -1, dtype=torch.long)
            for i, t in enumerate(self.teachers):
                table[t.classes] = i
            self._class_to_teacher = table.to(device)
        table = self._class_to_teacher
        if targets.numel() and (int(targets.max()) >= table.numel() or bool((table[targets.clamp(min=0)] < 0).any())):
            owned = sorted(c for t in self.teachers for c in t.classes)
            bad = sorted({int(y) for y in targets.tolist() if y >= table.numel() or table[y] < 0})
            raise ValueError(f"labels {bad} belong to no teacher's classes {owned}")
        owner = table[targets]
        return [torch.nonzero(owner == i, as_tuple=False).flatten() for i in range(len(self))]

    def run_routed(self, x: Tensor, targets: Tensor) -> tuple[List[Tensor], List[TeacherOutput]]:
        """Each sample through the teacher of its own group (ED).

        Returns the per-teacher batch positions and outputs (teachers that own
        no sample of the batch are skipped: their output has zero rows).
        """
        index = self.route(targets)
        outputs = []
        for i, idx in enumerate(index):
            if idx.numel() == 0:
                n = len(self.teachers[i].classes)
                outputs.append(TeacherOutput(x.new_zeros((0, n))))
            else:
                outputs.append(self.run(i, x.index_select(0, idx)))
        return index, outputs


__all__ = ["GroupTeacher", "TeacherOutput", "TeacherSet"]
