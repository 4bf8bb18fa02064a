"""Class-incremental metrics: pure functions on an accuracy matrix, and an
Avalanche plugin metric that builds the matrix during evaluation.

``matrix[i][j]`` is the accuracy on (the test set of) experience ``j`` after
training experience ``i``; ``sizes[j]`` is the number of test samples of
experience ``j``. Rows are training steps (``R`` of them), columns experiences
(``C >= R``; columns past ``R`` are experiences not trained yet and are ignored).
Accuracies on several experiences together are weighted by their sizes, so
unequal experiences count correctly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from avalanche.distributed import DistributedHelper
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

Matrix = Sequence[Sequence[float]] | np.ndarray


def _square(matrix: Matrix) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] < m.shape[0]:
        raise ValueError(f"accuracy matrix must be R x C with C >= R >= 1, got shape {m.shape}")
    return m[:, : m.shape[0]]


def _sizes(sizes: Optional[Sequence[float]], n: int) -> np.ndarray:
    if sizes is None:
        return np.ones(n)
    s = np.asarray(sizes, dtype=np.float64)[:n]
    if s.shape != (n,) or (s <= 0).any():
        raise ValueError(f"sizes must give a positive test-set size for each of the {n} experiences")
    return s


def seen_class_accuracy(matrix: Matrix, sizes: Optional[Sequence[float]] = None) -> np.ndarray:
    """Accuracy on all classes seen so far, after each step:
    ``sum_{j<=i} a[i][j] n_j / sum_{j<=i} n_j``."""
    m = _square(matrix)
    n = _sizes(sizes, m.shape[0])
    return np.array([(m[i, : i + 1] * n[: i + 1]).sum() / n[: i + 1].sum() for i in range(m.shape[0])])


def average_incremental_accuracy(matrix: Matrix, sizes: Optional[Sequence[float]] = None) -> float:
    """Mean over steps of the accuracy on the classes seen so far (first step
    included; Rebuffi et al. 2017)."""
    return float(seen_class_accuracy(matrix, sizes).mean())


def last_step_accuracy(matrix: Matrix, sizes: Optional[Sequence[float]] = None) -> float:
    """Accuracy on all seen classes after the last step."""
    return float(seen_class_accuracy(matrix, sizes)[-1])


def forgetting(matrix: Matrix) -> float:
    """Average forgetting (Chaudhry et al. 2018): over experiences ``j`` before
    the last step, the best accuracy ever reached on ``j`` before the last step
    minus the final accuracy on ``j``. NaN with a single step."""
    m = _square(matrix)
    last = m.shape[0] - 1
    if last == 0:
        return float("nan")
    return float(np.mean([m[j:last, j].max() - m[last, j] for j in range(last)]))


def backward_transfer(matrix: Matrix) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean over ``j`` before the
    last step of ``a[last][j] - a[j][j]``. NaN with a single step."""
    m = _square(matrix)
    last = m.shape[0] - 1
    if last == 0:
        return float("nan")
    return float(np.mean([m[last, j] - m[j, j] for j in range(last)]))


def old_new_accuracy(matrix: Matrix, sizes: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per step ``i``: accuracy on the old classes (experiences ``< i``,
    size-weighted; NaN at step 0) and on the new ones (experience ``i``)."""
    m = _square(matrix)
    n = _sizes(sizes, m.shape[0])
    old = np.array([np.nan] + [(m[i, :i] * n[:i]).sum() / n[:i].sum() for i in range(1, m.shape[0])])
    new = np.diag(m).copy()
    return old, new


def summarize(matrix: Matrix, sizes: Optional[Sequence[float]] = None) -> Dict[str, object]:
    """Every metric of this module, as plain Python values (NaN -> None)."""

    def clean(v):
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v.tolist()]
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)

    old, new = old_new_accuracy(matrix, sizes)
    return {
        "seen_accuracy": clean(seen_class_accuracy(matrix, sizes)),
        "average_incremental_accuracy": clean(average_incremental_accuracy(matrix, sizes)),
        "last_accuracy": clean(last_step_accuracy(matrix, sizes)),
        "forgetting": clean(forgetting(matrix)),
        "backward_transfer": clean(backward_transfer(matrix)),
        "old_accuracy": clean(old),
        "new_accuracy": clean(new),
    }


class IncrementalMetrics(PluginMetric[Dict[str, float]]):
    """Avalanche plugin metric: accuracy matrix and class-incremental metrics.

    Add it to any ``EvaluationPlugin`` and evaluate on the test stream after
    every training experience. After each such evaluation it emits (stream
    level) ``IncrementalAccuracy/seen``, ``IncrementalAccuracy/average``,
    ``IncrementalAccuracy/old``, ``IncrementalAccuracy/new``,
    ``IncrementalForgetting`` and ``IncrementalBWT``. The matrix itself is
    ``metric.matrix()`` (and ``metric.sizes()``, the test-set sizes).
    Evaluations before the first training experience are ignored; periodic
    evaluations during experience ``i`` (``eval_every > 0``) fill row ``i``,
    and the evaluation after it replaces them. Under
    ``torch.distributed`` the counts are summed over ranks (each rank having
    evaluated a shard, see :class:`~avalanche_m2kd.distributed.DataParallelSync`).
    """

    def __init__(self):
        super().__init__()
        self._counts: Dict[tuple[int, int], List[int]] = defaultdict(lambda: [0, 0])
        self._sizes: Dict[int, int] = {}
        self._row = -1
        self._training_row: Optional[int] = None

    def reset(self) -> None:
        self._counts.clear()
        self._sizes.clear()

    def state_dict(self) -> dict:
        """The counts recorded so far, as plain values (for checkpoints)."""
        return {
            "counts": [[i, j, c, t] for (i, j), (c, t) in sorted(self._counts.items())],
            "sizes": {int(k): int(v) for k, v in self._sizes.items()},
            "row": self._row,
            "training_row": self._training_row,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._counts.clear()
        for i, j, c, t in state["counts"]:
            self._counts[(int(i), int(j))] = [int(c), int(t)]
        self._sizes = {int(k): int(v) for k, v in state["sizes"].items()}
        self._row = int(state["row"])
        self._training_row = state["training_row"]

    def matrix(self) -> np.ndarray:
        """``R x C`` accuracies recorded so far (NaN where not evaluated)."""
        if not self._counts:
            return np.zeros((0, 0))
        rows = max(i for i, _ in self._counts) + 1
        cols = max(max(j for _, j in self._counts) + 1, rows)
        out = np.full((rows, cols), np.nan)
        for (i, j), (correct, total) in self._counts.items():
            out[i, j] = correct / total if total else np.nan
        return out

    def sizes(self) -> List[int]:
        return [self._sizes.get(j, 0) for j in range(max(self._sizes, default=-1) + 1)]

    def result(self) -> Dict[str, float]:
        m = self.matrix()
        if m.size == 0 or np.isnan(m[:, : m.shape[0]]).any():
            return {}
        return summarize(m, self.sizes()[: m.shape[0]])

    def before_training_exp(self, strategy) -> None:
        self._training_row = strategy.clock.train_exp_counter

    def before_eval(self, strategy) -> None:
        # Periodic evaluations (eval_every >= 0) run inside training experience i,
        # some before Avalanche's clock has counted it: they belong to row i, not i - 1.
        self._row = strategy.clock.train_exp_counter - 1
        if self._training_row is not None:
            self._row = max(self._row, self._training_row)

    def after_eval_iteration(self, strategy) -> None:
        if self._row < 0:
            return
        j = int(strategy.experience.current_experience)
        predicted = torch.argmax(strategy.mb_output, dim=1)
        counts = self._counts[(self._row, j)]
        counts[0] += int((predicted == strategy.mb_y).sum())
        counts[1] += int(strategy.mb_y.numel())

    def before_eval_exp(self, strategy) -> None:
        if self._row >= 0:
            self._counts.pop((self._row, int(strategy.experience.current_experience)), None)

    def after_eval_exp(self, strategy) -> None:
        if self._row >= 0:
            j = int(strategy.experience.current_experience)
            counts = self._counts[(self._row, j)]
            if DistributedHelper.is_distributed:  # each rank evaluated a shard: sum them
                # on the strategy's device: NCCL reduces only CUDA tensors (gloo takes CPU ones)
                total = torch.tensor(counts, dtype=torch.float64, device=strategy.device)
                torch.distributed.all_reduce(total)
                counts[0], counts[1] = int(total[0]), int(total[1])
            self._sizes[j] = counts[1]

    def after_eval(self, strategy) -> List[MetricValue]:
        summary = self.result()
        if not summary:
            return []
        x = strategy.clock.train_iterations
        step = self._row
        values = {
            "IncrementalAccuracy/seen": summary["seen_accuracy"][step],
            "IncrementalAccuracy/average": summary["average_incremental_accuracy"],
            "IncrementalAccuracy/new": summary["new_accuracy"][step],
            "IncrementalAccuracy/old": summary["old_accuracy"][step],
            "IncrementalForgetting": summary["forgetting"],
            "IncrementalBWT": summary["backward_transfer"],
        }
        return [MetricValue(self, name, v, x) for name, v in values.items() if v is not None]

    def __str__(self) -> str:
        return "IncrementalMetrics"


def incremental_metrics() -> List[PluginMetric]:
    """``[IncrementalMetrics()]``, for ``EvaluationPlugin(*incremental_metrics(), ...)``."""
    return [IncrementalMetrics()]


__all__ = [
    "IncrementalMetrics",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
    "incremental_metrics",
    "last_step_accuracy",
    "old_new_accuracy",
    "seen_class_accuracy",
    "summarize",
]
