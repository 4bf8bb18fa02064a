"""Small helpers that read Avalanche experiences and check stream assumptions."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from avalanche.models import MultiTaskModule
from torch import Tensor, nn


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


def check_stream(owner: str, strategy, seen: Iterable[int]) -> List[int]:
    """At the start of a training experience: class-incremental use, and the
    experience's (new) classes."""
    check_class_incremental(owner, strategy.model, strategy.experience)
    return check_new_classes(owner, strategy.experience, seen)


def check_is_criterion(owner: str, plugin, strategy, strategy_name: str) -> None:
    """A plugin that replaces the classification loss must be the criterion."""
    if strategy._criterion is not plugin:
        raise ValueError(
            f"{owner} replaces the classification loss: pass the same plugin as the strategy's criterion "
            f"(criterion=plugin), or use {strategy_name}, which does it."
        )


def check_batch(owner: str, experience, x: Tensor, y: Tensor, width: int) -> None:
    """Finite inputs; integer labels inside the model's ``width`` outputs."""
    where = f"training experience {experience_index(experience)}"
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{owner}: the inputs of {where} contain NaN or infinite values; clean the data set")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{owner}: labels of {where} are {y.dtype}; class labels must be integers (torch.long)")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= width):
        raise ValueError(
            f"{owner}: label {int(y.max()) if int(y.max()) >= width else int(y.min())} of {where} is outside the "
            f"model's {width} outputs (0..{width - 1})"
        )


def batch_augmentation(strategy):
    """The augmentation a plugin of ``strategy`` applies to whole batches on the
    device (:class:`~avalanche_m2kd.DeviceDataPlugin`), or None."""
    return next((a for p in strategy.plugins if (a := getattr(p, "batch_augmentation", None)) is not None), None)


def check_listed_once(owner: str, plugin, strategy) -> None:
    """A plugin instance appears once in the strategy's plugins (twice, every hook runs twice)."""
    if sum(p is plugin for p in strategy.plugins) > 1:
        raise ValueError(f"{owner}: this plugin instance is listed twice in the strategy's plugins; list it once")


def check_model_accepts(owner: str, model: nn.Module, example: Tensor, experience) -> None:
    """One forward pass of one example (eval mode, mode restored); the model
    must return one tensor of logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example.unsqueeze(0) if example.dim() in (1, 3) else example[:1])
        if not isinstance(output, Tensor):
            raise ValueError(
                f"{owner}: the model returns a {type(output).__name__}, not a tensor of logits; wrap it so that "
                "forward returns the logits alone (features can be tapped with aux_layers)"
            )
    except RuntimeError as err:
        raise ValueError(
            f"{owner}: the model cannot process the inputs of training experience {experience_index(experience)} "
            f"(shape {tuple(example.shape)}): {str(err).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)


def stream_class_count(experience) -> Optional[int]:
    """The number of classes of the whole stream an experience belongs to:
    ``benchmark.n_classes`` (``nc_benchmark``), else the classes seen so far
    plus the future ones (``class_incremental_benchmark``); None where the
    experience tells neither."""
    for owner in (getattr(experience, "benchmark", None), getattr(getattr(experience, "origin_stream", None), "benchmark", None)):
        n = getattr(owner, "n_classes", None)
        if isinstance(n, int) and n > 0:
            return n
    try:
        classes = set(experience.classes_seen_so_far) | set(experience.future_classes)
    except (AttributeError, TypeError, RuntimeError):  # masked or absent attributes
        return None
    return len(classes) or None


def check_output_width(owner: str, strategy, needed: int) -> None:
    """The model's output covers class ids ``0..needed-1``, and the batch is
    finite with integer labels inside it (first batch of an experience)."""
    width = strategy.mb_output.shape[-1]
    if width < needed:
        raise ValueError(
            f"{owner}: the model outputs {width} logits but experience "
            f"{experience_index(strategy.experience)} needs class ids up to {needed - 1}; "
            f"give the model a head with at least {needed} outputs, or use "
            "avalanche.models.IncrementalClassifier, which grows with the classes."
        )
    check_batch(owner, strategy.experience, strategy.mb_x, strategy.mb_y, width)


def accumulate_nonfinite(flags: Dict[str, Tensor], terms: Dict[str, Tensor]) -> None:
    """OR into ``flags[name]`` (a device bool) whether each term is non-finite,
    without reading the device (no stall per batch on a GPU)."""
    for name, value in terms.items():
        bad = ~torch.isfinite(value.detach()).all()
        flags[name] = bad if name not in flags else flags[name] | bad


def check_nonfinite_flags(owner: str, flags: Dict[str, Tensor], experience) -> None:
    """One read of the flags :func:`accumulate_nonfinite` gathered; the error
    names every term that was non-finite, and the experience."""
    if not flags:
        return
    names = list(flags)
    bad = [n for n, v in zip(names, torch.stack([flags[n] for n in names]).tolist()) if v]
    if bad:
        raise FloatingPointError(
            f"{owner}: the {', '.join(bad)} loss term{'s were' if len(bad) > 1 else ' was'} NaN or infinite during "
            f"training experience {experience_index(experience)}; check the inputs for NaN/inf and lower the "
            "learning rate."
        )


def check_finite_terms(owner: str, terms: Dict[str, Tensor], experience) -> None:
    """Every loss term is finite now (one device read); the error names the
    non-finite terms and the experience."""
    flags: Dict[str, Tensor] = {}
    accumulate_nonfinite(flags, terms)
    check_nonfinite_flags(owner, flags, experience)
