"""Accuracy matrix, continual-learning metrics, plots and ``zscl metrics``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from zscl.cli.metrics import main as metrics_main
from zscl.evaluation.metrics import AccuracyMatrix, MatrixError, format_table, summarize

from zscl.resources import data_dir

# The paper's matrices ship as package data (zscl compare prints them beside a user's runs); the
# numbers checked here are the paper's *printed* Transfer/Avg/Last, which the code did not compute.
PAPER = data_dir() / "published" / "mtil_order1.json"
PAPER_RUNS = [
    run
    for order in ("mtil_order1", "mtil_order2")
    for run in json.loads((data_dir() / "published" / f"{order}.json").read_text())["results"]
    if run["accuracy"] is not None  # MoE-Adapters: published summary only
]

# 3 tasks, hand-computed below. Row i = after task i.
A3 = [[80.0, 30.0, 20.0], [95.0, 90.0, 40.0], [70.0, 50.0, 85.0]]
NAMES3 = ["a", "b", "c"]


def _write(tmp_path: Path, obj, name: str = "m.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj))  # json writes NaN / Infinity literals, as Python's json reads them
    return path


# -- the paper's published numbers ------------------------------------------------------------


@pytest.mark.parametrize("run", PAPER_RUNS, ids=[f"{r['method']}-{r['datasets'][0]}" for r in PAPER_RUNS])
def test_published_mtil_numbers_reproduce(run):
    s = summarize(AccuracyMatrix.from_dict(run))
    for key in ("transfer", "avg", "last"):
        assert round(s[key], 1) == run["published"][key], key


@pytest.mark.parametrize("run", PAPER_RUNS, ids=[f"{r['method']}-{r['datasets'][0]}" for r in PAPER_RUNS])
def test_published_numbers_through_cli_json(run, tmp_path, capsys):
    path = _write(tmp_path, {"datasets": run["datasets"], "accuracy": run["accuracy"], "config": {"x": 1}})
    assert metrics_main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout must be exactly one JSON object
    assert {"transfer", "avg", "last", "bwt", "forgetting", "per_dataset"} <= set(out)
    assert {k: round(out[k], 1) for k in ("transfer", "avg", "last")} == run["published"]


def test_paper_zero_shot_baseline_and_method_selection():
    paper = json.loads(PAPER.read_text())
    m = AccuracyMatrix.load(PAPER, method="zscl")  # case-insensitive; zero-shot row from the top level
    assert m.zero_shot == [paper["zero_shot_clip"][d] for d in m.datasets]
    s = summarize(m)
    assert round(s["zero_shot_transfer"], 1) == paper["zero_shot_published"]["transfer"]
    assert round(s["zero_shot_avg"], 1) == paper["zero_shot_published"]["avg"]
    assert s["per_dataset"]["MNIST"]["zero_shot"] == paper["zero_shot_clip"]["MNIST"]


def test_dispatcher_runs_metrics(tmp_path, capsys):
    from zscl.cli.main import main as zscl_main

    with pytest.raises(SystemExit) as exit_ok:
        zscl_main(["metrics", str(PAPER), "--method", "ZSCL", "--json"])
    assert exit_ok.value.code == 0
    assert round(json.loads(capsys.readouterr().out)["transfer"], 1) == 68.1
    with pytest.raises(SystemExit) as exit_bad:
        zscl_main(["metrics", str(_write(tmp_path, {"datasets": ["a"]}))])
    assert exit_bad.value.code == 2
    assert "missing key 'accuracy'" in capsys.readouterr().err


# -- hand-computed metrics -------------------------------------------------------------------


def test_two_by_two_by_hand():
    s = summarize(AccuracyMatrix(["a", "b"], [[50, 20], [40, 90]]))
    assert s["transfer"] == pytest.approx(20.0)  # only A[0][1]
    assert s["avg"] == pytest.approx(50.0)
    assert s["last"] == pytest.approx(65.0)
    assert s["bwt"] == pytest.approx(-10.0)  # 40 - 50
    assert s["forgetting"] == pytest.approx(10.0)  # max(50) - 40
    assert s["per_dataset"] == {
        "a": {"transfer": None, "avg": pytest.approx(45.0), "last": 40.0},
        "b": {"transfer": pytest.approx(20.0), "avg": pytest.approx(55.0), "last": 90.0},
    }
    assert "zero_shot_transfer" not in s


def test_three_by_three_by_hand():
    s = summarize(AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30]))
    assert s["transfer"] == pytest.approx((30 + (20 + 40) / 2) / 2)  # column b: 30; column c: (20+40)/2
    assert s["avg"] == pytest.approx(560 / 9)
    assert s["last"] == pytest.approx((70 + 50 + 85) / 3)
    assert s["bwt"] == pytest.approx(((70 - 80) + (50 - 90)) / 2)
    # forgetting takes the best earlier accuracy (95 after task b, not 80 at a's own task)
    assert s["forgetting"] == pytest.approx(((95 - 70) + (90 - 50)) / 2)
    assert s["zero_shot_transfer"] == pytest.approx(25.0)
    assert s["zero_shot_avg"] == pytest.approx(20.0)
    assert s["per_dataset"]["c"] == {"transfer": 30.0, "avg": pytest.approx(145 / 3), "last": 85.0, "zero_shot": 30.0}


def test_forgetting_ignores_accuracy_before_the_dataset_is_trained():
    # A[0][1] = 95 is zero-shot accuracy on b before b's own task; forgetting counts l = j..n-2 only.
    s = summarize(AccuracyMatrix(NAMES3, [[80, 95, 20], [95, 90, 40], [70, 50, 85]]))
    assert s["forgetting"] == pytest.approx(((95 - 70) + (90 - 50)) / 2)


def test_single_task_has_no_transfer_bwt_or_forgetting():
    s = summarize(AccuracyMatrix(["a"], [[70]]))
    assert (s["transfer"], s["bwt"], s["forgetting"], s["avg"], s["last"]) == (None, None, None, 70.0, 70.0)
    assert "-" in format_table(AccuracyMatrix(["a"], [[70]]))


def test_round_trip_zero_shot_forms_and_extra_keys(tmp_path):
    as_list = AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30])
    assert AccuracyMatrix.from_dict(as_list.to_dict()) == as_list
    results_json = {**as_list.to_dict(), "zero_shot": {"c": 30, "a": 10, "b": 20}, "metrics": {}, "versions": {}}
    assert AccuracyMatrix.load(_write(tmp_path, results_json)) == as_list
    assert "zero_shot" not in AccuracyMatrix(NAMES3, A3).to_dict()
    np = pytest.importorskip("numpy")
    assert AccuracyMatrix(NAMES3, np.array(A3), zero_shot=np.array([10.0, 20.0, 30.0])) == as_list


def test_format_table_shows_matrix_per_dataset_rows_and_totals():
    text = format_table(AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30]))
    lines = text.splitlines()
    assert any(line.startswith(" 2 b") and line.split()[2:] == ["95.0", "90.0", "40.0"] for line in lines)
    assert any(line.startswith("Transfer") and line.split()[1:] == ["-", "30.0", "30.0"] for line in lines)
    assert any(line.startswith("Forgetting") and "32.5" in line for line in lines)
    assert any(line.startswith("Transfer") and "(zero-shot: 25.0)" in line for line in lines)


# -- malformed input -------------------------------------------------------------------------

GOOD = {"datasets": ["a", "b"], "accuracy": [[50, 20], [40, 90]]}
AT01, AT10 = "accuracy[0][1] (after task 'a', on 'b')", "accuracy[1][0] (after task 'b', on 'a')"
MALFORMED = {
    "not square": ({"datasets": ["a", "b"], "accuracy": [[1, 2, 3], [4, 5, 6]]}, "accuracy is 2×3 but must be square"),
    "ragged rows": ({"datasets": ["a", "b"], "accuracy": [[1, 2], [3]]}, "row 1 has 1 entries but row 0 has 2"),
    "names vs n": ({"datasets": ["a"], "accuracy": [[1, 2], [3, 4]]}, "'datasets' lists 1 names but accuracy is 2×2"),
    "nan": ({**GOOD, "accuracy": [[50, float("nan")], [40, 90]]}, f"{AT01} is nan"),
    "inf": ({**GOOD, "accuracy": [[50, 20], [float("inf"), 90]]}, f"{AT10} is inf"),
    "above 100": ({**GOOD, "accuracy": [[50, 20], [140, 90]]}, f"{AT10} is 140, outside 0..100"),
    "negative": ({**GOOD, "accuracy": [[50, -1], [40, 90]]}, f"{AT01} is -1, outside 0..100"),
    "empty": ({"datasets": [], "accuracy": []}, "the accuracy matrix is empty"),
    "duplicates": ({"datasets": ["a", "a"], "accuracy": [[1, 2], [3, 4]]}, "'a' appear more than once"),
    "no accuracy": ({"datasets": ["a", "b"]}, "missing key 'accuracy'"),
    "no datasets": ({"accuracy": [[1]]}, "missing key 'datasets'"),
    "string cell": ({**GOOD, "accuracy": [[50, "x"], [40, 90]]}, f"{AT01} is 'x' (str)"),
    "bool cell": ({**GOOD, "accuracy": [[50, True], [40, 90]]}, "is True (bool); expected a number"),
    "null cell": ({**GOOD, "accuracy": [[50, None], [40, 90]]}, "is None (NoneType); expected a number"),
    "flat list": ({"datasets": ["a"], "accuracy": [50]}, "'accuracy' must be a list of rows"),
    "not an object": ([[50]], "expected a JSON object with 'datasets'"),
    "zero-shot length": ({**GOOD, "zero_shot": [1, 2, 3]}, "'zero_shot' must be a list of 2 accuracies"),
    "zero-shot names": ({**GOOD, "zero_shot": {"a": 1}}, "'zero_shot' has no accuracy for 'b'"),
    "zero-shot range": ({**GOOD, "zero_shot": [1, 200]}, "zero_shot[1] ('b') is 200, outside 0..100"),
    "several runs": ({"results": [{"method": "X", **GOOD}]}, "holds several runs (X); choose one with --method"),
}


@pytest.mark.parametrize("obj, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_clear_error(obj, message):
    with pytest.raises(MatrixError) as err:
        AccuracyMatrix.from_dict(obj)
    assert message in str(err.value)


@pytest.mark.parametrize("key", ["nan", "above 100", "ragged rows", "no accuracy", "duplicates"])
def test_cli_malformed_file_exit_code_2(key, tmp_path, capsys):
    obj, message = MALFORMED[key]
    path = _write(tmp_path, obj)
    assert metrics_main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"zscl metrics: {path}: ") and message in captured.err


def test_cli_missing_file_invalid_json_and_unknown_method(tmp_path, capsys):
    assert metrics_main([str(tmp_path / "absent.json")]) == 2
    assert "absent.json: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"datasets": ["a"],\n')
    assert metrics_main([str(bad)]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    assert metrics_main([str(PAPER), "--method", "nope"]) == 2
    assert "no run named 'nope'; available: Continual-FT, LwF" in capsys.readouterr().err


def test_cli_table_and_plots(tmp_path, capsys):
    path = _write(tmp_path, {"datasets": NAMES3, "accuracy": A3})
    assert metrics_main([str(path), "--plot", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert "per dataset" in out and "Forgetting" in out and "wrote" in out
    for name in ("heatmap.png", "accuracy_over_tasks.png"):
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plots_into_an_unwritable_folder_exit_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, {"datasets": NAMES3, "accuracy": A3})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot be created, even by root
    assert metrics_main([str(path), "--plot", str(blocker / "figs"), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"zscl metrics: cannot write plots to {blocker / 'figs'}: ") and len(err.splitlines()) == 1


# -- plots ----------------------------------------------------------------------------------


def _labelled_lines(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_plot_files_are_png(tmp_path):
    from zscl.evaluation import plots

    m = AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30])
    written = [
        plots.plot_heatmap(m, tmp_path / "h.png", title="t"),
        plots.plot_accuracy_over_tasks(m, tmp_path / "o.png"),
        plots.plot_transfer_curve({"x": m, "y": AccuracyMatrix(NAMES3, A3)}, tmp_path / "c.png"),
        plots.plot_metric_bars({"x": summarize(m)}, tmp_path / "b.png"),
    ]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_heatmap_contents():
    from zscl.evaluation.plots import heatmap_figure

    fig = heatmap_figure(AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30]))
    ax = fig.axes[0]
    ylabels = ["zero-shot", "after task 1: a", "after task 2: b", "after task 3: c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ylabels
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES3
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{x:.1f}" for row in [[10, 20, 30], *A3] for x in row)
    assert fig.axes[1].get_ylabel() == "top-1 accuracy (%)"  # the colour bar


def test_accuracy_over_tasks_lines_and_markers():
    from zscl.evaluation.plots import accuracy_over_tasks_figure

    ax = accuracy_over_tasks_figure(AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30])).axes[0]
    assert _labelled_lines(ax) == NAMES3
    b_line = next(line for line in ax.get_lines() if line.get_label() == "b")
    assert list(b_line.get_xdata()) == [0, 1, 2, 3] and list(b_line.get_ydata()) == [20, 30, 90, 50]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in stars] == [(1, 80), (2, 90), (3, 85)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["zero-shot", *NAMES3]
    assert ax.get_xlabel() and ax.get_ylabel()


def test_transfer_curve_values_and_errors():
    from zscl.evaluation.plots import transfer_curve_figure

    zs = AccuracyMatrix(NAMES3, A3, zero_shot=[10, 20, 30])
    ax = transfer_curve_figure({"zscl": zs, "ft": AccuracyMatrix(NAMES3, [[80, 0, 0], [0, 90, 10], A3[2]])}).axes[0]
    assert _labelled_lines(ax) == ["zscl", "ft", "zero-shot (initial model)"]
    ys = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert ys["zscl"] == [25.0, 40.0] and ys["ft"] == [0.0, 10.0]  # mean of A[i][j > i]
    assert ys["zero-shot (initial model)"] == [25.0, 30.0]
    assert ax.get_lines()[-1].get_linestyle() == "--"
    with pytest.raises(MatrixError, match="same task sequence"):
        transfer_curve_figure({"x": zs, "y": AccuracyMatrix(["c", "b", "a"], A3)})


def test_metric_bars_count_and_errors():
    from zscl.evaluation.plots import metric_bars_figure

    table = {
        "ft": {"transfer": 40.0, "avg": 50.0, "last": 60.0, "bwt": -5.0},
        "zscl": {"transfer": 68.1, "avg": 75.4, "last": 83.6, "bwt": -1.0},
    }
    ax = metric_bars_figure(table, ("transfer", "avg", "last", "bwt")).axes[0]
    assert len(ax.patches) == 8
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Transfer", "Avg", "Last", "BWT"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.1f}" for row in table.values() for v in row.values())
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()] == ["ft", "zscl"]
    with pytest.raises(ValueError, match="'zscl' has no finite number for metric 'forgetting'"):
        metric_bars_figure({"zscl": {"forgetting": math.nan}}, ("forgetting",))
