"""Model surgery in one place: resizing and growing models to fit a saved
state before it loads (used by checkpoints; usable to load a saved student).
Nothing here imports anything above ``models``."""

from __future__ import annotations

import torch
from avalanche.models import IncrementalClassifier
from torch import nn

from .ed_student import EDStudent


def conform_incremental_classifiers(model: nn.Module, state: dict) -> None:
    """Resize every Avalanche ``IncrementalClassifier`` of ``model`` to the
    width its entry in ``state`` (a model ``state_dict``) has."""
    for name, module in model.named_modules():
        if not isinstance(module, IncrementalClassifier):
            continue
        key = f"{name}.classifier.weight" if name else "classifier.weight"
        if key not in state:
            continue
        rows, cols = state[key].shape
        linear = module.classifier
        device = linear.weight.device
        if linear.out_features != rows or linear.in_features != cols:
            module.classifier = nn.Linear(cols, rows, bias=linear.bias is not None).to(device)
        units = state.get(key.replace("classifier.weight", "active_units"))
        if units is not None and units.shape != module.active_units.shape:  # (not grown when masking is off)
            module.active_units = torch.zeros(units.shape, dtype=units.dtype, device=device)


def grow_student_to_state(student: EDStudent, state: dict) -> EDStudent:
    """Grow a freshly built :class:`EDStudent` to the depth of a saved
    ``state_dict``, with a head as wide as the saved one (weights untouched)."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    if depth > student.depth:
        student.grow_to(depth, state["head.classifier.classifier.weight"].shape[0])
    return student


def load_student_state(student: EDStudent, state: dict) -> EDStudent:
    """Load a saved :class:`EDStudent` ``state_dict`` into a freshly built
    student of the same family: grows it to the saved depth and head size first."""
    conform_incremental_classifiers(grow_student_to_state(student, state), state)
    student.load_state_dict(state)
    return student


__all__ = ["conform_incremental_classifiers", "grow_student_to_state", "load_student_state"]
