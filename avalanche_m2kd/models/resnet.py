"""CIFAR ResNets (He et al. 2016, the 6n+2 family) with named stages.

Every model here exposes the same top-level names, usable as M2KD
``aux_layers`` and for feature extraction:

``stem`` -> ``stage1`` -> ``stage2`` -> ``stage3`` -> ``pool`` -> ``embedding`` -> ``head``

``embedding`` outputs the flat feature vector (herding and nearest-mean
classifiers read it); ``head`` is Avalanche's growing ``IncrementalClassifier``
by default, or a fixed ``nn.Linear`` when ``num_classes`` is given.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from avalanche.models import IncrementalClassifier
from torch import Tensor, nn


def make_head(in_features: int, num_classes: Optional[int] = None, initial_out_features: int = 2) -> nn.Module:
    """A classifier head: a growing ``IncrementalClassifier`` when ``num_classes``
    is None (class-incremental default), else a fixed ``nn.Linear``."""
    if num_classes is None:
        return IncrementalClassifier(in_features, initial_out_features=initial_out_features)
    return nn.Linear(in_features, num_classes)


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut of CIFAR ResNets: subsample by the
    stride and zero-pad the new channels (what iCaRL's ResNet-32 uses)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or padded) shortcut,
    then a ReLU (``relu_out=False``: none, as iCaRL's last block)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, relu_out: bool = True):
        super().__init__()
        self.relu_out = relu_out
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.relu_out else out


def make_stage(in_planes: int, planes: int, blocks: int, stride: int, last_relu: bool = True) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one changes width and stride; the last
    one ends without ReLU when ``last_relu`` is False."""
    layers = [BasicBlock(in_planes, planes, stride, relu_out=blocks > 1 or last_relu)]
    layers += [BasicBlock(planes, planes, 1, relu_out=i < blocks - 2 or last_relu) for i in range(blocks - 1)]
    return nn.Sequential(*layers)


def make_stem(in_channels: int, planes: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, planes, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=True),
    )


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n BasicBlocks at widths
    16/32/64 (times ``width // 16``), global average pooling and a head.

    Args:
        variant: ``"he"`` (default): every block ends in a ReLU, convolutions
            get Kaiming fan-out init (He et al.; torchvision's convention).
            ``"icarl"``: iCaRL's ResNet-32 as in its original code and
            Avalanche's ``make_icarl_net`` / ``initialize_icarl_net``: the last
            block has no ReLU (the features, which herding and the nearest-mean
            classifier read, can be negative), convolutions get Kaiming fan-in
            init and the head Kaiming fan-in (sigmoid gain) with zero bias.
    """
    m2kd_aux_layers = ("stage1", "stage2")  # what M2KD's aux_layers="auto" taps: the first two stages, as the M2KD note suggests

    def __init__(
        self,
        depth: int = 32,
        num_classes: Optional[int] = None,
        in_channels: int = 3,
        width: int = 16,
        variant: str = "he",
    ):
        super().__init__()
        if variant not in ("he", "icarl"):
            raise ValueError(f"CifarResNet: variant must be 'he' or 'icarl', got {variant!r}")
        self.variant = variant
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CifarResNet: depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = make_stem(in_channels, width)
        self.stage1 = make_stage(width, width, n, 1)
        self.stage2 = make_stage(width, 2 * width, n, 2)
        self.stage3 = make_stage(2 * width, 4 * width, n, 2, last_relu=variant == "he")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten()
        self.feature_dim = 4 * width
        self.head = make_head(self.feature_dim, num_classes)
        _init_weights(self, variant)

    def features(self, x: Tensor) -> Tensor:
        """The flat feature vector (the output of ``embedding``)."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.embedding(self.pool(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _init_weights(model: nn.Module, variant: str = "he") -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if variant == "he" else "fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and variant == "icarl":
            icarl_linear_init(m)


def icarl_linear_init(layer: nn.Linear) -> None:
    """iCaRL's classifier init: Kaiming fan-in with the sigmoid gain, zero bias."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="sigmoid")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def cifar_resnet20(num_classes: Optional[int] = None, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (0.27M parameters): ED's student."""
    return CifarResNet(20, num_classes, in_channels)


def cifar_resnet32(num_classes: Optional[int] = None, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (0.46M parameters): the iCaRL / M2KD CIFAR-100 backbone."""
    return CifarResNet(32, num_classes, in_channels)


def icarl_resnet32(num_classes: Optional[int] = None, in_channels: int = 3) -> CifarResNet:
    """iCaRL's ResNet-32 (``variant="icarl"``): the backbone of the iCaRL
    CIFAR-100 protocol (no ReLU after the last block, fan-in init)."""
    return CifarResNet(32, num_classes, in_channels, variant="icarl")


def cifar_resnet110(num_classes: Optional[int] = None, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (1.7M parameters): ED's teacher."""
    return CifarResNet(110, num_classes, in_channels)


__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet110",
    "cifar_resnet20",
    "cifar_resnet32",
    "icarl_linear_init",
    "icarl_resnet32",
    "make_head",
    "make_stage",
    "make_stem",
]
