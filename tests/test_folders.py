"""Output and checkpoint folders: nothing of the user's is deleted, nothing
trained is lost, two runners never share a folder (issue 26, items 1-3)."""

import fcntl
import json
import os

import pytest

from benchmarks import compare, merge

TINY = ["--epochs", "1", "--n-experiences", "2", "--train-per-class", "20", "--test-per-class", "8", "--quiet", "--no-plots",
        "--strategies", "naive", "--seeds", "0"]


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty"),
    ("   ", "--out is empty"),
    (".", "is the current, home or root folder"),
    ("/", "is the current, home or root folder"),
])
def test_an_empty_or_shared_out_is_refused(out, message, capsys):
    assert compare.main([*TINY, "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert compare.main([*TINY, "--out", str(tmp_path / "o"), "--resume", "--overwrite"]) == 2
    assert "pass one of the two" in capsys.readouterr().err


def test_a_checkpoint_folder_in_use_is_refused_and_left_alone(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    inflight = ckpt / ".naive-seed0.ckpt.m2kd-abcd1234.tmp"
    inflight.write_text("another runner is writing this")
    with open(ckpt / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert compare.main([*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--resume"]) == 2
    assert "another process is writing to" in capsys.readouterr().err
    assert inflight.read_text() == "another runner is writing this"


def test_a_read_only_out_with_an_old_lock_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """The check creates a real file: an old lock file, opened for appending,
    used to pass it on a read-only folder (simulated: the tests may run as root)."""
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()
    (out / ".lock").write_text("")
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, out):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert compare.main([*TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not writable (Permission denied)" in err and err.count("\n") == 1
    assert not (out / "results.json").exists()


def test_a_failed_results_write_keeps_the_trained_run_and_says_where(tmp_path, capsys, monkeypatch):
    from benchmarks import report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_all", full_disk)
    ckpt = tmp_path / "ckpt"
    assert compare.main([*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    kept = ckpt / f"results-{os.getpid()}.json"
    assert f"the 1 finished runs are in {kept}" in err
    assert json.loads(kept.read_text())["runs"][0]["strategy"] == "naive"


def test_overwrite_keeps_the_old_results_until_a_new_run_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert compare.main([*TINY, "--out", str(out)]) == 0
    before = (out / "results.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_one", interrupted)
    assert compare.main([*TINY, "--out", str(out), "--overwrite", "--seeds", "1"]) == 130
    assert (out / "results.json").read_text() == before


def test_merge_refuses_an_out_another_process_holds(tmp_path, capsys):
    source = tmp_path / "run"
    assert compare.main([*TINY, "--out", str(source)]) == 0
    target = tmp_path / "merged"
    target.mkdir()
    with open(target / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert merge.main(["--out", str(target), str(source)]) == 2
    assert "another process is writing to" in capsys.readouterr().err
    assert merge.main(["--out", str(target), str(source)]) == 0
    assert merge.main(["--out", str(target), str(source)]) == 2  # results there already
    assert "already holds results" in capsys.readouterr().err
    assert merge.main(["--out", str(target), str(source), "--overwrite"]) == 0
