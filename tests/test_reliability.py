"""Issue 7: exact resume, atomic checkpoints, multi-process training, clear
errors on bad input, long streams."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.training.templates import SupervisedTemplate

from avalanche_m2kd import EducationDistillation, M2KDPlugin, checkpoint, datasets, models
from avalanche_m2kd.models import digits_cnn, ed_small

from helpers import quiet_evaluator, seed_everything, synthetic_arrays

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--n-experiences", "4", "--train-per-class", "20", "--test-per-class", "8",
        "--seeds", "0", "--quiet", "--no-plots"]


def compare(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "benchmarks.compare", *TINY, *args], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("strategy, extra", [("m2kd", ["--m2kd-store", "packnet"]), ("ed", [])])
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, strategy, extra):
    """Exact equality across processes holds on one machine (the same float
    kernels); it is what resuming promises there."""
    compare("--strategies", strategy, *extra, "--out", str(tmp_path / "straight"))
    args = ["--strategies", strategy, *extra, "--out", str(tmp_path / "split"), "--checkpoint", str(tmp_path / "ckpt")]
    first = compare(*args, "--stop-after", "2")  # a separate process that exits after experience 2 of 4
    assert "stopped 1 run(s) after 2 experience(s) each" in first.stdout
    assert (tmp_path / "ckpt" / f"{strategy}-seed0.ckpt").is_file()
    assert not (tmp_path / "split" / "results.json").is_file() or not json.loads((tmp_path / "split" / "results.json").read_text())["runs"]
    compare(*args, "--resume")
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())["runs"][0]
    resumed = json.loads((tmp_path / "split" / "results.json").read_text())["runs"][0]
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert resumed["metrics"] == straight["metrics"]


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    args = ["--strategies", "naive", "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "ckpt")]
    compare(*args, "--stop-after", "1")
    result = compare(*args, "--resume", "--mem-size", "50", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another configuration (mem_size: 200 there, 50 now)" in lines[0]
    again = compare(*args, check=False)  # without --resume: would silently start over
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model = digits_cnn()
    strategy = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), evaluator=quiet_evaluator())
    path = tmp_path / "run.ckpt"
    checkpoint.save_checkpoint(strategy, path)
    good = path.read_bytes()

    def crash(strategy, fname):
        Path(fname).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", lambda obj, fname: crash(None, fname))
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(strategy, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    restored, next_exp = checkpoint.maybe_load_checkpoint(strategy, path)
    assert next_exp == 0
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read safely"):
        checkpoint.maybe_load_checkpoint(strategy, path)


def test_a_failing_run_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    from benchmarks import compare as runner
    from benchmarks import strategies

    def broken(name, setup):
        raise RuntimeError("the strategy broke")

    monkeypatch.setitem(strategies.STRATEGIES, "lwf", broken)
    out = tmp_path / "out"
    assert runner.main([*TINY, "--strategies", "naive,lwf", "--out", str(out), "--quiet", "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert "lwf seed 0 failed: RuntimeError: the strategy broke" in err and "1 finished runs kept" in err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["strategy"] for r in runs] == ["naive"]


def test_two_processes_with_torchrun_hold_identical_models_and_snapshots(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "-m", "benchmarks.compare", *TINY, "--strategies", "m2kd,ed",
         "--m2kd-store", "packnet", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("| Strategy |") == 1  # only rank 0 prints and writes
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["world_size"] == 2 and document["config"]["batch_size"] == 16
    for run in document["runs"]:
        assert run["world_size"] == 2
        assert run["test_sizes"] == [16, 16, 16, 32]  # metrics cover the whole test set once: 2, 2, 2, 4 classes x 8 images
        assert len(set(run["rank_model_hashes"])) == 1
    m2kd = next(r for r in document["runs"] if r["strategy"] == "m2kd")
    assert len(m2kd["rank_snapshot_hashes"]) == 2 and len(set(m2kd["rank_snapshot_hashes"])) == 1



def test_one_allreduce_after_backward_takes_the_same_steps_as_distributed_data_parallel():
    """Why DataParallelSync and not a DDP wrapper is sound: from the same start,
    on different batches per rank, both leave the same weights (2 gloo processes)."""
    from benchmarks.studies import ddp_sync

    args = ddp_sync.build_parser().parse_args(["--model", "cifar_cnn", "--classes", "10", "--batch-size", "8",
                                               "--iterations", "1", "--warmup", "0", "--repeats", "1",
                                               "--check-steps", "3"])
    result = ddp_sync.run(args)
    assert result["max_weight_difference"] <= 1e-6
    assert set(result["median_ms"]) == {"none", "allreduce", "ddp"} and all(v > 0 for v in result["median_ms"].values())

# -- bad input: each answered by an error that names the problem --------------------------------
def tiny_stream(x_fix=None, y_fix=None, n_experiences=2):
    data = synthetic_arrays(n_classes=4, per_class=8)
    if x_fix:
        x_fix(data)
    train = torch.utils.data.TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(y_fix(data.y_train) if y_fix else data.y_train))
    test = torch.utils.data.TensorDataset(torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))
    from avalanche.benchmarks import nc_benchmark

    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, shuffle=False)


def m2kd_strategy(model=None, **kwargs):
    model = model or digits_cnn()
    plugin = M2KDPlugin(aux_layers=("stage1",), **kwargs)
    return SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                              plugins=[plugin], evaluator=quiet_evaluator()), plugin


def nan_images(data):
    data.x_train[3, 0, 0, 0] = np.nan


def test_non_finite_inputs():
    """Every batch checked on request; by default the first batch of each
    experience, and a NaN later shows up as a non-finite loss term that names
    the inputs as the likely cause."""
    strategy, _ = m2kd_strategy(check_batches=True)
    with pytest.raises(ValueError, match="inputs of training experience 0 contain NaN"):
        strategy.train(tiny_stream(nan_images).train_stream[0])
    strategy, _ = m2kd_strategy()
    with pytest.raises((ValueError, FloatingPointError), match="NaN"):
        strategy.train(tiny_stream(nan_images).train_stream[0])


def test_non_finite_distillation_term_names_the_term_and_experience():
    strategy, plugin = m2kd_strategy()
    bm = tiny_stream()
    strategy.train(bm.train_stream[0])
    snapshot = plugin.snapshots._snapshots[0]
    snapshot["head.classifier.bias"] = torch.full_like(snapshot["head.classifier.bias"], float("nan"))
    with pytest.raises(FloatingPointError, match="the mm loss term was NaN or infinite during training experience 1"):
        strategy.train(bm.train_stream[1])


def test_labels_of_the_wrong_type_or_out_of_range():
    bm = tiny_stream()
    fake = SimpleNamespace(experience=bm.train_stream[0], mb_x=torch.zeros(2, 1, 8, 8))
    from avalanche_m2kd._experience import check_batch

    with pytest.raises(ValueError, match="must be integers"):
        check_batch("M2KDPlugin", fake.experience, fake.mb_x, torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match=r"label 7 of training experience 0 is outside the model's 4 outputs"):
        check_batch("M2KDPlugin", fake.experience, fake.mb_x, torch.tensor([1, 7]), 4)
    with pytest.raises(ValueError, match="label -1"):
        check_batch("M2KDPlugin", fake.experience, fake.mb_x, torch.tensor([-1, 0]), 4)


def test_images_that_do_not_fit_the_model():
    strategy, _ = m2kd_strategy(models.mnist_cnn())  # 28x28 model, 8x8 images
    with pytest.raises(ValueError, match=r"cannot process the inputs of training experience 0 \(shape \(1, 8, 8\)\)"):
        strategy.train(tiny_stream().train_stream[0])


def test_empty_experience():
    plugin = M2KDPlugin()
    empty = SimpleNamespace(classes_in_this_experience=set(), current_experience=3, dataset=[])
    from avalanche_m2kd._experience import check_new_classes

    with pytest.raises(ValueError, match="training experience 3 has no samples"):
        check_new_classes("M2KDPlugin", empty, plugin.regularizer.seen_classes())


@pytest.mark.parametrize("check_batches", [True, False])
def test_ed_rejects_bad_batches_too(check_batches):
    """The teacher trained on the NaN image is NaN too: the loss check names it,
    at once (check_batches) or when the epoch ends, or the batch check the inputs."""
    student = ed_small(1, 8)
    strategy = EducationDistillation(model=student, optimizer=torch.optim.Adam(student.parameters()),
                                     teacher_factory=lambda n: digits_cnn(n), teacher_epochs=1, train_mb_size=8,
                                     evaluator=quiet_evaluator(), check_batches=check_batches)
    with pytest.raises((ValueError, FloatingPointError), match="NaN"):
        strategy.train(tiny_stream(nan_images).train_stream[0])


@pytest.mark.parametrize("kind", ["packnet", "sparse"])
def test_a_twenty_experience_stream_runs_to_the_end(kind):
    seed_everything(0)
    data = synthetic_arrays(n_classes=40, per_class=6, shape=(3, 32, 32), test_per_class=2)
    bm = datasets.make_benchmark(data, 20)
    model = models.cifar_cnn()
    fine_tune = {"post_prune_epochs": 1} if kind == "packnet" else {}
    plugin = M2KDPlugin(snapshot_store=kind, prune_ratio=0.8, teacher_cache="off", **fine_tune)
    strategy = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  train_mb_size=12, plugins=[plugin], evaluator=quiet_evaluator())
    held = []
    for exp in bm.train_stream:
        strategy.train(exp)
        held.append(plugin.snapshots.nbytes())
    assert len(plugin.snapshots) == 20
    assert all(b > a for a, b in zip(held, held[1:]))
    assert plugin.snapshots.nbytes() < plugin.snapshots.full_copy_nbytes() / (10 if kind == "packnet" else 3)
    if kind == "packnet":
        assert plugin.snapshots.free_fraction() == pytest.approx(0.8**20, abs=0.01)
    x = torch.stack([bm.test_stream[0].dataset[i][0] for i in range(2)])
    assert torch.isfinite(plugin.snapshots.teacher(0)(x)).all()


def test_data_is_checked_once_before_training_for_every_strategy(tmp_path, capsys):
    """Issue 15.4: NaN pixels (train or test), a class without test images and
    huge labels are refused with one line, whatever the strategies."""
    from benchmarks import compare as runner

    def npz(name, **fix):
        rng = np.random.default_rng(0)
        arrays = dict(x_train=rng.random((40, 8, 8)).astype(np.float32), y_train=np.repeat(np.arange(4), 10),
                      x_test=rng.random((12, 8, 8)).astype(np.float32), y_test=np.repeat(np.arange(4), 3))
        for key, change in fix.items():
            arrays[key] = change(arrays[key])
        np.savez(tmp_path / name, **arrays)
        return f"npz:{tmp_path / name}"

    def nan_at_3(x):
        x = x.copy()
        x[3, 0, 0] = np.nan
        return x

    cases = [
        (npz("train-nan.npz", x_train=nan_at_3), "1 training pixel values are NaN or infinite"),
        (npz("test-nan.npz", x_test=nan_at_3), "1 test pixel values are NaN or infinite"),
        (npz("untested.npz", x_test=lambda x: x[:9], y_test=lambda y: y[:9]), "classes 3 have training images but no test image"),
        (npz("huge.npz", y_train=lambda y: np.where(y == 3, 10**9, y), y_test=lambda y: np.where(y == 3, 10**9, y)),
         "label 1000000000 is above 65535"),
    ]
    for dataset, message in cases:
        code = runner.main(["--dataset", dataset, "--strategies", "naive", "--n-experiences", "2", "--out",
                            str(tmp_path / "out"), "--quiet", "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (dataset, err)
    assert not (tmp_path / "out" / "results.json").exists()  # nothing trained


def test_output_folder_is_guarded(tmp_path, capsys):
    """Issue 15.3: no silent overwrite, one runner per folder, unwritable
    folders refused before training, stale temporary files removed."""
    import fcntl

    from benchmarks import compare as runner

    out = tmp_path / "out"
    args = [*TINY, "--strategies", "naive", "--n-experiences", "2", "--out", str(out)]
    assert runner.main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert runner.main(args) == 2
    assert "already holds results; pass --resume" in capsys.readouterr().err
    (out / ".results.json.m2kd-abc12345.tmp").write_text("partial")  # ours, left by a killed runner
    (out / "notes.tmp").write_text("the user's")
    (out / "x.tmp").mkdir()
    assert runner.main([*args, "--overwrite", "--seeds", "1"]) == 0
    assert not (out / ".results.json.m2kd-abc12345.tmp").exists()
    assert (out / "notes.tmp").read_text() == "the user's" and (out / "x.tmp").is_dir()
    assert [r["seed"] for r in json.loads((out / "results.json").read_text())["runs"]] == [1]
    assert runner.main([*args, "--resume", "--seeds", "0"]) == 0  # adds seed 0 to seed 1's results
    assert sorted(r["seed"] for r in json.loads((out / "results.json").read_text())["runs"]) == [0, 1]
    assert first["runs"][0]["seed"] == 0
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert runner.main([*args, "--resume"]) == 2
        assert "another process is writing to" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert runner.main([*TINY, "--out", str(blocked / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_ed_teacher_class_lists_are_checked_at_construction():
    from avalanche_m2kd import EducationDistillationPlugin

    with pytest.raises(ValueError, match="class 2 is covered by teachers 0 and 1"):
        EducationDistillationPlugin(teachers=[(digits_cnn(3), [0, 1, 2]), (digits_cnn(3), [2, 3, 4])])


def test_packnet_without_free_weights_warns():
    with pytest.warns(UserWarning, match="prune_ratio=0 frees no weight"):
        M2KDPlugin(snapshot_store="packnet", prune_ratio=0.0)


def test_sigterm_stops_the_runner_with_a_message(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.compare", "--epochs", "30", "--strategies", "naive,lwf", "--seeds", "0",
         "--out", str(out), "--quiet", "--no-plots"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (out / ".lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # past start-up, inside training
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
