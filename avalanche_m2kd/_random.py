"""Random numbers that leave the global streams alone.

A paired comparison (two strategies, one seed) is only paired if both draw
the same data order and augmentation. Anything a method does on the side
(checking a transform, building a layer, sampling teachers, fine-tuning a
pruned snapshot) must therefore not consume the global generators."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def global_random_untouched() -> Iterator[None]:
    """Run the block and restore torch's CPU generator, Python's ``random``
    and NumPy's global state afterwards: the block may draw (a random
    transform read for a check), the run after it draws as if it had not."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # CPU generator only: nothing here runs on CUDA
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def derived_seed(salt: int) -> int:
    """A seed that follows the global torch seed (and a resumed run's restored
    generator) without consuming it: the next draw, peeked and put back,
    mixed with ``salt`` so that each consumer gets a stream of its own."""
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, ())) ^ salt


@contextlib.contextmanager
def own_random_stream(salt: int) -> Iterator[None]:
    """Run the block on a random stream of its own: the global CPU generator
    is reseeded with :func:`derived_seed` and restored on exit (Python's and
    NumPy's generators too), so the block is deterministic and leaves every
    later draw as it would be without the block."""
    with global_random_untouched():
        torch.random.default_generator.manual_seed(derived_seed(salt))
        yield


def own_generator(salt: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derived_seed` (the global one untouched)."""
    return torch.Generator().manual_seed(derived_seed(salt))


_EPOCH_STREAM = 0x45504F43  # mixed into every epoch seed (see epoch_seed)


def epoch_seed(seed: int, experience: int, epoch: int) -> int:
    """The seed of one training epoch: a function of the run's seed, the
    experience and the epoch only (NumPy's ``SeedSequence`` mixes them)."""
    words = np.random.SeedSequence([int(seed), int(experience), int(epoch), _EPOCH_STREAM]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_globally(seed: int) -> None:
    """Seed torch (every device), NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """The states of torch's, CUDA's, numpy's and Python's generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s generators."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["python"]))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
