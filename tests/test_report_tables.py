"""The results tables of the README and docs/results.md are generated from
their results files: a committed table that differs from its file fails."""

import json
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["README.md", "docs/results.md"])
def test_committed_tables_equal_what_their_results_files_give(name):
    path = ROOT / name
    assert report.BLOCK.search(path.read_text()), f"{name} has no generated table"
    assert report.update_markdown(path, ROOT) == path.read_text(), (
        f"{name}: a results table differs from its results.json; run python -m benchmarks.report --markdown {name}")


def test_a_changed_number_is_caught_and_rewritten(tmp_path):
    folder = "docs/results/cifar100-b0-10-cpu-free-merged"
    fresh = f"<!-- results {folder} compact strategies=lwf,m2kd-bce -->\n<!-- /results -->\n"
    page = tmp_path / "page.md"
    page.write_text(fresh)
    rendered = report.update_markdown(page, ROOT)
    assert "| `lwf` | 0, 1 | 13.5 ± 1.3 | 4.3 ± 0.6 |" in rendered and "m2kd-bce-last" not in rendered
    page.write_text(rendered.replace("13.5 ± 1.3", "14.5 ± 1.3"))
    assert report.main(["--markdown", str(page), "--root", str(ROOT), "--check"]) == 1
    assert report.main(["--markdown", str(page), "--root", str(ROOT)]) == 0
    assert page.read_text() == rendered


def test_an_unknown_table_kind_is_named(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("<!-- results docs/results/demo histogram -->\n<!-- /results -->\n")
    assert report.main(["--markdown", str(page), "--root", str(ROOT)]) == 2
    assert "unknown table kind 'histogram'" in capsys.readouterr().err


def test_a_table_can_hold_only_some_seeds(tmp_path, capsys):
    folder = "docs/results/cifar100-b0-10-cpu-free-merged"
    page = tmp_path / "page.md"
    page.write_text(f"<!-- results {folder} compact strategies=lwf seeds=1 -->\n<!-- /results -->\n")
    rendered = report.update_markdown(page, ROOT)
    runs = [r for r in json.loads((ROOT / folder / "results.json").read_text())["runs"]
            if r["strategy"] == "lwf" and r["seed"] == 1]
    assert f"| `lwf` | 1 | {100 * runs[0]['metrics']['average_incremental_accuracy']:.1f} |" in rendered
    page.write_text(f"<!-- results {folder} compact seeds=one -->\n<!-- /results -->\n")
    assert report.main(["--markdown", str(page), "--root", str(ROOT)]) == 2
    assert "seeds are integers" in capsys.readouterr().err
