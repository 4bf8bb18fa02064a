"""Small helpers that read Avalanche experiences and check stream assumptions."""

from __future__ import annotations

from typing import Iterable, List

from avalanche.models import MultiTaskModule
from torch import nn


def experience_classes(experience) -> List[int]:
    """Sorted class ids of a training experience."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = experience.dataset.targets.uniques
    return sorted(int(c) for c in classes)


def experience_index(experience) -> int:
    return int(getattr(experience, "current_experience", 0))


def check_class_incremental(owner: str, model: nn.Module, experience) -> None:
    """Reject task-incremental (multi-head) use: the methods here distil
    class groups of one shared head."""
    if any(isinstance(m, MultiTaskModule) for m in model.modules()):
        raise ValueError(
            f"{owner}: the model contains a MultiTaskModule (multi-head, task-incremental); "
            "only class-incremental learning with one shared head is supported. "
            "Use a single head such as avalanche.models.IncrementalClassifier."
        )
    task_labels = getattr(experience, "task_labels", None)
    if task_labels is not None and any(int(t) != 0 for t in task_labels):
        raise ValueError(
            f"{owner}: experience {experience_index(experience)} has task labels {list(task_labels)}; "
            "task-incremental streams are not supported. Build the stream with task_labels=False "
            "(class-incremental)."
        )


def check_new_classes(owner: str, experience, seen: Iterable[int]) -> List[int]:
    """The experience's classes, after checking it brings no class seen before."""
    classes = experience_classes(experience)
    if not classes:
        raise ValueError(f"{owner}: training experience {experience_index(experience)} has no samples / classes")
    repeated = sorted(set(classes) & set(seen))
    if repeated:
        raise ValueError(
            f"{owner}: training experience {experience_index(experience)} repeats classes {repeated} of "
            "earlier experiences; class-incremental order requires each experience to bring new classes "
            "(train each experience once, in stream order)."
        )
    return classes
