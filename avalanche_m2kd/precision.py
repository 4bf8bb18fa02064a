"""Mixed precision for Avalanche strategies and for frozen teachers.

Avalanche 0.6.0's classification templates have no automatic mixed precision.
:class:`MixedPrecisionPlugin` adds it to any ``SupervisedTemplate``: the
model's forward passes (training and evaluation) run under ``torch.autocast``
and their outputs are cast back to float32, so every loss is computed in
float32. ``"bf16"`` needs no loss scaling (bfloat16 has float32's exponent
range); ``"fp16"`` adds a ``torch.amp.GradScaler`` that scales the loss before
the backward pass and skips an optimizer step whose gradients are not finite.

Teachers (M2KD's snapshots, ED's stage teachers) take their own precision
(``teacher_precision`` of the plugins): they only run forward passes, so they
can run in bf16 while the student trains in float32.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Literal, Optional

import torch
from avalanche.core import SupervisedPlugin

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, owner: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32); ``ValueError`` otherwise."""
    if precision not in _DTYPES:
        raise ValueError(f"{owner}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _DTYPES[precision]


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX), read
    from ``/proc/cpuinfo``; False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(precision: str, device: torch.device | str):
    """``torch.autocast`` for ``precision`` on ``device`` (a null context for fp32)."""
    dtype = check_precision(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=dtype)


class MixedPrecisionPlugin(SupervisedPlugin, supports_distributed=True):
    """Runs a strategy's model forward passes in reduced precision.

    Autocast covers exactly the student's forward (the template's ``forward()``;
    in training, and in evaluation if asked), whose output is cast back to float32; every
    loss is then computed in float32, and teacher passes that other plugins
    make keep their own precision (Avalanche's ``LwF`` and ``ICaRL`` run theirs
    in float32; this library's plugins take ``teacher_precision``).

    Args:
        precision: ``"bf16"`` (default [ours]: about 2x faster than float32 on
            CPUs with bf16 units and on recent GPUs, no loss scaling needed),
            ``"fp16"`` (CUDA; with a gradient scaler) or ``"fp32"`` (no-op).
        evaluation: also run evaluation forwards in ``precision``. Default
            False [ours]: evaluation is a small share of the time, and features
            read in float32 match class means computed in float32 (iCaRL's
            nearest-mean classifier compares the two).

    With ``"fp16"`` the strategy's ``backward`` and ``optimizer_step`` go
    through a ``torch.amp.GradScaler`` (``strategy.grad_scaler``): a step whose
    gradients hold inf or NaN is skipped and the scale lowered, as the scaler
    does; this library's plugins then do not raise on non-finite loss terms.
    Avalanche's template calls ``forward()``, ``backward()`` and
    ``optimizer_step()``; the plugin replaces them on the strategy instance.
    """

    def __init__(self, precision: Precision = "bf16", evaluation: bool = False):
        super().__init__()
        self.dtype = check_precision(precision, "MixedPrecisionPlugin")
        self.precision = precision
        self.evaluation = bool(evaluation)
        self.scaler: Optional[torch.amp.GradScaler] = None

    def before_training(self, strategy, **kwargs):
        self._install(strategy)
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(device_type(strategy.device))
            _route_through_scaler(strategy, self.scaler)

    def before_eval(self, strategy, **kwargs):
        self._install(strategy)

    def _install(self, strategy) -> None:
        if self.dtype is None or getattr(strategy, "_precision_forward", None) is not None:
            return
        if self.precision == "bf16" and device_type(strategy.device) == "cpu" and not cpu_has_bf16():
            warnings.warn(
                "MixedPrecisionPlugin: this CPU has no bfloat16 units (avx512_bf16 / amx_bf16); bf16 will be "
                "emulated and slower than fp32",
                RuntimeWarning,
                stacklevel=3,
            )
        plain_forward = strategy.forward
        dtype, evaluation = self.dtype, self.evaluation

        def forward():
            if not (strategy.is_training or evaluation):
                return plain_forward()
            with torch.autocast(device_type(strategy.device), dtype=dtype):
                out = plain_forward()
            return out.float() if torch.is_tensor(out) else out

        strategy.forward = forward
        strategy._precision_forward = forward


def _route_through_scaler(strategy, scaler: torch.amp.GradScaler) -> None:
    """Scale the loss before backward; step through the scaler (which skips
    non-finite steps) and update its scale. Avalanche's template calls
    ``backward()`` and ``optimizer_step()``; they are replaced on this instance."""

    def backward():
        scaler.scale(strategy.loss).backward(retain_graph=getattr(strategy, "retain_graph", False))

    def optimizer_step():
        scaler.step(strategy.optimizer)
        scaler.update()

    strategy.backward = backward
    strategy.optimizer_step = optimizer_step
    strategy.grad_scaler = scaler


def scaler_skips_non_finite(strategy) -> bool:
    """Whether a gradient scaler handles non-finite values for ``strategy`` (fp16)."""
    scaler = getattr(strategy, "grad_scaler", None)
    return scaler is not None and scaler.is_enabled()


__all__ = [
    "MixedPrecisionPlugin",
    "PRECISIONS",
    "Precision",
    "autocast",
    "check_precision",
    "cpu_has_bf16",
    "scaler_skips_non_finite",
]
