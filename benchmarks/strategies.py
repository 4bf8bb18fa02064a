"""The strategies the runner compares, built from one configuration so that
every method gets the same model, epochs, optimizer, memory and seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from avalanche.training import ICaRL, LwF, Naive
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
from avalanche.training.supervised import Cumulative
from torch import nn

from avalanche_m2kd import M2KD, EducationDistillation, PairedStreamPlugin, models
from avalanche_m2kd.exemplars import ExemplarReplay, class_balanced_buffer
from avalanche_m2kd.precision import MixedPrecisionPlugin


@dataclass
class Setup:
    """Everything a strategy builder needs besides its name."""

    config: dict
    n_classes: int
    input_shape: tuple
    device: str
    evaluator: EvaluationPlugin
    buffer_transform: Optional[Callable] = None  # augmentation for iCaRL's stored (eval-transformed) exemplars
    first_plugins: tuple = ()  # run before every other plugin (multi-process synchronisation)
    last_plugins: tuple = ()  # run after every other plugin (the device-data loader replaces the strategy's)
    seed: int = 0  # every epoch's data order and augmentation (PairedStreamPlugin)


ABLATIONS = {"m2kd-last-noaux", "m2kd-probe", "m2kd-last-probe", "m2kd-icarl-noaux", "m2kd-icarl-last-noaux", "m2kd-icarl-informed", "m2kd-bce-noaux", "m2kd-bce-last-noaux", "m2kd-bce-informed", "m2kd-bce-icarlhead"}
"""Strategies run only when named in ``--strategies`` (not in the default set)."""


def learning_rate(name: str, config: dict) -> float:
    if name in SIGMOID_LOSS and config.get("lr_sigmoid") is not None:
        return float(config["lr_sigmoid"])
    return float(config["lr"])


def make_optimizer(params, name: str, config: dict) -> torch.optim.Optimizer:
    lr = learning_rate(name, config)
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config["momentum"], weight_decay=config["weight_decay"])
    if config["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config["weight_decay"])
    raise ValueError(f"unknown optimizer {config['optimizer']!r}; use 'sgd' or 'adam'")


def _plugins(optimizer, setup: "Setup", replay: bool) -> List:
    config = setup.config
    plugins: List = [*setup.first_plugins, PairedStreamPlugin(setup.seed)]
    # Autocast covers the student's forward only: Avalanche's LwF and ICaRL run their previous model in
    # float32 (outside it), this library's teachers in --precision through teacher_precision.
    if config.get("precision", "fp32") != "fp32":
        plugins.append(MixedPrecisionPlugin(config["precision"]))
    if config["milestones"]:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config["milestones"], gamma=config["gamma"])
        plugins.append(LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True))
    if replay and config["mem_size"] > 0:
        plugins.append(ExemplarReplay(config["mem_size"], storage_policy=class_balanced_buffer(config["mem_size"])))
    return plugins + list(setup.last_plugins)


def _common(setup: Setup) -> dict:
    c = setup.config
    return dict(
        train_mb_size=c["batch_size"],
        train_epochs=c["epochs"],
        eval_mb_size=max(256, c["batch_size"]),
        device=setup.device,
        evaluator=setup.evaluator,
    )


def _model(setup: Setup, fixed_head: bool = False) -> nn.Module:
    """The configured backbone; ``fixed_head``: iCaRL's classifier, one output
    per class of the stream from the first step (iCaRL's init on its variant)."""
    if not fixed_head:
        return models.create(setup.config["model"], in_channels=setup.input_shape[0])
    model = models.create(setup.config["model"], num_classes=setup.n_classes, in_channels=setup.input_shape[0])
    if getattr(model, "variant", None) == "icarl":
        models.icarl_linear_init(model.head)  # as Avalanche's initialize_icarl_net
    return model


def build_naive(name: str, setup: Setup):
    model = _model(setup)
    optimizer = make_optimizer(model.parameters(), name, setup.config)
    return Naive(model=model, optimizer=optimizer, plugins=_plugins(optimizer, setup, True), **_common(setup))


def build_joint(name: str, setup: Setup):
    model = _model(setup)
    optimizer = make_optimizer(model.parameters(), name, setup.config)
    return Cumulative(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        plugins=_plugins(optimizer, setup, False),
        **_common(setup),
    )


def build_lwf(name: str, setup: Setup):
    model = _model(setup)
    optimizer = make_optimizer(model.parameters(), name, setup.config)
    return LwF(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        alpha=1.0,
        temperature=2.0,
        plugins=_plugins(optimizer, setup, True),
        **_common(setup),
    )


def build_icarl(name: str, setup: Setup):
    if setup.config["mem_size"] <= 0:
        raise ValueError("icarl needs an exemplar memory: set --mem-size > 0 or leave icarl out of --strategies")
    # The fixed-head model M2KD's iCaRL form builds, split into features and classifier: the
    # same random draws, so icarl and m2kd-icarl* start from the same weights on a seed.
    backbone = _model(setup, fixed_head=True)
    features = models.feature_extractor(backbone)
    classifier = backbone.head
    params = list(features.parameters()) + list(classifier.parameters())
    optimizer = make_optimizer(params, name, setup.config)
    return ICaRL(
        feature_extractor=features,
        classifier=classifier,
        optimizer=optimizer,
        memory_size=setup.config["mem_size"],
        buffer_transform=setup.buffer_transform,
        fixed_memory=True,
        plugins=_plugins(optimizer, setup, False),
        **_common(setup),
    )


def _m2kd(icarl_head: bool = False, **overrides):
    # icarl_head: iCaRL's classifier, a fixed head over the stream's classes with
    # unseen classes pushed towards 0. With exemplars (m2kd-icarl*) it is worth 5
    # to 6 points at the first experience over a growing head on the seen
    # columns; without exemplars (m2kd-bce*) it ends 2 to 3 points lower on both
    # seeds (CIFAR-100 B0-10 CPU form; README), so those keep the growing head.
    if icarl_head:
        overrides = dict(overrides, bce_columns="all")

    def build(name: str, setup: Setup):
        model = _model(setup, fixed_head=icarl_head)
        optimizer = make_optimizer(model.parameters(), name, setup.config)
        kwargs = dict(
            teacher_precision=setup.config.get("precision", "fp32"),
        )
        if setup.config.get("m2kd_store"):
            kwargs["snapshot_store"] = setup.config["m2kd_store"]
        if setup.config.get("teacher_inference"):
            kwargs["teacher_inference"] = setup.config["teacher_inference"]
        kwargs.update(setup.config.get("m2kd") or {})
        kwargs.update(overrides)
        if kwargs.get("classifier") == "nme" and setup.config["mem_size"] <= 0:
            raise ValueError(f"{name} needs an exemplar memory: set --mem-size > 0 or leave it out of --strategies")
        return M2KD(
            model=model,
            optimizer=optimizer,
            mem_size=setup.config["mem_size"],
            plugins=_plugins(optimizer, setup, False),
            **kwargs,
            **_common(setup),
        )

    build.options = overrides  # read by SIGMOID_LOSS and NEEDS_MEMORY below
    return build


def build_ed(name: str, setup: Setup):
    """ED's growing student of the backbone's family; each stage's teacher is
    the backbone itself, trained on the stage alone with the same optimizer and
    epochs; earlier stages are revisited through a memory of ``mem_size``."""
    c = setup.config
    channels, side = setup.input_shape[0], setup.input_shape[-1]
    student = models.ed_student_for(c["model"], channels, side)
    optimizer = make_optimizer(student.parameters(), name, c)
    kwargs = dict(revisit=c["mem_size"], teacher_precision=c.get("precision", "fp32"))
    if c.get("teacher_inference"):
        kwargs["teacher_inference"] = c["teacher_inference"]
    kwargs.update(c.get("ed") or {})
    return EducationDistillation(
        model=student,
        optimizer=optimizer,
        teacher_factory=lambda n: models.create(c["model"], num_classes=n, in_channels=channels),
        teacher_optimizer=lambda params: make_optimizer(params, name, c),
        plugins=_plugins(optimizer, setup, False),
        **kwargs,
        **_common(setup),
    )


STRATEGIES: Dict[str, Callable] = {
    "naive": build_naive,
    "joint": build_joint,
    "lwf": build_lwf,
    "icarl": build_icarl,
    "m2kd": _m2kd(),
    "m2kd-last": _m2kd(teachers="last"),
    "m2kd-noaux": _m2kd(aux_layers=()),
    "m2kd-last-noaux": _m2kd(teachers="last", aux_layers=()),
    "m2kd-probe": _m2kd(aux_supervision="probe"),
    "m2kd-last-probe": _m2kd(teachers="last", aux_supervision="probe"),
    "m2kd-icarl": _m2kd(True, loss="bce", classifier="nme"),
    "m2kd-icarl-last": _m2kd(True, loss="bce", classifier="nme", teachers="last"),
    "m2kd-icarl-noaux": _m2kd(True, loss="bce", classifier="nme", aux_layers=()),
    "m2kd-icarl-last-noaux": _m2kd(True, loss="bce", classifier="nme", teachers="last", aux_layers=()),
    "m2kd-icarl-informed": _m2kd(True, loss="bce", classifier="nme", old_targets="informed"),
    "m2kd-bce": _m2kd(loss="bce"),
    "m2kd-bce-last": _m2kd(loss="bce", teachers="last"),
    "m2kd-bce-noaux": _m2kd(loss="bce", aux_layers=()),
    "m2kd-bce-last-noaux": _m2kd(loss="bce", teachers="last", aux_layers=()),
    "m2kd-bce-informed": _m2kd(loss="bce", old_targets="informed"),
    "m2kd-bce-icarlhead": _m2kd(True, loss="bce"),
    "ed": build_ed,
}
"""Strategies by name. ``naive`` and ``lwf`` are Avalanche's, with Avalanche's
``ReplayPlugin`` (as ``ExemplarReplay``, exemplars joined to the training data as
in iCaRL's protocol) over the same class-balanced herding memory when
``mem_size > 0``; the M2KD strategies replay the same way; ``joint`` is Avalanche's ``Cumulative`` (all data seen so
far, the upper bound at every step); ``icarl`` is Avalanche's ``ICaRL``."""

SIGMOID_LOSS = {"icarl"} | {n for n, b in STRATEGIES.items() if getattr(b, "options", {}).get("loss") == "bce"}
"""Strategies trained with a per-class sigmoid loss: they use ``lr_sigmoid``."""
NEEDS_MEMORY = {"icarl"} | {n for n, b in STRATEGIES.items() if getattr(b, "options", {}).get("classifier") == "nme"}
"""Strategies that classify by the nearest mean of exemplars: checked before any training."""
EXEMPLAR_FREE = {"m2kd-bce", "m2kd-bce-last"}
"""The sigmoid form classifying with its trained head: made for streams without a
memory. With one, iCaRL's loss teaches each old class's output to fire on the new
classes' images (the snapshots' sigmoid targets there are near 1) and the trained
head confuses them; the nearest-mean classifier does not (``m2kd-icarl``). So by
default these run only with ``--mem-size 0`` (named, they run with any memory)."""


def default_strategies(mem_size: int) -> List[str]:
    """The strategies a comparison runs when none are named: every product
    strategy suited to the memory (no ablations)."""
    unsuited = NEEDS_MEMORY if mem_size == 0 else EXEMPLAR_FREE
    return [n for n in STRATEGIES if n not in ABLATIONS and n not in unsuited]

DESCRIPTIONS = {
    "naive": "fine-tuning (Avalanche Naive) + replay memory",
    "joint": "all data seen so far (Avalanche Cumulative): upper bound",
    "lwf": "Avalanche LwF (alpha 1, T 2) + replay memory",
    "icarl": "Avalanche ICaRL (herding, nearest-mean classifier)",
    "m2kd": "M2KD: all snapshots, auxiliary heads",
    "m2kd-last": "M2KD with the last snapshot only",
    "m2kd-noaux": "M2KD without auxiliary heads",
    "m2kd-last-noaux": "the last snapshot, no auxiliary heads: LwF's loss through our code (ablation)",
    "m2kd-probe": "M2KD, auxiliary heads trained as probes: their cross-entropy does not reach the backbone (ablation)",
    "m2kd-last-probe": "m2kd-last with the auxiliary heads trained as probes (ablation)",
    "m2kd-icarl": "M2KD in iCaRL's form: iCaRL's classifier and sigmoid loss, herding, nearest-mean classifier",
    "m2kd-icarl-last": "the same with the last snapshot only (iCaRL's loss through our code)",
    "m2kd-icarl-noaux": "m2kd-icarl without auxiliary heads (ablation)",
    "m2kd-icarl-last-noaux": "the last snapshot in iCaRL's form, no auxiliary heads: iCaRL through our code, its teacher in eval mode (ablation)",
    "m2kd-icarl-informed": "m2kd-icarl, each snapshot judging only samples of classes it saw (old_targets='informed'; ablation)",
    "m2kd-bce": "M2KD's sigmoid form with the trained, growing head (no nearest-mean classifier; for --mem-size 0)",
    "m2kd-bce-last": "the same with the last snapshot only",
    "m2kd-bce-noaux": "m2kd-bce without auxiliary heads (ablation)",
    "m2kd-bce-last-noaux": "the last snapshot in the sigmoid form, no auxiliary heads: iCaRL's LwF.MC through our code (ablation)",
    "m2kd-bce-informed": "m2kd-bce with old_targets='informed' (ablation)",
    "m2kd-bce-icarlhead": "m2kd-bce with iCaRL's fixed classifier, every column in the loss (ablation)",
    "ed": "Education Distillation: growing student, one teacher per experience",
}


def build_strategy(name: str, setup: Setup):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](name, setup)


def snapshot_state(strategy):
    """The snapshot store's state of an M2KD strategy (None for others)."""
    plugin = getattr(strategy, "m2kd", None)
    return None if plugin is None else plugin.snapshots.state_dict()


def snapshot_bytes(strategy) -> Optional[Dict[str, int]]:
    """Bytes held by an M2KD strategy's snapshot store (None for others)."""
    plugin = getattr(strategy, "m2kd", None)
    if plugin is None:
        return None
    return {"held": plugin.snapshots.nbytes(), "full_copies": plugin.snapshots.full_copy_nbytes()}
