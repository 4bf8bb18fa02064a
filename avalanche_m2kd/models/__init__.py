"""Backbones with named stages (usable as M2KD ``aux_layers``) and ED's growing student."""

from .resnet import (
    BasicBlock,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet110,
    icarl_linear_init,
    icarl_resnet32,
    make_head,
)
from .ed_student import (
    EDStudent,
    TeachingReferenceHead,
    ed_resnet,
    ed_resnet20,
    ed_small,
    ed_wrn16_2,
)
from .surgery import conform_incremental_classifiers, grow_student_to_state, load_student_state
from .small import SmallConvNet, cifar_cnn, digits_cnn, mnist_cnn
from .wide_resnet import WideResNet, wrn40_2

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "EDStudent",
    "TeachingReferenceHead",
    "ed_resnet",
    "ed_resnet20",
    "ed_small",
    "ed_wrn16_2",
    "SmallConvNet",
    "cifar_cnn",
    "cifar_resnet110",
    "cifar_resnet20",
    "cifar_resnet32",
    "digits_cnn",
    "icarl_linear_init",
    "icarl_resnet32",
    "make_head",
    "mnist_cnn",
    "WideResNet",
    "wrn40_2",
]

import copy as _copy
from typing import Callable, Dict, Optional, Sequence

from torch import nn

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": lambda num_classes=None, in_channels=1: SmallConvNet(in_channels, 8, num_classes),
    "mnist_cnn": lambda num_classes=None, in_channels=1: SmallConvNet(in_channels, 28, num_classes),
    "cifar_cnn": lambda num_classes=None, in_channels=3: SmallConvNet(in_channels, 32, num_classes),
    "resnet20": lambda num_classes=None, in_channels=3: cifar_resnet20(num_classes, in_channels),
    "resnet32": lambda num_classes=None, in_channels=3: cifar_resnet32(num_classes, in_channels),
    "resnet32_icarl": lambda num_classes=None, in_channels=3: icarl_resnet32(num_classes, in_channels),
    "resnet110": lambda num_classes=None, in_channels=3: cifar_resnet110(num_classes, in_channels),
    "wrn40_2": lambda num_classes=None, in_channels=3: wrn40_2(num_classes, in_channels),
}
"""Backbones by name; each takes ``num_classes`` (None = growing head) and ``in_channels``."""

def create(name: str, num_classes: Optional[int] = None, in_channels: Optional[int] = None) -> nn.Module:
    """A backbone of :data:`MODELS` by name (``ValueError`` lists the names)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    kwargs = {} if in_channels is None else {"in_channels": in_channels}
    return MODELS[name](num_classes=num_classes, **kwargs)


def ed_student_for(name: str, in_channels: int, input_size: int) -> EDStudent:
    """ED's growing student matching a backbone of :data:`MODELS`: ``ed_small``
    (ResNet-8) for the small CNNs, ``ed_resnet20`` for the ResNets, ``ed_wrn16_2``
    for the wide ResNets."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name.startswith("resnet"):
        return ed_resnet20(in_channels, input_size)
    if name.startswith("wrn"):
        return ed_wrn16_2(in_channels, input_size)
    return ed_small(in_channels, input_size)


def feature_extractor(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose head is replaced by the identity: it outputs
    the feature vector (for Avalanche's ``ICaRL`` feature_extractor)."""
    if not hasattr(model, "head") or not hasattr(model, "feature_dim"):
        raise ValueError(f"{type(model).__name__} has no 'head' / 'feature_dim'; use this library's models")
    body = _copy.deepcopy(model)
    body.head = nn.Identity()
    return body


__all__ += ["conform_incremental_classifiers", "grow_student_to_state", "load_student_state"]
__all__ += ["MODELS", "create", "ed_student_for", "feature_extractor"]
