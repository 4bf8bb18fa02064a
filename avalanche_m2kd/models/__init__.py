"""Backbones with named stages (usable as M2KD ``aux_layers``) and ED's growing student."""

from .resnet import (
    BasicBlock,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet110,
    make_head,
)
from .small import SmallConvNet, cifar_cnn, digits_cnn, mnist_cnn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "SmallConvNet",
    "cifar_cnn",
    "cifar_resnet110",
    "cifar_resnet20",
    "cifar_resnet32",
    "digits_cnn",
    "make_head",
    "mnist_cnn",
]
