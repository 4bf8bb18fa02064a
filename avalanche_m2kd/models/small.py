"""Small convolutional networks for 8x8 (scikit-learn digits), 28x28
(MNIST / Fashion-MNIST) and 32x32 inputs, fast enough for a 2-core CPU.

Top-level names: ``stage1`` -> ``stage2`` -> ``embedding`` -> ``head``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .resnet import make_head


def _conv_stage(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallConvNet(nn.Module):
    """Two conv stages (each conv-BN-ReLU twice, then 2x2 max-pool), a hidden
    fully connected layer, and a head.

    Flattening instead of global pooling: on 8x8 inputs a pooled CNN of this
    size trains far slower (seen on Split-Digits).
    """
    m2kd_aux_layers = ("stage1", "stage2")  # what M2KD's aux_layers="auto" taps: the first two stages, as the M2KD note suggests

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: Optional[int] = None,
        width: int = 32,
        hidden: int = 128,
    ):
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"SmallConvNet: image_size must be a multiple of 4, got {image_size}")
        self.stage1 = _conv_stage(in_channels, width)
        self.stage2 = _conv_stage(width, 2 * width)
        side = image_size // 4
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(inplace=True))
        self.feature_dim = hidden
        self.head = make_head(hidden, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The flat feature vector (the output of ``embedding``)."""
        return self.embedding(self.stage2(self.stage1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def digits_cnn(num_classes: Optional[int] = None) -> SmallConvNet:
    """For 1x8x8 inputs (scikit-learn's ``load_digits``)."""
    return SmallConvNet(1, 8, num_classes)


def mnist_cnn(num_classes: Optional[int] = None) -> SmallConvNet:
    """For 1x28x28 inputs (MNIST, Fashion-MNIST)."""
    return SmallConvNet(1, 28, num_classes)


def cifar_cnn(num_classes: Optional[int] = None) -> SmallConvNet:
    """For 3x32x32 inputs: the cheap CPU stand-in for a CIFAR ResNet."""
    return SmallConvNet(3, 32, num_classes)


__all__ = ["SmallConvNet", "cifar_cnn", "digits_cnn", "mnist_cnn"]
