"""Gather the finished runs of several runner folders into one results folder.

    python -m benchmarks.merge --out docs/results/b0-10 runs/b0-10-s0 runs/b0-10-s1
    python -m benchmarks.merge --out docs/results/b0-10 runs/full runs/packnet \\
        --rename packnet:m2kd-icarl=m2kd-icarl-packnet --skip runs/full:lwf

Long benchmarks run in pieces (a strategy or a seed at a time, across sessions,
sometimes at different commits). This checks that the folders ran the same
protocol (every configuration key but the ones in ``MERGE_INDEPENDENT``), then
writes what the runner writes: results.json, results.csv, summary.md with the
paired per-seed differences of every claim in ``benchmarks.report.CLAIMS``,
and the plots. Every run records the folder it came from and its code version.

A strategy that ran twice on one seed, or a folder whose M2KD runs used another
snapshot store, is refused until ``--rename`` or ``--skip`` says which is which.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import report
from .compare import CHECKPOINT_INDEPENDENT, OneLineParser, UsageError, check_own_folder, lock_folder, read_json

PROG = "python -m benchmarks.merge"
MERGE_INDEPENDENT = CHECKPOINT_INDEPENDENT + ("teacher_inference", "m2kd_store", "world_size", "batch_size_per_process")
"""Configuration keys that may differ between merged folders: which runs were
asked for, where the data lay, the device, and options that change speed but
not the method (``m2kd_store`` is checked on its own: see ``merge``)."""


def _folder_option(text: str, option: str) -> Tuple[str, str]:
    folder, sep, rest = text.rpartition(":")
    if not sep or not folder or not rest:
        raise UsageError(f"{option} {text!r}: expected FOLDER:{'OLD=NEW' if option == '--rename' else 'STRATEGY'}")
    return folder, rest


def _matches(given: str, folder: str) -> bool:
    """A folder named on an option by its path as given or by its last component."""
    return given == folder or given == Path(folder).name


def check_runs(doc: dict, folder: str) -> None:
    """Every run fits the folder's protocol: a strategy name, an integer seed,
    an n x n accuracy matrix of values in [0, 1] and n test-set sizes, with n
    the configuration's number of experiences."""
    config, runs = doc["config"], doc["runs"]
    n = config.get("n_experiences") if isinstance(config, dict) else None
    if not isinstance(n, int) or not isinstance(runs, list):
        raise UsageError(f"{folder}/results.json has no n_experiences or no list of runs; merge folders written by benchmarks.compare")
    for i, run in enumerate(runs):
        problem = None
        if not isinstance(run, dict) or not isinstance(run.get("strategy"), str) or not isinstance(run.get("seed"), int):
            problem = "no strategy name or integer seed"
        elif not (isinstance(run.get("accuracy_matrix"), list) and len(run["accuracy_matrix"]) == n
                  and all(isinstance(row, list) and len(row) == n for row in run["accuracy_matrix"])):
            problem = f"its accuracy matrix is not {n} x {n} (the protocol's {n} experiences)"
        elif not all(isinstance(v, (int, float)) and 0 <= v <= 1 for row in run["accuracy_matrix"] for v in row):
            problem = "its accuracy matrix holds values outside [0, 1]"
        elif not (isinstance(run.get("test_sizes"), list) and len(run["test_sizes"]) == n):
            problem = f"it does not give {n} test-set sizes"
        elif not isinstance(run.get("metrics"), dict):
            problem = "it has no metrics"
        if problem:
            raise UsageError(f"{folder}/results.json: run {i} does not fit the protocol ({problem}); leave that folder out or rerun it")


def merge(folders: Sequence[str], renames: Sequence[str] = (), skips: Sequence[str] = ()) -> dict:
    """The merged results document of ``folders`` (see the module docstring).

    ``renames``: ``FOLDER:OLD=NEW`` (the runs of ``OLD`` in ``FOLDER`` are named
    ``NEW``); ``skips``: ``FOLDER:STRATEGY`` (those runs are left out).
    """
    if not folders:
        raise UsageError("no folders to merge; name at least one runner output folder")
    rename_rules = []
    for text in renames:
        folder, pair = _folder_option(text, "--rename")
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"--rename {text!r}: expected FOLDER:OLD=NEW")
        rename_rules.append((folder, old, new))
    skip_rules = [_folder_option(text, "--skip") for text in skips]
    for given, *_ in rename_rules + [(f, s) for f, s in skip_rules]:
        if not any(_matches(given, f) for f in folders):
            raise UsageError(f"{given!r} in --rename/--skip is none of the folders given ({', '.join(folders)})")

    documents = [(f, read_json(Path(f) / "results.json", "results file")) for f in folders]
    for folder, doc in documents:
        if not isinstance(doc, dict) or not {"config", "runs"} <= set(doc):
            raise UsageError(f"{folder}/results.json is not a runner results file (no config or runs); "
                             "merge folders written by benchmarks.compare")
        check_runs(doc, folder)
    first_folder, first = documents[0]
    runs: List[dict] = []
    origin: Dict[Tuple[str, int], str] = {}
    sources = []
    for folder, doc in documents:
        keys = sorted((set(first["config"]) | set(doc["config"])) - set(MERGE_INDEPENDENT))
        if "data_fingerprint" not in first["config"] or "data_fingerprint" not in doc["config"]:
            keys = [k for k in keys if k != "data_fingerprint"]  # a folder older than data fingerprints
        for k in keys:
            if first["config"].get(k) != doc["config"].get(k):
                raise UsageError(
                    f"{folder} ran another protocol than {first_folder} ({k}: {doc['config'].get(k)!r} against "
                    f"{first['config'].get(k)!r}); merge only folders of one protocol"
                )
        names = {old: new for f, old, new in rename_rules if _matches(f, folder)}
        skipped = {s for f, s in skip_rules if _matches(f, folder)}
        store = doc["config"].get("m2kd_store")
        for run in doc["runs"]:
            name = run["strategy"]
            if name in skipped:
                continue
            if store != first["config"].get("m2kd_store") and name.startswith("m2kd") and name not in names:
                raise UsageError(
                    f"{folder} ran M2KD with --m2kd-store {store} ({first_folder}: {first['config'].get('m2kd_store')}); "
                    f"name its runs apart, e.g. --rename {folder}:{name}={name}-{store}"
                )
            merged = dict(run, strategy=names.get(name, name), source=folder,
                          code_version=doc.get("environment", {}).get("code_version"))
            key = (merged["strategy"], merged["seed"])
            if key in origin:
                raise UsageError(
                    f"{key[0]} seed {key[1]} is in {origin[key]} and in {folder}; keep one with "
                    f"--skip {folder}:{name}, or tell them apart with --rename {folder}:{name}=NEW"
                )
            origin[key] = folder
            runs.append(merged)
        sources.append({"folder": folder, "command": doc.get("command"), "code_version": doc.get("environment", {}).get("code_version"),
                        "m2kd_store": store})
    config = dict(first["config"])
    config["strategies"] = list(dict.fromkeys(r["strategy"] for r in runs))
    config["seeds"] = sorted({r["seed"] for r in runs})
    return {
        "format": "avalanche_m2kd.compare/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "class_order": first.get("class_order"),
        "sources": sources,
        "runs": runs,
    }


def notes(document: dict, command: str) -> List[str]:
    c = document["config"]
    lines = [
        f"model {c['model']}, {c['epochs']} epochs, batch {c['batch_size']}, {c['optimizer']} lr {c['lr']}"
        + (f" (sigmoid-loss methods {c['lr_sigmoid']})" if c.get("lr_sigmoid") else "") + f", {c['precision']}",
        f"memory {c['mem_size']} exemplars for every strategy that keeps one; class order {c['class_order']}; "
        f"seeds {', '.join(map(str, c['seeds']))}",
        f"merged with `{command}`",
    ]
    for s in document["sources"]:
        taken = sorted({f"{r['strategy']} {r['seed']}" for r in document["runs"] if r["source"] == s["folder"]})
        lines.append(f"from `{s['folder']}` (code {str(s['code_version'])[:7]}): {', '.join(taken) or 'nothing taken'}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="runner output folders (each with a results.json)")
    p.add_argument("--out", required=True, help="folder for the merged results")
    p.add_argument("--rename", action="append", default=[], metavar="FOLDER:OLD=NEW", help="name a folder's runs of OLD as NEW")
    p.add_argument("--skip", action="append", default=[], metavar="FOLDER:STRATEGY", help="leave a folder's runs of STRATEGY out")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        out = check_own_folder(args.out, "--out")
        if any(out.resolve() == Path(f).resolve() for f in args.folders):
            raise UsageError(f"--out {out} is one of the folders being merged; write the merge elsewhere")
        document = merge(args.folders, args.rename, args.skip)
        lock = lock_folder(out, "--out")  # noqa: F841 (held until exit: a runner cannot write there meanwhile)
        if (out / "results.json").is_file() and not args.overwrite:
            raise UsageError(f"{out} already holds results; pass --overwrite to replace them or choose another --out")
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    command = " ".join([PROG, *argv])
    document["command"] = [PROG, *argv]
    c = document["config"]
    report.write_all(out, document, f"{c['dataset']}, {c['n_experiences']} experiences (merged)", notes(document, command),
                     plots=not args.no_plots)
    print((out / "summary.md").read_text() if document["runs"] else f"no runs to merge; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
