"""Saving and resuming a strategy between experiences, in files that load
without running code.

A checkpoint holds tensors and plain values only, written with ``torch.save``
and read with ``torch.load(weights_only=True)``: a crafted or tampered file
cannot execute anything, it is refused with one line. (Avalanche 0.6.0's own
``save_checkpoint`` pickles the whole strategy with dill, and loading such a
file runs whatever it contains.) The price is that the strategy is not stored
but rebuilt: the caller builds it exactly as the saved one was built (same
class, model, optimizer and plugins, in the same order), and
:func:`load_checkpoint` restores into it, in this order:

1. **structure**: what grew during training is grown again (auxiliary heads,
   the ED student's groups, every ``IncrementalClassifier`` to its saved width,
   iCaRL's class-mean table);
2. the model's ``state_dict``, then the optimizer's state, re-attached to the
   parameters by name (momentum survives, as in an uninterrupted run);
3. each plugin's state, through a handler for its class (see
   :data:`PLUGIN_STATE`): M2KD's snapshots and class groups, ED's teachers and
   stage classes, the exemplar memories, LwF's and iCaRL's previous models and
   iCaRL's exemplars, learning-rate schedulers, the gradient scaler, the
   clock and :class:`~avalanche_m2kd.metrics.IncrementalMetrics`;
4. the random generators (torch, CUDA, numpy, ``random``), so a resumed run
   continues as the uninterrupted one would.

Replay memories are stored as sample identities, not images: the training
datasets carry a ``sample_id`` attribute (:func:`avalanche_m2kd.datasets.make_benchmark`
adds it; :func:`avalanche_m2kd.datasets.with_sample_ids` adds it to other
data) and loading takes the training stream to find the samples again.

Each file also records a caller's ``meta`` (the runner stores the strategy
name and the whole configuration); :func:`load_checkpoint` refuses a file
whose ``meta`` differs from the one expected, naming the first difference.

Not restored: teacher and output caches (rebuilt at the next experience) and
the history of Avalanche metrics other than ``IncrementalMetrics`` (they
restart at the resume point). A plugin without a handler makes saving fail
with a message naming it; :func:`register_plugin_state` adds one.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._errors import CheckpointError
from ._random import rng_state, set_rng_state
from .exemplars import StreamSamples, buffer_state, load_buffer, sample_ids
from .models.ed_student import EDStudent
from .models.surgery import conform_incremental_classifiers, grow_student_to_state

FORMAT = "avalanche_m2kd.checkpoint/2"
"""The ``format`` entry of every checkpoint this module writes."""

TMP_SUFFIX = ".tmp"
TMP_MARK = ".m2kd-"
"""Temporary files of :func:`atomic_write` are named ``.NAME.m2kd-<8 random characters>.tmp``:
ours by construction, so a clean-up never touches a user's own ``*.tmp``."""
_OURS = re.compile(r"^\..+\.m2kd-[A-Za-z0-9_]{8}\.tmp$")
"""Suffix of :func:`atomic_write`'s temporary files."""


# -- files ----------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over
    ``path``: a crash midway leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=TMP_SUFFIX)
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
    killed mid-write: regular files of its own name pattern only (never a
    user's file or folder). Only the folder's sole writer may call this."""
    for stale in Path(folder).iterdir():
        if _OURS.match(stale.name) and stale.is_file() and not stale.is_symlink():
            stale.unlink()


def save_checkpoint(strategy, path: str | os.PathLike, meta: Optional[dict] = None) -> None:
    """Save ``strategy`` (between experiences) to ``path``, atomically, with
    ``meta`` (plain values) for :func:`load_checkpoint` to check."""
    state = strategy_state(strategy)
    state["meta"] = dict(meta or {})
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` as plain data, read without executing code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(err).__name__}: {first[:160]}); "
            "it was not loaded: delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not an {FORMAT} file (found {found!r}); delete it to start over")
    return state


def load_checkpoint(strategy, path: str | os.PathLike, experiences: Sequence = (), expect: Optional[dict] = None) -> int:
    """Restore ``strategy`` from ``path``; returns the number of training
    experiences it had finished (the index of the next one).

    ``strategy`` must be built as the saved one was; ``experiences`` is the
    training stream (needed to find a replay memory's samples); ``expect``
    is compared with the ``meta`` the file was saved with, key by key."""
    state = read_checkpoint(path)
    if expect is not None:
        check_meta(state.get("meta", {}), expect, str(path))
    try:
        load_strategy_state(strategy, state, experiences)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return int(state["clock"]["train_exp_counter"])


def maybe_load_checkpoint(
    strategy, path: str | os.PathLike, experiences: Sequence = (), expect: Optional[dict] = None
) -> Tuple[object, int]:
    """:func:`load_checkpoint` if ``path`` exists; returns the strategy and the
    index of the next training experience (0 without a checkpoint)."""
    if not os.path.exists(path):
        return strategy, 0
    return strategy, load_checkpoint(strategy, path, experiences, expect)


MAY_PREDATE = ("data_fingerprint",)
"""Meta keys that checkpoints of earlier releases lack: accepted with a warning."""


def check_meta(saved: dict, expected: dict, where: str) -> None:
    """Refuse a checkpoint whose ``meta`` differs from ``expected``."""
    for key in sorted(set(saved) | set(expected)):
        if key in MAY_PREDATE and key not in saved:
            warnings.warn(f"checkpoint {where} predates its {key}; it cannot be checked", RuntimeWarning)
            continue
        if saved.get(key) != expected.get(key):
            a, b = saved.get(key), expected.get(key)
            if isinstance(a, dict) and isinstance(b, dict):  # name the inner key
                inner = next(k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
                key, a, b = f"{key}.{inner}", a.get(inner), b.get(inner)
            raise CheckpointError(
                f"checkpoint {where} belongs to another run ({key}: {a!r} there, {b!r} now); "
                "use the same options or another checkpoint folder"
            )


def check_can_save(strategy) -> None:
    """Raise :class:`CheckpointError` now, before any training, if a plugin of
    ``strategy`` has no checkpoint handler."""
    for plugin in strategy.plugins:
        _handler(plugin)


# -- the whole strategy -----------------------------------------------------------------------
def strategy_state(strategy) -> dict:
    """Everything :func:`load_strategy_state` needs, as tensors and plain values."""
    model = strategy.model
    names = {id(p): n for n, p in model.named_parameters()}
    # Parameters by name; a parameter the model no longer has (a head replaced
    # when it grew, kept by Avalanche's optimizer update) by its shape only.
    optimizer_names = [
        [names.get(id(p), list(p.shape)) for p in group["params"]] for group in strategy.optimizer.param_groups
    ]
    plugins = []
    for plugin in strategy.plugins:
        handler = _handler(plugin)
        plugins.append({"type": type(plugin).__name__, "state": handler.save(plugin, strategy)})
    return {
        "format": FORMAT,
        "strategy_type": type(strategy).__name__,
        "model": model.state_dict(),
        "optimizer": strategy.optimizer.state_dict(),
        "optimizer_names": optimizer_names,
        "plugins": plugins,
        "strategy": _strategy_extra_state(strategy),
        "clock": _clock_state(strategy.clock),
        "rng": rng_state(),
    }


def load_strategy_state(strategy, state: dict, experiences: Sequence = ()) -> None:
    """Restore :func:`strategy_state`'s ``state`` into a freshly built ``strategy``."""
    if state.get("strategy_type") != type(strategy).__name__:
        raise CheckpointError(f"saved from a {state.get('strategy_type')} strategy, restoring into a {type(strategy).__name__}")
    saved_types = [p["type"] for p in state["plugins"]]
    types = [type(p).__name__ for p in strategy.plugins]
    if saved_types != types:
        raise CheckpointError(f"saved with plugins {saved_types}, this strategy has {types}")
    context = _Context(strategy, list(experiences), state["model"])
    pairs = list(zip(strategy.plugins, state["plugins"]))
    model = strategy.model
    for plugin, saved in pairs:  # 1. structure
        _handler(plugin).prepare(plugin, saved["state"], context)
    conform_incremental_classifiers(model, state["model"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])[:300]
        raise CheckpointError(f"the model does not match the saved one ({detail})") from None
    _load_optimizer(strategy, state)  # 2. optimizer, by parameter name
    for plugin, saved in pairs:  # 3. plugins
        _handler(plugin).load(plugin, saved["state"], context)
    _load_strategy_extra_state(strategy, state["strategy"], context)
    for key, value in state["clock"].items():
        setattr(strategy.clock, key, int(value))
    set_rng_state(state["rng"])  # 4. last: nothing above may draw


def _load_optimizer(strategy, state: dict) -> None:
    named = dict(strategy.model.named_parameters())
    groups = strategy.optimizer.param_groups
    if len(groups) != len(state["optimizer_names"]):
        raise CheckpointError(f"the optimizer has {len(groups)} parameter groups, the saved one {len(state['optimizer_names'])}")
    chosen = {}
    device = next(strategy.model.parameters()).device
    for group, names in zip(groups, state["optimizer_names"]):
        unknown = [n for n in names if isinstance(n, str) and n not in named]
        if unknown:
            raise CheckpointError(f"the saved optimizer trains {unknown[0]!r}, which this model does not have")
        # a detached parameter stands in for one the model dropped: it never gets a gradient
        group["params"] = [named[n] if isinstance(n, str) else nn.Parameter(torch.zeros(n, device=device)) for n in names]
        chosen.update((n, named[n]) for n in names if isinstance(n, str))
    strategy.optimizer.load_state_dict(state["optimizer"])
    # Avalanche re-maps the optimizer by these names at the next experience
    # (momentum kept); without them it would reset the optimizer's state.
    strategy.optimized_param_id = chosen


# -- the clock ------------------------------------------------------------------------------------
def _clock_state(clock) -> dict:
    return {k: int(v) for k, v in vars(clock).items() if isinstance(v, int) and not isinstance(v, bool)}


# -- plugin handlers -------------------------------------------------------------------------------
@dataclass
class _Context:
    strategy: Any
    experiences: List
    model_state: dict

    def __post_init__(self):
        self.samples = StreamSamples(self.experiences)  # the training samples by sample_id (looked up on first use)


@dataclass
class PluginState:
    """How one plugin class is saved and restored: ``save(plugin, strategy) ->
    dict``; ``load(plugin, state, context)``; ``prepare(plugin, state,
    context)`` regrows model structure before the model's weights are loaded."""

    save: Callable[[Any, Any], dict]
    load: Callable[[Any, dict, _Context], None] = lambda plugin, state, context: None
    prepare: Callable[[Any, dict, _Context], None] = lambda plugin, state, context: None


PLUGIN_STATE: Dict[type, PluginState] = {}
"""Handlers by plugin class (the most specific class in a plugin's MRO wins)."""


def register_plugin_state(cls: type, save, load=None, prepare=None) -> None:
    """Teach checkpoints to save and restore plugins of class ``cls``."""
    _ensure_handlers()  # built-in handlers first, so that this one can replace them
    PLUGIN_STATE[cls] = PluginState(save, load or PluginState.load, prepare or PluginState.prepare)


_STATELESS = PluginState(lambda plugin, strategy: {})


def _handler(plugin) -> PluginState:
    _ensure_handlers()
    for cls in type(plugin).__mro__:
        if cls in PLUGIN_STATE:
            return PLUGIN_STATE[cls]
    raise CheckpointError(
        f"no checkpoint handler for plugin {type(plugin).__name__}; register one with "
        "avalanche_m2kd.checkpoint.register_plugin_state (or train without checkpoints)"
    )


def _module_copy(model: nn.Module, state: Optional[dict]) -> Optional[nn.Module]:
    """A frozen copy of ``model`` holding ``state`` (for previous-model teachers)."""
    import copy

    if state is None:
        return None
    other = copy.deepcopy(model)
    # The live model may be wider: evaluation grows its heads to every class of the test stream.
    conform_incremental_classifiers(other, state)
    other.load_state_dict(state)
    return other


def _replay_save(plugin, strategy) -> dict:
    from avalanche.training.storage_policy import ParametricBuffer

    if not isinstance(plugin.storage_policy, ParametricBuffer):
        raise CheckpointError(f"{type(plugin).__name__}: only ParametricBuffer memories can be checkpointed")
    return {"memory": buffer_state(plugin.storage_policy)}


def _register_builtin_handlers() -> None:
    from avalanche.training.losses import ICaRLLossPlugin
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval
    from avalanche.training.supervised.icarl import _ICaRLPlugin

    from .device_data import DeviceDataPlugin
    from .distributed import DataParallelSync
    from .metrics import IncrementalMetrics
    from .plugins.ed import EducationDistillationPlugin
    from .plugins.kd import RoutedDistillationPlugin
    from .plugins.m2kd import M2KDPlugin
    from .plugins.nme import NMEClassifierPlugin
    from .plugins.paired_stream import PairedStreamPlugin
    from .precision import MixedPrecisionPlugin

    for cls in (Clock, PeriodicEval, DataParallelSync, DeviceDataPlugin, RoutedDistillationPlugin):  # teachers are given  # configuration only; the clock is restored with the strategy
        PLUGIN_STATE[cls] = _STATELESS

    # M2KD: its own state_dict; the auxiliary heads are regrown before the model loads.
    def m2kd_prepare(plugin, state, context):
        if state["state"]["groups"]:
            example = torch.as_tensor(context.experiences[0].dataset.eval()[0][0]) if context.experiences else None
            if example is None and plugin.regularizer.uses_aux_heads:
                raise CheckpointError("restoring M2KD's auxiliary heads needs the training stream (pass experiences=...)")
            if example is not None:
                plugin.regularizer.prepare_model(context.strategy.model, example.to(next(context.strategy.model.parameters()).device))

    register_plugin_state(
        M2KDPlugin,
        lambda p, s: {"state": p.state_dict()},
        lambda p, state, c: p.load_state_dict(state["state"]),
        m2kd_prepare,
    )

    # ED: its own state_dict; the student regrows to its saved depth before the model loads.
    def ed_prepare(p, state, c):
        if isinstance(c.strategy.model, EDStudent):
            grow_student_to_state(c.strategy.model, c.model_state)

    def ed_save(p, strategy):
        return p.state_dict()

    def ed_load(p, state, c):
        p.load_state_dict(state, c.experiences, c.strategy.model, samples=c.samples)

    register_plugin_state(EducationDistillationPlugin, ed_save, ed_load, ed_prepare)

    # Exemplar memories: sample ids. Our NME classifier: its class means.
    register_plugin_state(ReplayPlugin, _replay_save, lambda p, state, c: load_buffer(p.storage_policy, state["memory"], c.samples))

    def nme_load(p, state, c):
        p.class_means = {int(k): v.to(c.strategy.device) for k, v in state["class_means"].items()}
        if p.class_means:
            p.ncm.replace_class_means_dict(p.class_means)

    register_plugin_state(NMEClassifierPlugin, lambda p, s: {"class_means": dict(p.class_means)}, nme_load)

    # Avalanche's LwF and iCaRL keep a copy of the previous model.
    def lwf_save(p, strategy):
        lwf = p.lwf
        return {
            "prev_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
            "expcount": int(lwf.expcount),
            "prev_classes_by_task": {int(t): sorted(int(x) for x in v) for t, v in lwf.prev_classes_by_task.items()},
        }

    def lwf_load(p, state, c):
        lwf = p.lwf
        lwf.prev_model = _module_copy(c.strategy.model, state["prev_model"])
        lwf.expcount = state["expcount"]
        for t, classes in state["prev_classes_by_task"].items():
            lwf.prev_classes_by_task[t] = set(classes)

    register_plugin_state(LwFPlugin, lwf_save, lwf_load)

    def icarl_loss_load(p, state, c):
        p.old_classes = list(state["old_classes"])
        p.old_model = _module_copy(c.strategy.model, state["old_model"])

    register_plugin_state(
        ICaRLLossPlugin,
        lambda p, s: {"old_classes": [int(x) for x in p.old_classes], "old_model": None if p.old_model is None else p.old_model.state_dict()},
        icarl_loss_load,
    )

    def icarl_save(p, strategy):
        return {
            "x_memory": [x.cpu() for x in p.x_memory],
            "y_memory": [[int(y) for y in ys] for ys in p.y_memory],
            "order": [x.cpu() if torch.is_tensor(x) else x for x in p.order],
            "observed_classes": [int(x) for x in p.observed_classes],
            "class_means": {int(k): v.cpu() for k, v in p.class_means.items()},
            "sizes": [None if v is None else [int(x) for x in v] if isinstance(v, (tuple, torch.Size)) else int(v)
                      for v in (p.embedding_size, p.output_size, p.input_size)],
        }

    def icarl_prepare(p, state, c):
        if state["class_means"]:  # the eval classifier's mean table has the saved shape before the model loads
            c.strategy.model.eval_classifier.replace_class_means_dict(
                {k: v.to(c.strategy.device) for k, v in state["class_means"].items()}
            )

    def icarl_load(p, state, c):
        device = c.strategy.device
        p.x_memory = list(state["x_memory"])
        p.y_memory = [list(y) for y in state["y_memory"]]
        p.order = list(state["order"])
        p.observed_classes = list(state["observed_classes"])
        p.class_means = {k: v.to(device) for k, v in state["class_means"].items()}
        emb, out, inp = state["sizes"]
        p.embedding_size, p.output_size = emb, out
        p.input_size = None if inp is None else torch.Size(inp)

    register_plugin_state(_ICaRLPlugin, icarl_save, icarl_load, icarl_prepare)

    # Schedulers: their state_dict (milestones are configuration, rebuilt with the plugin).
    def scheduler_save(p, strategy):
        return {"scheduler": {k: v for k, v in p.scheduler.state_dict().items() if k != "milestones"}}

    def scheduler_load(p, state, c):
        merged = dict(p.scheduler.state_dict())
        merged.update(state["scheduler"])
        p.scheduler.load_state_dict(merged)

    register_plugin_state(LRSchedulerPlugin, scheduler_save, scheduler_load)

    def precision_load(p, state, c):
        if state["scaler"] is not None:
            p.before_training(c.strategy)  # creates the scaler and routes the steps through it
            p.scaler.load_state_dict(state["scaler"])

    register_plugin_state(
        MixedPrecisionPlugin,
        lambda p, s: {"scaler": None if p.scaler is None else p.scaler.state_dict()},
        precision_load,
    )

    def paired_load(p, state, c):
        if state["seed"] != p.seed:
            raise CheckpointError(f"the checkpoint's runs were paired on seed {state['seed']}, this strategy on {p.seed}")

    register_plugin_state(PairedStreamPlugin, lambda p, s: {"seed": p.seed}, paired_load)

    # The evaluator: IncrementalMetrics' counts (other metrics restart).
    def evaluator_save(p, strategy):
        return {"incremental": [m.state_dict() for m in p.metrics if isinstance(m, IncrementalMetrics)]}

    def evaluator_load(p, state, c):
        for metric, saved in zip([m for m in p.metrics if isinstance(m, IncrementalMetrics)], state["incremental"]):
            metric.load_state_dict(saved)

    register_plugin_state(EvaluationPlugin, evaluator_save, evaluator_load)


def _strategy_extra_state(strategy) -> dict:
    from avalanche.training.supervised import Cumulative

    if isinstance(strategy, Cumulative):  # all data so far: the first n experiences
        return {"cumulative_experiences": int(strategy.clock.train_exp_counter) if strategy.dataset is not None else 0}
    return {}


def _load_strategy_extra_state(strategy, state: dict, context: _Context) -> None:
    n = state.get("cumulative_experiences", 0)
    if n:
        from avalanche.benchmarks.utils.utils import concat_datasets

        strategy.dataset = concat_datasets([e.dataset for e in context.experiences[:n]])


_builtin_handlers_registered = False


def _ensure_handlers() -> None:
    """Register the built-in handlers on first use (they import the plugins,
    which import this package)."""
    global _builtin_handlers_registered
    if not _builtin_handlers_registered:
        _builtin_handlers_registered = True
        _register_builtin_handlers()


__all__ = [
    "FORMAT",
    "PLUGIN_STATE",
    "TMP_SUFFIX",
    "CheckpointError",
    "PluginState",
    "atomic_write",
    "check_can_save",
    "check_meta",
    "conform_incremental_classifiers",
    "load_checkpoint",
    "load_strategy_state",
    "maybe_load_checkpoint",
    "read_checkpoint",
    "register_plugin_state",
    "remove_stale_temporaries",
    "rng_state",
    "sample_ids",
    "save_checkpoint",
    "set_rng_state",
    "strategy_state",
]
