"""Feature taps (outputs of named intermediate modules) and the auxiliary heads
that M2KD's multi-level distillation attaches to them."""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch
from avalanche.models import DynamicModule, IncrementalClassifier
from torch import Tensor, nn

from . import _random

AUX_ATTRIBUTE = "m2kd_aux"
"""Name under which :class:`AuxiliaryHeads` are registered on the user's model,
so that the optimizer, ``state_dict`` and every snapshot include them."""


def module_names(model: nn.Module) -> List[str]:
    """All dotted submodule names of ``model`` (what ``aux_layers`` may name)."""
    return [name for name, _ in model.named_modules() if name and not name.startswith(AUX_ATTRIBUTE)]


def resolve_modules(model: nn.Module, names: Sequence[str], argument: str = "aux_layers") -> List[nn.Module]:
    """The submodules called ``names``; a ``ValueError`` lists the valid names
    when one does not exist."""
    table = dict(model.named_modules())
    missing = [n for n in names if not n or n not in table or n.startswith(AUX_ATTRIBUTE)]
    if missing:
        valid = module_names(model)
        top = [n for n in valid if "." not in n]
        shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
        raise ValueError(
            f"{argument}: {', '.join(repr(m) for m in missing)} not found in {type(model).__name__}. "
            f"Top-level modules: {', '.join(top)}. Valid dotted names: {shown}"
        )
    return [table[n] for n in names]


class FeatureTaps:
    """Records the outputs of named submodules while the model runs.

    Use as a context manager around a forward pass, or call :meth:`attach` and
    :meth:`detach`. Hooks live only while attached, so deep copies and pickles
    of the model never carry them.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = list(names)
        self._modules = resolve_modules(model, self.names)
        self._handles: list = []
        self.outputs: Dict[str, Tensor] = {}

    def attach(self) -> "FeatureTaps":
        self.detach()
        self.outputs = {}
        for name, module in zip(self.names, self._modules):
            self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"aux_layers: module {name!r} returns {type(output).__name__}, "
                    "a feature tap needs a tensor output; name a module that returns one"
                )
            self.outputs[name] = output

        return hook

    def features(self) -> List[Tensor]:
        """The recorded outputs, in ``names`` order."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"feature taps {missing} recorded nothing: the model's forward never ran them")
        return [self.outputs[n] for n in self.names]

    def __enter__(self) -> "FeatureTaps":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def _key(layer: str) -> str:
    # ModuleDict keys may not contain dots.
    return layer.replace(".", "__")


_AUX_STREAM = 0x6D326B64  # the auxiliary heads' own random stream (see _random.own_random_stream)


def own_random_stream():
    """The auxiliary heads' weights come from a random stream of their own, so
    a run with heads keeps the data order and augmentation of the same run
    without them (otherwise a paired ablation measures the shift: on CIFAR-100
    the first step alone moved by 7.7 points)."""
    return _random.own_random_stream(_AUX_STREAM)


class _AuxiliaryClassifier(IncrementalClassifier):
    """An ``IncrementalClassifier`` whose new units draw their weights from
    :func:`own_random_stream`."""

    @torch.no_grad()
    def adaptation(self, experience):
        with own_random_stream():
            super().adaptation(experience)


class AuxiliaryHead(nn.Module):
    """Global average pooling (for feature maps) followed by a growing linear
    classifier over all classes seen so far. Not used at inference. Its
    weights come from a random stream of their own (:func:`own_random_stream`)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        # No masking: callers select the seen-class columns themselves.
        with own_random_stream():
            self.classifier = _AuxiliaryClassifier(in_features, initial_out_features=2, masking=False)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            features = self.pool(features)
        return self.classifier(features.flatten(1))


class AuxiliaryHeads(DynamicModule):
    """One :class:`AuxiliaryHead` per tapped layer; grows with the classes seen
    through Avalanche's model adaptation."""

    def __init__(self, layers: Sequence[str], channels: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleDict({_key(n): AuxiliaryHead(c) for n, c in zip(layers, channels)})

    def forward(self, features: Iterable[Tensor]) -> List[Tensor]:
        return [self.heads[_key(n)](f) for n, f in zip(self.layers, features)]


@torch.no_grad()
def feature_channels(model: nn.Module, layers: Sequence[str], example: Tensor) -> List[int]:
    """Channel count of each tapped layer's output, from one forward pass of
    ``example`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, layers) as taps:
            model(example)
        return [f.shape[1] for f in taps.features()]
    finally:
        model.train(was_training)


def attach_auxiliary_heads(model: nn.Module, layers: Sequence[str], example: Tensor) -> None:
    """Register :class:`AuxiliaryHeads` for ``layers`` on ``model`` as
    :data:`AUX_ATTRIBUTE` (once; a model that has them is left alone).
    ``example`` is one input, with or without batch dimension, used to read
    the layers' channel counts."""
    if hasattr(model, AUX_ATTRIBUTE):
        return
    device = next(model.parameters()).device
    if example.dim() in (1, 3):
        example = example.unsqueeze(0)
    channels = feature_channels(model, layers, example[:1].to(device))
    model.add_module(AUX_ATTRIBUTE, AuxiliaryHeads(layers, channels).to(device))


__all__ = [
    "AUX_ATTRIBUTE",
    "attach_auxiliary_heads",
    "AuxiliaryHead",
    "AuxiliaryHeads",
    "FeatureTaps",
    "feature_channels",
    "module_names",
    "own_random_stream",
    "resolve_modules",
]
