"""The budget study reads stopped runs' side files and picks the smallest budget."""

import json

from benchmarks.progress import read_run
from benchmarks.studies import budget


def _folder(tmp_path, epochs, strategy, rows, sizes=(10, 10, 10)):
    folder = tmp_path / f"e{epochs}-{strategy}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"epochs": epochs, "milestones": [1], "precision": "bf16"}))
    (folder / f"{strategy}-seed0.json").write_text(json.dumps(
        {"elapsed_s": 1.0, "experience_s": [60.0] * len(rows), "experience_cpu_s": [120.0] * len(rows),
         "accuracy_matrix": rows, "test_sizes": list(sizes)}))
    return folder


def test_seen_class_accuracy_per_step_and_the_smallest_budget_within_tolerance(tmp_path):
    protocol = [[0.9, 0, 0], [0.6, 0.8, 0], [0.5, 0.6, 0.7]]  # seen: 0.90, 0.70, 0.60
    close = [[0.88, 0, 0], [0.58, 0.76, 0], [0.46, 0.58, 0.68]]  # 0.88, 0.67, 0.5733: within 3 points
    far = [[0.80, 0, 0], [0.6, 0.8, 0], [0.5, 0.6, 0.7]]  # step 1 ten points short
    runs = [r for e, rows in ((70, protocol), (45, close), (30, far)) for r in read_run(_folder(tmp_path, e, "icarl", rows))]
    by_epochs = {r["epochs"]: r for r in runs}
    assert [round(a, 4) for a in by_epochs[45]["accuracy"]] == [0.88, 0.67, 0.5733]
    assert by_epochs[30]["cpu_s"] == [120.0] * 3
    assert budget.choose(runs, 3, 4.0) == {"icarl": 45, "all": 45}
    assert budget.choose(runs, 3, 2.0) == {"icarl": 70, "all": 70}
    assert budget.choose(runs, 3, 10.0) == {"icarl": 30, "all": 30}


def test_every_strategy_must_agree_and_a_short_run_is_left_out(tmp_path):
    good = [[0.9, 0, 0], [0.6, 0.8, 0], [0.5, 0.6, 0.7]]
    runs = [
        *read_run(_folder(tmp_path, 70, "lwf", good)),
        *read_run(_folder(tmp_path, 30, "lwf", good)),
        *read_run(_folder(tmp_path, 70, "icarl", good)),
        *read_run(_folder(tmp_path, 30, "icarl", [[0.7, 0, 0], [0.5, 0.6, 0], [0.4, 0.5, 0.6]])),
        *read_run(_folder(tmp_path, 45, "icarl", [[0.9, 0], [0.6, 0.8]], sizes=(10, 10))),  # two steps only
    ]
    assert budget.choose(runs, 3, 4.0) == {"lwf": 30, "icarl": 70, "all": 70}
    partial = [r for r in runs if r["strategy"] == "lwf"] + read_run(_folder(tmp_path, 90, "joint", [[0.9, 0], [0.6, 0.8]], sizes=(10, 10)))
    assert budget.choose(partial, 3, 4.0) == {"lwf": 30, "joint": None, "all": None}  # joint has no budget through step 3
    text = budget.markdown(runs, 3, budget.choose(runs, 3, 4.0), 4.0)
    assert "| icarl | 30 | 1 | 70.0 | 55.0 | 50.0 | 2.0 / 2.0 / 2.0 | +20.0 |" in text
