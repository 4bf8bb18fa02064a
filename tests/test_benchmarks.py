"""The speed, growth and teacher-pass benchmarks on tiny settings: they write
what they promise, and their derived numbers follow from their measurements."""

import json
import statistics

import pytest

from benchmarks.studies import growth, speed, teacher_pass


def test_growth_reports_capacity_bytes_and_time(tmp_path):
    growth.main(["--experiences", "3", "--iterations", "1", "--batch-size", "4", "--stores", "packnet,full",
                 "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "growth.json").read_text())
    packnet, full = saved["results"]["packnet"], saved["results"]["full"]
    assert [r["experience"] for r in packnet] == [1, 2, 3]
    assert [r["teachers"] for r in packnet] == [0, 1, 2]
    # 80% of the free weights are released after every experience
    assert [r["free_fraction"] for r in packnet] == pytest.approx([0.8, 0.64, 0.512], abs=0.01)
    # full copies, less the head rows of classes a snapshot does not teach: none in the first
    # (its head has only its own two rows), some in every later one (the head grew)
    assert full[0]["held_bytes"] == full[0]["full_copy_bytes"]
    assert all(r["held_bytes"] < r["full_copy_bytes"] for r in full[1:])
    assert all(p["held_bytes"] < f["held_bytes"] / 3 for p, f in zip(packnet[1:], full[1:]))
    assert all(r["iteration_s"] > 0 for r in packnet + full)
    rows = [line for line in (tmp_path / "growth.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header and one row per experience
    assert rows[-1].split(" | ")[2] == f"{packnet[-1]['free_fraction']:.3f}"


def test_teacher_pass_ratios_follow_from_its_timings(tmp_path):
    teacher_pass.main(["--models", "cifar_cnn", "--snapshots", "2", "--batch-size", "4", "--repeats", "1",
                       "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "teacher_pass.json").read_text())["results"]
    assert [r["aux_heads"] for r in rows] == [False, True]
    for r in rows:  # the pass timed is the one M2KD runs: every snapshot, each on its own group
        assert r["teachers_run"] == 2 and r["teacher_output_widths"] == [2, 2] and r["repeats"] == 1
    table = (tmp_path / "teacher_pass.md").read_text()
    assert f"{rows[1]['teacher_pass_vs_plain_forwards']:.2f}x" in table.splitlines()[-1]


def test_teacher_pass_rejects_an_unknown_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        teacher_pass.main(["--models", "resnet33", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown models resnet33" in capsys.readouterr().err


def test_speed_table_ratios_and_floor(tmp_path):
    speed.main(["--model", "cifar_cnn", "--modes", "naive,lwf,m2kd-loop", "--snapshots", "1", "--iterations", "4",
                "--batch-size", "4", "--repeats", "1", "--tune-malloc", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "speed.json").read_text())
    assert all(run["malloc_mmap_threshold"] == str(speed.TUNED_THRESHOLD) for runs in summary["runs"].values() for run in runs)
    table, floor = summary["table"], summary["floor"]
    loop = table["m2kd-loop"]
    # the table aggregates the raw runs: medians of each mode's repeats
    for mode in ("naive", "lwf", "m2kd-loop"):
        assert table[mode]["iteration_s"] == pytest.approx(statistics.median(r["iteration_s"] for r in summary["runs"][mode]))
    assert [r["snapshots"] for r in summary["runs"]["m2kd-loop"]] == [2]  # 1 snapshot + the timed experience's
    assert floor["m2kd_loop_teacher_forwards_s"] == pytest.approx(summary["runs"]["m2kd-loop"][0]["inference_forward_s"])
    text = (tmp_path / "speed.md").read_text()
    assert "--modes naive,lwf,m2kd-loop --tune-malloc" in text and "timed in its own process" in text


def test_speed_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(SystemExit, match="unknown modes"):
        speed.main(["--modes", "naive,fast", "--out", str(tmp_path)])


def _drift_checkpoint(path, states, groups, kind="full"):
    import torch

    plugin = {"type": "M2KDPlugin", "state": {"state": {"snapshots": {"kind": kind, "snapshots": states}, "groups": groups}}}
    torch.save({"plugins": [plugin], "meta": {"config": {"model": "digits_cnn"}}}, path)


def test_target_drift_is_zero_for_equal_snapshots_and_the_mean_gap_otherwise(tmp_path):
    import torch

    from avalanche_m2kd import models
    from benchmarks.studies import target_drift

    torch.manual_seed(0)
    nets = [models.create("digits_cnn", num_classes=6) for _ in range(3)]
    nets[1].load_state_dict(nets[0].state_dict())  # snapshot 1 equals snapshot 0
    groups = [[0, 1], [2, 3], [4, 5]]
    path = tmp_path / "run.ckpt"
    _drift_checkpoint(path, [n.state_dict() for n in nets], groups)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 6
    rows = target_drift.drift(path, images, labels)
    assert [r["step"] for r in rows] == [3]  # 3 snapshots: step 3's teachers are snapshots 0 and 1
    assert rows[0]["every_image"] == 0.0 and rows[0]["own_images"] == 0.0
    nets[1] = models.create("digits_cnn", num_classes=6)
    _drift_checkpoint(path, [n.state_dict() for n in nets], groups)
    row = target_drift.drift(path, images, labels)[0]
    with torch.no_grad():
        gap = (torch.sigmoid(nets[0].eval()(images))[:, :2] - torch.sigmoid(nets[1].eval()(images))[:, :2]).abs()
    assert row["every_image"] == pytest.approx(float(gap.mean()), abs=1e-6)
    assert row["own_images"] == pytest.approx(float(gap[labels < 2].mean()), abs=1e-6)
    later = (labels == 2) | (labels == 3)  # group 1: learned after snapshot 0, known to the last teacher
    assert row["later_images"] == pytest.approx(float(gap[later].mean()), abs=1e-6)
    with torch.no_grad():
        owner, newest = (torch.sigmoid(nets[i].eval()(images))[later][:, :2] for i in (0, 1))
    assert row["owner_target_later_images"] == pytest.approx(float(owner.mean()), abs=1e-6)
    assert row["last_target_later_images"] == pytest.approx(float(newest.mean()), abs=1e-6)
    assert row["owner_share_above_half_later_images"] == pytest.approx(float((owner > 0.5).float().mean()), abs=1e-6)
    assert row["last_share_above_half_later_images"] == pytest.approx(float((newest > 0.5).float().mean()), abs=1e-6)
    current = labels >= 4  # group 2: being learned at step 3, seen by neither teacher
    assert row["current_images"] == pytest.approx(float(gap[current].mean()), abs=1e-6)
    assert 0 < row["current_images"] != row["later_images"]


def test_target_drift_measures_each_auxiliary_head_as_the_strategy_runs_it(tmp_path):
    import torch
    from torch import nn

    from avalanche_m2kd import models
    from avalanche_m2kd.taps import AUX_ATTRIBUTE, FeatureTaps, attach_auxiliary_heads
    from benchmarks.studies import target_drift

    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 6
    layers = ["stage1", "stage2"]
    nets = []
    for _ in range(3):
        net = models.create("digits_cnn", num_classes=6)
        attach_auxiliary_heads(net, layers, images[:1])
        for head in getattr(net, AUX_ATTRIBUTE).heads.values():  # grown to the six classes, random weights
            head.classifier.classifier = nn.Linear(head.classifier.classifier.in_features, 6)
        nets.append(net.eval())
    path = tmp_path / "run.ckpt"
    _drift_checkpoint(path, [n.state_dict() for n in nets], [[0, 1], [2, 3], [4, 5]])
    row = target_drift.drift(path, images, labels)[0]
    assert sorted(row["aux"]) == layers
    with torch.no_grad():
        aux = []
        for net in nets[:2]:
            with FeatureTaps(net, layers) as taps:
                net(images)
            aux.append([torch.sigmoid(z) for z in getattr(net, AUX_ATTRIBUTE)(taps.features())])
    for i, layer in enumerate(layers):
        gap = (aux[0][i][:, :2] - aux[1][i][:, :2]).abs()
        assert row["aux"][layer]["every_image"] == pytest.approx(float(gap.mean()), abs=1e-6)
        later = (labels == 2) | (labels == 3)
        assert row["aux"][layer]["later_images"] == pytest.approx(float(gap[later].mean()), abs=1e-6)
        assert row["aux"][layer]["every_image"] != pytest.approx(row["every_image"], abs=1e-4)  # not the output's


def test_target_drift_refuses_what_it_cannot_read(tmp_path, capsys):
    from benchmarks.studies import target_drift

    _drift_checkpoint(tmp_path / "packnet.ckpt", [], [], kind="packnet")
    for name, message in [("missing.ckpt", "no such checkpoint"), ("packnet.ckpt", "only the full store")]:
        assert target_drift.main([str(tmp_path / name), "--dataset", "digits", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
