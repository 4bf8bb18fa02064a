"""Education Distillation's growing student (Feng et al., arXiv 2311.13811).

The student is a stem plus S block groups. At training experience ``s`` it is
stem + groups ``1..s`` + a temporary *teaching reference* (TR) head for depth
``s``, sized to every class seen so far [ED code]. When it grows, the next group
is appended and the TR head replaced (the old one is discarded); nothing is
frozen. After the last group the student is the target architecture plus the
final TR head's BatchNorm.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from avalanche.models import DynamicModule, IncrementalClassifier
from torch import Tensor, nn

from .resnet import BasicBlock, make_stage, make_stem

HeadFactory = Callable[[int, int], nn.Module]


class TeachingReferenceHead(nn.Module):
    """A TR head: a small ``body`` (e.g. 1x1 conv, BatchNorm, pooling) and a
    masked, growing linear classifier over the classes seen so far."""

    def __init__(self, body: nn.Module, in_features: int, n_classes: int, depth: int):
        super().__init__()
        self.depth = depth
        self.body = body
        self.classifier = IncrementalClassifier(in_features, initial_out_features=max(n_classes, 1))

    @property
    def out_features(self) -> int:
        return self.classifier.classifier.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


class EDStudent(DynamicModule):
    """The growing student: ``stem``, block ``groups`` and a TR head factory.

    ``head_factory(depth, n_classes)`` builds the TR head for ``depth`` (1..S)
    covering ``n_classes`` outputs. Growth happens in Avalanche's model
    adaptation, in training only (evaluation never grows the student): at
    training experience ``s`` (0-based) the student has ``min(s + 1, S)``
    groups [ours: one group per experience; experiences beyond ``S`` only
    resize the head, through its growing classifier].

    Groups not yet appended are not registered submodules (not trained, not in
    the optimizer, not in ``parameters()``); their initial weights travel in
    ``state_dict()`` as extra state, so a resumed run grows the same weights.
    """

    def __init__(self, stem: nn.Module, groups: Sequence[nn.Module], head_factory: HeadFactory):
        super().__init__()
        if not groups:
            raise ValueError("EDStudent needs at least one block group")
        self.stem = stem
        self.body = nn.ModuleList([groups[0]])
        self._pending: List[nn.Module] = list(groups[1:])
        self.head_factory = head_factory
        self.n_groups = len(groups)
        self.head: TeachingReferenceHead = head_factory(1, 2)
        self.seen_classes: set[int] = set()

    @property
    def depth(self) -> int:
        """Number of block groups in use."""
        return len(self.body)

    def features(self, x: Tensor) -> Tensor:
        """The output of the last group in use."""
        x = self.stem(x)
        for group in self.body:
            x = group(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def target_depth(self, experience_index: int) -> int:
        """Depth at training experience ``experience_index`` (0-based)."""
        return min(experience_index + 1, self.n_groups)

    def grow_to(self, depth: int, n_classes: Optional[int] = None) -> bool:
        """Append groups up to ``depth`` and replace the TR head by the one for
        that depth (``n_classes`` outputs, default: classes seen so far).
        Returns whether the student grew."""
        if not 1 <= depth <= self.n_groups:
            raise ValueError(f"EDStudent: depth must be in 1..{self.n_groups}, got {depth}")
        if depth <= self.depth:
            return False
        device = next(self.stem.parameters()).device
        while self.depth < depth:
            self.body.append(self._pending.pop(0).to(device))
        width = n_classes if n_classes is not None else max(self.seen_classes, default=1) + 1
        head = self.head_factory(depth, width).to(device)
        with torch.no_grad():
            for c in self.seen_classes:
                if c < width:
                    head.classifier.active_units[c] = 1
        self.head = head
        return True

    def adaptation(self, experience) -> None:
        if not self.training:
            return
        classes = getattr(experience, "classes_in_this_experience", None)
        if classes is None:
            classes = experience.dataset.targets.uniques
        self.seen_classes.update(int(c) for c in classes)
        self.grow_to(self.target_depth(int(getattr(experience, "current_experience", 0))))
        # the head's IncrementalClassifier then grows to the new classes (adapted after its parent)

    def get_extra_state(self):
        return {
            "pending": [g.state_dict() for g in self._pending],
            "seen_classes": sorted(self.seen_classes),
        }

    def set_extra_state(self, state) -> None:
        if len(state["pending"]) != len(self._pending):
            raise ValueError(
                f"EDStudent state has {self.n_groups - len(state['pending'])} groups in use, this student "
                f"{self.depth}: call grow_to(depth) first (or use load_student_state)"
            )
        for group, group_state in zip(self._pending, state["pending"]):
            group.load_state_dict(group_state)
        self.seen_classes = set(state["seen_classes"])


def _out_features(body: nn.Module, channels: int, size: int) -> int:
    with torch.no_grad():
        was = body.training
        body.eval()
        out = body(torch.zeros(1, channels, size, size)).shape[1]
        body.train(was)
    return out


def _stage_size(input_size: int, depth: int) -> int:
    size = input_size
    for _ in range(depth - 1):  # groups 2..S halve the resolution
        size = (size + 1) // 2
    return size


def resnet_tr_heads(widths: Sequence[int], input_size: int, tr_width: int = 64) -> HeadFactory:
    """ED's ResNet-20 TR heads [ED code], generalised to ``len(widths)`` groups:
    depth 1: 1x1 conv -> ``tr_width``, BN, 8x8 average pooling, linear;
    middle depths: 1x1 conv -> ``tr_width``, BN, global pooling, linear;
    last depth: BN, global pooling, linear."""
    last = len(widths)

    def factory(depth: int, n_classes: int) -> TeachingReferenceHead:
        channels, size = widths[depth - 1], _stage_size(input_size, depth)
        if depth == last:
            body: nn.Module = nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif depth == 1:
            body = nn.Sequential(
                nn.Conv2d(channels, tr_width, 1, bias=False),
                nn.BatchNorm2d(tr_width),
                nn.AvgPool2d(min(8, size)),
                nn.Flatten(),
            )
        else:
            body = nn.Sequential(
                nn.Conv2d(channels, tr_width, 1, bias=False),
                nn.BatchNorm2d(tr_width),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        return TeachingReferenceHead(body, _out_features(body, channels, size), n_classes, depth)

    return factory


def ed_resnet(blocks: int, in_channels: int = 3, input_size: int = 32, width: int = 16) -> EDStudent:
    """A growing CIFAR ResNet-(6n+2) student with three groups of ``blocks``
    BasicBlocks (widths ``width``, 2x, 4x) and ED's TR heads."""
    widths = [width, 2 * width, 4 * width]
    groups = [
        make_stage(width, widths[0], blocks, 1),
        make_stage(widths[0], widths[1], blocks, 2),
        make_stage(widths[1], widths[2], blocks, 2),
    ]
    return EDStudent(make_stem(in_channels, width), groups, resnet_tr_heads(widths, input_size, tr_width=4 * width))


def ed_resnet20(in_channels: int = 3, input_size: int = 32) -> EDStudent:
    """ED's student: ResNet-20 in three groups of three blocks, TR1/TR2/TR3 as
    in the authors' code. Final: :func:`~avalanche_m2kd.models.cifar_resnet20`
    plus TR3's BatchNorm."""
    return ed_resnet(3, in_channels, input_size)


def ed_small(in_channels: int = 1, input_size: int = 8) -> EDStudent:
    """A CPU-sized student for 8x8 / 28x28 inputs: ResNet-8 (one BasicBlock per
    group) with ED's TR heads."""
    return ed_resnet(1, in_channels, input_size)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv twice), 1x1 conv shortcut
    when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def ed_wrn16_2(in_channels: int = 3, input_size: int = 32) -> EDStudent:
    """ED's WRN-16-2 student (from the authors' compiled code): two wide blocks
    per group at widths 32/64/128; TR1: 1x1 conv -> 128, BN, ReLU, global pool,
    linear; TR2: 1x1 conv -> 128, BN, global pool, linear; TR3: BN, ReLU, global
    pool, linear."""
    widths = [32, 64, 128]
    groups = [
        nn.Sequential(WideBlock(16, 32, 1), WideBlock(32, 32)),
        nn.Sequential(WideBlock(32, 64, 2), WideBlock(64, 64)),
        nn.Sequential(WideBlock(64, 128, 2), WideBlock(128, 128)),
    ]
    stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)

    def factory(depth: int, n_classes: int) -> TeachingReferenceHead:
        channels = widths[depth - 1]
        if depth == 3:
            layers = [nn.BatchNorm2d(channels), nn.ReLU()]
        else:
            layers = [nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128)]
            if depth == 1:
                layers.append(nn.ReLU())
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return TeachingReferenceHead(body, 128, n_classes, depth)

    return EDStudent(stem, groups, factory)


__all__ = [
    "BasicBlock",
    "EDStudent",
    "TeachingReferenceHead",
    "WideBlock",
    "ed_resnet",
    "ed_resnet20",
    "ed_small",
    "ed_wrn16_2",
    "load_student_state",
    "resnet_tr_heads",
]
