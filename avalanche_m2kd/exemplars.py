"""Exemplar selection for Avalanche's storage policies: iCaRL's herding on
L2-normalised features, read from a named layer of the model."""

from __future__ import annotations

from typing import Callable, List, Literal, Optional, Sequence

import torch
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import (
    ExemplarsSelectionStrategy,
    ParametricBuffer,
    RandomExemplarsSelectionStrategy,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ._errors import CheckpointError
from .taps import FeatureTaps


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    layer: str = "embedding",
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    flip: bool = False,
) -> Tensor:
    """Flat features of ``dataset`` (eval transforms) at module ``layer``, in
    eval mode; ``flip=True`` mirrors image inputs horizontally first."""
    was_training = model.training
    model.eval()
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    collate = getattr(data, "collate_fn", None)
    chunks = []
    try:
        with FeatureTaps(model, [layer]) as taps:
            for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
                x = batch[0].to(device)
                if flip and x.dim() == 4:
                    x = torch.flip(x, dims=[3])
                model(x)
                chunks.append(taps.features()[0].flatten(1))
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def icarl_herding_order(features: Tensor, n: Optional[int] = None, max_iterations: int = 1000) -> List[int]:
    """iCaRL's herding, as in its reference code and Avalanche's ``ICaRL``.

    Features are L2-normalised; starting from ``w = mu`` (their mean), each step
    picks ``argmax_i <w, phi_i>`` (kept if not already chosen) and updates
    ``w <- w + mu - phi_i``. Returns up to ``n`` indices in selection order,
    after at most ``max_iterations`` steps.
    """
    d = features.T / torch.norm(features.T, dim=0)
    mu = d.mean(dim=1)
    w = mu
    n = features.shape[0] if n is None else min(n, features.shape[0])
    selected: List[int] = []
    chosen = set()
    steps = 0
    while len(selected) < n and steps < max_iterations:
        index = int(torch.argmax(w.unsqueeze(0) @ d))
        if index not in chosen:
            chosen.add(index)
            selected.append(index)
        w = w + mu - d[:, index]
        steps += 1
    return selected


class HerdingSelection(ExemplarsSelectionStrategy):
    """Ranks a class's samples by iCaRL's herding on the features of
    ``feature_layer`` of the strategy's model (eval mode, eval transforms).

    Samples herding did not reach come last, in dataset order.
    """

    def __init__(self, feature_layer: str = "embedding"):
        self.feature_layer = feature_layer

    def make_sorted_indices(self, strategy, data) -> List[int]:
        features = extract_features(strategy.model, data, self.feature_layer, strategy.device, strategy.eval_mb_size or 256)
        order = icarl_herding_order(features, max_iterations=max(1000, 2 * len(data)))
        rest = sorted(set(range(len(data))) - set(order))
        return order + rest


def class_balanced_buffer(
    mem_size: int, selection: Literal["herding", "random"] = "herding", feature_layer: str = "embedding"
) -> ParametricBuffer:
    """Avalanche's class-balanced ``ParametricBuffer`` with herding or random
    selection (``mem_size`` exemplars shared equally by the classes seen)."""
    if selection == "herding":
        policy: ExemplarsSelectionStrategy = HerdingSelection(feature_layer)
    elif selection == "random":
        policy = RandomExemplarsSelectionStrategy()
    else:
        raise ValueError(f"exemplar selection must be 'herding' or 'random', got {selection!r}")
    return ParametricBuffer(mem_size, groupby="class", selection_strategy=policy)


ReplayMode = Literal["concat", "batch"]


class ExemplarReplay(ReplayPlugin):
    """Avalanche's ``ReplayPlugin`` with two ways to replay the memory.

    ``mode="concat"`` (default [iCaRL]): the exemplars join the experience's
    training data, so each is seen once per epoch, as in iCaRL's (and PyCIL's,
    FACIL's) protocol and Avalanche's own ``ICaRL``; the memory is seen with
    the training transform (augmentation included). ``mode="batch"``:
    Avalanche's ``ReplayPlugin`` as it is, a memory mini-batch beside every
    data mini-batch (the memory is oversampled when it is smaller than the
    experience).

    The memory is updated through the storage policy's ``post_adapt``:
    0.6.0's plugin calls the deprecated ``update``, whose decorator re-enables
    DeprecationWarning on every call.
    """

    def __init__(self, mem_size: int = 200, storage_policy=None, mode: ReplayMode = "concat", **kwargs):
        if mode not in ("concat", "batch"):
            raise ValueError(f"ExemplarReplay: mode must be 'concat' or 'batch', got {mode!r}")
        super().__init__(mem_size, storage_policy=storage_policy, **kwargs)
        self.mode = mode

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        buffer = self.storage_policy.buffer
        if self.mode == "concat" and len(buffer) > 0:
            strategy.adapted_dataset = strategy.adapted_dataset.concat(buffer.train())

    def before_training_exp(self, strategy, num_workers: int = 0, shuffle: bool = True, drop_last: bool = False, **kwargs):
        if self.mode == "batch":
            super().before_training_exp(strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last, **kwargs)

    def after_training_exp(self, strategy, **kwargs):
        self.storage_policy.post_adapt(strategy, strategy.experience)


# -- memories as sample ids (checkpoints and plugin states) ----------------------------------
def sample_ids(dataset) -> List[int]:
    """The ``sample_id`` attribute of an Avalanche dataset, as ints."""
    ids = getattr(dataset, "sample_id", None)
    if ids is None:
        raise CheckpointError(
            "a replay memory can only be checkpointed over datasets with a sample_id attribute: build the stream "
            "with avalanche_m2kd.datasets.make_benchmark, or add ids with avalanche_m2kd.datasets.with_sample_ids"
        )
    return [int(i) for i in ids]


class StreamSamples:
    """The training samples of a stream looked up by ``sample_id`` (built on first use)."""

    def __init__(self, experiences: Sequence):
        self.experiences = list(experiences)
        self._pool = self._positions = None

    def __call__(self, ids: Sequence[int]):
        if self._pool is None:
            if not self.experiences:
                raise CheckpointError("restoring a replay memory needs the training stream (pass experiences=...)")
            from avalanche.benchmarks.utils.utils import concat_datasets

            self._pool = concat_datasets([e.dataset for e in self.experiences])
            self._positions = {int(s): i for i, s in enumerate(sample_ids(self._pool))}
        try:
            return self._pool.subset([self._positions[int(i)] for i in ids])
        except KeyError as err:
            raise CheckpointError(f"sample {err.args[0]} of the saved memory is not in this training stream") from None


def buffer_state(policy) -> dict:
    """A class-balanced ``ParametricBuffer``'s groups as sample ids (plain data)."""
    return {
        "seen_groups": sorted(int(g) for g in policy.seen_groups),
        "groups": {int(g): {"max_size": int(b.max_size), "ids": sample_ids(b.buffer)} for g, b in policy.buffer_groups.items()},
        "max_size": int(policy.max_size),
    }


def load_buffer(policy, state: dict, samples: Callable) -> None:
    """Restore :func:`buffer_state` into ``policy``; ``samples(ids)`` gives the
    datasets of those ids (a :class:`StreamSamples`)."""
    from avalanche.training.storage_policy import _ParametricSingleBuffer

    policy.max_size = state["max_size"]
    policy.seen_groups = set(state["seen_groups"])
    policy.buffer_groups = {}
    for group, saved in state["groups"].items():
        single = _ParametricSingleBuffer(saved["max_size"], policy.selection_strategy)
        single.buffer = samples(saved["ids"])
        policy.buffer_groups[int(group)] = single


__all__ = [
    "ExemplarReplay", "ReplayMode", "HerdingSelection", "StreamSamples", "buffer_state", "class_balanced_buffer",
    "extract_features", "icarl_herding_order", "load_buffer", "sample_ids",
]
