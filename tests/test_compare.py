"""``zscl compare``: runs side by side, beside the paper's printed numbers.

The oracle is the paper itself: runs made from its published matrices must come out with the
paper's *printed* Transfer / Avg / Last (one decimal) and a zero delta, and every number must
equal what ``zscl metrics`` prints for the same results.json.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from zscl.cli.compare import main as compare_main
from zscl.cli.metrics import main as metrics_main
from zscl.resources import data_dir


def paper(order: str) -> dict:
    return json.loads((data_dir() / "published" / f"{order}.json").read_text())


def write_run(folder: Path, benchmark: str, method: str, datasets: list[str], accuracy, zero_shot) -> Path:
    """A results.json in the runner's format (what `zscl sequence` writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({
        "benchmark": benchmark, "method": method, "tasks": datasets, "datasets": datasets,
        "accuracy": accuracy, "zero_shot": zero_shot, "top5": [], "timing": []}))
    return folder


@pytest.fixture()
def paper_runs(tmp_path) -> tuple[dict, list[Path]]:
    """Order I's published matrices written as our runs, named by our method configs."""
    pub = paper("mtil_order1")
    zero = [pub["zero_shot_clip"][d] for d in pub["datasets"]]
    runs = [write_run(tmp_path / e["config"], "mtil_order1", e["config"], e["datasets"], e["accuracy"], zero)
            for e in pub["results"] if e["accuracy"] is not None]
    return pub, runs


def rows_by_method(text: str) -> dict[str, dict[str, str]]:
    return {row["method"]: row for row in csv.DictReader(io.StringIO(text))}


def test_compare_reproduces_the_published_table_with_zero_deltas(paper_runs, capsys):
    pub, runs = paper_runs
    assert compare_main([*map(str, runs), "--format", "csv"]) == 0
    rows = rows_by_method(capsys.readouterr().out)
    for entry in pub["results"]:
        if entry["accuracy"] is None:
            continue
        row = rows[entry["config"]]
        assert row["paper row"] == entry["method"]
        for key, title in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
            assert round(float(row[title]), 1) == entry["published"][key]
            assert abs(float(row[f"Δ {title}"])) <= 0.05 + 1e-6  # the paper prints one decimal
    zs = rows["zero-shot"]
    assert round(float(zs["Transfer"]), 1) == pub["zero_shot_published"]["transfer"] == 69.4
    assert round(float(zs["Avg"]), 1) == 65.3


def test_compare_numbers_equal_zscl_metrics_on_each_run(paper_runs, capsys):
    _, runs = paper_runs
    assert compare_main([*map(str, runs), "--format", "csv"]) == 0
    rows = rows_by_method(capsys.readouterr().out)
    for run in runs:
        assert metrics_main([str(run / "results.json"), "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        for key, title in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
            assert float(rows[run.name][title]) == pytest.approx(metrics[key], abs=1e-4)


def test_compare_rejects_runs_of_different_benchmarks(tmp_path, capsys):
    o1, o2 = paper("mtil_order1"), paper("mtil_order2")
    a = write_run(tmp_path / "a", "mtil_order1", "zscl", o1["datasets"], o1["results"][0]["accuracy"], None)
    b = write_run(tmp_path / "b", "mtil_order2", "zscl", o2["datasets"], o2["results"][0]["accuracy"], None)
    assert compare_main([str(a), str(b)]) == 2
    assert "different benchmarks" in capsys.readouterr().err
    c = write_run(tmp_path / "c", "mtil_order1", "lwf", o2["datasets"], o2["results"][0]["accuracy"], None)
    assert compare_main([str(a), str(c)]) == 2
    assert "different dataset lists" in capsys.readouterr().err


def test_compare_rejects_an_incomplete_run_and_a_missing_folder(tmp_path, capsys):
    o1 = paper("mtil_order1")
    a = write_run(tmp_path / "a", "mtil_order1", "zscl", o1["datasets"], o1["results"][0]["accuracy"][:3], None)
    assert compare_main([str(a)]) == 2
    assert "incomplete (3 of 11 tasks)" in capsys.readouterr().err
    assert compare_main([str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_compare_of_an_unknown_benchmark_has_no_paper_columns_and_writes_plots(tmp_path, capsys):
    acc = [[80.0, 30.0, 20.0], [95.0, 90.0, 40.0], [70.0, 50.0, 85.0]]
    runs = [write_run(tmp_path / m, "mine", m, ["a", "b", "c"], acc, [50.0, 40.0, 30.0]) for m in ("x", "y")]
    out = tmp_path / "cmp"
    assert compare_main([*map(str, runs), "--per-dataset", "--out", str(out), "--format", "latex"]) == 0
    text = capsys.readouterr().out
    assert "paper" not in text and r"\begin{tabular}" in text
    # Transfer by hand: mean(30, mean(20, 40)) = 30.0; Avg = 560/9 = 62.2; Last = 205/3 = 68.3
    assert "x & 30.0 & 62.2 & 68.3" in text
    assert {p.name for p in out.iterdir()} == {"comparison.tex", "metrics.png", "transfer_curves.png", "heatmaps.png"}


def test_compare_without_runs_prints_the_papers_table(capsys):
    assert compare_main(["--published", "mtil_order2", "--format", "csv"]) == 0
    rows = rows_by_method(capsys.readouterr().out)
    for entry in paper("mtil_order2")["results"]:
        row = rows[entry["method"]]
        if entry["accuracy"] is None:  # a row published without its matrix (DIKI): printed numbers only
            assert row["Last (from matrix)"] == "" and float(row["Last (printed)"]) == entry["published"]["last"]
            continue
        assert round(float(row["Last (from matrix)"]), 1) == entry["published"]["last"] == float(row["Last (printed)"])


def test_compare_labels_name_the_runs_in_order(paper_runs, capsys):
    _, runs = paper_runs
    assert compare_main([str(runs[0]), str(runs[-1]), "--label", "mine", "theirs", "--format", "csv"]) == 0
    rows = rows_by_method(capsys.readouterr().out)
    assert {"mine", "theirs"} <= set(rows) and rows["mine"]["paper row"] == ""  # a label the paper does not know


def test_order2_icarl_row_is_footnoted_wherever_it_is_shown(tmp_path, capsys):
    """The published order-II iCaRL matrix is at chance after Aircraft (its row 7, read here from the file)."""
    pub = paper("mtil_order2")
    icarl = next(e for e in pub["results"] if e["config"] == "icarl")
    after_aircraft = icarl["accuracy"][icarl["datasets"].index("Aircraft")]
    assert max(after_aircraft) < 11, "every dataset at about chance (MNIST and EuroSAT: 10 classes)"
    assert compare_main(["--published", "mtil_order2"]) == 0
    assert "Note: iCaRL: in the published matrix the row after Aircraft" in capsys.readouterr().out
    zero = [pub["zero_shot_clip"][d] for d in pub["datasets"]]
    for config in ("icarl", "lwf"):
        write_run(tmp_path / config, "mtil_order2", config, icarl["datasets"], icarl["accuracy"], zero)
    assert compare_main([str(tmp_path / "lwf")]) == 0
    assert "Note:" not in capsys.readouterr().out, "no iCaRL row shown: no footnote"
    assert compare_main([str(tmp_path / "icarl"), "--format", "latex"]) == 0
    assert "% Note: iCaRL:" in capsys.readouterr().out
    assert compare_main(["--published", "mtil_order1"]) == 0
    assert "Note: iCaRL" not in capsys.readouterr().out, "order I's iCaRL row is sound"


def test_published_rows_notes_are_footnotes_of_the_table_and_csv_stays_data(tmp_path, capsys):
    """DIKI's row is on CoOp splits: whenever it is shown, its note and source are printed under the table."""
    pub = paper("mtil_order1")
    diki = next(e for e in pub["results"] if e["config"] == "diki")
    assert compare_main(["--published", "mtil_order1"]) == 0
    text = capsys.readouterr().out
    assert f"Note: DIKI: {diki['note']}; source: {diki['source']}" in text and "CoOp splits" in diki["note"]
    # a run labelled diki beside the paper: the footnote follows the row
    zero = [pub["zero_shot_clip"][d] for d in pub["datasets"]]
    run = write_run(tmp_path / "diki", "mtil_order1", "diki", pub["datasets"], pub["results"][0]["accuracy"], zero)
    assert compare_main([str(run)]) == 0
    assert "Note: DIKI: " in capsys.readouterr().out
    assert compare_main([str(run), "--format", "csv"]) == 0
    assert "CoOp" not in capsys.readouterr().out
    finetune = write_run(tmp_path / "finetune", "mtil_order1", "finetune", pub["datasets"], pub["results"][0]["accuracy"], zero)
    assert compare_main([str(finetune)]) == 0
    assert "Note:" not in capsys.readouterr().out  # no published row with a note is shown
