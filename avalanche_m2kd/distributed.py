"""Data-parallel training across processes (``torchrun``), with Avalanche's
``DistributedHelper`` for the process group.

Avalanche 0.6.0 initialises ``torch.distributed`` and shards training data
with a ``DistributedSampler``, but no longer wraps the model in
``DistributedDataParallel`` and does not gather metrics. A DDP wrapper would
also have to be rebuilt whenever a growing head (``IncrementalClassifier``) or
ED's student adds parameters. :class:`DataParallelSync` gives the same
semantics as DDP with plain collectives instead:

* after model adaptation, every rank takes rank 0's parameters and buffers
  (new head rows are drawn independently on each rank);
* after every backward pass, gradients are averaged over ranks (what DDP's
  all-reduce does), so the ranks' updates, and hence models, stay identical;
* after every training experience, BatchNorm statistics are averaged over
  ranks before snapshots, exemplars or teachers are taken from the model;
* evaluation is sharded without padding (rank ``r`` takes samples ``r, r + W,
  ...``): :class:`~avalanche_m2kd.metrics.IncrementalMetrics` sums its counts
  over ranks, so metrics cover the whole test set exactly once.

Put the plugin first in the strategy's plugin list, so its end-of-experience
synchronisation precedes every snapshot.

Why not a DDP wrapper: it takes the same steps (``benchmarks.studies.ddp_sync`` finds
identical weights), its overlap of all-reduce and backward won nothing on a
2-process CPU run (README), and it renames every module that M2KD's taps,
snapshots and checkpoints address by name.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable

import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from torch import Tensor, nn
from torch.utils.data import DataLoader


def is_distributed() -> bool:
    return bool(DistributedHelper.is_distributed)


def sync_gradients(model: nn.Module) -> None:
    """Average the gradients of ``model`` over all ranks (one all-reduce)."""
    if not is_distributed():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= DistributedHelper.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        chunk = flat[offset : offset + n].view_as(g)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def _tensors(module: nn.Module) -> Iterable[Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    if not is_distributed():
        return
    for t in _tensors(module):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_batchnorm_statistics(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks."""
    if not is_distributed():
        return
    world = DistributedHelper.world_size
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    dist.all_reduce(t)
                    t /= world


def state_hash(obj) -> str:
    """SHA-256 of ``torch.save(obj)``: equal states, equal hashes (for checking
    that every rank holds the same snapshots)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class RankShardLoader:
    """Evaluation data for this rank: samples ``rank, rank + world, ...``, no padding."""

    def __init__(self, dataset, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size
        rank, world = DistributedHelper.rank, DistributedHelper.world_size
        self.indices = list(range(rank, len(dataset), world))

    def __iter__(self):
        return iter(
            DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.indices,
                collate_fn=getattr(self.dataset, "collate_fn", None),
            )
        )

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size


class DataParallelSync(SupervisedPlugin, supports_distributed=True):
    """Keeps the model identical on every rank of a ``torchrun`` job (see the
    module docstring). A no-op without ``torch.distributed``."""

    def before_training_exp(self, strategy, **kwargs):
        broadcast_module(strategy.model)

    def after_backward(self, strategy, **kwargs):
        sync_gradients(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        average_batchnorm_statistics(strategy.model)

    def before_eval_exp(self, strategy, **kwargs):
        if is_distributed():
            strategy.dataloader = RankShardLoader(strategy.adapted_dataset, strategy.eval_mb_size)


__all__ = [
    "DataParallelSync",
    "RankShardLoader",
    "average_batchnorm_statistics",
    "broadcast_module",
    "is_distributed",
    "state_hash",
    "sync_gradients",
]
