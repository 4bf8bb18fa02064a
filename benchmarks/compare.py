"""Side-by-side comparison of M2KD, ED and the baselines on one class-incremental
stream, with the same model, epochs, optimizer, memory and seeds.

    python -m benchmarks.compare                       # the embedded default (digits preset)
    python -m benchmarks.compare --preset fmnist-quick --seeds 0,1,2
    python -m benchmarks.compare --list                # presets and strategies

Outputs in ``--out``: results.json, results.csv, summary.md and plots
(accuracy_curve.png, accuracy_matrices.png, old_new.png).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

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


def load_preset(name: str) -> dict:
    table = presets()
    if name not in table:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    return json.loads(table[name].read_text())


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
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"named protocol in benchmarks/presets (default {DEFAULT_PRESET})")
    p.add_argument("--dataset", help="digits, fmnist, cifar10, cifar100, npz:PATH or imagefolder:ROOT")
    p.add_argument("--data-root", help="folder holding the data set files")
    p.add_argument("--download", action="store_true", help="allow torchvision to download the data set")
    p.add_argument("--strategies", help="comma-separated strategies (default: all; see --list)")
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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--list", action="store_true", help="list presets, strategies, models and exit")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """The preset, with the command line's overrides applied."""
    from benchmarks.strategies import STRATEGIES

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
    }
    if args.dataset and args.dataset != config["dataset"] and not args.model:
        config["model"] = None  # chosen from the images' size once loaded
    config.update({k: v for k, v in overrides.items() if v is not None})
    config.setdefault("data_root", None)
    config["download"] = bool(args.download)
    if args.lr is not None:
        config["lr"] = args.lr
        config["lr_sigmoid"] = None
    if args.seeds:
        config["seeds"] = parse_seeds(args.seeds)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else list(STRATEGIES)
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise UsageError(f"unknown strategy {', '.join(unknown) or '(none given)'}; choose from {', '.join(STRATEGIES)}")
    config["strategies"] = names
    if config["model"] is not None and config["model"] not in models.MODELS:
        raise UsageError(f"unknown model {config['model']!r}; choose one of {', '.join(models.MODELS)}")
    for key in ("epochs", "n_experiences", "batch_size"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config["mem_size"] < 0:
        raise UsageError(f"--mem-size must be >= 0, got {config['mem_size']}")
    config["device"] = resolve_device(args.device)
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
    data = datasets.subsample(data, config.get("train_per_class"), config.get("test_per_class"))
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
    train_t, eval_t = datasets.make_transforms(data, config.get("augment", False))
    benchmark = datasets.make_benchmark(data, config["n_experiences"], order, train_t, eval_t)
    buffer_t = None
    if config.get("augment"):
        side = data.input_shape[-1]
        buffer_t = v2.Compose([v2.RandomCrop(side, padding=4), v2.RandomHorizontalFlip()])
    return data, benchmark, order, buffer_t


def run_one(name: str, seed: int, config: dict, data, benchmark, buffer_transform, progress) -> dict:
    """Train ``name`` on the stream with ``seed``; evaluate after every experience."""
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin
    from benchmarks.strategies import Setup, build_strategy, learning_rate, snapshot_bytes

    from avalanche_m2kd.metrics import IncrementalMetrics, summarize

    RNGManager.set_random_seeds(seed)
    metric = IncrementalMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(metric, loggers=[])
    setup = Setup(config, data.n_classes, data.input_shape, config["device"], evaluator, buffer_transform)
    strategy = build_strategy(name, setup)
    start = time.perf_counter()
    for experience in benchmark.train_stream:
        strategy.train(experience, num_workers=0)
        strategy.eval(benchmark.test_stream, num_workers=0)
        progress.update(1)
    wall = time.perf_counter() - start
    matrix, sizes = metric.matrix(), metric.sizes()
    return {
        "strategy": name,
        "seed": seed,
        "lr": learning_rate(name, config),
        "accuracy_matrix": matrix.tolist(),
        "test_sizes": sizes,
        "metrics": summarize(matrix, sizes),
        "wall_time_s": wall,
        "snapshot_bytes": snapshot_bytes(strategy),
    }


def environment(config: dict) -> dict:
    import avalanche
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "avalanche": avalanche.__version__,
        "platform": platform.platform(),
        "device": config["device"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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


def print_list() -> int:
    from benchmarks.strategies import DESCRIPTIONS

    from avalanche_m2kd import models

    print("presets:")
    for name, path in presets().items():
        print(f"  {name:28s} {json.loads(path.read_text())['description']}")
    print("strategies:")
    for name, text in DESCRIPTIONS.items():
        print(f"  {name:28s} {text}")
    print("models: " + ", ".join(models.MODELS))
    return 0


def run(args: argparse.Namespace, argv: List[str]) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    config = resolve_config(args)
    from tqdm import tqdm

    from benchmarks import report

    data, benchmark, order, buffer_t = prepare_data(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    description = config.get("description", "")
    print(f"preset {config['preset']}: {description}")
    shown = {k: v for k, v in config.items() if k != "description"}
    print("config: " + json.dumps(shown))
    document = {
        "format": "avalanche_m2kd.compare/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [PROG, *argv],
        "config": config,
        "class_order": {"name": config["class_order"], "order": order},
        "environment": environment(config),
        "runs": [],
    }
    title = f"{config['dataset']}, {config['n_experiences']} experiences, preset {config['preset']}"
    notes = [
        f"model {config['model']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"{config['optimizer']} lr {config['lr']}" + (f" (sigmoid-loss methods {config['lr_sigmoid']})" if config.get("lr_sigmoid") else ""),
        f"memory {config['mem_size']} exemplars for every strategy that keeps one; class order {config['class_order']}; "
        f"seeds {', '.join(map(str, config['seeds']))}",
        f"command: `{' '.join(document['command'])}`",
    ]
    total = len(config["seeds"]) * len(config["strategies"]) * config["n_experiences"]
    progress = tqdm(total=total, disable=args.quiet, unit="exp", dynamic_ncols=True)
    try:
        for seed in config["seeds"]:
            for name in config["strategies"]:
                progress.set_description(f"{name} seed {seed}")
                try:
                    document["runs"].append(run_one(name, seed, config, data, benchmark, buffer_t, progress))
                except (KeyboardInterrupt, UsageError):
                    raise
                except Exception as err:
                    if args.debug:
                        raise
                    report.write_all(out, document, title, notes, plots=not args.no_plots)
                    print(f"{PROG}: error: {name} seed {seed} failed: {type(err).__name__}: {err} "
                          f"({len(document['runs'])} finished runs kept in {out})", file=sys.stderr)
                    return 1
                report.write_all(out, document, title, notes, plots=False)
    except KeyboardInterrupt:
        progress.close()
        report.write_all(out, document, title, notes, plots=not args.no_plots)
        print(f"{PROG}: interrupted; {len(document['runs'])} finished runs written to {out}", file=sys.stderr)
        return 130
    progress.close()
    report.write_all(out, document, title, notes, plots=not args.no_plots)
    print((out / "summary.md").read_text())
    print(f"results in {out}/ (results.json, results.csv, summary.md" + ("" if args.no_plots else ", *.png") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
