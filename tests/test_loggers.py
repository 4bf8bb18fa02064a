"""--loggers: Avalanche's own loggers receive the runner's per-experience metrics."""

import csv
import json

import pytest

from benchmarks import compare

TINY = ["--epochs", "1", "--n-experiences", "3", "--train-per-class", "20", "--test-per-class", "8", "--quiet", "--no-plots",
        "--strategies", "naive", "--seeds", "0"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("loggers")
    assert compare.main([*TINY, "--out", str(out), "--loggers", "csv,tensorboard,text"]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    return out / "logs" / "naive-seed0", run


def test_csv_holds_the_accuracy_matrix(logged):
    folder, run = logged
    rows = list(csv.DictReader(open(folder / "eval_results.csv")))
    got = {(int(r["training_exp"]), int(r["eval_exp"])): float(r["eval_accuracy"]) for r in rows}
    matrix = run["accuracy_matrix"]
    assert len(got) == 9
    assert all(got[(i, j)] == pytest.approx(matrix[i][j], abs=5e-5) for i in range(3) for j in range(3))


def test_tensorboard_holds_the_average_incremental_accuracy_per_experience(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, run = logged
    events = EventAccumulator(str(folder))
    events.Reload()
    average = [e.value for e in events.Scalars("IncrementalAccuracy/average")]
    seen = run["metrics"]["seen_accuracy"]
    assert average == pytest.approx([sum(seen[: i + 1]) / (i + 1) for i in range(3)], abs=1e-6)
    assert (folder / "log.txt").read_text().count("IncrementalAccuracy/average") == 3


def test_an_unknown_logger_is_a_one_line_error(tmp_path, capsys):
    assert compare.main([*TINY, "--out", str(tmp_path), "--loggers", "csv,mlflow"]) == 2
    err = capsys.readouterr().err
    assert "unknown logger mlflow; choose from text, csv, tensorboard, wandb" in err and err.count("\n") == 1


def test_a_missing_logger_package_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert compare.main([*TINY, "--out", str(tmp_path), "--loggers", "tensorboard"]) == 2
    assert "pip install 'avalanche-m2kd[tensorboard]'" in capsys.readouterr().err
