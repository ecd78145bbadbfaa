"""report.py / metrics/report.py against tables computed by hand from small CSVs."""
from __future__ import annotations

import os

import pytest

import report as cli
from metrics import report
from utils.errors import UserError

# VOC 15-1a (reference order): step 0 = these 16 ids, then 17, 3, 6, 18, 10 (one per step).
ORDER_A = [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17, 3, 6, 18, 10]


def _write(folder, name, rows):
    path = os.path.join(str(folder), name)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(",".join(str(c) for c in row) + "\n")
    return path


def _voc_15_5(folder, name="2024-01-01_voc_15-5_MiB.csv"):
    """Step 0: bg 0.95, 1-15 0.7. Step 1: bg 0.9, 1-15 0.6 except 3 = X, 16-20 0.3 except 17 = X."""
    step0 = [0, 0.95] + [0.7] * 15 + ["x"] * 5 + [0.715625]
    last = [0.9] + [0.6] * 15 + [0.3] * 5
    last[3], last[17] = "X", "X"
    step1 = [1] + last + [0.5526]
    return _write(folder, name, [step0, step1])


def _run_md(capsys, *argv):
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _row(md, *prefix):
    start = "| " + " | ".join(prefix) + " |"
    rows = [ln for ln in md.splitlines() if ln.startswith(start)]
    assert len(rows) == 1, (start, md)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_old_new_all_excludes_x_and_X_cells(tmp_path, capsys):
    # old = (0.9 + 14 x 0.6) / 15 = 0.62; new = 0.3 (4 classes, 17 absent); all = (9.3 + 1.2) / 19 = 0.5526...
    # avg over steps = (11.45 / 16 + 10.5 / 19) / 2 = 0.63413
    md = _run_md(capsys, _voc_15_5(tmp_path))
    assert _row(md, "voc", "15-5", "MiB") == ["voc", "15-5", "MiB", "1", "2/2", "62.0", "30.0", "55.3", "40.4", "63.4"]  # hIoU 2*62*30/92


def test_reference_average_counts_x_and_X_in_the_denominators(tmp_path, capsys):
    # average_csv.py: old = 9.3 / 16 = 0.58125, new = 1.2 / 5 = 0.24, all = the mIoU column 0.5526
    md = _run_md(capsys, _voc_15_5(tmp_path), "--reference-average")
    assert _row(md, "voc", "15-5", "MiB")[5:] == ["58.1", "24.0", "55.3", "34.0", "63.4"]
    assert "average_csv.py" in md


def _order_a_remapped(folder):
    """Columns in model order. Step 0: 0.8 on the 16 base columns. Step 5: base 0.5, new 0.1, class 3 (col 17) X."""
    step0 = [0] + [0.8] * 16 + ["x"] * 5 + [0.8]
    last = [0.5] * 16 + [0.1] * 5
    last[17] = "X"
    return _write(folder, "_voc_15-1a_MiB_AWT.csv", [step0, [5] + last + [0.42]])


def _order_b_last_only(folder):
    """Only the last step: base 0.6, new 0.2 (column order cannot be told apart: remapped by default)."""
    return _write(folder, "_voc_15-1b_MiB_AWT.csv", [[5] + [0.6] * 16 + [0.2] * 5 + [0.5048]])


def test_class_orders_pool_into_mean_and_std(tmp_path, capsys):
    _order_a_remapped(tmp_path)
    _order_b_last_only(tmp_path)
    md = _run_md(capsys, str(tmp_path))
    # old 0.5 / 0.6, new 0.1 / 0.2, all 0.42 / (9.6 + 1) / 21 = 0.504762; sample std of two values = |a - b| / sqrt 2
    # avg: order a (0.8 + 0.42) / 2 = 0.61, order b 0.504762 -> 55.7 +- 7.4
    assert _row(md, "voc", "15-1, the AWT paper's ten orders", "MiB+AWT") == [
        "voc", "15-1, the AWT paper's ten orders", "MiB+AWT", "2", "6/6", "55.0 ± 7.1", "15.0 ± 7.1", "46.2 ± 6.0",
        "23.3 ± 9.4", "55.7 ± 7.4"]  # hIoU per run (16.7, 30.0), then pooled
    md = _run_md(capsys, str(tmp_path), "--separate-orders")
    assert _row(md, "voc", "15-1a", "MiB+AWT")[5:] == ["50.0", "10.0", "42.0", "16.7", "61.0"]
    assert _row(md, "voc", "15-1b", "MiB+AWT")[5:] == ["60.0", "20.0", "50.5", "30.0", "50.5"]


def test_remapped_columns_are_mapped_back_to_class_ids(tmp_path):
    run = report.read_run(_order_a_remapped(tmp_path))
    assert run.columns == "remapped"  # the x cells of step 0 sit in the last five columns
    last = run.values[5]
    assert last[12] == 0.5 and last[17] == 0.1 and last[3] == "X" and last[10] == 0.1
    assert run.values[0][17] == "x" and run.values[0][16] == 0.8  # 16 is a base class of 15-1a


def test_original_column_order_uses_the_task_table(tmp_path, capsys):
    base = set(ORDER_A[:16])
    step0 = [0] + [0.8 if c in base else "x" for c in range(21)] + [0.8]
    step5 = [5] + [0.5 if c in base else 0.1 for c in range(21)] + [0.419]
    path = _write(tmp_path, "_voc_15-1a_MiB.csv", [step0, step5])
    run = report.read_run(path)
    assert run.columns == "original"
    assert report.step_scores(run) == pytest.approx({"old": 0.5, "new": 0.1, "all": (8 + 0.5) / 21,
                                                      "hiou": 2 * 0.5 * 0.1 / 0.6})
    # forcing the other order gives other numbers: the table decides old/new, not the column position
    forced = report.step_scores(report.read_run(path, columns="remapped"))
    assert forced["old"] != pytest.approx(0.5)


def test_permuted_task_from_a_monkeypatched_table(tmp_path, monkeypatch):
    table = {0: [0, 5, 7], 1: [3], 2: [9, 1]}

    def labels(dataset, task, step):
        return list(table[step]), [c for s in range(step) for c in table[s]]

    monkeypatch.setattr(report, "get_task_labels", labels)
    monkeypatch.setattr(report, "num_steps", lambda dataset, task: 3)
    monkeypatch.setattr(report, "canonical_task", lambda dataset, task: task)
    cells = ["x"] * 21
    for c, v in {0: 0.9, 5: 0.7, 7: "X", 3: 0.4, 9: 0.2, 1: 0.0}.items():
        cells[c] = v
    run = report.read_run(_write(tmp_path, "_voc_toy_FT.csv", [[2] + cells + [0.44]]), columns="original")
    assert report.step_scores(run) == pytest.approx({"old": 0.8, "new": 0.2, "all": 2.2 / 5, "hiou": 0.32})
    assert report.step_scores(run, reference_average=True)["old"] == pytest.approx(1.6 / 3)


def test_per_class_and_per_step_tables(tmp_path, capsys):
    md = _run_md(capsys, _voc_15_5(tmp_path), "--per-class", "--per-step")
    assert _row(md, "0", "background") == ["0", "background", "90.0"]
    assert _row(md, "3", "bird") == ["3", "bird", "X"]
    assert _row(md, "16", "pottedplant") == ["16", "pottedplant", "30.0"]
    assert "| voc | 15-5 | MiB | 71.6 | 55.3 |" in md.splitlines()  # per-step table: step 0, step 1


def test_labels_filters_disjoint_and_incomplete_runs(tmp_path, capsys):
    a = _voc_15_5(tmp_path, "x_voc_15-5_MiB_disjoint.csv")
    b = _write(tmp_path, "x_voc_15-1_PLOP_AWT.csv", [[0, 0.95] + [0.7] * 15 + ["x"] * 5 + [0.7156]])
    md = _run_md(capsys, a, b, "--label", "MiB (ours)", "PLOP+AWT (ours)")
    assert _row(md, "voc", "15-5 disjoint", "MiB (ours)")[6] == "30.0"
    assert _row(md, "voc", "15-1", "PLOP+AWT (ours)")[3:7] == ["1", "1/6", "71.6", "—"]  # only step 0 so far
    md = _run_md(capsys, str(tmp_path), "--name", "PLOP*")
    assert "MiB" not in md and "PLOP+AWT" in md


def test_folder_skips_unrelated_csv_with_a_warning(tmp_path, capsys):
    _voc_15_5(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n")
    md = _run_md(capsys, str(tmp_path))
    assert "| voc | 15-5 | MiB |" in md


def test_plot_and_output_files(tmp_path, capsys):
    _order_a_remapped(tmp_path)
    _voc_15_5(tmp_path)
    png, out = tmp_path / "plots" / "curves.png", tmp_path / "table.md"
    md = _run_md(capsys, str(tmp_path), "--plot", str(png), "--output", str(out))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.read_text() == md


@pytest.mark.parametrize("content, name, needle", [
    ("0,0.5\n", "_voc_15-5_MiB.csv", "_voc_15-5_MiB.csv:1: 2 cells, expected 23"),
    ("0," + ",".join(["0.5"] * 21) + ",abc\n", "_voc_15-5_MiB.csv", "neither a number nor x/X"),
    ("0," + ",".join(["55"] * 21) + ",0.5\n", "_voc_15-5_MiB.csv", "outside [0, 1]"),
    ("z," + ",".join(["0.5"] * 21) + ",0.5\n", "_voc_15-5_MiB.csv", "is not an integer"),
    ("7," + ",".join(["0.5"] * 21) + ",0.5\n", "_voc_15-5_MiB.csv", "step 7 does not exist"),
    ("", "_voc_15-5_MiB.csv", "no result rows"),
    ("0,0.5\n", "results_MiB.csv", "cannot read dataset/task/name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, name, needle):
    path = tmp_path / name
    path.write_text(content)
    assert cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("error: ")


def test_missing_input_and_label_count(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    path = _voc_15_5(tmp_path)
    assert cli.main([path, "--label", "a", "b"]) == 2
    assert "--label" in capsys.readouterr().err
    assert cli.main([str(tmp_path), "--task", "10-1"]) == 2
    assert "matching the filters" in capsys.readouterr().err


def test_file_name_parsing():
    assert report.parse_filename("r/2024-05-01_voc_15-1a_MiB_AWT.csv") == ("2024-05-01", "voc", "15-1a", "MiB_AWT")
    assert report.parse_filename("_ade_50-50_PLOP.csv") == ("", "ade", "50", "PLOP")
    assert report.parse_filename("d_x_cityscapes_14-1_FT_disjoint.csv") == ("d_x", "cityscapes", "14-1", "FT_disjoint")
    assert report.method_label("PLOP_AWT_disjoint") == ("PLOP+AWT", "disjoint")
    with pytest.raises(UserError):
        report.parse_filename("voc_15-1.csv")
