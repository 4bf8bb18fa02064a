"""Resumes check what they resume; bad files and mismatched data end in one
line instead of a silently wrong result (issue 26, items 4 and 6)."""

import json

import numpy as np
import pytest

from avalanche_m2kd.datasets import DatasetError, load_dataset
from benchmarks import compare, merge

TINY = ["--epochs", "1", "--n-experiences", "2", "--quiet", "--no-plots", "--strategies", "naive", "--seeds", "0",
        "--mem-size", "0", "--model", "digits_cnn"]


def _npz(path, x_test_dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 6)
    x = rng.integers(0, 255, (len(y), 8, 8, 1), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[::2].astype(x_test_dtype), y_test=y[::2])
    return f"npz:{path}"


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_test_images_of_another_dtype_are_refused(tmp_path, dtype):
    with pytest.raises(DatasetError, match=f"training images are uint8 but test images are {np.dtype(dtype).name}"):
        load_dataset(_npz(tmp_path / "d.npz", dtype))


def test_a_resume_on_other_data_at_the_same_path_is_refused(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    args = [*TINY, "--dataset", data, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    assert compare.main([*args, "--stop-after", "1"]) == 0
    _npz(tmp_path / "d.npz", seed=1)  # the same file name, other pixels
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another configuration (data_fingerprint" in err and err.count("\n") == 1


def test_every_experience_records_its_code_version_and_another_one_is_warned(tmp_path, capsys, monkeypatch):
    args = [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    monkeypatch.setattr(compare, "code_version", lambda: "aaaa")
    assert compare.main([*args, "--stop-after", "1"]) == 0
    monkeypatch.setattr(compare, "code_version", lambda: "bbbb")
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 0
    assert "trained to experience 1 by code aaaa and continues with bbbb" in capsys.readouterr().err
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run["code_versions"] == ["aaaa", "bbbb"]


def test_a_side_file_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    args = [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    assert compare.main([*args, "--stop-after", "1"]) == 0
    (tmp_path / "c" / "naive-seed0.json").write_text(json.dumps({"elapsed_s": "an hour"}))
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not one the runner wrote" in err and err.count("\n") == 1


@pytest.mark.parametrize("damage, message", [
    (lambda run: run.update(accuracy_matrix=[[0.5]]), "accuracy matrix is not 2 x 2"),
    (lambda run: run["accuracy_matrix"][0].__setitem__(0, 7.0), "values outside [0, 1]"),
    (lambda run: run.update(seed="0"), "no strategy name or integer seed"),
    (lambda run: run.update(test_sizes=[1]), "does not give 2 test-set sizes"),
])
def test_merge_refuses_a_run_that_does_not_fit_the_protocol(tmp_path, capsys, damage, message):
    source = tmp_path / "run"
    assert compare.main([*TINY, "--out", str(source)]) == 0
    document = json.loads((source / "results.json").read_text())
    damage(document["runs"][0])
    (source / "results.json").write_text(json.dumps(document))
    assert merge.main(["--out", str(tmp_path / "m"), str(source)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("where, content", [("o/results.json", "[1, 2]"), ("o/results.json", '{"config": [], "runs": []}'),
                                            ("c/config.json", '"text"')])
def test_json_of_the_wrong_shape_is_one_line(tmp_path, capsys, where, content):
    args = [*TINY, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    assert compare.main([*args, "--stop-after", "1"]) == 0
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / where).write_text(content)
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not a" in err and err.count("\n") == 1


def test_a_side_file_that_disagrees_with_its_checkpoint_is_refused(tmp_path, capsys):
    """A checkpoint's progress is checked against its side file, not trusted as written."""
    args = [*TINY, "--n-experiences", "3", "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    assert compare.main([*args, "--stop-after", "2"]) == 0
    side = tmp_path / "c" / "naive-seed0.json"
    state = json.loads(side.read_text())
    side.write_text(json.dumps(dict(state, experience_s=[1.0, 2.0, 3.0])))
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 experiences but its side file 3" in err and err.count("\n") == 1
    # one behind: killed between the checkpoint and its side file; resumed, the missing time is None
    side.write_text(json.dumps(dict(state, experience_s=state["experience_s"][:1], experience_cpu_s=state["experience_cpu_s"][:1])))
    assert compare.main([*args, "--resume"]) == 0
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run["experience_s"][1] is None and len(run["experience_s"]) == 3


def test_records_a_side_file_lacks_stay_aligned_with_their_experiences(tmp_path, capsys):
    """A side file written before a record existed (here ``code_versions``) gives
    None for each experience it trained, so that the resumed experiences' entries
    land at their own positions, not at the front."""
    args = [*TINY, "--n-experiences", "3", "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")]
    assert compare.main([*args, "--stop-after", "2"]) == 0
    side = tmp_path / "c" / "naive-seed0.json"
    state = json.loads(side.read_text())
    del state["code_versions"]
    side.write_text(json.dumps(state))
    capsys.readouterr()
    assert compare.main([*args, "--resume"]) == 0
    assert "trained to experience 2 by code that was not recorded and continues with" in capsys.readouterr().err
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run["code_versions"][:2] == [None, None] and run["code_versions"][2] == compare.code_version()
    assert len(run["experience_s"]) == 3 and None not in run["experience_s"]
