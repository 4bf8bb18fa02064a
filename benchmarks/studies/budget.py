"""How many epochs per step the CPU evidence needs: accuracy after the first
steps of CIFAR-100 B0-10 against the budget, next to the protocol's 70 epochs.

Each budget is one runner invocation per strategy stopped after ``--steps``
experiences (their checkpoint folders hold what was measured, see
``RunCheckpoint``); this module reads them back and writes the table:

    python -m benchmarks.compare --preset benchmarks/studies/budget/cifar100-b0-10-e30.json \\
        --dataset npz:DIR/cifar100.npz --strategies icarl --seeds 0 \\
        --out runs/budget/e30-icarl/out --checkpoint runs/budget/e30-icarl/ck --stop-after 3
    python -m benchmarks.studies.budget runs/budget/*/ck --out docs/results/budget-b0-10

The chosen budget is the smallest whose every measured step comes within
``--tolerance`` points (default 4) of the protocol's (the largest budget
measured) for every strategy."""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from benchmarks.progress import read_runs
from benchmarks.report import write_benchmark

PROG = "python -m benchmarks.studies.budget"


def choose(runs: List[dict], steps: int, tolerance: float) -> Dict[str, Optional[int]]:
    """Per strategy and overall: the smallest budget whose first ``steps``
    accuracies are all within ``tolerance`` points of the largest budget's."""
    by_strategy: Dict[str, Dict[int, dict]] = {r["strategy"]: {} for r in runs}
    for r in runs:
        if len(r["accuracy"]) >= steps:
            by_strategy[r["strategy"]][r["epochs"]] = r
    chosen: Dict[str, Optional[int]] = {}
    for strategy, table in by_strategy.items():
        if not table:  # no budget measured through every step yet
            chosen[strategy] = None
            continue
        reference = table[max(table)]["accuracy"][:steps]
        ok = [e for e, r in sorted(table.items()) if all(ref - a <= tolerance / 100 for a, ref in zip(r["accuracy"][:steps], reference))]
        chosen[strategy] = ok[0] if ok else None
    picks = list(chosen.values())
    chosen["all"] = None if not picks or None in picks else max(picks)
    return chosen


def markdown(runs: List[dict], steps: int, chosen: Dict[str, Optional[int]], tolerance: float) -> str:
    lines = [
        "# Budget per step against the protocol (CIFAR-100 B0-10, seed 0)",
        "",
        f"Accuracy on the classes seen after steps 1-{steps}; minutes of one core per step (CPU time). "
        f"Milestones at 0.7 and 0.9 of the epochs, lr x0.2 at each.",
        "",
        "| strategy | epochs | milestones | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " | min/step (CPU) | max gap to the largest budget |",
        "|---|---|---|" + "---|" * steps + "---|---|",
    ]
    for strategy in sorted({r["strategy"] for r in runs}):
        table = sorted((r for r in runs if r["strategy"] == strategy), key=lambda r: r["epochs"])
        reference = table[-1]["accuracy"]
        for r in table:
            cells = [f"{100 * a:.1f}" if i < len(r["accuracy"]) else "—" for i, a in enumerate((r["accuracy"] + [0] * steps)[:steps])]
            gaps = [100 * (ref - a) for a, ref in zip(r["accuracy"][:steps], reference)]
            minutes = [s / 60 if s is not None else float("nan") for s in r["cpu_s"][:steps]]  # None: not recorded
            lines.append(
                f"| {strategy} | {r['epochs']} | {'/'.join(map(str, r['milestones']))} | " + " | ".join(cells)
                + f" | {' / '.join(f'{m:.1f}' for m in minutes) or '—'} | {max(gaps):+.1f} |"
            )
    complete = {s: sorted(r["epochs"] for r in runs if r["strategy"] == s and len(r["accuracy"]) >= steps)
                for s in sorted({r["strategy"] for r in runs})}
    lines += ["", "Budgets measured through every step: " + "; ".join(f"{s} {', '.join(map(str, e)) or 'none yet'}" for s, e in complete.items())
              + f". Smallest of them within {tolerance:g} points of the largest at every step: "
              + ", ".join(f"{k} {v} epochs" if v else f"{k} not decided" for k, v in chosen.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="checkpoint folders of the budget runs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=4.0, help="points below the largest budget allowed at each step")
    p.add_argument("--out", help="folder for budget.json and budget.md")
    args = p.parse_args(argv)
    runs = read_runs(args.folders, PROG)
    if runs is None:
        return 2
    chosen = choose(runs, args.steps, args.tolerance)
    text = markdown(runs, args.steps, chosen, args.tolerance)
    if args.out:
        write_benchmark(args.out, "budget", {"runs": runs, "chosen": chosen, "steps": args.steps, "tolerance": args.tolerance}, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
