"""Saving and resuming a strategy, on top of Avalanche's checkpointing.

Avalanche 0.6.0's ``save_checkpoint`` pickles the whole strategy with dill:
model, optimizer, every plugin (M2KD's snapshots and owners, class groups and
auxiliary heads live on the model; ED's teachers, stage data and the growing
student's pending groups), the evaluator and the random generators. Two things
are added here:

* **torch 2.14 compatibility.** ``torch/optim/__init__.py`` deletes its
  submodule attributes (``del adam``, ...), so dill cannot find
  ``torch.optim.adam.Adam`` by reference and tries to pickle the class by
  value, failing with a ``PicklingError``. :func:`save_checkpoint` re-attaches
  the loaded ``torch.optim`` submodules first (site-packages untouched).
* **Atomic writes.** The checkpoint is written to a temporary file in the same
  folder and renamed over the old one, so a crash while writing leaves the
  previous checkpoint intact.

Caches (teacher sets, their output caches) are rebuilt at the next experience,
so they are never saved.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from avalanche.checkpointing import maybe_load_checkpoint as _avalanche_load
from avalanche.checkpointing import save_checkpoint as _avalanche_save


def _reattach_torch_optim_submodules() -> None:
    for name, module in list(sys.modules.items()):
        prefix, _, short = name.partition("torch.optim.")
        if prefix == "" and short and "." not in short and module is not None:
            if getattr(torch.optim, short, None) is not module:
                setattr(torch.optim, short, module)


TMP_SUFFIX = ".tmp"
"""Suffix of :func:`atomic_write`'s temporary files."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over
    ``path``: a crash midway leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete what :func:`atomic_write` leaves in ``folder`` when its process is
    killed mid-write. Only the folder's sole writer may call this."""
    for stale in Path(folder).glob(f"*{TMP_SUFFIX}"):
        stale.unlink()


def save_checkpoint(strategy, path: str | os.PathLike) -> None:
    """Save ``strategy`` (between experiences) to ``path``, atomically."""
    _reattach_torch_optim_submodules()
    atomic_write(path, lambda tmp: _avalanche_save(strategy, tmp))


def maybe_load_checkpoint(
    strategy, path: str | os.PathLike, map_location: Optional[str | torch.device] = None
) -> Tuple[object, int]:
    """Restore ``strategy`` from ``path`` if it exists; returns the strategy
    and the index of the next training experience (0 without a checkpoint).

    The strategy must be built the same way as the one that was saved."""
    if not os.path.exists(path):
        return strategy, 0
    try:
        return _avalanche_load(strategy, str(path), map_location=map_location)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it to start over") from None


__all__ = ["TMP_SUFFIX", "atomic_write", "remove_stale_temporaries", "maybe_load_checkpoint", "save_checkpoint"]
