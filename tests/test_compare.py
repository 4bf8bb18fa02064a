"""The side-by-side runner: outputs, determinism and one-line errors."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import compare
from benchmarks.report import SUMMARY_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--n-experiences", "2", "--train-per-class", "20", "--test-per-class", "8", "--quiet"]


def run_tiny(out, *extra):
    argv = [*TINY, "--out", str(out), *extra]
    assert compare.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, run_tiny(out, "--strategies", "naive,joint,icarl,m2kd", "--seeds", "0,1", "--mem-size", "20")


def test_runner_writes_every_output(tiny_run):
    out, document = tiny_run
    for name in ("results.json", "results.csv", "summary.md", "accuracy_curve.png", "accuracy_matrices.png", "old_new.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as img:
            img.verify()
    assert len(document["runs"]) == 8
    assert document["class_order"] == {"name": "natural", "order": list(range(10))}
    assert document["config"]["preset"] == "digits" and document["config"]["mem_size"] == 20
    run = document["runs"][0]
    assert np.array(run["accuracy_matrix"]).shape == (2, 2)
    assert run["test_sizes"] == [40, 40]
    assert run["wall_time_s"] == pytest.approx(sum(run["experience_s"])) and len(run["experience_cpu_s"]) == 2
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert float(rows[0]["last_accuracy"]) == pytest.approx(run["metrics"]["last_accuracy"])


def test_summary_numbers_equal_the_json(tiny_run):
    out, document = tiny_run
    table = {}
    main_table = (out / "summary.md").read_text().split("Paired differences")[0]
    for line in main_table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in document["summary"]:
            table[cells[0]] = cells[1:]
    assert set(table) == {"naive", "joint", "icarl", "m2kd"}
    assert [(r["method"], r["baseline"]) for r in document["paired"]] == [("m2kd", "naive")]  # the one claim both ran
    for name, cells in table.items():
        for (key, _, _), cell in zip(SUMMARY_COLUMNS, cells):
            stat = document["summary"][name][key]
            mean, std = (float(v) for v in re.findall(r"-?\d+\.\d", cell))
            assert mean == pytest.approx(round(stat["mean"] * 100, 1), abs=0.051), (name, key)
            assert std == pytest.approx(round(stat["std"] * 100, 1), abs=0.051), (name, key)
        runs = [r for r in document["runs"] if r["strategy"] == name]
        assert document["summary"][name]["last_accuracy"]["mean"] == pytest.approx(
            np.mean([r["metrics"]["last_accuracy"] for r in runs])
        )


def test_same_seed_same_results(tmp_path):
    """Two processes on this machine: the same float kernels, so the same
    numbers. Another CPU may give other numbers for the same seed."""
    args = ("--strategies", "m2kd,lwf", "--seeds", "3", "--no-plots")
    first = run_tiny(tmp_path / "a", *args)
    second = run_tiny(tmp_path / "b", *args)
    for a, b in zip(first["runs"], second["runs"]):
        assert a["accuracy_matrix"] == b["accuracy_matrix"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "mnist3d"], "unknown dataset"),
        (["--strategies", "naive,ewc"], "unknown strategy ewc"),
        (["--preset", "imagenet"], "unknown preset"),
        (["--class-order", "sorted"], "unknown class order"),
        (["--dataset", "cifar100"], "--data-root"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent"], "does not exist"),
        (["--seeds", "a,b"], "--seeds"),
        (["--epochs", "0"], "--epochs"),
        (["--model", "vgg"], "unknown model"),
        (["--model", "mnist_cnn"], "does not fit"),
        (["--stop-after", "1"], "--stop-after needs --checkpoint"),
        (["--bogus"], "unrecognized arguments"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA device"),
        (["--precision", "fp8"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert compare.main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0] and err[0].startswith("python -m benchmarks.compare: error:")


def test_malformed_npz_and_image_folder_exit_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    assert compare.main(["--dataset", f"npz:{bad}", "--out", str(tmp_path), "--quiet"]) == 2
    assert compare.main(["--dataset", f"imagefolder:{tmp_path}", "--out", str(tmp_path), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "not a readable npz" in lines[0] and "missing folder" in lines[1]


def test_command_line_exit_status_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--strategies", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_npz_dataset_through_the_runner(tmp_path):
    rng = np.random.default_rng(0)
    y_tr, y_te = np.repeat(np.arange(4), 10), np.repeat(np.arange(4), 3)
    protos = rng.integers(0, 255, (4, 8, 8, 1))
    np.savez(tmp_path / "toy.npz", x_train=protos[y_tr].astype(np.uint8), y_train=y_tr,
             x_test=protos[y_te].astype(np.uint8), y_test=y_te)
    document = run_tiny(tmp_path / "out", "--dataset", f"npz:{tmp_path / 'toy.npz'}", "--strategies", "naive",
                        "--seeds", "0", "--class-order", "random:3", "--no-plots")
    assert document["config"]["model"] == "digits_cnn"  # chosen from the 8x8 images
    assert sorted(document["class_order"]["order"]) == [0, 1, 2, 3]
    assert document["runs"][0]["test_sizes"] == [6, 6]


def test_a_preset_keeps_its_model_and_schedule_when_only_the_data_source_changes(tmp_path):
    """Issue 13.2: --dataset npz:FILE with a CIFAR preset used to swap ResNet-32
    for the small CNN; a field the command line does not override never changes."""
    args = compare.build_parser().parse_args(["--preset", "cifar100-b0-10-cpu", "--dataset", "npz:x.npz"])
    config = compare.resolve_config(args)
    preset = compare.load_preset("cifar100-b0-10-cpu")
    for key, value in preset.items():
        if key != "dataset":
            assert config[key] == value, key
    assert config["model"] == "resnet32_icarl" and config["dataset"] == "npz:x.npz"
    args = compare.build_parser().parse_args(["--preset", "cifar100-b0-10-cpu", "--dataset", "npz:x.npz", "--model", "resnet32"])
    assert compare.resolve_config(args)["model"] == "resnet32"


def test_every_presets_m2kd_options_reach_the_plugin():
    """A preset's ``m2kd`` field (the packnet ablations') builds the runner's
    M2KD strategies with exactly those options."""
    with_options = {n: preset for n in compare.presets() if "m2kd" in (preset := compare.load_preset(n))}
    assert {"cifar100-b0-10-cpu-prune50", "cifar100-b0-10-cpu-finetune5"} <= set(with_options)
    for name, preset in with_options.items():
        built = build_on_digits_shape("m2kd-icarl", "--preset", name, "--dataset", "digits", "--model", "digits_cnn",
                                      "--m2kd-store", "packnet")[1].m2kd.config()
        assert all(built[k] == v for k, v in preset["m2kd"].items()), name
        assert preset["n_experiences"] == 10


def build_on_digits_shape(name, *argv):
    """The runner's strategy ``name`` for the configuration of ``argv`` (8x8, 10 classes), not trained."""
    from avalanche.training.plugins import EvaluationPlugin

    from benchmarks.strategies import Setup, build_strategy

    config = dict(compare.resolve_config(compare.build_parser().parse_args(list(argv))), device="cpu")
    return config, build_strategy(name, Setup(config, 10, (1, 8, 8), "cpu", EvaluationPlugin(loggers=[])))


def test_ablation_strategies_run_only_when_named_and_change_one_option():
    from benchmarks.strategies import ABLATIONS

    default = compare.resolve_config(compare.build_parser().parse_args([]))["strategies"]
    assert "m2kd-icarl" in default and not ABLATIONS & set(default)
    changed = {"m2kd-icarl-noaux": ("m2kd-icarl", "aux_layers", []), "m2kd-bce-noaux": ("m2kd-bce", "aux_layers", []),
               "m2kd-icarl-last-noaux": ("m2kd-icarl-last", "aux_layers", []),
               "m2kd-bce-last-noaux": ("m2kd-bce-last", "aux_layers", []),
               "m2kd-icarl-informed": ("m2kd-icarl", "old_targets", "informed"), "m2kd-bce-informed": ("m2kd-bce", "old_targets", "informed"),
               "m2kd-bce-icarlhead": ("m2kd-bce", "bce_columns", "all"), "m2kd-last-noaux": ("m2kd-last", "aux_layers", []),
               "m2kd-probe": ("m2kd", "aux_supervision", "probe"), "m2kd-last-probe": ("m2kd-last", "aux_supervision", "probe")}
    assert set(changed) == ABLATIONS
    for name, (full, key, value) in changed.items():
        plugins = [build_on_digits_shape(n, "--mem-size", "20")[1].m2kd.config() for n in (name, full)]
        assert plugins[0][key] == value and plugins[1][key] != value
        assert {k: v for k, v in plugins[0].items() if k != key} == {k: v for k, v in plugins[1].items() if k != key}


def test_teacher_inference_reaches_the_m2kd_and_ed_teachers_only_when_given():
    from avalanche_m2kd.teachers import TEACHER_INFERENCE

    def plugins(*argv):
        config, m2kd = build_on_digits_shape("m2kd", *argv)
        return config, m2kd.m2kd, build_on_digits_shape("ed", *argv)[1].ed

    config, m2kd, ed = plugins("--teacher-inference", "compiled")
    assert config["teacher_inference"] == "compiled"
    assert m2kd.regularizer.teacher_inference == "compiled" and ed.teacher_inference == "compiled"
    config, m2kd, ed = plugins()
    assert "teacher_inference" not in config  # folders written before the option stay resumable
    assert m2kd.regularizer.teacher_inference == "fused" and ed.teacher_inference == "fused"
    with pytest.raises(compare.UsageError, match="--teacher-inference: invalid choice: 'fast'"):
        compare.build_parser().parse_args(["--teacher-inference", "fast"])
    option = next(a for a in compare.build_parser()._actions if a.dest == "teacher_inference")
    assert tuple(option.choices) == TEACHER_INFERENCE  # the command line (kept free of torch imports) follows the library


def test_the_sigmoid_form_trains_icarls_classifier_with_exemplars_and_a_growing_head_without():
    """m2kd-icarl* (exemplars): iCaRL's fixed head, every column in the loss;
    m2kd-bce* (no exemplars): a growing head over the seen columns, which
    measured 2 to 3 points better there (README); m2kd-bce-icarlhead keeps the other."""
    from avalanche.models import IncrementalClassifier

    for name, fixed in (("m2kd-icarl", True), ("m2kd-bce", False), ("m2kd-bce-last", False), ("m2kd-bce-icarlhead", True)):
        strategy = build_on_digits_shape(name, "--mem-size", "20")[1]
        growing = any(isinstance(m, IncrementalClassifier) for n, m in strategy.model.named_modules() if n.startswith("head"))
        assert growing is not fixed, name
        assert strategy.m2kd.regularizer.bce_columns == ("all" if fixed else "seen"), name


def test_every_builtin_preset_passes_the_field_checks():
    for name in compare.presets():
        assert compare.check_preset(compare.load_preset(name), name)["description"]


def test_a_users_preset_file_runs_like_a_builtin_one(tmp_path):
    preset = dict(compare.load_preset("digits"), epochs=1, description="mine")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    args = compare.build_parser().parse_args(["--preset", str(path), "--strategies", "naive"])
    config = compare.resolve_config(args)
    assert config["epochs"] == 1 and config["preset"] == str(path) and config["description"] == "mine"


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("epochs"), "lacks epochs"),
    (lambda p: p.update(epochs="3"), "epochs must be int, got '3'"),
    (lambda p: p.update(augment=1), "augment must be bool, got 1"),
    (lambda p: p.update(epoch=3), "unknown field 'epoch'"),
    (lambda p: p.update(milestones=[0]), "milestones must be epochs between 1 and 4"),
    (lambda p: p.update(seeds=[]), "seeds must be a non-empty list of integers"),
])
def test_a_bad_preset_file_is_a_one_line_error_naming_the_field(tmp_path, capsys, change, message):
    preset = compare.load_preset("digits")
    change(preset)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(preset))
    assert compare.main(["--preset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_preset_file_and_a_json_list_are_one_line_errors(tmp_path, capsys):
    assert compare.main(["--preset", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert compare.main(["--preset", str(tmp_path / "list.json")]) == 2
    assert "must hold a JSON object, not list" in capsys.readouterr().err


def test_list_shows_every_presets_description(capsys):
    assert compare.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in compare.presets():
        assert compare.load_preset(name)["description"][:40] in out


def test_default_strategies_follow_the_memory():
    """Every claim row pairs two strategies run with the same memory: the
    exemplar-free sigmoid form runs by default only without one, the
    nearest-mean ones only with one."""
    with_memory = compare.resolve_config(compare.build_parser().parse_args(["--mem-size", "200"]))["strategies"]
    without = compare.resolve_config(compare.build_parser().parse_args(["--mem-size", "0"]))["strategies"]
    assert "m2kd-icarl" in with_memory and "m2kd-bce" not in with_memory and "lwf" in with_memory
    assert "m2kd-bce" in without and "m2kd-bce-last" in without and "icarl" not in without and "lwf" in without
    named = compare.resolve_config(compare.build_parser().parse_args(["--mem-size", "200", "--strategies", "m2kd-bce"]))
    assert named["strategies"] == ["m2kd-bce"]
