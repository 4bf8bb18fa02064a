"""--jobs: runs spread over worker processes give what one process gives."""

import json

import pytest

from benchmarks import compare


TINY = ["--epochs", "1", "--n-experiences", "3", "--train-per-class", "20", "--test-per-class", "8", "--quiet", "--no-plots",
        "--strategies", "naive,m2kd", "--seeds", "0,1", "--mem-size", "0"]


def runs(out):
    return [(r["strategy"], r["seed"], r["accuracy_matrix"]) for r in json.loads((out / "results.json").read_text())["runs"]]


def test_two_jobs_give_the_results_of_one_bit_for_bit_in_the_same_order(tmp_path):
    assert compare.main([*TINY, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    assert compare.main([*TINY, "--out", str(tmp_path / "two"), "--jobs", "2", "--threads", "2"]) == 0
    one, two = runs(tmp_path / "one"), runs(tmp_path / "two")
    assert [r[:2] for r in one] == [("naive", 0), ("m2kd", 0), ("naive", 1), ("m2kd", 1)]
    assert one == two


def test_stopped_jobs_resume_with_another_number_of_jobs(tmp_path, capsys):
    """--stop-after stops every run after that many experiences; the resumed
    invocation (here in one process) finishes them as if never stopped."""
    args = [*TINY, "--out", str(tmp_path / "split"), "--checkpoint", str(tmp_path / "ckpt")]
    assert compare.main([*args, "--jobs", "2", "--threads", "2", "--stop-after", "2"]) == 0
    assert "stopped 4 run(s) after 2 experience(s) each" in capsys.readouterr().out
    sides = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "ckpt").glob("*-seed*.json")}
    assert sorted(sides) == ["m2kd-seed0", "m2kd-seed1", "naive-seed0", "naive-seed1"]
    assert all(len(s["accuracy_matrix"]) == 2 and len(s["experience_cpu_s"]) == 2 for s in sides.values())
    assert compare.main([*args, "--resume", "--threads", "1"]) == 0
    assert compare.main([*TINY, "--out", str(tmp_path / "straight"), "--threads", "1"]) == 0
    assert runs(tmp_path / "split") == runs(tmp_path / "straight")


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_job_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert compare.main([*TINY, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_jobs_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert compare.main([*TINY, "--out", str(tmp_path), "--jobs", "2"]) == 2
    assert "--jobs does not combine with torchrun" in capsys.readouterr().err
