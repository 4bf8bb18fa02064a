"""Where long runs stand: what the checkpoint folders of unfinished (or
stopped) runner invocations have measured so far, with paired differences on
the steps two runs of one seed have both finished.

    python -m benchmarks.progress runs/free-s0/ck runs/free-s1/ck --against lwf

Each run's checkpoint side file keeps its accuracy rows and the CPU seconds of
every experience trained (``RunCheckpoint``), so a comparison lasting days can
be read at any moment without stopping it. Numbers over the first k steps are
not the final ones; the table says how many steps each covers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from avalanche_m2kd.metrics import seen_class_accuracy

PROG = "python -m benchmarks.progress"


def read_run(folder: Path) -> List[dict]:
    """The runs of one checkpoint folder: strategy, seed, epochs and, per
    experience trained so far, the accuracy on the classes seen and the
    seconds (wall and CPU) it took."""
    stamp = folder / "config.json"
    if not stamp.is_file():
        raise ValueError(f"{folder} has no config.json: not a runner checkpoint folder, or its runner has not started yet")
    config = json.loads(stamp.read_text())
    found = []
    for side in sorted(folder.glob("*-seed*.json")):
        strategy, seed = side.stem.rsplit("-seed", 1)
        state = json.loads(side.read_text())
        if "accuracy_matrix" not in state:
            raise ValueError(f"{side} predates the accuracy rows in side files; it cannot be read before it finishes")
        rows = state["accuracy_matrix"]
        accuracy = seen_class_accuracy([r[: len(rows)] for r in rows], state["test_sizes"][: len(rows)])
        found.append({
            "strategy": strategy, "seed": int(seed), "epochs": config["epochs"], "milestones": config["milestones"],
            "precision": config["precision"], "steps_total": config.get("n_experiences"),
            "accuracy": [float(a) for a in accuracy],
            "matrix": rows,  # rows[i][j]: accuracy on experience j's classes after step i
            "cpu_s": state.get("experience_cpu_s", []), "wall_s": state.get("experience_s", []),
        })
    return found


def read_runs(folders: List[str], prog: str) -> Optional[List[dict]]:
    """Every run of the checkpoint ``folders``; None after one error line on
    stderr (an unreadable or foreign folder)."""
    try:
        return [r for f in folders for r in read_run(Path(f))]
    except (OSError, ValueError, KeyError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return None


def paired(runs: List[dict], against: str) -> List[dict]:
    """Per strategy and seed with a run of ``against`` at the same seed, in
    points over the steps both finished: the difference of the seen-class
    accuracy at each step, of its mean, at the last of them, and per
    experience's classes at the last of them (which groups gain, which lose)."""
    reference = {r["seed"]: r for r in runs if r["strategy"] == against}
    out = []
    for r in runs:
        ref = reference.get(r["seed"])
        if r["strategy"] == against or ref is None or not r["accuracy"] or not ref["accuracy"]:
            continue
        k = min(len(r["accuracy"]), len(ref["accuracy"]))
        per_step = [100 * (a - b) for a, b in zip(r["accuracy"][:k], ref["accuracy"][:k])]
        out.append({"strategy": r["strategy"], "seed": r["seed"], "steps": k,
                    "mean": sum(per_step) / k, "last": per_step[-1], "per_step": per_step,
                    "per_group": [100 * (a - b) for a, b in zip(r["matrix"][k - 1][:k], ref["matrix"][k - 1][:k])]})
    return out


def hours_left(run: dict) -> Optional[float]:
    """Core-hours a run still needs: its steps left priced by the CPU time of
    its steps after the first (the first has no teacher to run), along their
    least-squares line when they grow (all-snapshot M2KD runs one more snapshot
    at each step), else at their mean; by the first step alone when it is all
    that was measured. None when it has measured no step or its length is
    unknown."""
    measured = [(k, s) for k, s in enumerate(run["cpu_s"]) if s is not None]
    if not measured or not run.get("steps_total"):
        return None
    later = [(k, s) for k, s in measured if k > 0] or measured
    mean_k = sum(k for k, _ in later) / len(later)
    mean_s = sum(s for _, s in later) / len(later)
    spread = sum((k - mean_k) ** 2 for k, _ in later)
    slope = sum((k - mean_k) * (s - mean_s) for k, s in later) / spread if spread else 0.0
    slope = max(slope, 0.0)  # a step never gets cheaper by design: a falling line is noise
    left = range(len(run["accuracy"]), run["steps_total"])
    return sum(mean_s + slope * (k - mean_k) for k in left) / 3600


def markdown(runs: List[dict], against: Optional[str] = None) -> str:
    lines = [
        "| strategy | seed | steps | accuracy on the classes seen, per step (%) | mean so far | core-hours so far | core-hours left (est.) |",
        "|---|---|---|---|---|---|---|",
    ]
    still_needed: List[float] = []  # each run's core-hours left (0 where unknown)
    for r in sorted(runs, key=lambda r: (r["strategy"], r["seed"])):
        acc = r["accuracy"]
        total = f"/{r['steps_total']}" if r.get("steps_total") else ""
        hours = sum(s for s in r["cpu_s"] if s is not None) / 3600
        mean = f"{100 * sum(acc) / len(acc):.1f}" if acc else "—"
        left = hours_left(r)
        still_needed.append(left or 0.0)
        lines.append(f"| {r['strategy']} | {r['seed']} | {len(acc)}{total} | {' / '.join(f'{100 * a:.1f}' for a in acc) or '—'} "
                     f"| {mean} | {hours:.1f} | {'—' if left is None else f'{left:.1f}'} |")
    lines += ["", f"Core-hours left for these runs: about {sum(still_needed):.1f} (each run's steps left priced along its steps after the first)."]
    if against:
        pairs = paired(runs, against)
        lines += ["", f"Paired against `{against}` (same seed, the steps both runs finished):", "",
                  "| strategy | seed | steps | per step | mean difference | difference at the last common step "
                  "| there, per experience's classes |", "|---|---|---|---|---|---|---|"]
        signed = lambda xs: " / ".join(f"{x:+.1f}" for x in xs)  # noqa: E731
        lines += [f"| {p['strategy']} | {p['seed']} | {p['steps']} | {signed(p['per_step'])} | {p['mean']:+.1f} "
                  f"| {p['last']:+.1f} | {signed(p['per_group'])} |" for p in pairs]
        if not pairs:
            lines.append(f"| (no run shares a seed with `{against}` yet) | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="checkpoint folders (--checkpoint of the runner)")
    p.add_argument("--against", help="strategy to pair every other one with, seed by seed (e.g. lwf)")
    args = p.parse_args(argv)
    runs = read_runs(args.folders, PROG)
    if runs is None:
        return 2
    if args.against and args.against not in {r["strategy"] for r in runs}:
        print(f"{PROG}: error: --against {args.against}: no run of that strategy in these folders", file=sys.stderr)
        return 2
    print(markdown(runs, args.against), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
