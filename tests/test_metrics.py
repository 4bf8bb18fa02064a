"""Class-incremental metrics: exact values on small matrices, and the Avalanche
plugin metric against a direct computation."""

import math

import numpy as np
import pytest
import torch
from avalanche.training import Naive

from avalanche_m2kd.metrics import (
    IncrementalMetrics,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    last_step_accuracy,
    old_new_accuracy,
    seen_class_accuracy,
    summarize,
)
from avalanche_m2kd.models import digits_cnn

from helpers import quiet_evaluator, synthetic_stream

# rows: after training step i; columns: experience j (the last column is not trained yet)
MATRIX = [
    [0.9, 0.0, 0.0, 0.0],
    [0.6, 0.8, 0.0, 0.0],
    [0.5, 0.7, 1.0, 0.0],
]
SIZES = [100, 300, 100, 50]  # unequal experiences


def test_seen_accuracy_weights_experiences_by_size():
    expected = [0.9, (0.6 * 100 + 0.8 * 300) / 400, (0.5 * 100 + 0.7 * 300 + 1.0 * 100) / 500]
    assert seen_class_accuracy(MATRIX, SIZES).tolist() == pytest.approx(expected)
    assert last_step_accuracy(MATRIX, SIZES) == pytest.approx(0.72)
    assert average_incremental_accuracy(MATRIX, SIZES) == pytest.approx((0.9 + 0.75 + 0.72) / 3)
    # equal sizes by default
    assert last_step_accuracy(MATRIX) == pytest.approx((0.5 + 0.7 + 1.0) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # experience 0: best before the last step 0.9, final 0.5 -> 0.4; experience 1: 0.8 -> 0.7 -> 0.1
    assert forgetting(MATRIX) == pytest.approx((0.4 + 0.1) / 2)
    rising = [[0.5, 0.0], [0.9, 0.8]]
    assert forgetting(rising) == pytest.approx(-0.4)
    assert math.isnan(forgetting([[0.7]]))


def test_backward_transfer():
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert math.isnan(backward_transfer([[1.0]]))


def test_old_new_accuracy():
    old, new = old_new_accuracy(MATRIX, SIZES)
    assert math.isnan(old[0])
    assert old[1:].tolist() == pytest.approx([0.6, (0.5 * 100 + 0.7 * 300) / 400])
    assert new.tolist() == pytest.approx([0.9, 0.8, 1.0])


def test_summarize_gives_plain_values_and_rejects_bad_input():
    s = summarize(MATRIX, SIZES)
    assert s["old_accuracy"][0] is None
    assert s["last_accuracy"] == pytest.approx(0.72)
    with pytest.raises(ValueError, match="R x C"):
        summarize([[0.5, 0.5]] * 3)
    with pytest.raises(ValueError, match="positive"):
        seen_class_accuracy(MATRIX, [1, 0, 1])


def test_plugin_metric_builds_the_matrix_avalanche_sees():
    bm = synthetic_stream(3)
    metric = IncrementalMetrics()
    model = digits_cnn()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_mb_size=16,
        eval_mb_size=7,
        evaluator=quiet_evaluator(metric),
    )
    strategy.eval(bm.test_stream)  # before training: ignored
    direct = []
    for exp in bm.train_stream:
        strategy.train(exp)
        result = strategy.eval(bm.test_stream)
        model.eval()
        row = []
        for test_exp in bm.test_stream:
            xs = torch.stack([s[0] for s in test_exp.dataset])
            ys = torch.tensor([int(s[1]) for s in test_exp.dataset])
            with torch.no_grad():
                row.append((model(xs).argmax(1) == ys).float().mean().item())
        direct.append(row)
    matrix = metric.matrix()
    assert matrix.shape == (3, 3)
    assert np.allclose(matrix, np.array(direct), atol=1e-9)
    assert metric.sizes() == [8, 8, 8]
    assert result["IncrementalAccuracy/average"] == pytest.approx(average_incremental_accuracy(direct, [8, 8, 8]))
    assert result["IncrementalForgetting"] == pytest.approx(forgetting(direct))


@pytest.mark.parametrize("eval_every", [1, 0])
def test_incremental_metrics_rows_with_periodic_evaluation(eval_every):
    """Periodic evaluations during experience i belong to row i; they must not
    overwrite row i - 1 (issue 12.4), and the matrix equals the one built from
    evaluations after each experience only."""
    import torch
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_m2kd.metrics import IncrementalMetrics
    from avalanche_m2kd.models import digits_cnn

    from helpers import synthetic_stream

    torch.manual_seed(0)
    bm = synthetic_stream(3)
    metric = IncrementalMetrics()
    model = digits_cnn()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                     train_epochs=2, evaluator=EvaluationPlugin(metric, loggers=[]), eval_every=eval_every)
    finals = []
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[bm.test_stream])
        strategy.eval(bm.test_stream)
        finals.append(metric.matrix()[-1].copy())
        # the row just written is the experience just trained; earlier rows keep their values
        assert metric.matrix().shape[0] == exp.current_experience + 1
        for i, row in enumerate(finals):
            np.testing.assert_array_equal(metric.matrix()[i], row)


def test_paired_differences_use_the_same_seeds_only():
    from benchmarks.report import paired_differences

    def run(strategy, seed, avg, last):
        return {"strategy": strategy, "seed": seed, "wall_time_s": 1.0, "metrics": {
            "average_incremental_accuracy": avg, "last_accuracy": last, "forgetting": 0.0,
            "backward_transfer": 0.0, "old_accuracy": [None, 0.0], "new_accuracy": [0.0, 0.0]}}

    runs = [run("m2kd", 0, 0.50, 0.40), run("m2kd", 1, 0.48, 0.30), run("m2kd", 2, 0.9, 0.9),
            run("naive", 0, 0.45, 0.41), run("naive", 1, 0.40, 0.20), run("lwf", 5, 0.1, 0.1)]
    rows = paired_differences(runs)
    assert [(r["method"], r["baseline"], r["seeds"]) for r in rows] == [("m2kd", "naive", [0, 1])]
    avg, last = rows[0]["average_incremental_accuracy"], rows[0]["last_accuracy"]
    assert avg["per_seed"] == pytest.approx([0.05, 0.08]) and avg["mean"] == pytest.approx(0.065)
    assert avg["std"] == pytest.approx(np.std([0.05, 0.08], ddof=1)) and avg["wins"] == 2
    assert last["per_seed"] == pytest.approx([-0.01, 0.10]) and last["wins"] == 1
