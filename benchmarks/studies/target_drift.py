"""How far the older snapshots' targets are from the last one's (a diagnostic, not a test).

    python -m benchmarks.studies.target_drift runs/b0-10-ckpt/m2kd-icarl-seed0.ckpt \\
        runs/b0-10-free-ckpt/m2kd-bce-seed0.ckpt --dataset npz:data/cifar100.npz

M2KD differs from distilling from the last model only in the targets of the
older class groups: at step t, group k's targets come from snapshot k instead
of snapshot t-1. Where the two agree, "all snapshots" cannot change training.
For each finished M2KD run (a runner checkpoint with the full snapshot store),
this measures that difference at every step: the mean, over the classes c of
every group k < t-1, of ``|sigmoid(g_k(x)_c) - sigmoid(g_{t-1}(x)_c)|`` (the
sigmoid form's targets), over ``--images`` test images of every class (most
targets there are near 0 for both), over those of group k's own classes
(where its targets are large), and over those of the groups learned after k
and before t, which snapshot k never saw and the last teacher did; there, also
how often each teacher's target is above 0.5 (a confident "this is class c" on
an image of another class). Then the gap on the images of the classes being
learned at step t, which no teacher saw. These two are the images where
``old_targets="informed"`` hands group k to the last teacher. The same gaps are
measured at every auxiliary head the snapshots hold (multi-level distillation's
targets, sigmoid of each head's logits), since the heads' targets can differ
where the output's agree. Writes target_drift.json and target_drift.md to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from avalanche_m2kd import datasets, models
from avalanche_m2kd.snapshots import load_state_reshaped
from avalanche_m2kd.taps import AUX_ATTRIBUTE, FeatureTaps, attach_auxiliary_heads

from benchmarks import report
from benchmarks.compare import OneLineParser, UsageError

PROG = "python -m benchmarks.studies.target_drift"


def _snapshots(path: Path) -> tuple[dict, List[dict], List[List[int]]]:
    """The run's configuration, its snapshots (state dicts) and class groups."""
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint; pass a runner checkpoint (--checkpoint FOLDER/NAME-seedS.ckpt)")
    saved = torch.load(path, map_location="cpu", weights_only=True)  # the runner's checkpoints hold no code
    plugin = next((p["state"] for p in saved.get("plugins", []) if p.get("type") == "M2KDPlugin"), None)
    if plugin is None:
        raise UsageError(f"{path} holds no M2KD run; pass the checkpoint of an m2kd strategy")
    state = plugin["state"]
    store = state["snapshots"]
    if store.get("kind") != "full":
        raise UsageError(f"{path}: snapshot store {store.get('kind')!r}; only the full store keeps every snapshot exactly")
    return saved["meta"]["config"], store["snapshots"], [list(g) for g in state["groups"]]


_HEADS = AUX_ATTRIBUTE + ".heads."


@torch.no_grad()
def _targets(config: dict, state: dict, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One snapshot's sigmoid targets on ``images``: the output's (``"output"``)
    and each auxiliary head's, keyed by its tapped layer, computed as the
    strategy's teachers compute them (taps, then the model's own heads)."""
    fixed = state["head.weight"].shape[0] if "head.weight" in state else None
    net = models.create(config["model"], num_classes=fixed, in_channels=images.shape[1])
    # the heads' keys are m2kd_aux.heads.<layer, dots as "__">.<...>
    layers = sorted({k[len(_HEADS):].split(".")[0].replace("__", ".") for k in state if k.startswith(_HEADS)})
    if layers:
        attach_auxiliary_heads(net, layers, images[:1])
    load_state_reshaped(net, state).eval()
    taps = FeatureTaps(net, layers)
    out: Dict[str, List[torch.Tensor]] = {name: [] for name in ["output", *layers]}
    for chunk in images.split(500):
        with taps:
            out["output"].append(torch.sigmoid(net(chunk)))
        if layers:
            for layer, logits in zip(layers, getattr(net, AUX_ATTRIBUTE)(taps.features())):
                out[layer].append(torch.sigmoid(logits))
    return {name: torch.cat(parts) for name, parts in out.items()}


def _gaps(probs: List[torch.Tensor], groups: List[List[int]], last: int, labels: torch.Tensor) -> dict:
    """At the step whose last teacher is snapshot ``last``: the owners' gaps
    to it per older group, on every image, on the group's own images and on
    the later groups' images, with both teachers' mean targets there and their
    shares of targets above 0.5; and on the images of the classes being learned
    at that step (which neither teacher saw), the gap and both mean targets."""
    values: Dict[str, List[float]] = defaultdict(list)
    current = torch.isin(labels, torch.tensor(groups[last + 1]))
    for k, g in enumerate(groups[:last]):
        owner, newest = probs[k][:, g], probs[last][:, g]
        gap = (owner - newest).abs()
        mine = torch.isin(labels, torch.tensor(g))
        unseen = torch.isin(labels, torch.tensor([c for h in groups[k + 1 : last + 1] for c in h]))
        for name, value in [
            ("every_image", gap.mean()), ("own_images", gap[mine].mean()), ("owner_target_own_images", owner[mine].mean()),
            ("later_images", gap[unseen].mean()), ("owner_target_later_images", owner[unseen].mean()),
            ("last_target_later_images", newest[unseen].mean()),
            ("owner_share_above_half_later_images", (owner[unseen] > 0.5).float().mean()),
            ("last_share_above_half_later_images", (newest[unseen] > 0.5).float().mean()),
            ("current_images", gap[current].mean()), ("owner_target_current_images", owner[current].mean()),
            ("last_target_current_images", newest[current].mean()),
        ]:
            values[name].append(float(value))
    row = {name: float(np.mean(v)) for name, v in values.items()}
    for name in ("every_image", "own_images", "later_images"):
        row[f"per_group_{name}"] = values[name]
    return row


def drift(path: Path, images: torch.Tensor, labels: torch.Tensor) -> List[dict]:
    """Per step t >= 3 (1-based), the mean absolute difference between the
    owners' sigmoid targets and the last teacher's on the older groups: on
    every image, on the images of each group's own classes, and on those of
    the groups learned after it (with both teachers' mean targets there); the
    same for each auxiliary head under ``"aux"``."""
    config, snapshots, groups = _snapshots(path)
    targets = [_targets(config, state, images) for state in snapshots]
    levels = [name for name in targets[0] if name != "output"]
    rows = []
    for t in range(3, len(snapshots) + 1):  # at step t the teachers are snapshots 0..t-2
        row = {"step": t, "groups": t - 2, **_gaps([p["output"] for p in targets], groups, t - 2, labels)}
        row["aux"] = {name: _gaps([p[name] for p in targets], groups, t - 2, labels) for name in levels}
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="runner checkpoints of finished M2KD runs (full snapshot store)")
    p.add_argument("--dataset", required=True, help="the runs' data set (e.g. npz:data/cifar100.npz)")
    p.add_argument("--data-root")
    p.add_argument("--images", type=int, default=2000, help="test images drawn at random (seed 0); default 2000")
    p.add_argument("--out", default="results/target_drift")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        data = datasets.load_dataset(args.dataset, args.data_root)
        pick = np.random.RandomState(0).permutation(len(data.x_test))[: args.images]
        normalize = datasets.make_transforms(data)[1]  # the runner's evaluation transform
        images = torch.stack([normalize(torch.from_numpy(data.x_test[i])) for i in pick])
        labels = torch.from_numpy(data.y_test[pick]).long()
        results: Dict[str, List[dict]] = {c: drift(Path(c), images, labels) for c in args.checkpoints}
    except (UsageError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    names = list(results)
    lines = [f"# Older snapshots' targets against the last teacher's ({len(pick)} test images)", "",
             f"Command: `{' '.join([PROG, *argv])}`", "",
             "Mean |sigmoid target of the group's own snapshot − the last teacher's| over the older groups, "
             "on every image / on the images of the group's own classes (in brackets: the owner's mean target there) / "
             "on the images of the groups learned after it, which the owner never saw (in brackets: the owner's mean "
             "target there, then the last teacher's):", ""]
    header = ["| step | " + " | ".join(f"`{Path(n).parent.name}/{Path(n).stem}`" for n in names) + " |",
              "|---|" + "---|" * len(names)]

    def cell(r: dict) -> str:
        return (f"{r['every_image']:.3f} / {r['own_images']:.3f} ({r['owner_target_own_images']:.3f}) / "
                f"{r['later_images']:.3f} ({r['owner_target_later_images']:.3f}, {r['last_target_later_images']:.3f})")

    def confident(r: dict) -> str:
        return (f"{r['owner_share_above_half_later_images']:.3f}, {r['last_share_above_half_later_images']:.3f} / "
                f"{r['current_images']:.3f} ({r['owner_target_current_images']:.3f}, {r['last_target_current_images']:.3f})")

    def table(pick_level, show=cell) -> List[str]:
        rows = []
        for i in range(max(len(r) for r in results.values())):
            cells = [show(pick_level(results[n][i])) if i < len(results[n]) and pick_level(results[n][i]) else ""
                     for n in names]
            rows.append(f"| {i + 3} | " + " | ".join(cells) + " |")
        return rows

    lines += header + table(lambda row: row)
    lines += ["", "On the later groups' images, the share of the older groups' targets above 0.5, the owners' then the "
              "last teacher's; on the images of the classes being learned at the step (which no teacher saw), the mean "
              "gap (in brackets: the owners' mean target, then the last teacher's):", "",
              *header, *table(lambda row: row, confident)]
    for level in dict.fromkeys(name for r in results.values() for row in r for name in row["aux"]):
        lines += ["", f"The same at the auxiliary head on `{level}` (multi-level distillation's targets there):", "",
                  *header, *table(lambda row: row["aux"].get(level))]
    document = {"command": [PROG, *argv], "images": len(pick), "results": results}
    report.write_benchmark(args.out, "target_drift", document, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
