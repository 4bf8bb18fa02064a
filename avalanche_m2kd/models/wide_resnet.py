"""Wide ResNets (Zagoruyko and Komodakis 2016) for 32x32 inputs, with the same
named stages as the CIFAR ResNets: the teachers of ED's WRN pair (WRN-40-2 ->
WRN-16-2)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ed_student import WideBlock
from .resnet import make_head


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: three stages of ``(depth - 4) / 6`` pre-activation
    wide blocks at widths 16k, 32k, 64k, a final BatchNorm-ReLU, global average
    pooling and a head (growing ``IncrementalClassifier`` unless ``num_classes``)."""
    m2kd_aux_layers = ("stage1", "stage2")  # what M2KD's aux_layers="auto" taps: the first two stages, as the M2KD note suggests

    def __init__(self, depth: int = 40, widen: int = 2, num_classes: Optional[int] = None, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet: depth must be 6n+4 (10, 16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages, planes = [], 16
        for i, width in enumerate(widths):
            blocks = [WideBlock(planes if j == 0 else width, width, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            planes = width
        self.stage1, self.stage2, self.stage3 = stages
        self.final = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten()
        self.feature_dim = widths[-1]
        self.head = make_head(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.final(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.head(self.embedding(self.pool(x)))


def wrn40_2(num_classes: Optional[int] = None, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (about 2.2M parameters): ED's WRN teacher."""
    return WideResNet(40, 2, num_classes, in_channels)


__all__ = ["WideResNet", "wrn40_2"]
