"""Side-by-side comparison of M2KD, ED and the baselines on one class-incremental
stream, with the same model, epochs, optimizer, memory and seeds.

    python -m benchmarks.compare                       # the embedded default (digits preset)
    python -m benchmarks.compare --preset fmnist-quick --seeds 0,1,2
    python -m benchmarks.compare --list                # presets and strategies
    torchrun --nproc_per_node=2 -m benchmarks.compare  # data-parallel over 2 processes

Outputs in ``--out``: results.json, results.csv, summary.md and plots
(accuracy_curve.png, accuracy_matrices.png, old_new.png). With
``--checkpoint DIR`` every run is checkpointed after each experience and
``--resume`` continues an interrupted invocation exactly where it stopped.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: a stop during them ends in one line
    from benchmarks.stopping import exit_during_start_up

    exit_during_start_up("python -m benchmarks.compare")

import argparse
import functools
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from benchmarks.stopping import Terminated, check_stop, exit_status, run_stoppable

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "digits"
PROG = "python -m benchmarks.compare"


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we print one line
        raise UsageError(message)


def presets() -> dict:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.json"))}


PRESET_FIELDS = {
    "description": (str,), "dataset": (str,), "n_experiences": (int,), "class_order": (str,), "model": (str, type(None)),
    "epochs": (int,), "batch_size": (int,), "optimizer": (str,), "lr": (int, float), "momentum": (int, float),
    "weight_decay": (int, float), "milestones": (list,), "gamma": (int, float), "mem_size": (int,), "augment": (bool,),
    "train_per_class": (int, type(None)), "test_per_class": (int, type(None)), "seeds": (list,),
    "lr_sigmoid": (int, float, type(None)),
}
"""A preset's required fields and their JSON types."""
PRESET_OPTIONAL = {"precision": (str,), "m2kd": (dict,), "ed": (dict,), "data_root": (str, type(None))}
"""Optional fields: precision (default fp32), M2KD's and ED's plugin options, the data folder."""


def load_preset(name: str) -> dict:
    """A built-in preset by name, or a user's JSON file in the same format
    (``--preset my_protocol.json``), checked field by field."""
    table = presets()
    if name in table:
        return check_preset(read_json(table[name], "preset"), name)
    path = Path(name)
    if not (name.endswith(".json") or path.is_file()):
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(table)}, or give the path of a .json file")
    if not path.is_file():
        raise UsageError(f"preset file {name} does not exist; give the path of a .json preset (see --list for the built-in ones)")
    return check_preset(read_json(path, "preset"), name)


def check_preset(preset, where: str) -> dict:
    """Every field a preset needs, with its JSON type; unknown fields refused."""
    if not isinstance(preset, dict):
        raise UsageError(f"preset {where} must hold a JSON object, not {type(preset).__name__}")
    fields = {**PRESET_FIELDS, **PRESET_OPTIONAL}
    missing = [k for k in PRESET_FIELDS if k not in preset]
    if missing:
        raise UsageError(f"preset {where} lacks {', '.join(missing)}; copy a built-in preset (benchmarks/presets) and edit it")
    for key, value in preset.items():
        if key not in fields:
            raise UsageError(f"preset {where}: unknown field {key!r}; the fields are {', '.join(fields)}")
        types = fields[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UsageError(f"preset {where}: {key} must be {names}, got {value!r}")
    if not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m < preset["epochs"] for m in preset["milestones"]):
        raise UsageError(f"preset {where}: milestones must be epochs between 1 and {preset['epochs'] - 1}, got {preset['milestones']}")
    if not preset["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in preset["seeds"]):
        raise UsageError(f"preset {where}: seeds must be a non-empty list of integers, got {preset['seeds']}")
    return preset


def parse_names(text: Optional[str], known: List[str], what: str, default: Optional[List[str]] = None) -> List[str]:
    """A comma-separated choice among ``known`` (``default``, else all of them, when ``text`` is empty)."""
    names = [s.strip() for s in text.split(",") if s.strip()] if text else list(default or known)
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"a protocol of benchmarks/presets by name (default {DEFAULT_PRESET}, see --list) or the path of a JSON file in their format")
    p.add_argument("--dataset", help="digits, fmnist, cifar10, cifar100, npz:PATH or imagefolder:ROOT")
    p.add_argument("--data-root", help="folder holding the data set files")
    p.add_argument("--download", action="store_true", help="allow torchvision to download the data set")
    from benchmarks.strategies import ABLATIONS, EXEMPLAR_FREE, NEEDS_MEMORY

    p.add_argument("--strategies", help=(
        "comma-separated strategies (see --list). Default: every product strategy suited to the memory: with --mem-size 0 all "
        f"but {', '.join(sorted(NEEDS_MEMORY))}; with a memory all but {', '.join(sorted(EXEMPLAR_FREE))}. "
        f"The ablations run when named: {', '.join(sorted(ABLATIONS))}"))
    p.add_argument("--mem-size", type=int, help="exemplars kept in total, for every strategy that uses a memory")
    p.add_argument("--epochs", type=int, help="epochs per experience")
    p.add_argument("--n-experiences", type=int, help="number of experiences")
    p.add_argument("--class-order", help="natural, seed1993, podnet or random:SEED")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--model", help="backbone (see --list)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of every strategy (overrides the preset's lr and lr_sigmoid)")
    p.add_argument("--train-per-class", type=int, help="at most this many training images per class")
    p.add_argument("--test-per-class", type=int, help="at most this many test images per class")
    p.add_argument("--m2kd-store", choices=["full", "packnet", "sparse"], help="snapshot store of the m2kd strategies")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="forward passes of students and of M2KD's and ED's teachers; Avalanche's lwf and icarl run their previous model in fp32 (fp16: CUDA only)")
    p.add_argument("--teacher-inference", choices=["fused", "plain", "compiled"],
                   help="how M2KD's and ED's teachers run (default fused; compiled: torch.compile, faster after a first wait)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-data", action="store_true",
                   help="hold each experience's training set on the device and augment whole batches there")
    p.add_argument("--checkpoint", help="folder for per-run checkpoints, written after every experience")
    p.add_argument("--resume", action="store_true", help="continue an interrupted invocation (same --out and --checkpoint), or add runs to --out")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--stop-after", type=int, help="stop each run after it trained this many experiences (checkpoint kept; see --resume)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs (strategy, seed) trained at once, each in its own process with its own checkpoint and its own copy "
                        "of the data (default 1; on a 2-core machine 2 jobs of one thread beat 1 job of two)")
    p.add_argument("--threads", type=int,
                   help="torch threads in all, shared by the jobs (default: torch's, i.e. OMP_NUM_THREADS or every core)")
    p.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--loggers", help=f"Avalanche loggers for every run, comma-separated: {', '.join(LOGGERS)} "
                   "(written under OUT/logs/STRATEGY-seedN/; wandb logs to your W&B account)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--list", action="store_true", help="list presets, strategies, models and exit")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """The preset, with the command line's overrides applied."""
    from benchmarks.strategies import NEEDS_MEMORY, STRATEGIES, default_strategies

    from avalanche_m2kd import models

    config = load_preset(args.preset)
    config["preset"] = args.preset
    overrides = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "mem_size": args.mem_size,
        "epochs": args.epochs,
        "n_experiences": args.n_experiences,
        "class_order": args.class_order,
        "model": args.model,
        "batch_size": args.batch_size,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "m2kd_store": args.m2kd_store,
        "precision": args.precision,
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    config.setdefault("data_root", None)
    config.setdefault("m2kd_store", None)
    config.setdefault("precision", "fp32")
    config["download"] = bool(args.download)
    if args.device_data:  # absent unless asked: folders written before the option stay resumable
        config["device_data"] = True
    if args.teacher_inference:  # the same
        config["teacher_inference"] = args.teacher_inference
    if args.lr is not None:
        config["lr"] = args.lr
        config["lr_sigmoid"] = None
    if args.seeds:
        config["seeds"] = parse_seeds(args.seeds)
    config["strategies"] = names = parse_names(args.strategies, list(STRATEGIES), "strategy", default_strategies(config["mem_size"]))
    needs_memory = [n for n in names if n in NEEDS_MEMORY]
    if config["mem_size"] == 0 and needs_memory:
        raise UsageError(f"{', '.join(needs_memory)} need an exemplar memory: set --mem-size > 0 or leave them out of --strategies")
    if config["model"] is not None and config["model"] not in models.MODELS:
        raise UsageError(f"unknown model {config['model']!r}; choose one of {', '.join(models.MODELS)}")
    for key in ("epochs", "n_experiences", "batch_size"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config["mem_size"] < 0:
        raise UsageError(f"--mem-size must be >= 0, got {config['mem_size']}")
    args.logger_names = tuple(parse_names(args.loggers, list(LOGGERS), "logger")) if args.loggers else ()
    check_logger_packages(args.logger_names)
    for option, value in (("--jobs", args.jobs), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    if args.jobs > 1 and "LOCAL_RANK" in os.environ:
        raise UsageError("--jobs does not combine with torchrun (each process already trains a share of every batch); drop --jobs")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.stop_after is not None and not args.checkpoint:
        raise UsageError("--stop-after needs --checkpoint (otherwise the stopped run is lost)")
    check_own_folder(args.out, "--out")
    if args.checkpoint is not None:
        check_own_folder(args.checkpoint, "--checkpoint")
    if args.resume and args.overwrite:
        raise UsageError("--resume adds to the results in --out and --overwrite replaces them; pass one of the two")
    if args.resume and not args.checkpoint and not (Path(args.out) / "results.json").is_file():
        raise UsageError(f"--resume: {args.out}/results.json does not exist and no --checkpoint was given")
    config["device"] = resolve_device(args.device)
    if config["precision"] == "fp16" and not config["device"].startswith("cuda"):
        raise UsageError("--precision fp16 needs a CUDA device (it relies on a gradient scaler); use bf16 on a CPU")
    return config


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return name


def default_model(shape: tuple) -> str:
    side = shape[-1]
    table = {8: "digits_cnn", 28: "mnist_cnn", 32: "cifar_cnn"}
    if shape[-2] != side or side not in table:
        raise UsageError(f"no default model for {shape[-2]}x{side} images; pass --model (see --list)")
    return table[side]


def prepare_data(config: dict):
    """Load, subsample and order the data; build the Avalanche stream."""
    import numpy as np
    import torch
    from torchvision.transforms import v2

    from avalanche_m2kd import datasets, models

    data = datasets.load_dataset(config["dataset"], config.get("data_root"), config.get("download", False))
    data = datasets.check_arrays(datasets.subsample(data, config.get("train_per_class"), config.get("test_per_class")))
    order = datasets.class_order(config["class_order"], np.unique(data.y_train))
    if config["model"] is None:
        config["model"] = default_model(data.input_shape)
    probe = models.create(config["model"], in_channels=data.input_shape[0]).eval()
    try:
        with torch.no_grad():
            probe(torch.zeros(2, *data.input_shape))
    except RuntimeError:
        raise UsageError(
            f"model {config['model']} does not fit {config['dataset']} images of shape {data.input_shape}; "
            f"choose another --model (see --list)"
        ) from None
    on_device = bool(config.get("device_data"))
    train_t, eval_t = datasets.make_transforms(data, config.get("augment", False) and not on_device)
    benchmark = datasets.make_benchmark(data, config["n_experiences"], order, train_t, eval_t)
    augmentation = Augmentation(on_device=on_device, augment=bool(config.get("augment")))
    if on_device:  # pad with a black pixel, normalised, as torchvision's pad-then-normalise does
        augmentation.fill = eval_t(torch.zeros(data.input_shape[0], 1, 1, dtype=torch.from_numpy(data.x_train[:1]).dtype)).flatten()
    elif config.get("augment"):
        side = data.input_shape[-1]
        augmentation.buffer_transform = v2.Compose([v2.RandomCrop(side, padding=4), v2.RandomHorizontalFlip()])
    return data, benchmark, order, augmentation


@dataclass
class Augmentation:
    """How training images are augmented: per sample by the datasets'
    transforms (iCaRL's stored exemplars by ``buffer_transform``), or, with
    ``--device-data``, a batch at a time on the device (``fill``: the
    normalised black pixel the crop pads with)."""

    on_device: bool = False
    augment: bool = False
    buffer_transform: Optional[object] = None
    fill: Optional[object] = None

    def last_plugins(self) -> tuple:
        if not self.on_device:
            return ()
        from avalanche_m2kd.device_data import DeviceDataPlugin

        return (DeviceDataPlugin(augment=self.augment, padding=4, fill=self.fill),)


class ResultsNotWritten(Exception):
    """``--out`` refused the results; the message says where they were kept (:func:`keep_elsewhere`)."""

    def __init__(self, out: Path, err: OSError, runs: int, kept: Optional[Path]):
        where = f"the {runs} finished runs are in {kept}" if kept else "they could not be kept anywhere"
        super().__init__(f"cannot write the results to {out} ({type(err).__name__}: {err.strerror or err}); {where}")


def keep_elsewhere(document: dict, checkpoint: Optional[Path]) -> Optional[Path]:
    """The results document written beside the checkpoints, else in the
    temporary folder; the file's path, or None when neither takes it."""
    import tempfile

    for place in ([checkpoint] if checkpoint is not None else []) + [Path(tempfile.gettempdir())]:
        kept = place / f"results-{os.getpid()}.json"
        try:
            kept.write_text(json.dumps(document, indent=1))
            return kept
        except OSError:
            continue
    return None


class Stopped(Exception):
    """``--stop-after`` reached: the run's checkpoint holds its state."""


def run_one(name: str, seed: int, config: dict, data, benchmark, augmentation: "Augmentation", progress, ckpt=None,
            loggers: tuple = ()) -> dict:
    """Train ``name`` on the stream with ``seed``; evaluate after every experience.

    ``ckpt`` (a :class:`RunCheckpoint`) saves the strategy after every
    experience and, when resuming, restores it first. ``loggers``: Avalanche
    loggers that receive every metric the evaluator emits.
    """
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin
    from benchmarks.strategies import Setup, build_strategy, learning_rate, snapshot_bytes, snapshot_state

    from avalanche_m2kd.checkpoint import CheckpointError, check_can_save, load_checkpoint, save_checkpoint
    from avalanche_m2kd.distributed import DataParallelSync, is_distributed, state_hash
    from avalanche_m2kd.metrics import IncrementalMetrics, summarize

    RNGManager.set_random_seeds(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # with loggers, Avalanche's standard metrics too: its CSV and text loggers expect them
        standard = standard_metrics() if loggers else []
        evaluator = EvaluationPlugin(IncrementalMetrics(), *standard, loggers=list(loggers))
    first = (DataParallelSync(),) if is_distributed() else ()
    setup = Setup(
        config, data.n_classes, data.input_shape, config["device"], evaluator, augmentation.buffer_transform, first,
        augmentation.last_plugins(), seed,
    )
    strategy = build_strategy(name, setup)
    start, elapsed, per_experience, cpu_per_experience, versions = 0, 0.0, [], [], []
    experiences = list(benchmark.train_stream)
    meta = checkpoint_meta(name, seed, config)
    try:
        if ckpt is not None:
            check_can_save(strategy)
        if ckpt is not None and ckpt.resume:
            start = load_checkpoint(strategy, ckpt.path, experiences, expect=meta)
            if not 0 < start <= len(experiences):
                raise UsageError(f"checkpoint {ckpt.path} claims {start} trained experiences of {len(experiences)}; "
                                 "it was not written by this run: remove it to start the run over")
            recorded = ckpt.side_list("experience_s")
            # the side file is written right after the checkpoint: a kill between the two leaves it one behind
            if recorded and len(recorded) not in (start, start - 1):
                raise UsageError(f"checkpoint {ckpt.path} holds {start} experiences but its side file {len(recorded)}; "
                                 "one of them was replaced: remove both to start the run over")
            elapsed = ckpt.elapsed()

            def record(key: str) -> list:  # one entry per trained experience (None: not recorded)
                # padded even when the side file predates the record, so that later entries stay aligned
                values = ckpt.side_list(key)[:start]
                return values + [None] * (start - len(values))

            per_experience, cpu_per_experience, versions = record("experience_s"), record("experience_cpu_s"), record("code_versions")
            if versions and versions[-1] != code_version():
                trained_by = f"code {versions[-1]}" if versions[-1] else "code that was not recorded"
                print(f"{PROG}: warning: {name} seed {seed} was trained to experience {start} by {trained_by} "
                      f"and continues with {code_version()} (both recorded per experience)", file=sys.stderr)
            progress.update(start)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    metric = next(m for m in strategy.evaluator.metrics if isinstance(m, IncrementalMetrics))
    for index in range(start, len(experiences)):
        began, began_cpu = time.perf_counter(), time.process_time()
        strategy.train(experiences[index], num_workers=0)
        strategy.eval(benchmark.test_stream, num_workers=0)
        per_experience.append(time.perf_counter() - began)
        cpu_per_experience.append(time.process_time() - began_cpu)  # this process's CPU time: steady while neighbours run
        versions.append(code_version())
        elapsed += per_experience[-1]
        progress.update(1)
        if ckpt is not None:
            so_far = {"experience_s": per_experience, "experience_cpu_s": cpu_per_experience, "code_versions": versions,
                      "accuracy_matrix": metric.matrix().tolist(), "test_sizes": metric.sizes()}
            ckpt.save(strategy, elapsed, lambda strategy, path: save_checkpoint(strategy, path, meta), so_far)
            if ckpt.should_stop():
                raise Stopped()
        check_stop()  # a stop that a callback swallowed still ends the run here, the experience saved
    matrix, sizes = metric.matrix(), metric.sizes()
    run = {
        "strategy": name,
        "seed": seed,
        "lr": learning_rate(name, config),
        "accuracy_matrix": matrix.tolist(),
        "test_sizes": sizes,
        "metrics": summarize(matrix, sizes),
        "wall_time_s": elapsed,
        "experience_s": per_experience,
        "experience_cpu_s": cpu_per_experience,
        "code_versions": versions,  # per experience: a resumed run may span commits
        "snapshot_bytes": snapshot_bytes(strategy),
    }
    if is_distributed():
        from avalanche.distributed import DistributedHelper

        state = snapshot_state(strategy)
        run["world_size"] = DistributedHelper.world_size
        # every rank must hold the same model and the same snapshots
        run["rank_model_hashes"] = DistributedHelper.gather_all_objects(state_hash(strategy.model.state_dict()))
        if state is not None:
            run["rank_snapshot_hashes"] = DistributedHelper.gather_all_objects(state_hash(state))
    return run


def checkpoint_meta(name: str, seed: int, config: dict) -> dict:
    """What a run's checkpoint must match to be resumed: the strategy, the
    seed and every configuration key a result depends on."""
    return {
        "strategy": name,
        "seed": seed,
        "config": {k: v for k, v in config.items() if k not in CHECKPOINT_INDEPENDENT and k != "data_fingerprint"},
        "data_fingerprint": config.get("data_fingerprint"),
    }


class RunCheckpoint:
    """One run's checkpoint file and its side file (time spent so far); only
    the main process writes. ``--stop-after`` counts the experiences this run
    trained in this invocation."""

    def __init__(self, folder: Path, name: str, seed: int, resume: bool, stop_after: Optional[int]):
        self.path = folder / f"{name}-seed{seed}.ckpt"
        self.side = folder / f"{name}-seed{seed}.json"
        self.resume = resume and self.path.is_file()
        self.stop_after = stop_after
        self.trained = 0  # experiences this run trained in this invocation

    def _side(self) -> dict:
        """The side file, its shape checked (a hand-edited or foreign file is named in one line)."""
        if not self.side.is_file():
            return {}
        side = read_json(self.side, "checkpoint side file")
        lists = ("experience_s", "experience_cpu_s", "code_versions", "accuracy_matrix", "test_sizes")
        if (not isinstance(side, dict) or not isinstance(side.get("elapsed_s", 0.0), (int, float))
                or not all(isinstance(side.get(k, []), list) for k in lists)):
            raise UsageError(f"checkpoint side file {self.side} is not one the runner wrote; remove it (the run's time "
                             "and per-experience records restart) or restore it")
        return side

    def elapsed(self) -> float:
        return float(self._side().get("elapsed_s", 0.0))

    def side_list(self, key: str) -> list:
        """A per-experience record so far (``experience_s``, ``experience_cpu_s``,
        ``code_versions``); empty for side files that predate it."""
        return list(self._side().get(key, []))

    def save(self, strategy, elapsed: float, save_checkpoint, so_far: Optional[dict] = None) -> None:
        """The checkpoint, and beside it the time spent and what the run has
        measured so far (the accuracy matrix's rows, seconds per experience):
        a run stopped by ``--stop-after`` can be read without resuming it."""
        from avalanche.distributed import DistributedHelper

        from benchmarks.report import write_atomic

        if DistributedHelper.is_main_process:
            save_checkpoint(strategy, self.path)
            write_atomic(self.side, json.dumps({"elapsed_s": elapsed, **(so_far or {})}))
        DistributedHelper.barrier()
        self.trained += 1

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.trained >= self.stop_after


@functools.lru_cache(maxsize=1)
def code_version() -> Optional[str]:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), or None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(config: dict) -> dict:
    import avalanche
    import torch

    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "avalanche": avalanche.__version__,
        "platform": platform.platform(),
        "device": config["device"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stoppable(PROG, lambda: _main(argv))


def _main(argv: List[str]) -> int:
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
        if args.list:
            return print_list()
        return run(args, argv)
    except UsageError as err:
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DatasetError and invalid configurations
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except ResultsNotWritten as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


def print_list() -> int:
    from benchmarks.strategies import DESCRIPTIONS

    from avalanche_m2kd import models

    print("presets:")
    for name, path in presets().items():
        print(f"  {name:28s} {read_json(path, 'preset')['description']}")
    print("strategies:")
    for name, text in DESCRIPTIONS.items():
        print(f"  {name:28s} {text}")
    print("models: " + ", ".join(models.MODELS))
    return 0


CHECKPOINT_INDEPENDENT = ("seeds", "strategies", "device", "data_root", "download", "preset", "description")
"""Configuration keys that may differ between a checkpoint and its resumption."""


def data_fingerprint(data) -> str:
    """The arrays the runs train and test on, hashed (SHA-256 of their shapes,
    dtypes and bytes, after subsampling): the same file at the same path with
    other content gives another fingerprint."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return f"sha256:{digest.hexdigest()[:32]},{sum(a.nbytes for a in (data.x_train, data.x_test))}B"


def check_same_config(saved: dict, config: dict, where: str, independent=CHECKPOINT_INDEPENDENT) -> None:
    """Refuse ``saved`` if it differs from ``config`` in a key outside
    ``independent``. A ``saved`` configuration that predates the data
    fingerprint is accepted with a warning (it cannot be checked)."""
    if "data_fingerprint" in config and "data_fingerprint" not in saved:
        print(f"{PROG}: warning: {where} predates data fingerprints; make sure it ran on the same data", file=sys.stderr)
        config = {k: v for k, v in config.items() if k != "data_fingerprint"}
    keys = sorted((set(saved) | set(config)) - set(independent))
    diff = [k for k in keys if saved.get(k) != config.get(k)]
    if diff:
        k = diff[0]
        raise UsageError(
            f"{where} was written with another configuration ({k}: {saved.get(k)!r} there, {config.get(k)!r} now); "
            "use the same options or another folder"
        )


def init_distributed(config: dict) -> bool:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on GPUs)."""
    if "LOCAL_RANK" not in os.environ:
        return False
    from avalanche.distributed import DistributedHelper

    use_cuda = config["device"].startswith("cuda")
    DistributedHelper.init_distributed(random_seed=config["seeds"][0], use_cuda=use_cuda)
    if use_cuda:
        config["device"] = str(DistributedHelper.make_device())
    world = DistributedHelper.world_size
    if config["batch_size"] % world:
        raise UsageError(f"--batch-size {config['batch_size']} is not divisible by the {world} processes")
    config["world_size"] = world
    config["batch_size_per_process"] = config["batch_size"] // world
    return True


def read_json(path: Path, what: str) -> dict:
    """A JSON file the runner reads back; a broken one is named in a one-line error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{what} {path} cannot be read ({type(err).__name__}: {err}); fix or remove it") from None


def lock_folder(folder: Path, option: str):
    """An exclusive lock on ``folder`` (its ``.lock`` file, held until this
    process exits), after checking that the folder takes a new file (a real
    temporary file is created and removed: an old lock file opened for
    appending proves nothing). Returns the open lock file."""
    import fcntl
    import tempfile

    from avalanche_m2kd.checkpoint import TMP_MARK, TMP_SUFFIX

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".write-check{TMP_MARK}", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
        lock = open(folder / ".lock", "a+")
    except OSError as err:
        raise UsageError(f"{option} {folder} is not writable ({err.strerror or err}); choose another folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UsageError(f"another process is writing to {folder}; wait for it or use another {option}") from None
    return lock


def check_own_folder(folder: str, option: str) -> Path:
    """``folder`` as a Path, refusing an empty name and the current, home or
    root folder: the runner writes and cleans there, so it must be a folder of its own."""
    if not str(folder).strip():
        raise UsageError(f"{option} is empty; name a folder for the outputs, e.g. {option} results/run1")
    path = Path(folder)
    resolved = path.resolve()
    if resolved in {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}:
        raise UsageError(f"{option} {folder} is the current, home or root folder; name a folder of its own, e.g. {option} results/run1")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {folder} is a file, not a folder; name a folder")
    return path


def claim_output_folder(out: Path, resume: bool, overwrite: bool):
    """Before any data is loaded or model trained: the folder is writable and
    locked (:func:`lock_folder`), it holds no results unless ``--resume`` (add
    to them) or ``--overwrite`` (replace them, once new ones are written) says
    what to do, and our temporary files left by a killed runner are removed.
    Returns the open lock file."""
    from avalanche_m2kd.checkpoint import remove_stale_temporaries

    lock = lock_folder(out, "--out")
    if (out / "results.json").is_file() and not (resume or overwrite):
        lock.close()
        raise UsageError(f"{out} already holds results; pass --resume to add to them, --overwrite to replace them, or use another --out")
    remove_stale_temporaries(out)
    return lock


def run(args: argparse.Namespace, argv: List[str]) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    config = resolve_config(args)
    distributed = init_distributed(config)
    from avalanche.distributed import DistributedHelper
    from tqdm import tqdm

    from benchmarks import report

    main_process = DistributedHelper.is_main_process
    quiet = args.quiet or not main_process
    lock = claim_output_folder(Path(args.out), args.resume, args.overwrite) if main_process else None  # noqa: F841
    folder = Path(args.checkpoint) if args.checkpoint else None
    if folder is not None and main_process and folder.resolve() != Path(args.out).resolve():
        checkpoint_lock = lock_folder(folder, "--checkpoint")  # noqa: F841 (a second runner must not clean it)
    data, benchmark, order, augmentation = prepare_data(config)
    config["data_fingerprint"] = data_fingerprint(data)  # a resume on other data at the same path is refused
    if distributed:  # each process trains on its share of the batch
        config = dict(config, batch_size=config["batch_size_per_process"])
    out = Path(args.out)
    document = {
        "format": "avalanche_m2kd.compare/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [PROG, *argv],
        "config": config,
        "class_order": {"name": config["class_order"], "order": order},
        "environment": environment(config),
        "runs": [],
    }
    previous = out / "results.json"
    if args.resume and previous.is_file():
        saved = read_json(previous, "results file")
        if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict) and isinstance(saved.get("runs"), list)):
            raise UsageError(f"{previous} is not a runner results file (no config or list of runs); move it away or use another --out")
        check_same_config(saved["config"], config, str(previous))
        document["runs"] = saved["runs"]
    if folder is not None:
        stamp = folder / "config.json"
        if stamp.is_file():
            saved = read_json(stamp, "checkpoint configuration")
            if not isinstance(saved, dict):
                raise UsageError(f"{stamp} is not a checkpoint configuration (a JSON object); remove the folder's runs or use another --checkpoint")
            check_same_config(saved, config, f"checkpoint folder {folder}")
            from avalanche_m2kd.checkpoint import remove_stale_temporaries

            remove_stale_temporaries(folder)  # left by a killed runner (this one holds the folder's lock)
            if not args.resume:
                raise UsageError(f"checkpoint folder {folder} already holds a run; pass --resume to continue it or use another folder")
        elif main_process:
            folder.mkdir(parents=True, exist_ok=True)
            report.write_atomic(stamp, json.dumps(config, indent=1))
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(f"preset {config['preset']}: {config.get('description', '')}")
        print("config: " + json.dumps({k: v for k, v in config.items() if k != "description"}))
    title = f"{config['dataset']}, {config['n_experiences']} experiences, preset {config['preset']}"
    notes = [
        f"model {config['model']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"{config['optimizer']} lr {config['lr']}" + (f" (sigmoid-loss methods {config['lr_sigmoid']})" if config.get("lr_sigmoid") else "")
        + f", {config['precision']}" + (f", teachers {config['teacher_inference']}" if config.get("teacher_inference") else ""),
        f"memory {config['mem_size']} exemplars for every strategy that keeps one; class order {config['class_order']}; "
        f"seeds {', '.join(map(str, config['seeds']))}",
        f"command: `{' '.join(document['command'])}`",
    ]

    def write(plots: bool) -> None:
        if not main_process or (args.overwrite and not document["runs"]):  # --overwrite: old results stay until new ones exist
            return
        try:
            report.write_all(out, document, title, notes, plots=plots and not args.no_plots)
        except OSError as err:  # a full disk, a folder made read-only: keep what was trained
            raise ResultsNotWritten(out, err, len(document["runs"]), keep_elsewhere(document, folder)) from None

    done = {(r["strategy"], r["seed"]) for r in document["runs"]}
    todo = [(seed, name) for seed in config["seeds"] for name in config["strategies"] if (name, seed) not in done]
    rank = {(name, seed): i for i, (seed, name) in enumerate((s, n) for s in config["seeds"] for n in config["strategies"])}

    def finished(run: dict) -> None:  # kept in the invocation's order, whichever job ends first
        document["runs"].append(run)
        document["runs"].sort(key=lambda r: rank.get((r["strategy"], r["seed"]), -1))
        write(plots=False)

    progress = tqdm(total=len(todo) * config["n_experiences"], disable=quiet, unit="exp", dynamic_ncols=True)
    tasks = RunTasks(config, folder, args.resume, args.stop_after, args.logger_names, out / "logs")
    try:
        if args.jobs > 1 and len(todo) > 1:
            del data, benchmark  # each worker loads its own copy
            outcome = run_in_workers(todo, tasks, min(args.jobs, len(todo)), args.threads, progress, finished)
        else:
            torch_threads(args.threads)
            outcome = run_here(todo, tasks, (data, benchmark, augmentation), progress, finished)
    except KeyboardInterrupt as stop:
        progress.close()
        write(plots=True)
        how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        resume = "; continue with the same command plus --resume" if folder else ""
        print(f"{PROG}: {how}; {len(document['runs'])} finished runs written to {out}{resume}", file=sys.stderr)
        return exit_status(stop)
    progress.close()
    write(plots=True)
    if outcome.usage_error:
        raise UsageError(outcome.usage_error)
    if outcome.failed:
        if args.debug and outcome.exception is not None:
            raise outcome.exception
        print(f"{PROG}: error: {outcome.failed} ({len(document['runs'])} finished runs kept in {out})", file=sys.stderr)
        return 1
    if outcome.stopped:
        if main_process:
            print(f"stopped {outcome.stopped} run(s) after {args.stop_after} experience(s) each, as asked; "
                  "continue with the same command plus --resume")
        return 0
    if main_process:
        print((out / "summary.md").read_text())
        print(f"results in {out}/ (results.json, results.csv, summary.md" + ("" if args.no_plots else ", *.png") + ")")
    return 0


LOGGERS = {"text": None, "csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
"""Avalanche loggers the runner attaches, and the package (an extra of this project) each needs."""


def check_logger_packages(names) -> None:
    """Before any data is loaded: the package each named logger needs is installed."""
    import importlib.util

    for name in names:
        package = LOGGERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise UsageError(f"--loggers {name} needs the package {package}: pip install 'avalanche-m2kd[{name}]'")


def make_loggers(names, folder: Path, run_name: str) -> tuple:
    """Avalanche's own loggers for one run, writing into ``folder``
    (``text``: ``log.txt``; ``csv``: Avalanche's CSV files; ``tensorboard``:
    an event file; ``wandb``: a W&B run named ``run_name``)."""
    from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger, WandBLogger

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        if name == "text":
            made.append(TextLogger(open(folder / "log.txt", "a")))
        elif name == "csv":
            made.append(CSVLogger(log_folder=str(folder)))
        elif name == "tensorboard":
            made.append(TensorboardLogger(tb_log_dir=str(folder)))
        else:
            made.append(WandBLogger(project_name="avalanche-m2kd", run_name=run_name, dir=str(folder)))
    return tuple(made)


def standard_metrics() -> list:
    """Avalanche's accuracy, loss and forgetting per epoch, experience and stream."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics

    return [*accuracy_metrics(epoch=True, experience=True, stream=True), *loss_metrics(epoch=True, experience=True, stream=True),
            *forgetting_metrics(experience=True, stream=True)]


def close_loggers(loggers) -> None:
    """Flush and close what Avalanche's loggers hold open (they have no common close)."""
    for logger in loggers:
        if hasattr(logger, "writer"):  # TensorBoard's SummaryWriter
            logger.writer.close()
        elif hasattr(logger, "close"):  # CSV files
            logger.close()
        elif getattr(logger, "file", None) not in (None, sys.stdout, sys.stderr):  # the text log
            logger.file.close()


def torch_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@dataclass
class RunTasks:
    """What every run of one invocation shares besides its data: the
    configuration and the checkpoint options (sent to worker processes)."""

    config: dict
    folder: Optional[Path]
    resume: bool
    stop_after: Optional[int]
    loggers: tuple = ()  # names in LOGGERS
    log_root: Optional[Path] = None  # each run logs to log_root/STRATEGY-seedN

    def run(self, name: str, seed: int, loaded, progress) -> dict:
        ckpt = RunCheckpoint(self.folder, name, seed, self.resume, self.stop_after) if self.folder else None
        loggers = make_loggers(self.loggers, self.log_root / f"{name}-seed{seed}", f"{self.config['preset']}-{name}-seed{seed}") if self.loggers else ()
        try:
            return run_one(name, seed, self.config, *loaded, progress, ckpt, loggers)
        finally:
            close_loggers(loggers)


@dataclass
class Outcome:
    """How the runs of one invocation ended (besides the finished ones)."""

    stopped: int = 0  # runs stopped by --stop-after, resumable
    failed: Optional[str] = None  # the first run that raised, and why
    usage_error: Optional[str] = None  # a run refused its checkpoint or configuration
    exception: Optional[BaseException] = None  # for --debug (in this process only)


def run_here(todo, tasks: RunTasks, loaded, progress, finished) -> Outcome:
    """The runs one after another in this process."""
    outcome = Outcome()
    for seed, name in todo:
        check_stop()
        progress.set_description(f"{name} seed {seed}")
        try:
            finished(tasks.run(name, seed, loaded, progress))
        except Stopped:
            outcome.stopped += 1
        except UsageError as err:
            outcome.usage_error = str(err)
            return outcome
        except ResultsNotWritten:
            raise
        except Exception as err:  # noqa: BLE001 - reported in one line, the finished runs kept
            outcome.failed, outcome.exception = f"{name} seed {seed} failed: {type(err).__name__}: {err}", err
            return outcome
    return outcome


# -- worker processes (--jobs) ------------------------------------------------------------
_WORKER: dict = {}


class _QueueProgress:
    """A worker's progress bar: experiences done, sent to the main process."""

    def __init__(self, queue):
        self.queue = queue

    def update(self, n: int = 1) -> None:
        if n:
            self.queue.put(n)

    def set_description(self, text: str) -> None:
        pass


def _worker_init(tasks: RunTasks, threads: int, queue) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops the workers
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch_threads(threads)
    _WORKER.update(tasks=tasks, queue=queue)


def _worker_run(name: str, seed: int):
    """One run in a worker: ("run", result), ("stopped",), ("usage", message) or ("error", message)."""
    if "loaded" not in _WORKER:  # once per worker: the data and the stream
        data, benchmark, _, augmentation = prepare_data(_WORKER["tasks"].config)
        _WORKER["loaded"] = (data, benchmark, augmentation)
    try:
        return ("run", _WORKER["tasks"].run(name, seed, _WORKER["loaded"], _QueueProgress(_WORKER["queue"])))
    except Stopped:
        return ("stopped",)
    except UsageError as err:
        return ("usage", str(err))
    except Exception as err:  # noqa: BLE001 - sent to the main process as one line
        return ("error", f"{name} seed {seed} failed: {type(err).__name__}: {err}")


def run_in_workers(todo, tasks: RunTasks, jobs: int, threads: Optional[int], progress, finished) -> Outcome:
    """The runs spread over ``jobs`` worker processes, each with
    ``threads // jobs`` torch threads (at least one) and its own copy of the
    data; each run keeps its own checkpoint, so a resumed invocation may use
    another number of jobs. Results arrive in the main process, which alone
    writes ``--out``."""
    import multiprocessing
    import queue as queues

    import torch

    per_job = max(1, (threads or torch.get_num_threads()) // jobs)
    context = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
    messages = context.Queue()
    outcome = Outcome()
    pool = context.Pool(jobs, initializer=_worker_init, initargs=(tasks, per_job, messages))
    try:
        pending = [pool.apply_async(_worker_run, (name, seed)) for seed, name in todo]
        progress.set_description(f"{len(todo)} runs in {jobs} jobs")
        while pending:
            try:
                progress.update(messages.get(timeout=0.5))
            except queues.Empty:
                pass
            for result in [r for r in pending if r.ready()]:
                pending.remove(result)
                kind, *value = result.get()
                if kind == "run":
                    finished(value[0])
                elif kind == "stopped":
                    outcome.stopped += 1
                elif outcome.usage_error is None and outcome.failed is None:  # the first problem is reported
                    setattr(outcome, "usage_error" if kind == "usage" else "failed", value[0])
                    pool.terminate()  # the other runs keep their checkpoints
                    return outcome
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return outcome


if __name__ == "__main__":
    sys.exit(main())
