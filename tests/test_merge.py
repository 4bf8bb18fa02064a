"""benchmarks.merge: runs from several runner folders become one table, with
paired differences across folders, and only when the folders ran one protocol."""

import json

import pytest

from benchmarks import merge

CONFIG = {"dataset": "npz:x.npz", "n_experiences": 2, "class_order": "seed1993", "model": "resnet32_icarl", "epochs": 3,
          "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "lr_sigmoid": 2.0, "mem_size": 2000, "precision": "bf16",
          "m2kd_store": None, "preset": "p", "strategies": [], "seeds": [], "device": "cpu"}


def run(strategy, seed, avg, last=0.1):
    return {"strategy": strategy, "seed": seed, "wall_time_s": 60.0, "accuracy_matrix": [[0.5, 0.0], [0.4, 0.3]], "test_sizes": [10, 10],
            "metrics": {"average_incremental_accuracy": avg, "last_accuracy": last, "forgetting": 0.1,
                        "backward_transfer": -0.1, "old_accuracy": [None, 0.4], "new_accuracy": [0.5, 0.3],
                        "seen_accuracy": [0.5, last]}}


def folder(tmp_path, name, runs, code="a" * 40, **config):
    path = tmp_path / name
    path.mkdir()
    doc = {"config": dict(CONFIG, **config), "environment": {"code_version": code}, "command": ["x"], "runs": runs}
    (path / "results.json").write_text(json.dumps(doc))
    return str(path)


def test_runs_from_two_folders_are_paired_by_seed(tmp_path):
    a = folder(tmp_path, "a", [run("icarl", 0, 0.25), run("icarl", 1, 0.24)], code="1" * 40)
    b = folder(tmp_path, "b", [run("m2kd-icarl", 0, 0.28), run("m2kd-icarl", 1, 0.23)], code="2" * 40)
    out = tmp_path / "out"
    assert merge.main([a, b, "--out", str(out), "--no-plots"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [(r["strategy"], r["seed"], r["source"], r["code_version"][0]) for r in doc["runs"]] == [
        ("icarl", 0, a, "1"), ("icarl", 1, a, "1"), ("m2kd-icarl", 0, b, "2"), ("m2kd-icarl", 1, b, "2")]
    pair = next(p for p in doc["paired"] if (p["method"], p["baseline"]) == ("m2kd-icarl", "icarl"))
    assert pair["average_incremental_accuracy"]["per_seed"] == pytest.approx([0.03, -0.01])
    assert pair["average_incremental_accuracy"]["wins"] == 1
    assert doc["config"]["seeds"] == [0, 1] and doc["config"]["strategies"] == ["icarl", "m2kd-icarl"]
    summary = (out / "summary.md").read_text()
    assert "+3.0, -1.0 → +1.0 ± 2.8 (1/2)" in summary
    assert f"from `{b}` (code 2222222): m2kd-icarl 0, m2kd-icarl 1" in summary
    assert "| 60.0 ± 0.0 | 2 |" in summary  # wall time, then the number of seeds


def test_a_strategy_on_fewer_seeds_says_so(tmp_path):
    a = folder(tmp_path, "a", [run("icarl", 0, 0.25), run("icarl", 1, 0.24)])
    b = folder(tmp_path, "b", [run("m2kd-icarl", 0, 0.28)])
    out = tmp_path / "out"
    assert merge.main([a, b, "--out", str(out), "--no-plots"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip(" |")
            for line in (out / "summary.md").read_text().split("Paired")[0].splitlines() if line.startswith("| ") and "±" in line}
    assert rows == {"icarl": "2", "m2kd-icarl": "1"}


def test_another_protocol_is_refused_with_the_key_that_differs(tmp_path, capsys):
    a = folder(tmp_path, "a", [run("icarl", 0, 0.25)])
    b = folder(tmp_path, "b", [run("lwf", 0, 0.15)], mem_size=0, device="cuda", preset="other")
    assert merge.main([a, b, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mem_size: 0 against 2000" in err
    assert not (tmp_path / "out").exists()


def test_a_run_twice_on_one_seed_needs_skip_or_rename(tmp_path):
    a = folder(tmp_path, "a", [run("lwf", 0, 0.15), run("m2kd", 0, 0.2)])
    b = folder(tmp_path, "b", [run("lwf", 0, 0.14), run("m2kd-last", 0, 0.18)])
    with pytest.raises(merge.UsageError, match="lwf seed 0 is in .*a and in .*b; keep one with --skip"):
        merge.merge([a, b])
    kept = merge.merge([a, b], skips=["b:lwf"])
    assert [(r["strategy"], r["metrics"]["average_incremental_accuracy"]) for r in kept["runs"]] == [
        ("lwf", 0.15), ("m2kd", 0.2), ("m2kd-last", 0.18)]
    renamed = merge.merge([a, b], renames=[f"{b}:lwf=lwf-rerun"])
    assert [r["strategy"] for r in renamed["runs"]] == ["lwf", "m2kd", "lwf-rerun", "m2kd-last"]


def test_another_snapshot_store_must_be_named_apart(tmp_path):
    a = folder(tmp_path, "a", [run("m2kd-icarl", 0, 0.25)])
    b = folder(tmp_path, "b", [run("m2kd-icarl", 0, 0.24), run("naive", 1, 0.1)], m2kd_store="packnet")
    with pytest.raises(merge.UsageError, match="--m2kd-store packnet .* --rename .*b:m2kd-icarl=m2kd-icarl-packnet"):
        merge.merge([a, b])
    doc = merge.merge([a, b], renames=["b:m2kd-icarl=m2kd-icarl-packnet"])
    assert [r["strategy"] for r in doc["runs"]] == ["m2kd-icarl", "m2kd-icarl-packnet", "naive"]


@pytest.mark.parametrize("args, message", [
    (["missing"], "results.json"),
    (["a", "--rename", "a:lwf"], "expected FOLDER:OLD=NEW"),
    (["a", "--skip", "elsewhere:lwf"], "'elsewhere' in --rename/--skip is none of the folders"),
    (["a", "--out", "a"], "is one of the folders being merged"),
    (["a", "other"], "other/results.json is not a runner results file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    folder(tmp_path, "a", [run("lwf", 0, 0.15)])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"speed": 1}')
    argv = args if "--out" in args else [*args, "--out", "out"]
    assert merge.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_data_fingerprints_must_agree_when_both_folders_have_one(tmp_path, capsys):
    a = folder(tmp_path, "a", [run("lwf", 0, 0.2)], data_fingerprint="sha256:aa")
    old = folder(tmp_path, "old", [run("lwf", 1, 0.2)])  # written before fingerprints: accepted
    assert merge.main([a, old, "--out", str(tmp_path / "m1"), "--no-plots"]) == 0
    other = folder(tmp_path, "other", [run("lwf", 2, 0.2)], data_fingerprint="sha256:bb")
    assert merge.main([a, other, "--out", str(tmp_path / "m2"), "--no-plots"]) == 2
    assert "data_fingerprint" in capsys.readouterr().err
