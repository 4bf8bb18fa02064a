"""Long runs read while they run: what their checkpoint side files measured so
far, and paired differences on the steps two runs of a seed both finished."""

import json

import pytest

from benchmarks import progress


def _run(folder, strategy, seed, rows, cpu_s=3600.0):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"epochs": 45, "milestones": [31, 40], "precision": "bf16", "n_experiences": 3}))
    (folder / f"{strategy}-seed{seed}.json").write_text(json.dumps(
        {"elapsed_s": 1.0, "experience_s": [1.0] * len(rows), "experience_cpu_s": [cpu_s] * len(rows),
         "accuracy_matrix": rows, "test_sizes": [10] * 3}))


def test_the_table_and_the_pairs_cover_only_the_steps_measured(tmp_path, capsys):
    a, b = tmp_path / "s0", tmp_path / "s1"
    _run(a, "lwf", 0, [[0.9, 0, 0], [0.2, 0.8, 0], [0.1, 0.1, 0.9]])  # seen: 0.9, 0.5, 0.3667
    _run(a, "m2kd-bce", 0, [[0.8, 0, 0], [0.6, 0.6, 0]])  # seen: 0.8, 0.6 (two steps so far)
    _run(b, "m2kd-bce", 1, [[0.7, 0, 0]])  # no lwf at seed 1 yet: not paired
    runs = progress.read_run(a) + progress.read_run(b)
    pairs = progress.paired(runs, "lwf")
    assert len(pairs) == 1 and pairs[0]["strategy"] == "m2kd-bce" and pairs[0]["steps"] == 2
    assert round(pairs[0]["mean"], 6) == 0.0 and round(pairs[0]["last"], 6) == 10.0  # (0.8+0.6)/2 - (0.9+0.5)/2; 0.6 - 0.5
    assert progress.main([str(a), str(b), "--against", "lwf"]) == 0
    out = capsys.readouterr().out
    assert "| lwf | 0 | 3/3 | 90.0 / 50.0 / 36.7 | 58.9 | 3.0 | 0.0 |" in out
    assert "| m2kd-bce | 0 | 2/3 | 80.0 / 60.0 | 70.0 | 2.0 | 1.0 |" in out
    assert "| m2kd-bce | 1 | 1/3 | 70.0 | 70.0 | 1.0 | 2.0 |" in out
    assert "Core-hours left for these runs: about 3.0" in out
    assert pairs[0]["per_step"] == pytest.approx([-10.0, 10.0])
    assert pairs[0]["per_group"] == pytest.approx([40.0, -20.0])  # after step 2: 0.6 - 0.2 on the first classes, 0.6 - 0.8 on the second
    assert "| m2kd-bce | 0 | 2 | -10.0 / +10.0 | +0.0 | +10.0 | +40.0 / -20.0 |" in out


def test_hours_left_prices_the_steps_left_at_the_steps_after_the_first():
    run = {"accuracy": [0.9, 0.5], "cpu_s": [600.0, 1800.0], "steps_total": 10}
    assert progress.hours_left(run) == 8 * 1800 / 3600  # the teacher-free first step is left out
    assert progress.hours_left(dict(run, accuracy=[0.9], cpu_s=[600.0])) == 9 * 600 / 3600
    assert progress.hours_left(dict(run, accuracy=[], cpu_s=[])) is None
    assert progress.hours_left(dict(run, steps_total=None)) is None


def test_hours_left_follows_steps_that_grow_and_averages_steps_that_do_not():
    growing = {"accuracy": [0.9, 0.8, 0.7, 0.6], "cpu_s": [600.0, 1000.0, 1100.0, 1200.0], "steps_total": 10}
    # steps 4..9 along 1000 + 100 (k - 1): 1300 .. 1800 s
    assert progress.hours_left(growing) == pytest.approx(sum(1000 + 100 * (k - 1) for k in range(4, 10)) / 3600)
    falling = dict(growing, cpu_s=[600.0, 1300.0, 1200.0, 1100.0])
    assert progress.hours_left(falling) == pytest.approx(6 * 1200 / 3600)
    unrecorded = dict(growing, cpu_s=[None, None, 1100.0, 1200.0])  # resumed past steps a side file lacked
    assert progress.hours_left(unrecorded) == pytest.approx(sum(1100 + 100 * (k - 2) for k in range(4, 10)) / 3600)


def test_bad_folders_and_an_unknown_reference_end_in_one_line(tmp_path, capsys):
    assert progress.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    _run(tmp_path / "s0", "lwf", 0, [[0.9, 0, 0]])
    assert progress.main([str(tmp_path / "s0"), "--against", "icarl"]) == 2
    assert "--against icarl: no run of that strategy" in capsys.readouterr().err
