"""How M2KD's costs grow over a long stream (a benchmark, not a test).

    python -m benchmarks.studies.growth                      # 20 experiences, small CNN, packnet / sparse / full
    python -m benchmarks.studies.growth --experiences 50 --stores packnet

Synthetic Split-CIFAR-shaped data (3x32x32, 2 classes per experience). After
each experience: the packnet store's free capacity, the bytes every store
holds, and the median training-iteration time of that experience (teachers
uncached, as with random augmentation). Writes growth.json and growth.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings


def measure(store: str, args) -> list:
    import torch
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.templates import SupervisedTemplate

    from avalanche_m2kd import M2KDPlugin, models
    from benchmarks.studies.harness import IterationTimer, synthetic_split_cifar

    torch.manual_seed(0)
    bm = synthetic_split_cifar([args.batch_size * args.iterations // 2] * args.experiences)
    timer = IterationTimer()
    model = models.create(args.model, in_channels=3)
    pruning = {} if store == "full" else {"prune_ratio": args.prune_ratio}
    if store == "packnet":
        pruning["post_prune_epochs"] = 1
    plugin = M2KDPlugin(snapshot_store=store, aux_layers="auto", teacher_cache="off", **pruning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                      train_mb_size=args.batch_size, plugins=[timer, plugin],
                                      evaluator=EvaluationPlugin(loggers=[]))
    rows = []
    for exp in bm.train_stream:
        strategy.train(exp)
        s = plugin.snapshots
        times = timer.iterations[exp.current_experience]
        rows.append({
            "experience": exp.current_experience + 1,
            "teachers": len(s) - 1,  # teachers that ran during this experience
            "free_fraction": s.free_fraction() if store == "packnet" else None,
            "held_bytes": s.nbytes(),
            "full_copy_bytes": s.full_copy_nbytes(),
            "iteration_s": statistics.median(times[1:] or times),
        })
        print(store, json.dumps(rows[-1]), flush=True)
    return rows


def markdown(results: dict, args) -> str:
    stores = list(results)
    lines = [
        f"# M2KD over {args.experiences} experiences: {args.model}, batch {args.batch_size}, prune ratio {args.prune_ratio}",
        "",
        f"Command: `python -m benchmarks.studies.growth --experiences {args.experiences} --model {args.model} --stores {','.join(stores)}`",
        "",
        "| experience | teachers | packnet free | " + " | ".join(f"{s} held (kB)" for s in stores)
        + " | full copies (kB) | " + " | ".join(f"{s} ms/iter" for s in stores) + " |",
        "|" + "---|" * (3 + 2 * len(stores) + 1),
    ]
    n = len(next(iter(results.values())))
    for i in range(n):
        rows = {s: results[s][i] for s in stores}
        first = rows[stores[0]]
        free = rows["packnet"]["free_fraction"] if "packnet" in rows else None
        cells = [str(first["experience"]), str(first["teachers"]), "" if free is None else f"{free:.3f}"]
        cells += [f"{rows[s]['held_bytes'] / 1e3:.0f}" for s in stores]
        cells.append(f"{first['full_copy_bytes'] / 1e3:.0f}")
        cells += [f"{rows[s]['iteration_s'] * 1e3:.0f}" for s in stores]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.growth", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiences", type=int, default=20)
    p.add_argument("--model", default="cifar_cnn")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=6, help="training iterations per experience")
    p.add_argument("--prune-ratio", type=float, default=0.8)
    p.add_argument("--stores", default="packnet,sparse,full")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/growth")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {store: measure(store, args) for store in args.stores.split(",")}
    from benchmarks.report import write_benchmark

    write_benchmark(args.out, "growth", {"config": vars(args), "results": results}, markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
