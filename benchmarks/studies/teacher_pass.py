"""Where M2KD's teacher time goes (a profile, not a test).

    python -m benchmarks.studies.teacher_pass                         # ResNet-32 and the small CNN
    python -m benchmarks.studies.teacher_pass --models resnet32 --snapshots 9

In one process, on the same input batch, timed in turn within every repeat
(medians of ``--repeats``):
``snapshots`` plain inference forwards of the live model; M2KD's whole teacher
pass (``TeacherSet.run_all`` over that many full-store snapshots: routing,
per-teacher bookkeeping, the Python loop), without auxiliary heads and with them on
the model's default ``aux_layers`` (as ``benchmarks.studies.speed`` runs M2KD); the
multi-model loss and its backward; and one training step of the model. The ratio teacher pass / plain forwards is the
overhead the issue's "1.1x of the plain forwards" target is about, without the
noise of comparing times taken in different processes. Writes teacher_pass.json
and teacher_pass.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List

CIFAR_SHAPED = ("resnet20", "resnet32", "resnet110", "cifar_cnn")  # the models that take the 3x32x32 batch


def _interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """Times of each function, taken in turn within every repeat, so that the
    slow and fast phases of a shared machine hit all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def profile(model_name: str, snapshots: int, batch: int, repeats: int, aux: bool) -> dict:
    import torch

    from avalanche.models import IncrementalClassifier
    from torch import nn

    from avalanche_m2kd import M2KDPlugin, models
    from avalanche_m2kd.losses import distill_group_logits, group_weights
    from avalanche_m2kd.taps import AuxiliaryHead

    torch.manual_seed(0)
    model = models.create(model_name, num_classes=2 * (snapshots + 1), in_channels=3)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 2 * (snapshots + 1), (batch,))
    plugin = M2KDPlugin(aux_layers="auto" if aux else (), teacher_cache="off")
    plugin.regularizer.prepare_model(model, x[:1])
    n_classes = 2 * (snapshots + 1)
    for head in getattr(model, "m2kd_aux", nn.Module()).modules():
        if isinstance(head, AuxiliaryHead):  # as wide as the seen classes, as after Avalanche's adaptation
            head.classifier = IncrementalClassifier(head.classifier.classifier.in_features, n_classes, masking=False)
    for k in range(snapshots):
        plugin.snapshots.add(model)
        plugin.groups.append([2 * k, 2 * k + 1])
    teacher_set = plugin.regularizer.build_teachers("cpu")
    weights = group_weights(plugin.groups)
    with torch.no_grad():
        outputs = teacher_set.run_all(x)

    def plain_forwards():
        with torch.no_grad():
            for _ in range(snapshots):
                model(x)

    def group_loss():
        logits = torch.randn(batch, 2 * (snapshots + 1), requires_grad=True)
        distill_group_logits(logits, [o.logits for o in outputs], plugin.groups, 2.0, weights).backward()

    def train_step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def in_mode(fn, training: bool):
        def run():
            model.train(training)
            fn()
        return run

    times = _interleaved_times({
        "plain": in_mode(plain_forwards, False),
        "teachers": in_mode(lambda: teacher_set.run_all(x), False),
        "loss": in_mode(group_loss, False),
        "step": in_mode(train_step, True),
    }, repeats)
    plain, teachers, loss, step = (statistics.median(times[k]) for k in ("plain", "teachers", "loss", "step"))
    pair_ratios = [t / p for t, p in zip(times["teachers"], times["plain"])]
    return {
        "model": model_name,
        "aux_heads": aux,
        "snapshots": snapshots,
        "teachers_run": len(outputs),
        "teacher_output_widths": [o.logits.shape[1] for o in outputs],
        "repeats": len(times["plain"]),
        "batch": batch,
        "plain_forwards_s": plain,
        "teacher_pass_s": teachers,
        "group_loss_s": loss,
        "train_step_s": step,
        "teacher_pass_vs_plain_forwards": teachers / plain,
        "median_pairwise_ratio": statistics.median(pair_ratios),
        "teachers_and_loss_vs_plain_forwards": (teachers + loss) / plain,
    }


def markdown(rows: list, args) -> str:
    lines = [
        f"# M2KD's teacher pass: {args.snapshots} snapshots, batch {args.batch_size}, {args.threads} threads",
        "",
        f"Medians of {args.repeats}, one process; command: `python -m benchmarks.studies.teacher_pass --models "
        f"{args.models} --snapshots {args.snapshots} --batch-size {args.batch_size}`",
        "",
        "| model | aux heads | plain forwards (ms) | teacher pass (ms) | group losses + backward (ms) | training step (ms) "
        "| teacher pass / forwards | (pass + losses) / forwards | median of per-repeat ratios |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'yes' if r['aux_heads'] else 'no'} | {r['plain_forwards_s'] * 1e3:.0f} | {r['teacher_pass_s'] * 1e3:.0f} | "
            f"{r['group_loss_s'] * 1e3:.1f} | {r['train_step_s'] * 1e3:.0f} | "
            f"{r['teacher_pass_vs_plain_forwards']:.2f}x | {r['teachers_and_loss_vs_plain_forwards']:.2f}x | "
            f"{r['median_pairwise_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.teacher_pass", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet32,cifar_cnn", help="comma-separated model names")
    p.add_argument("--snapshots", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/teacher_pass")
    args = p.parse_args(argv)
    import torch

    unknown = [m for m in args.models.split(",") if m not in CIFAR_SHAPED]
    if unknown:
        p.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(CIFAR_SHAPED)} (3x32x32 inputs)")
    if args.snapshots < 1 or args.repeats < 1:
        p.error("--snapshots and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    rows = [profile(m, args.snapshots, args.batch_size, args.repeats, aux)
            for m in args.models.split(",") for aux in (False, True)]
    from benchmarks.report import write_benchmark

    write_benchmark(args.out, "teacher_pass", {"config": vars(args), "results": rows}, markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
