"""The speed, growth and teacher-pass benchmarks on tiny settings: they write
what they promise, and their derived numbers follow from their measurements."""

import json
import statistics

import pytest

from benchmarks import growth, speed, teacher_pass


def test_growth_reports_capacity_bytes_and_time(tmp_path):
    growth.main(["--experiences", "3", "--iterations", "1", "--batch-size", "4", "--stores", "packnet,full",
                 "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "growth.json").read_text())
    packnet, full = saved["results"]["packnet"], saved["results"]["full"]
    assert [r["experience"] for r in packnet] == [1, 2, 3]
    assert [r["teachers"] for r in packnet] == [0, 1, 2]
    # 80% of the free weights are released after every experience
    assert [r["free_fraction"] for r in packnet] == pytest.approx([0.8, 0.64, 0.512], abs=0.01)
    assert all(r["held_bytes"] == r["full_copy_bytes"] for r in full)
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
    assert loop["snapshot_bytes"] == loop["full_copy_bytes"] > 0  # the full store, after 2 experiences
    assert floor["teacher_forwards_s"] == pytest.approx(1 * floor["inference_forward_s"])
    assert loop["extra_over_naive_vs_teacher_forwards"] == pytest.approx(
        (loop["iteration_s"] - table["naive"]["iteration_s"]) / floor["teacher_forwards_s"])
    own = floor["m2kd_loop_teacher_forwards_s"]
    assert own == pytest.approx(summary["runs"]["m2kd-loop"][0]["inference_forward_s"])
    assert loop["extra_over_naive_vs_own_teacher_forwards"] == pytest.approx(
        (loop["iteration_s"] - table["naive"]["iteration_s"]) / own)
    text = (tmp_path / "speed.md").read_text()
    assert "--modes naive,lwf,m2kd-loop --tune-malloc" in text and "timed in its own process" in text


def test_speed_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(SystemExit, match="unknown modes"):
        speed.main(["--modes", "naive,fast", "--out", str(tmp_path)])
