"""Speed and memory of M2KD's teachers against Naive and LwF (a benchmark, not a test).

    python -m benchmarks.studies.speed                           # ResNet-32, 3x32x32, batch 128, 9 snapshots
    python -m benchmarks.studies.speed --model cifar_cnn --repeats 5

Every mode runs in its own process (so peak memory is its own), the modes
interleaved over the repeats; each figure is the median over repeats. A run
trains experiences 1..S (one batch each, to create S snapshots), then times
experience S+1: per training iteration (forward, losses, backward, step, all
plugin hooks; data loading excluded), or per epoch over ``--epochs`` epochs for
the cache modes (data loading included). Writes speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

MODES = {
    "naive": "Naive (Avalanche), random crop + flip",
    "lwf": "LwF (Avalanche), random crop + flip",
    "m2kd-loop": "M2KD, exact, teachers in a Python loop, random crop + flip",
    "m2kd-loop-plain": "M2KD as m2kd-loop, teachers run as stored (teacher_inference='plain')",
    "m2kd-bf16-teachers": "M2KD, exact, loop, teachers in bf16 (student in fp32), random crop + flip",
    "m2kd-bf16-teachers-plain": "M2KD as m2kd-bf16-teachers, teachers run as stored (teacher_inference='plain')",
    "m2kd-bf16-teachers-compiled": "M2KD as m2kd-bf16-teachers, teachers through torch.compile (teacher_inference='compiled')",
    "m2kd-loop-compiled": "M2KD as m2kd-loop, teachers through torch.compile (teacher_inference='compiled')",
    "naive-bf16": "Naive with bf16 forward passes (MixedPrecisionPlugin), random crop + flip",
    "m2kd-bf16": "M2KD, exact, loop, student and teachers in bf16, random crop + flip",
    "m2kd-batched": "M2KD, exact, batched teachers (vmap), random crop + flip",
    "m2kd-sampled1": "M2KD, teachers_per_batch=1, random crop + flip",
    "m2kd-packnet": "M2KD, packnet snapshots, loop, random crop + flip",
    "ed": "ED, stage 3 of 3 (ResNet-20 student, ResNet-110 teachers for ResNets), random crop + flip",
    "naive-epochs": "Naive, deterministic data, mean epoch time",
    "lwf-epochs": "LwF, deterministic data, mean epoch time",
    "m2kd-cached-epochs": "M2KD, exact teacher cache, deterministic data, mean epoch time",
    "ed-cached-epochs": "ED, exact teacher cache, deterministic data, mean epoch time",
}


# glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh pages that
# are zero-filled on first touch and returned on free; raising it keeps big activations on the heap.
TUNED_THRESHOLD = 4 << 30


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(spec: dict) -> dict:
    """One measurement in this process (see the module docstring)."""
    warnings.filterwarnings("ignore")
    import torch
    from avalanche.training import LwF, Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_m2kd import M2KD, EducationDistillation, models
    from avalanche_m2kd.precision import MixedPrecisionPlugin
    from benchmarks.studies.harness import IterationTimer, synthetic_split_cifar

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    mode, batch, snapshots = spec["mode"], spec["batch_size"], spec["snapshots"]
    channels, side = 3, 32
    epochs_mode = mode.endswith("-epochs")
    augment = not epochs_mode
    is_ed = mode.startswith("ed")
    n_exp = 3 if is_ed else snapshots + 1
    per_class_timed = batch * spec["iterations"] // 2  # two classes per experience
    bm = synthetic_split_cifar([max(1, batch // 2)] * (n_exp - 1) + [per_class_timed], augment=augment)
    timer = IterationTimer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    name = spec["model"]
    model = models.create(name, in_channels=channels)
    opt = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)
    plugins = [MixedPrecisionPlugin("bf16"), timer] if mode.endswith("-bf16") else [timer]
    common = dict(train_mb_size=batch, train_epochs=1, eval_mb_size=batch, evaluator=evaluator, plugins=plugins)
    aux = model.m2kd_aux_layers
    if mode.startswith("naive"):
        strategy = Naive(model=model, optimizer=opt(model.parameters()), **common)
    elif mode.startswith("lwf"):
        strategy = LwF(model=model, optimizer=opt(model.parameters()), criterion=torch.nn.CrossEntropyLoss(),
                       alpha=1.0, temperature=2.0, **common)
    elif mode.startswith("m2kd"):
        kw = dict(aux_layers=aux, teacher_cache="off")
        for inference in ("plain", "compiled"):
            kind = mode.removesuffix(f"-{inference}")
            if kind != mode:
                kw["teacher_inference"] = inference
                break
        if kind == "m2kd-batched":
            kw["batched_teachers"] = True
        elif kind in ("m2kd-bf16-teachers", "m2kd-bf16"):
            kw["teacher_precision"] = "bf16"
        elif kind == "m2kd-sampled1":
            kw["teachers_per_batch"] = 1
        elif kind == "m2kd-packnet":
            kw.update(snapshot_store="packnet", post_prune_epochs=0)
        elif kind == "m2kd-cached-epochs":
            kw["teacher_cache"] = "exact"
        strategy = M2KD(model=model, optimizer=opt(model.parameters()), **kw, **common)
    else:
        student = models.ed_student_for(name, channels, side)
        teacher = (lambda n: models.cifar_resnet110(n, channels)) if name.startswith("resnet") else (
            lambda n: models.create(name, num_classes=n, in_channels=channels))
        strategy = EducationDistillation(
            model=student, optimizer=opt(student.parameters()), teacher_factory=teacher, teacher_epochs=1,
            teacher_optimizer=opt, revisit=0, teacher_cache="exact" if epochs_mode else "off", **common)
    experiences = list(bm.train_stream)  # Avalanche streams take no negative index
    for exp in experiences[:-1]:
        strategy.train(exp)
    strategy.train_epochs = spec["epochs"] if epochs_mode else 1
    strategy.train(experiences[-1])
    result = {"mode": mode, "peak_rss_mb": _peak_rss_mb(), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if epochs_mode:
        epochs = timer.epochs[n_exp - 1]  # the timed experience
        result["epoch_s"] = statistics.mean(epochs)
        result["epochs_s"] = epochs
    else:
        times = timer.iterations[n_exp - 1][2:]  # the timed experience; the first iterations warm up allocators and caches
        result["iteration_s"] = statistics.median(times)
        result["images_per_s"] = batch / result["iteration_s"]
    plugin = getattr(strategy, "m2kd", None)
    if plugin is not None:
        result["snapshots"] = len(plugin.snapshots)
        result["snapshot_bytes"] = plugin.snapshots.nbytes()
        result["full_copy_bytes"] = plugin.snapshots.full_copy_nbytes()
        result["model_params"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("m2kd_aux"))
        result["prunable_weights"] = sum(o.numel() for o in getattr(plugin.snapshots, "owners", {}).values())
    if mode in ("naive", "m2kd-loop"):
        result.update(_inference_floor(model, batch, channels, side, spec["snapshots"]))
    return result


def _inference_floor(model, batch: int, channels: int, side: int, snapshots: int) -> dict:
    """Time of one plain inference forward (median of 10), and FLOP counts.
    Measured in the Naive worker and again in the M2KD loop worker."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, channels, side, side)
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(12):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        model(x)
    model.train()
    with FlopCounterMode(display=False) as train_counter:
        torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    return {
        "inference_forward_s": statistics.median(times[2:]),
        "forward_flops": forward_counter.get_total_flops(),
        "train_step_flops": train_counter.get_total_flops(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet32", help="resnet32 (default), resnet20, cifar_cnn, ...")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--snapshots", type=int, default=9, help="existing snapshots (default 9: experience 10)")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per run")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the *-epochs (cache) modes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--tune-malloc", action="store_true",
                   help="run the workers with glibc's mmap and trim thresholds raised (MALLOC_MMAP_THRESHOLD_, "
                        "MALLOC_TRIM_THRESHOLD_), so large activations reuse heap memory instead of fresh pages")
    p.add_argument("--out", default="results/speed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def run_modes(args) -> Dict[str, List[dict]]:
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"python -m benchmarks.studies.speed: error: unknown modes {unknown}; choose from {', '.join(MODES)}")
    results: Dict[str, List[dict]] = {m: [] for m in modes}
    env = dict(os.environ)
    if args.tune_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_=str(TUNED_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TUNED_THRESHOLD))
    for repeat in range(args.repeats):
        for mode in modes:  # interleaved, so that slow phases of the machine hit every mode alike
            spec = dict(mode=mode, model=args.model, batch_size=args.batch_size, snapshots=args.snapshots,
                        iterations=args.iterations, epochs=args.epochs, threads=args.threads)
            out = subprocess.run([sys.executable, "-m", "benchmarks.studies.speed", "--worker", json.dumps(spec)],
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], env=env)
            if out.returncode != 0:
                raise SystemExit(f"python -m benchmarks.studies.speed: error: mode {mode} failed: {out.stderr.strip().splitlines()[-1]}")
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: {json.dumps({k: v for k, v in results[mode][-1].items() if k != 'epochs_s'})}", flush=True)
    return results


def summarize(results: Dict[str, List[dict]], args) -> dict:
    med = lambda mode, key: statistics.median(r[key] for r in results[mode]) if mode in results else None
    table = {}
    for mode, runs in results.items():
        row = {"description": MODES[mode], "peak_rss_mb": med(mode, "peak_rss_mb")}
        key = "epoch_s" if mode.endswith("-epochs") else "iteration_s"
        row[key] = med(mode, key)
        if "snapshot_bytes" in runs[0]:
            row["snapshot_bytes"] = runs[0]["snapshot_bytes"]
            row["full_copy_bytes"] = runs[0]["full_copy_bytes"]
            row["model_params"] = runs[0]["model_params"]
            row["prunable_weights"] = runs[0]["prunable_weights"]
        table[mode] = row
    for mode, row in table.items():
        ref = "-epochs" if mode.endswith("-epochs") else ""
        key = "epoch_s" if ref else "iteration_s"
        for base in ("naive", "lwf"):
            other = table.get(base + ref)
            row[f"vs_{base}"] = row[key] / other[key] if other else None
    floor = {}
    if "naive" in results and "inference_forward_s" in results["naive"][0]:
        t_inf = med("naive", "inference_forward_s")
        t_naive = med("naive", "iteration_s")
        flops = results["naive"][0]
        floor = {
            "inference_forward_s": t_inf,
            "teacher_forwards_s": args.snapshots * t_inf,
            "naive_plus_teachers_s": t_naive + args.snapshots * t_inf,
            "flop_ratio_forward_to_train_step": flops["forward_flops"] / flops["train_step_flops"],
            "flop_floor_s": t_naive * (1 + args.snapshots * flops["forward_flops"] / flops["train_step_flops"]),
        }
        for mode in ("m2kd-loop", "m2kd-batched"):
            if mode in table:
                table[mode]["extra_over_naive_vs_teacher_forwards"] = (table[mode]["iteration_s"] - t_naive) / floor["teacher_forwards_s"]
        if "m2kd-loop" in results and "inference_forward_s" in results["m2kd-loop"][0]:
            # the same ratio against forwards timed in M2KD's own process: less exposed to the machine's phases
            own = args.snapshots * med("m2kd-loop", "inference_forward_s")
            floor["m2kd_loop_teacher_forwards_s"] = own
            table["m2kd-loop"]["extra_over_naive_vs_own_teacher_forwards"] = (table["m2kd-loop"]["iteration_s"] - t_naive) / own
    return {"config": vars(args), "table": table, "floor": floor, "runs": results}


def markdown(summary: dict) -> str:
    c = summary["config"]
    lines = [
        f"# Speed: {c['model']}, batch {c['batch_size']}, {c['snapshots']} snapshots, {c['threads']} threads",
        "",
        f"Median of {c['repeats']} repeats, each mode in its own process; command: "
        f"`python -m benchmarks.studies.speed --model {c['model']} --batch-size {c['batch_size']} --snapshots {c['snapshots']} "
        f"--repeats {c['repeats']}{'' if c['modes'] == ','.join(MODES) else ' --modes ' + c['modes']}"
        f"{' --tune-malloc' if c.get('tune_malloc') else ''}`",
        "",
        "| mode | time | images/s | vs Naive | vs LwF | peak RSS (MB) | snapshot store |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in summary["table"].items():
        epochs = "epoch_s" in row
        t = row["epoch_s"] if epochs else row["iteration_s"]
        ips = "" if epochs else f"{c['batch_size'] / t:.0f}"
        store = ""
        if row.get("snapshot_bytes") is not None:
            per_param = row["snapshot_bytes"] / max(row["model_params"], 1)
            store = f"{row['snapshot_bytes'] / 1e6:.2f} MB ({per_param:.2f} B/param; full copies {row['full_copy_bytes'] / 1e6:.1f} MB)"
        fmt = lambda v: "" if v is None else f"{v:.2f}x"
        unit = "s/epoch" if epochs else "ms/iter"
        shown = t if epochs else t * 1000
        lines.append(f"| {mode} | {shown:.2f} {unit} | {ips} | {fmt(row['vs_naive'])} | {fmt(row['vs_lwf'])} | {row['peak_rss_mb']:.0f} | {store} |")
    f = summary["floor"]
    if f:
        lines += [
            "",
            f"Floor: one plain inference forward takes {f['inference_forward_s'] * 1000:.1f} ms, so {c['snapshots']} teacher "
            f"forwards cost {f['teacher_forwards_s'] * 1000:.1f} ms; Naive plus those is {f['naive_plus_teachers_s'] * 1000:.1f} ms/iter. "
            f"By FLOPs a forward is {f['flop_ratio_forward_to_train_step']:.3f} of a training step, a floor of "
            f"{f['flop_floor_s'] * 1000:.1f} ms/iter.",
        ]
        for mode in ("m2kd-loop", "m2kd-batched"):
            row = summary["table"].get(mode)
            if row and "extra_over_naive_vs_teacher_forwards" in row:
                lines.append(f"- {mode}: extra time over Naive = {row['extra_over_naive_vs_teacher_forwards']:.2f}x the {c['snapshots']} plain forwards.")
            if row and "extra_over_naive_vs_own_teacher_forwards" in row:
                lines.append(f"- {mode}: the same against {c['snapshots']} plain forwards timed in its own process "
                             f"({f['m2kd_loop_teacher_forwards_s'] * 1000:.1f} ms): {row['extra_over_naive_vs_own_teacher_forwards']:.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from benchmarks.report import write_benchmark

    summary = summarize(run_modes(args), args)
    write_benchmark(args.out, "speed", summary, markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
