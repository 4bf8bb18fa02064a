"""Education Distillation judged by its own claim: the final student's top-1
against the same student trained by cross-entropy, by single-teacher and by
multi-teacher distillation (issue 16).

    python -m benchmarks.studies.ed_kd --preset ed-kd-cifar100-cpu --dataset npz:data/cifar100.npz --out runs/ed-kd

Methods (one student architecture, data, augmentation, optimizer and budget):

* ``ce``: the full student, cross-entropy only;
* ``kd``: the full student, Hinton distillation from one teacher trained on
  every class (ED's alpha and temperature);
* ``mtkd``: the full student, each sample distilled from the stage teacher of
  its class on that stage's logit slice (ED without growth or stages);
* ``ed``: Education Distillation: the student grows stage by stage, every
  finished stage revisited (mixed with the new one), the same stage teachers;
* ``ed-seq``: ED with each epoch walking the stages in order (the authors' code);
* ``ed-mse``: ED with logit matching as its per-sample distillation loss;
* ``ed-full``: ED's stages, stage teachers and revisits with the student fully
  grown from the first stage (ablation: what growth and the teaching-reference
  heads do);
* ``ed-1t``: ED with the one all-class teacher, its logits sliced to each
  stage's classes, in place of the stage teachers (ablation: what per-stage
  teachers do).

Equal terms (each checked by a test on every method's resolved plan, see
:func:`student_plan` and :func:`teacher_epochs`):

* **Sample visits.** The full-student methods train ``epochs`` epochs over all
  data; ED trains each of its ``S`` stages ``2 * epochs / (S + 1)`` epochs over
  the data seen so far, which visits as many samples.
* **Annealing.** Every student follows one step schedule over all its epochs
  (``milestones``: fractions of them). ED's schedule runs across its stages
  without restarting, as in ED's code, where the stages switch at the rate
  drops of one 240-epoch schedule; so every method ends on the same annealed
  rate (restarting per stage left ED's one-epoch stages never annealed).
* **Teacher budgets.** Every teacher gets the same number of optimizer steps:
  a stage specialist, on a third of the data, trains about three times the
  all-class teacher's ``teacher_epochs``.

Teachers are trained once per teacher folder (``--teachers``), with their
configuration stored beside their weights and checked when they are loaded,
and shared by every method and seed. A teacher's training is saved after every
epoch (``teacher-ROLE.progress.pt``), so a stopped run continues it where it
stopped, to the same weights; finished student runs are kept in results.json,
so rerunning the same command continues a stopped benchmark. Each teacher's accuracy on each stage's
classes is reported, the all-class teacher's (restricted to the stage's
classes, as ``ed-1t`` uses it) included.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below: a stop during them ends in one line
    from benchmarks.stopping import exit_during_start_up

    exit_during_start_up("python -m benchmarks.studies.ed_kd")

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from benchmarks.compare import OneLineParser, UsageError, parse_names, parse_seeds, read_json
from benchmarks.report import ED_CLAIMS
from benchmarks.stopping import check_stop, run_stoppable

PROG = "python -m benchmarks.studies.ed_kd"
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets" / "ed_kd"
METHODS = ("ce", "kd", "mtkd", "ed", "ed-seq", "ed-mse", "ed-full", "ed-1t")
DESCRIPTIONS = {
    "ce": "full student, cross-entropy only",
    "kd": "full student, single-teacher KD (teacher on all classes)",
    "mtkd": "full student, multi-teacher KD (each sample from its stage's teacher)",
    "ed": "Education Distillation (growth, TR heads, stage teachers, full revisit)",
    "ed-seq": "ED with each epoch walking the stages in order (the authors' code) instead of mixing them",
    "ed-mse": "ED with logit matching as its distillation loss",
    "ed-full": "ED without growth: the full student (last TR head) from the first stage",
    "ed-1t": "ED with the all-class teacher, sliced to each stage's classes, as every stage's teacher",
}
CLAIMS = ED_CLAIMS  # the report's, so that docs tables and this summary pair the same methods
TEACHER_KEYS = (
    "dataset", "stages", "class_order", "teacher", "teacher_epochs", "batch_size", "lr", "momentum",
    "weight_decay", "milestones", "gamma", "augment", "train_per_class", "test_per_class", "precision", "teacher_seed",
    "teacher_budget",
)
"""Configuration a trained teacher depends on (checked when it is reused)."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ed-kd-digits", help="named protocol in benchmarks/presets/ed_kd")
    p.add_argument("--dataset", help="digits, cifar100, npz:PATH, ... (as the comparison runner)")
    p.add_argument("--data-root", help="folder holding the data set files")
    p.add_argument("--methods", help=f"comma-separated, default all: {', '.join(METHODS)}")
    p.add_argument("--seeds", help="comma-separated student seeds")
    p.add_argument("--epochs", type=int, help="full-student epochs (ED's stage epochs follow)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--teachers", help="folder of trained teachers (default OUT/teachers)")
    p.add_argument("--out", default="results/ed-kd")
    p.add_argument("--quiet", action="store_true")
    return p


def load_config(args: argparse.Namespace) -> dict:
    from benchmarks.compare import resolve_device

    path = PRESET_DIR / f"{args.preset}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise UsageError(f"unknown preset {args.preset!r}; choose from {known}")
    config = read_json(path, "preset")
    config["preset"] = args.preset
    for key in ("dataset", "data_root", "epochs", "teacher_epochs", "train_per_class", "test_per_class", "precision"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.seeds:
        config["seeds"] = parse_seeds(args.seeds)
    config["methods"] = parse_names(args.methods, list(METHODS), "method")
    config["device"] = resolve_device(args.device)
    if config["epochs"] < 1 or config["teacher_epochs"] < 1:
        raise UsageError("--epochs and --teacher-epochs must be >= 1")
    return config


# -- data --------------------------------------------------------------------------------------------
def load_streams(config: dict):
    """The data, ED's stage stream (``stages`` experiences, natural order) and
    the same data as one experience, both with the preset's augmentation."""
    from avalanche_m2kd import datasets

    data = datasets.load_dataset(config["dataset"], config.get("data_root"))
    data = datasets.check_arrays(datasets.subsample(data, config.get("train_per_class"), config.get("test_per_class")))
    order = datasets.class_order(config["class_order"], np.unique(data.y_train))
    train_t, eval_t = datasets.make_transforms(data, config["augment"])
    stages = datasets.make_benchmark(data, config["stages"], order, train_t, eval_t)
    whole = datasets.make_benchmark(data, 1, order, train_t, eval_t)
    return data, stages, whole


# -- teachers -----------------------------------------------------------------------------------------
def _scheduler(milestones: List[float], gamma: float):
    """MultiStepLR at fractions ``milestones`` of however many epochs a run has."""

    def make(optimizer, epochs: int):
        steps = sorted({max(1, round(f * epochs)) for f in milestones if round(f * epochs) < epochs})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=gamma)

    return make


def _sgd(config: dict):
    return lambda params: torch.optim.SGD(
        params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"]
    )


TEACHER_BUDGET = "equal-steps"
"""How teachers' epochs are set: every teacher gets the same optimizer steps
(teacher files of the earlier equal-epochs rule are refused, and retrained)."""


def teacher_config(config: dict, role: str) -> dict:
    return {**{k: config.get(k) for k in TEACHER_KEYS}, "teacher_budget": TEACHER_BUDGET, "role": role}


def teacher_epochs(config: dict, n_role: int, n_all: int) -> int:
    """Epochs for a teacher trained on ``n_role`` of the ``n_all`` training
    images: as many optimizer steps as the all-class teacher's
    ``teacher_epochs`` epochs (to the nearest epoch)."""
    steps_per_epoch = lambda n: math.ceil(n / config["batch_size"])  # noqa: E731
    return max(1, round(config["teacher_epochs"] * steps_per_epoch(n_all) / steps_per_epoch(n_role)))


def get_teachers(config: dict, data, stages, whole, folder: Path, log) -> Dict[str, object]:
    """``{"all": GroupTeacher, "stage0": ..., ...}``: loaded from ``folder``
    when a teacher of the same configuration is there, else trained and saved."""
    from avalanche_m2kd import models
    from avalanche_m2kd.checkpoint import atomic_write
    from avalanche_m2kd.teachers import GroupTeacher, train_group_teacher

    specs = {"all": (sorted(int(c) for c in np.unique(data.y_train)), whole.train_stream[0].dataset)}
    for k, exp in enumerate(stages.train_stream):
        specs[f"stage{k}"] = (sorted(int(c) for c in exp.classes_in_this_experience), exp.dataset)
    methods = config["methods"]
    roles = ["all"] * any(m in ("kd", "ed-1t") for m in methods) + [
        r for r in specs if r != "all" and any(m == "mtkd" or (m.startswith("ed") and m != "ed-1t") for m in methods)
    ]
    device = config["device"]
    out = {}
    for role in roles:
        classes, dataset = specs[role]
        wanted = teacher_config(config, role)
        path, progress_path = folder / f"teacher-{role}.pt", folder / f"teacher-{role}.progress.pt"
        # a teacher's seed depends on its role only: the same teacher whatever methods a run asks for
        torch.manual_seed(config["teacher_seed"] + list(specs).index(role))
        module = models.create(config["teacher"], num_classes=len(classes), in_channels=data.input_shape[0]).to(device)
        if path.is_file():
            saved = _read_safely(path, device, "teacher file", "delete it to retrain")
            if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict) and isinstance(saved.get("state"), dict)):
                raise UsageError(f"teacher file {path} is not one benchmarks.studies.ed_kd wrote (no config or state); delete it to retrain")
            if saved.get("config") != wanted or saved.get("classes") != classes:
                diff = next((k for k in wanted if saved.get("config", {}).get(k) != wanted[k]), "classes")
                raise UsageError(
                    f"teacher file {path} was trained with another configuration ({diff}: "
                    f"{saved.get('config', {}).get(diff)!r} there, {wanted.get(diff)!r} now); use another --teachers folder"
                )
            try:
                module.load_state_dict(saved["state"])
            except RuntimeError as err:
                raise UsageError(f"teacher file {path} does not fit the {config['teacher']} teacher "
                                 f"({str(err).splitlines()[0][:120]}); delete it to retrain") from None
            out[role] = GroupTeacher(module, classes, range(len(classes)))
            progress_path.unlink(missing_ok=True)  # left by a stop just after the teacher was saved
            log(f"teacher {role}: loaded from {path}")
            continue
        began = time.perf_counter()
        progress = _teacher_progress(progress_path, wanted, classes, device)
        if progress is not None:
            began -= progress["train_s"]
            log(f"teacher {role}: continues after epoch {len(progress['lrs'])} from {progress_path}")

        def save_progress(state: dict) -> None:  # a stopped run continues from its last finished epoch
            saved = {**state, "config": wanted, "classes": classes, "train_s": time.perf_counter() - began}
            atomic_write(progress_path, lambda tmp: torch.save(saved, tmp))

        out[role] = train_group_teacher(
            module, dataset, classes, teacher_epochs(config, len(dataset), len(specs["all"][1])), _sgd(config),
            _scheduler(config["milestones"], config["gamma"]), config["batch_size"], device, precision=config["precision"],
            resume=progress, on_epoch_end=save_progress,
        )
        state = {"config": wanted, "classes": classes, "state": module.state_dict(),
                 "train_s": time.perf_counter() - began}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        progress_path.unlink(missing_ok=True)
        log(f"teacher {role}: trained in {state['train_s']:.0f} s, saved to {path}")
        check_stop()
    return out


def _read_safely(path: Path, device, what: str, fix: str):
    """``torch.load`` with ``weights_only``: a file that holds anything but
    plain data and tensors is one error line naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(f"{what} {path} cannot be read safely ({type(err).__name__}); {fix}") from None


def _teacher_progress(path: Path, wanted: dict, classes: List[int], device) -> Optional[dict]:
    """A teacher's training saved after its last finished epoch, if ``path``
    holds one of the same configuration (another configuration is refused)."""
    if not path.is_file():
        return None
    saved = _read_safely(path, device, "teacher progress file", "delete it to restart the teacher")
    if not isinstance(saved, dict) or saved.get("config") != wanted or saved.get("classes") != classes:
        raise UsageError(f"teacher progress file {path} belongs to another teacher configuration; delete it or use another --teachers folder")
    return saved


# -- students ---------------------------------------------------------------------------------------------
STUDENTS = {"ed_small": "ed_small", "ed_resnet20": "ed_resnet20", "ed_wrn16_2": "ed_wrn16_2"}


def make_student(config: dict, data, full: bool):
    from avalanche_m2kd import models

    if config["student"] not in STUDENTS:
        raise UsageError(f"unknown student {config['student']!r}; choose from {', '.join(STUDENTS)}")
    student = getattr(models, STUDENTS[config["student"]])(data.input_shape[0], data.input_shape[-1])
    if full:  # every group and the last teaching-reference head from the first step
        student.grow_to(student.n_groups, data.n_classes)
    return student


def stage_epochs(config: dict) -> int:
    """ED's epochs per stage for the same number of sample visits as ``epochs`` full epochs."""
    return max(1, round(2 * config["epochs"] / (config["stages"] + 1)))


def student_plan(method: str, config: dict) -> dict:
    """How a student method trains: epochs per experience, experiences, and
    the epochs (counted over the whole run) after which the rate drops. One
    schedule over all the run's epochs for every method; ED's runs across its
    stages (ED's code switches stages at the drops of one schedule)."""
    is_ed = method.startswith("ed")
    per_experience = stage_epochs(config) if is_ed else config["epochs"]
    experiences = config["stages"] if is_ed else 1
    total = per_experience * experiences
    drops = sorted({max(1, round(f * total)) for f in config["milestones"] if round(f * total) < total})
    return {"epochs": per_experience, "experiences": experiences, "total_epochs": total, "milestones": drops,
            "final_lr": config["lr"] * config["gamma"] ** len(drops)}


class ClassSlice(nn.Module):
    """A frozen teacher's logits at ``columns`` only: the all-class teacher as
    a stage teacher (``ed-1t``)."""

    def __init__(self, module: nn.Module, columns: List[int]):
        super().__init__()
        self.module = module
        self.register_buffer("columns", torch.as_tensor(columns, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).index_select(1, self.columns)


def ed_stage_teachers(method: str, config: dict, stages, teachers) -> list:
    """The teachers ED distils from at each stage: the stage teachers, or for
    ``ed-1t`` the all-class teacher restricted to each stage's classes."""
    from avalanche_m2kd.teachers import GroupTeacher

    if method != "ed-1t":
        return [teachers[f"stage{k}"] for k in range(config["stages"])]
    every = teachers["all"]
    position = {c: i for i, c in enumerate(every.classes)}
    out = []
    for exp in stages.train_stream:
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        sliced = ClassSlice(every.module, [every.columns[position[c]] for c in classes])
        out.append(GroupTeacher(sliced, classes, range(len(classes))))
    return out


def train_student(method: str, seed: int, config: dict, data, stages, whole, teachers) -> dict:
    from avalanche.training import Naive
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

    from avalanche_m2kd import EducationDistillation, RoutedDistillationPlugin
    from avalanche_m2kd.precision import MixedPrecisionPlugin

    RNGManager.set_random_seeds(seed)
    device = config["device"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    is_ed = method.startswith("ed")
    student = make_student(config, data, full=not is_ed or method == "ed-full")
    optimizer = _sgd(config)(student.parameters())
    plan = student_plan(method, config)
    epochs = plan["epochs"]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, plan["milestones"], gamma=config["gamma"])
    # one schedule over the whole run: not reset between ED's stages (ED rebuilds its optimizer in place)
    plugins = [LRSchedulerPlugin(scheduler, reset_scheduler=False, reset_lr=False)]
    if config["precision"] != "fp32":
        plugins.insert(0, MixedPrecisionPlugin(config["precision"]))
    common = dict(train_mb_size=config["batch_size"], train_epochs=epochs, eval_mb_size=256, device=device, evaluator=evaluator)
    kd = dict(alpha=config["alpha"], temperature=config["temperature"], teacher_precision=config["precision"])
    began = time.perf_counter()
    if is_ed:
        strategy = EducationDistillation(
            model=student, optimizer=optimizer, teachers=ed_stage_teachers(method, config, stages, teachers), revisit="all",
            order="sequential" if method == "ed-seq" else "mixed",
            distillation="logit_mse" if method == "ed-mse" else "hinton", plugins=plugins, **kd, **common,
        )
        for exp in stages.train_stream:
            strategy.train(exp, num_workers=0)
    else:
        criterion = torch.nn.CrossEntropyLoss()
        if method != "ce":
            chosen = [teachers["all"]] if method == "kd" else [teachers[f"stage{k}"] for k in range(config["stages"])]
            criterion = RoutedDistillationPlugin(chosen, **kd)
            plugins.append(criterion)
        strategy = Naive(model=student, optimizer=optimizer, criterion=criterion, plugins=plugins, **common)
        strategy.train(whole.train_stream[0], num_workers=0)
    elapsed = time.perf_counter() - began
    from avalanche_m2kd.distributed import state_hash

    counts = [correct_and_total(student, exp.dataset, device) for exp in stages.test_stream]  # the stages split the test set
    return {"method": method, "seed": seed, "top1": sum(c for c, _ in counts) / sum(n for _, n in counts),
            "top1_per_stage": [c / n for c, n in counts], "wall_time_s": elapsed,
            "final_lr": optimizer.param_groups[0]["lr"], "student_hash": state_hash(student.state_dict())}


@torch.no_grad()
def teacher_accuracy(teachers: Dict[str, object], stages, whole, device) -> Dict[str, float]:
    """Each teacher's top-1 on the test images of its own classes (its local
    labels), and the all-class teacher's on each stage's test images with its
    logits restricted to that stage's classes (``all@stageK``: the teacher
    ``ed-1t`` distils from, comparable with the stage specialist ``stageK``)."""
    tests = {"all": whole.test_stream[0].dataset}
    tests.update({f"stage{k}": exp.dataset for k, exp in enumerate(stages.test_stream)})

    def accuracy(module, columns, classes, data) -> float:
        correct, total = correct_and_total(module, data, device, columns=columns, classes=classes)
        return correct / total

    out = {}
    for role, teacher in teachers.items():
        out[role] = accuracy(teacher.module, list(teacher.columns), teacher.classes, tests[role])
    if "all" in teachers:
        every = teachers["all"]
        position = {c: i for i, c in enumerate(every.classes)}
        for k, exp in enumerate(stages.test_stream):
            classes = sorted(int(c) for c in exp.classes_in_this_experience)
            out[f"all@stage{k}"] = accuracy(every.module, [every.columns[position[c]] for c in classes], classes, exp.dataset)
    return out


@torch.no_grad()
def correct_and_total(model, dataset, device, columns: Optional[List[int]] = None,
                      classes: Optional[List[int]] = None) -> Tuple[int, int]:
    """How many images of ``dataset`` the model's top-1 gets right (100-way on
    CIFAR-100: one head, no task labels), and how many there are. Run on each
    stage's test images: the student's top-1 per stage (``top1_per_stage``:
    where a method's points are lost) and, summed, its top-1, in one pass.
    For a teacher: the top-1 among its logit ``columns``, against each label's
    position in its ``classes``."""
    from torch.utils.data import DataLoader

    from avalanche_m2kd.losses import class_position_table

    model.eval()
    lookup = None if classes is None else class_position_table(classes, device)
    correct = total = 0
    for batch in DataLoader(dataset.eval(), batch_size=512, collate_fn=getattr(dataset, "collate_fn", None)):
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x) if columns is None else model(x)[:, columns]
        correct += int((logits.argmax(dim=1) == (y if lookup is None else lookup[y])).sum())
        total += int(y.numel())
    return correct, total


# -- report ------------------------------------------------------------------------------------------------------
def paired(runs: List[dict]) -> List[dict]:
    """Per-seed top-1 differences (points) for :data:`CLAIMS` that both ran."""
    from benchmarks.report import paired_table

    return paired_table({(r["method"], r["seed"]): 100 * r["top1"] for r in runs}, CLAIMS)


def summary(document: dict) -> str:
    from benchmarks.report import stage_top1_cell

    c = document["config"]
    lines = [
        f"# {c['dataset']}, {c['stages']} stages, preset {c['preset']}",
        "",
        f"- student {c['student']}, teacher {c['teacher']} ({c['teacher_epochs']} epochs); {c['epochs']} full-student epochs, "
        f"ED {stage_epochs(c)} per stage (same sample visits); SGD lr {c['lr']}, batch {c['batch_size']}, alpha {c['alpha']}, T {c['temperature']}",
        f"- command: `{' '.join(document['command'])}`",
        "",
        "- teachers' top-1 on their own classes: "
        + ", ".join(f"{role} {100 * acc:.1f}%" for role, acc in document.get("teachers", {}).items()),
        "",
        "| Method | Top-1 (%) | Top-1 on each stage's classes (%) | Seeds | Time (s) |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [r for r in document["runs"] if r["method"] == method]
        if runs:
            acc = [100 * r["top1"] for r in runs]
            lines.append(f"| {method} | {np.mean(acc):.1f} ± {np.std(acc, ddof=1) if len(acc) > 1 else 0:.1f} | {stage_top1_cell(runs)} | "
                         f"{len(runs)} | {np.mean([r['wall_time_s'] for r in runs]):.0f} |")
    lines += ["", "Paired differences on the same seeds (percentage points of top-1; per seed, then mean ± std, wins):", "",
              "| Method | Baseline | Per seed | Mean ± std | Wins |", "|---|---|---|---|---|"]
    for row in paired(document["runs"]):
        per = ", ".join(f"{d:+.1f}" for d in row["per_seed"])
        lines.append(f"| {row['method']} | {row['baseline']} | {per} | {row['mean']:+.1f} ± {row['std']:.1f} | "
                     f"{row['wins']}/{len(row['seeds'])} |")
    return "\n".join(lines) + "\n"


def run(args, argv: List[str]) -> int:
    from benchmarks.compare import check_same_config, claim_output_folder
    from benchmarks.report import write_atomic

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    config = load_config(args)
    out = Path(args.out)
    lock = claim_output_folder(out, resume=True, overwrite=False)  # noqa: F841 (held until exit); runs are added
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    data, stages, whole = load_streams(config)
    teacher_folder = Path(args.teachers) if args.teachers else out / "teachers"
    if teacher_folder.exists() and not teacher_folder.is_dir():
        raise UsageError(f"--teachers {teacher_folder} is a file; name a folder for the teachers")
    teachers = get_teachers(config, data, stages, whole, teacher_folder, log)
    path = out / "results.json"
    document = {"format": "avalanche_m2kd.ed_kd/1", "command": [PROG, *argv], "config": config, "runs": [],
                "teachers": teacher_accuracy(teachers, stages, whole, config["device"])}
    if path.is_file():
        saved = read_json(path, "results file")
        check_same_config(saved["config"], config, str(path), independent=("seeds", "methods", "device", "data_root"))
        document["runs"] = saved["runs"]
    done = {(r["method"], r["seed"]) for r in document["runs"]}
    for seed in config["seeds"]:
        for method in config["methods"]:
            if (method, seed) in done:
                continue
            check_stop()  # a stop swallowed inside a callback ends the run here, the finished runs written
            result = train_student(method, seed, config, data, stages, whole, teachers)
            log(f"{method} seed {seed}: top-1 {100 * result['top1']:.1f}% in {result['wall_time_s']:.0f} s")
            document["runs"].append(result)
            write_atomic(path, json.dumps(document, indent=1))
            write_atomic(out / "summary.md", summary(document))
    write_atomic(path, json.dumps(document, indent=1))
    write_atomic(out / "summary.md", summary(document))
    if not args.quiet:
        print(summary(document))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        try:
            return run(build_parser().parse_args(argv), argv)
        except (UsageError, ValueError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2

    return run_stoppable(PROG, body)  # finished runs are written as each ends; teachers are saved as each is trained


if __name__ == "__main__":
    sys.exit(main())
