"""Issue 15.1 and 15.2: checkpoints that load without running code, restore
every strategy exactly, and are refused when they belong to another run."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_m2kd import checkpoint, datasets
from avalanche_m2kd.checkpoint import CheckpointError
from avalanche_m2kd.metrics import IncrementalMetrics

TINY = ["--epochs", "1", "--n-experiences", "4", "--train-per-class", "20", "--test-per-class", "8", "--seeds", "0"]


def _setup(*extra):
    from benchmarks.compare import build_parser, prepare_data, resolve_config

    config = resolve_config(build_parser().parse_args([*TINY, "--strategies", "naive", *extra]))
    data, benchmark, _, augmentation = prepare_data(config)
    return config, data, benchmark, augmentation


class _Progress:
    def update(self, n):
        pass


def _run(name, config, data, benchmark, augmentation, ckpt=None):
    from benchmarks.compare import run_one

    return run_one(name, 0, config, data, benchmark, augmentation, _Progress(), ckpt)


def _split_run(tmp_path, name, config, data, benchmark, augmentation, after=2):
    """Train ``after`` experiences, checkpoint, then resume in a freshly built strategy."""
    from benchmarks.compare import RunCheckpoint, Stopped

    with pytest.raises(Stopped):
        _run(name, config, data, benchmark, augmentation, RunCheckpoint(tmp_path, name, 0, False, after))
    return _run(name, config, data, benchmark, augmentation, RunCheckpoint(tmp_path, name, 0, True, None))


@pytest.mark.parametrize(
    "name, extra",
    [
        ("naive", []),  # with the replay memory (200 exemplars)
        ("lwf", ["--mem-size", "0"]),
        # the first experiences lack the largest classes: evaluation widens the live head beyond LwF's previous model
        ("lwf", ["--mem-size", "0", "--class-order", "seed1993"]),
        ("icarl", []),
        ("joint", []),
        ("m2kd-icarl", []),
        ("m2kd", ["--precision", "bf16", "--m2kd-store", "sparse"]),
        ("m2kd-icarl", ["--device-data"]),  # batches drawn on the device from the restored generators
    ],
)
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, name, extra):
    config, data, benchmark, augmentation = _setup(*extra)
    straight = _run(name, config, data, benchmark, augmentation)
    resumed = _split_run(tmp_path, name, config, data, benchmark, augmentation)
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]
    assert resumed["snapshot_bytes"] == straight["snapshot_bytes"]


def test_a_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    from benchmarks.compare import RunCheckpoint, Stopped

    config, data, benchmark, augmentation = _setup()
    with pytest.raises(Stopped):
        _run("m2kd-icarl", config, data, benchmark, augmentation, RunCheckpoint(tmp_path, "m2kd-icarl", 0, False, 1))
    path = tmp_path / "m2kd-icarl-seed0.ckpt"
    state = torch.load(path, weights_only=True)  # raises on anything but tensors and plain data
    assert state["format"] == checkpoint.FORMAT
    assert state["meta"]["strategy"] == "m2kd-icarl" and state["meta"]["config"]["epochs"] == 1
    replay = next(p for p in state["plugins"] if p["type"] == "ExemplarReplay")["state"]["memory"]
    assert sum(len(g["ids"]) for g in replay["groups"].values()) == 40  # all of experience 1's 2 x 20 images
    assert state["clock"]["train_exp_counter"] == 1


class _Payload:
    """Pickles to a call of ``Path.touch``: loading it unsafely creates a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from avalanche.training import Naive

    from avalanche_m2kd.models import digits_cnn

    marker = tmp_path / "pwned"
    path = tmp_path / "run.ckpt"
    torch.save({"format": checkpoint.FORMAT, "payload": _Payload(marker)}, path)
    model = digits_cnn()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="cannot be read safely.*it was not loaded"):
        checkpoint.load_checkpoint(strategy, path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT}))  # a plain pickle, not torch.save's format
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        checkpoint.load_checkpoint(strategy, path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(CheckpointError, match="is not an avalanche_m2kd.checkpoint/2 file"):
        checkpoint.load_checkpoint(strategy, path)


def test_checkpoint_meta_is_checked_key_by_key():
    saved = {"strategy": "naive", "seed": 0, "config": {"epochs": 3, "lr": 0.1}}
    checkpoint.check_meta(saved, json.loads(json.dumps(saved)), "x.ckpt")
    with pytest.raises(CheckpointError, match=r"another run \(strategy: 'naive' there, 'lwf' now\)"):
        checkpoint.check_meta(saved, dict(saved, strategy="lwf"), "x.ckpt")
    with pytest.raises(CheckpointError, match=r"config.epochs: 3 there, 5 now"):
        checkpoint.check_meta(saved, dict(saved, config={"epochs": 5, "lr": 0.1}), "x.ckpt")


def test_runner_refuses_a_renamed_or_foreign_checkpoint(tmp_path, capsys):
    """A checkpoint of another strategy renamed, or of another --epochs in a
    folder whose config.json was removed, is refused with one line (exit 2)."""
    from benchmarks import compare as runner

    base = [*TINY, "--quiet", "--no-plots"]
    ckpt = tmp_path / "ckpt"
    assert runner.main([*base, "--strategies", "naive", "--out", str(tmp_path / "a"), "--checkpoint", str(ckpt), "--stop-after", "1"]) == 0
    (ckpt / "naive-seed0.ckpt").rename(ckpt / "lwf-seed0.ckpt")
    (ckpt / "naive-seed0.json").rename(ckpt / "lwf-seed0.json")
    capsys.readouterr()
    assert runner.main([*base, "--strategies", "lwf", "--out", str(tmp_path / "b"), "--checkpoint", str(ckpt), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another run (strategy: 'naive' there, 'lwf' now)" in err[0]
    (ckpt / "lwf-seed0.ckpt").rename(ckpt / "naive-seed0.ckpt")
    (ckpt / "config.json").unlink()
    args = [*base, "--epochs", "2", "--strategies", "naive", "--out", str(tmp_path / "c"), "--checkpoint", str(ckpt), "--resume"]
    assert runner.main(args) == 2
    assert "config.epochs: 1 there, 2 now" in capsys.readouterr().err


def test_a_plugin_without_a_handler_is_named_before_training(tmp_path, capsys):
    from avalanche.core import SupervisedPlugin

    from benchmarks import compare as runner
    from benchmarks import strategies

    class Custom(SupervisedPlugin):
        pass

    original = strategies.build_naive

    def with_custom(name, setup):
        strategy = original(name, setup)
        strategy.plugins.append(Custom())
        return strategy

    strategies.STRATEGIES["naive"], saved = with_custom, strategies.STRATEGIES["naive"]
    try:
        code = runner.main([*TINY, "--quiet", "--no-plots", "--strategies", "naive", "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "c")])
    finally:
        strategies.STRATEGIES["naive"] = saved
    assert code == 2
    assert "no checkpoint handler for plugin Custom; register one" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*.ckpt"))


def test_sample_ids_follow_subsets_and_concatenations():
    from helpers import synthetic_arrays

    bm = datasets.make_benchmark(synthetic_arrays(n_classes=4, per_class=5), 2)
    first, second = bm.train_stream[0].dataset, bm.train_stream[1].dataset
    assert checkpoint.sample_ids(first) == list(range(10))
    assert checkpoint.sample_ids(second.subset([3, 0]).concat(first.subset([1]))) == [13, 10, 1]
    with pytest.raises(ValueError, match="need 3 distinct ids"):
        datasets.with_sample_ids(torch.utils.data.TensorDataset(torch.zeros(3, 1), torch.zeros(3)), [0, 0, 1])
    with pytest.raises(CheckpointError, match="sample_id attribute"):
        checkpoint.sample_ids(torch.utils.data.TensorDataset(torch.zeros(3, 1), torch.zeros(3)))


def test_incremental_metrics_state_round_trip():
    metric = IncrementalMetrics()
    metric._counts[(0, 0)] = [3, 4]
    metric._counts[(1, 0)] = [2, 4]
    metric._counts[(1, 1)] = [1, 2]
    metric._sizes = {0: 4, 1: 2}
    other = IncrementalMetrics()
    other.load_state_dict(json.loads(json.dumps(metric.state_dict())))
    np.testing.assert_array_equal(other.matrix(), [[0.75, np.nan], [0.5, 0.5]])
    assert other.sizes() == [4, 2]


def test_a_resumed_run_counts_the_time_and_progress_before_the_stop(tmp_path):
    from benchmarks.compare import RunCheckpoint, Stopped, run_one

    class Progress:
        steps = []

        def update(self, n):
            self.steps.append(n)

    config, data, benchmark, augmentation = _setup()
    with pytest.raises(Stopped):
        _run("naive", config, data, benchmark, augmentation, RunCheckpoint(tmp_path, "naive", 0, False, 2))
    side = tmp_path / "naive-seed0.json"
    assert 0 < json.loads(side.read_text())["elapsed_s"] < 1000
    side.write_text(json.dumps({"elapsed_s": 1000.0}))  # as if the first part had run for 1000 s
    resumed = run_one("naive", 0, config, data, benchmark, augmentation, Progress(), RunCheckpoint(tmp_path, "naive", 0, True, None))
    assert 1000.0 < resumed["wall_time_s"] < 1000.0 + 600
    assert Progress.steps == [2, 1, 1]  # the two experiences already done, then the two trained now
