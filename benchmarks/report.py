"""Writing the runner's outputs: JSON, CSV, a Markdown summary and plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from avalanche_m2kd.checkpoint import atomic_write

# (key in a run's metrics, column title, higher is better, shown in percent)
SUMMARY_COLUMNS = [
    ("average_incremental_accuracy", "Avg. incremental acc.", True),
    ("last_accuracy", "Last acc.", True),
    ("forgetting", "Forgetting", False),
    ("backward_transfer", "BWT", True),
    ("old_last", "Old acc. (last)", True),
    ("new_last", "New acc. (last)", True),
]
UNRANKED = {"joint"}  # the upper bound is shown but not ranked


def save_figure(fig, path: Path) -> None:
    """``fig.savefig`` through a temporary file and a rename: a kill never leaves a partial PNG."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (a crash never leaves a half-written file)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_benchmark(out: str | Path, stem: str, document: dict, text: str) -> None:
    """A benchmark's ``stem.json`` (``document``) and ``stem.md`` (``text``) in
    ``out``, written atomically; the Markdown is printed too."""
    out = Path(out)
    write_atomic(out / f"{stem}.json", json.dumps(document, indent=1))
    write_atomic(out / f"{stem}.md", text)
    print(text)


def run_scalars(run: dict) -> Dict[str, float]:
    m = run["metrics"]
    return {
        "average_incremental_accuracy": m["average_incremental_accuracy"],
        "last_accuracy": m["last_accuracy"],
        "forgetting": m["forgetting"],
        "backward_transfer": m["backward_transfer"],
        "old_last": m["old_accuracy"][-1],
        "new_last": m["new_accuracy"][-1],
        "wall_time_s": run["wall_time_s"],
    }


def aggregate(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Per strategy and metric: mean, sample std (0 with one seed) and count."""
    by_strategy: Dict[str, List[dict]] = {}
    for run in runs:
        by_strategy.setdefault(run["strategy"], []).append(run_scalars(run))
    out: Dict[str, Dict[str, dict]] = {}
    for name, rows in by_strategy.items():
        out[name] = {}
        for key in rows[0]:
            values = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
            if values.size == 0:
                out[name][key] = {"mean": None, "std": None, "n": 0}
                continue
            std = float(values.std(ddof=1)) if values.size > 1 else 0.0
            out[name][key] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return out


CLAIMS = [
    ("m2kd", "naive"),
    ("m2kd", "lwf"),
    ("m2kd", "m2kd-last"),
    ("m2kd", "m2kd-noaux"),
    ("m2kd-last", "lwf"),
    ("m2kd-last-noaux", "lwf"),
    ("m2kd-last", "m2kd-last-noaux"),
    ("m2kd-last-probe", "m2kd-last"),
    ("m2kd-last-ownrng", "m2kd-last-noaux"),  # code from 6c03b71 (auxiliary heads on their own random stream), so named by benchmarks.merge
    ("m2kd-last-probe-ownrng", "m2kd-last-noaux"),
    ("m2kd-last-ownrng", "m2kd-last-probe-ownrng"),
    ("m2kd-probe", "m2kd"),
    ("m2kd-icarl", "icarl"),
    ("m2kd-icarl", "m2kd-icarl-last"),
    ("m2kd-icarl", "m2kd-icarl-noaux"),
    ("m2kd-icarl-informed", "m2kd-icarl"),
    ("m2kd-icarl-informed", "m2kd-icarl-last"),
    ("m2kd-icarl-last", "icarl"),
    ("m2kd-icarl-last", "m2kd-icarl-last-noaux"),
    ("m2kd-icarl-last-noaux", "icarl"),
    ("m2kd-icarl-packnet", "m2kd-icarl"),  # a --m2kd-store packnet run, so named by benchmarks.merge
    ("m2kd-bce", "lwf"),
    ("m2kd-bce", "m2kd-bce-last"),
    ("m2kd-bce", "m2kd-bce-noaux"),
    ("m2kd-bce-last", "m2kd-bce-last-noaux"),
    ("m2kd-bce", "m2kd-bce-last-noaux"),
    ("m2kd-bce-last-noaux", "lwf"),
    ("m2kd-bce-informed", "m2kd-bce"),
    ("m2kd-bce-informed", "m2kd-bce-last"),
    ("m2kd-bce", "m2kd-bce-icarlhead"),
]
"""(method, baseline) pairs whose per-seed differences the report shows when both ran."""
ED_CLAIMS = (
    ("ed", "kd"), ("ed", "mtkd"), ("ed", "ce"), ("mtkd", "kd"),
    ("ed-full", "mtkd"), ("ed-full", "ed"), ("ed-1t", "ed"), ("ed-seq", "ed"), ("ed-mse", "ed"),
)
"""The same for ``benchmarks.studies.ed_kd`` (its runs hold ``method`` and ``top1``)."""
PAIRED_METRICS = ("average_incremental_accuracy", "last_accuracy")


def paired_stats(diffs: List[float]) -> dict:
    """Per-seed differences, their mean, sample std (0 for one seed) and wins."""
    return {
        "per_seed": diffs,
        "mean": float(np.mean(diffs)),
        "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
        "wins": sum(d > 0 for d in diffs),
    }


def paired_table(values: Dict[tuple, float], pairs) -> List[dict]:
    """``values[(name, seed)]`` compared pair by pair on the seeds both ran:
    ``{"method", "baseline", "seeds", **paired_stats}`` per pair that ran."""
    out = []
    for method, baseline in pairs:
        seeds = sorted(s for (n, s) in values if n == method and (baseline, s) in values)
        if seeds:
            out.append({"method": method, "baseline": baseline, "seeds": seeds,
                        **paired_stats([values[(method, s)] - values[(baseline, s)] for s in seeds])})
    return out


def paired_differences(runs: List[dict], pairs=CLAIMS, metrics=PAIRED_METRICS) -> List[dict]:
    """For each pair of strategies that both ran on some seeds: per metric,
    :func:`paired_table`'s statistics of ``metric(method) - metric(baseline)``."""
    scalars = {(r["strategy"], r["seed"]): run_scalars(r) for r in runs}
    rows: Dict[tuple, dict] = {}
    for key in metrics:
        for row in paired_table({k: v[key] for k, v in scalars.items()}, pairs):
            entry = rows.setdefault((row["method"], row["baseline"]), {k: row[k] for k in ("method", "baseline", "seeds")})
            entry[key] = {k: row[k] for k in ("per_seed", "mean", "std", "wins")}
    return list(rows.values())


def paired_markdown(rows: List[dict]) -> str:
    if not rows:
        return ""
    lines = [
        "",
        "Paired differences on the same seeds (method minus baseline, percentage points; per seed, then mean ± std, wins):",
        "",
        "| Method | Baseline | Seeds | Avg. incremental acc. | Last acc. |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key in PAIRED_METRICS:
            d = r[key]
            per = ", ".join(f"{v * 100:+.1f}" for v in d["per_seed"])
            cells.append(f"{per} → {d['mean'] * 100:+.1f} ± {d['std'] * 100:.1f} ({d['wins']}/{len(r['seeds'])})")
        lines.append(f"| {r['method']} | {r['baseline']} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(stat: dict, percent: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    scale = 100.0 if percent else 1.0
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def summary_table(summary: Dict[str, Dict[str, dict]]) -> str:
    """Every strategy's mean ± std of each summary column; the best ranked value in bold."""
    names = list(summary)
    header = ["Strategy"] + [c[1] for c in SUMMARY_COLUMNS] + ["Time (s)", "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for key, _, higher in SUMMARY_COLUMNS:
        ranked = [(summary[n][key]["mean"], n) for n in names if n not in UNRANKED and summary[n][key]["mean"] is not None]
        if ranked:
            target = max(v for v, _ in ranked) if higher else min(v for v, _ in ranked)
            best[key] = {n for v, n in ranked if round(v * 100, 1) == round(target * 100, 1)}
    for n in names:
        cells = [n]
        for key, _, _ in SUMMARY_COLUMNS:
            text = _fmt(summary[n][key])
            cells.append(f"**{text}**" if n in best.get(key, set()) else text)
        cells.append(_fmt(summary[n]["wall_time_s"], percent=False))
        cells.append(str(summary[n]["wall_time_s"]["n"]))  # a std over one seed is 0.0, not agreement
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: Dict[str, Dict[str, dict]], title: str, notes: List[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines.append(summary_table(summary))
    lines.append(
        "Accuracies in %, mean ± std over the seeds counted in the last column; forgetting and BWT in percentage points; best ranked value in bold "
        "(higher is better, except forgetting); `joint` is the upper bound and is not ranked."
    )
    return "\n".join(lines) + "\n"


def compact_table(runs: List[dict]) -> str:
    """The results tables of the README and docs/results.md: per strategy,
    the seeds, the headline metrics, the snapshot memory and the minutes per run."""
    summary = aggregate(runs)
    lines = [
        "| strategy | seeds | avg. incremental acc. | last acc. | forgetting | old (last) | new (last) | snapshots held (MB) | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, stats in summary.items():
        mine = [r for r in runs if r["strategy"] == name]
        seeds = ", ".join(str(r["seed"]) for r in mine)
        held = [round((r.get("snapshot_bytes") or {}).get("held", 0) / 1e6, 1) for r in mine]
        held = [] if not any(held) else held[:1] if len(set(held)) == 1 else held  # per seed where they differ
        one = len(mine) == 1
        cells = [_fmt(stats[k]).split(" ± ")[0] if one else _fmt(stats[k])
                 for k in ("average_incremental_accuracy", "last_accuracy", "forgetting", "old_last", "new_last")]
        minutes = round(stats["wall_time_s"]["mean"] / 60)
        lines.append(f"| `{name}` | {seeds} | " + " | ".join(cells) + f" | {' / '.join(f'{h:.1f}' for h in held)} | {minutes} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs: List[dict]) -> None:
    fields = ["strategy", "seed"] + [c[0] for c in SUMMARY_COLUMNS] + ["wall_time_s", "seen_accuracy", "snapshot_bytes"]
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for run in runs:
                row = {"strategy": run["strategy"], "seed": run["seed"], **run_scalars(run)}
                row["seen_accuracy"] = " ".join(f"{v:.4f}" for v in run["metrics"]["seen_accuracy"])
                row["snapshot_bytes"] = (run.get("snapshot_bytes") or {}).get("held", "")
                writer.writerow(row)

    atomic_write(path, write)


def write_plots(out: Path, runs: List[dict]) -> List[Path]:
    """accuracy_curve.png, accuracy_matrices.png and old_new.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["strategy"] for r in runs))
    grouped = {n: [r for r in runs if r["strategy"] == n] for n in names}
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        curves = np.array([r["metrics"]["seen_accuracy"] for r in grouped[n]]) * 100
        steps = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(axis=0), curves.std(axis=0)
        ax.plot(steps, mean, marker="o", label=n, linestyle="--" if n in UNRANKED else "-")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("experience (training step)")
    ax.set_ylabel("accuracy on all classes seen so far (%)")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    paths.append(out / "accuracy_curve.png")
    save_figure(fig, paths[-1])
    plt.close(fig)

    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        m = np.array([r["accuracy_matrix"] for r in grouped[n]], dtype=float).mean(axis=0) * 100
        t = m.shape[0]
        m = np.where(np.tril(np.ones_like(m[:, :t], dtype=bool)), m[:, :t], np.nan)
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] < 60 else "k")
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("evaluated experience", fontsize=8)
        ax.set_ylabel("after training", fontsize=8)
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (%)")
    paths.append(out / "accuracy_matrices.png")
    save_figure(fig, paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, n in zip(axes.flat, names):
        old = np.array([r["metrics"]["old_accuracy"] for r in grouped[n]], dtype=float) * 100
        new = np.array([r["metrics"]["new_accuracy"] for r in grouped[n]], dtype=float) * 100
        steps = np.arange(1, new.shape[1] + 1)
        ax.plot(steps[1:], old[:, 1:].mean(axis=0), marker="o", label="old classes")
        ax.plot(steps, new.mean(axis=0), marker="s", label="new classes")
        ax.set_title(n, fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.supxlabel("experience")
    fig.supylabel("accuracy (%)")
    fig.tight_layout()
    paths.append(out / "old_new.png")
    save_figure(fig, paths[-1])
    plt.close(fig)
    return paths


def write_all(out: Path, document: dict, title: str, notes: List[str], plots: bool = True) -> None:
    """results.json (with the aggregated summary), results.csv, summary.md, plots."""
    runs = document["runs"]
    document["summary"] = aggregate(runs) if runs else {}
    document["paired"] = paired_differences(runs) if runs else []
    write_atomic(out / "results.json", json.dumps(document, indent=1))
    if not runs:
        return
    write_csv(out / "results.csv", runs)
    write_atomic(out / "summary.md", summary_markdown(document["summary"], title, notes) + paired_markdown(document["paired"]))
    if plots:
        write_plots(out, runs)


# -- generated tables in Markdown files -------------------------------------------------
BLOCK = re.compile(r"(<!-- results (?P<folder>\S+) (?P<kind>[\w-]+)(?P<options>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
"""A generated table: ``<!-- results FOLDER KIND [strategies=a,b] [seeds=0,1] -->`` ... ``<!-- /results -->``."""


def stage_top1_cell(runs: List[dict]) -> str:
    """One method's top-1 on each stage's classes, mean over its runs ("a / b / c",
    in %); "—" when a run predates ``top1_per_stage``."""
    staged = [r["top1_per_stage"] for r in runs if "top1_per_stage" in r]
    if not runs or len(staged) < len(runs):
        return "—"
    return " / ".join(f"{100 * a:.1f}" for a in np.mean(staged, axis=0))


def ed_table(runs: List[dict]) -> str:
    """ED against distillation: each method's top-1, mean ± std over seeds, and
    its top-1 on each stage's classes."""
    lines = ["| method | top-1 (%) | on each stage's classes (%) | seeds |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        acc = [100 * r["top1"] for r in mine]
        std = float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0
        lines.append(f"| {method} | {np.mean(acc):.1f} ± {std:.1f} | {stage_top1_cell(mine)} | {len(acc)} |")
    return "\n".join(lines) + "\n"


def ed_paired_table(runs: List[dict]) -> str:
    """ED's claims and ablation steps as paired top-1 differences (points)."""
    lines = ["| method | baseline | per seed | mean ± std | wins |", "|---|---|---|---|---|"]
    for row in paired_table({(r["method"], r["seed"]): 100 * r["top1"] for r in runs}, ED_CLAIMS):
        per = ", ".join(f"{d:+.1f}" for d in row["per_seed"])
        lines.append(f"| {row['method']} | {row['baseline']} | {per} | {row['mean']:+.1f} ± {row['std']:.1f} | {row['wins']}/{len(row['seeds'])} |")
    return "\n".join(lines) + "\n"


TABLES = {
    "ed": ed_table,
    "ed-paired": ed_paired_table,
    "compact": lambda runs: compact_table(runs),
    "summary": lambda runs: summary_table(aggregate(runs)),
    "paired": lambda runs: paired_markdown(paired_differences(runs)).lstrip("\n"),
}


def render_block(folder: str, kind: str, options: str, root: Path) -> str:
    """The table ``kind`` of the runs in ``root/folder/results.json``
    (``strategies=a,b``: only those, in that order; ``seeds=0,1``: only those
    seeds, so that a table can hold the seeds every strategy has finished)."""
    if kind not in TABLES:
        raise ValueError(f"unknown table kind {kind!r} for {folder}; use one of {', '.join(TABLES)}")
    runs = json.loads((root / folder / "results.json").read_text())["runs"]
    name = "method" if kind.startswith("ed") else "strategy"
    for option in options.split():
        key, _, value = option.partition("=")
        if key not in ("strategies", "seeds") or not value:
            raise ValueError(f"unknown table option {option!r} for {folder}; use strategies=a,b or seeds=0,1")
        if key == "seeds":
            try:
                seeds = [int(v) for v in value.split(",")]
            except ValueError:
                raise ValueError(f"table option {option!r} for {folder}: seeds are integers, e.g. seeds=0,1") from None
            runs = [r for r in runs if r["seed"] in seeds]
            continue
        order = value.split(",")
        runs = sorted((r for r in runs if r[name] in order), key=lambda r: (order.index(r[name]), r["seed"]))
    if not runs:
        raise ValueError(f"{folder}: no runs to tabulate")
    return TABLES[kind](runs)


def update_markdown(path: Path, root: Path) -> str:
    """``path``'s text with every generated table rendered again from its results file."""
    text = path.read_text()
    return BLOCK.sub(lambda m: m.group(1) + render_block(m["folder"], m["kind"], m["options"], root) + m.group(6), text)


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Render the results tables of Markdown files from their results.json files.")
    p.add_argument("--markdown", nargs="+", required=True, help="Markdown files with <!-- results FOLDER KIND --> blocks")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its results file")
    p.add_argument("--root", default=".", help="folder the blocks' results folders are relative to (default: .)")
    args = p.parse_args(argv)
    stale = []
    for name in args.markdown:
        path = Path(name)
        try:
            new = update_markdown(path, Path(args.root))
        except (OSError, ValueError, KeyError) as err:
            print(f"python -m benchmarks.report: error: {name}: {err}", file=sys.stderr)
            return 2
        if new != path.read_text():
            stale.append(name)
            if not args.check:
                write_atomic(path, new)
    if stale:
        print(("out of date: " if args.check else "updated: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
