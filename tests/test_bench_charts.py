"""benchmarks/charts.py: every stored benchmark table has a chart (a PNG beside its JSON), drawn from its rows."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import charts, common  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
STORED = sorted(os.path.join(d, f) for d, _, fs in os.walk(RESULTS) for f in fs if f.endswith(".json"))
# tables whose script draws its own figure from more than rows (the model's fit), or none at all
OWN_FIGURE = {"scaling_model", "scaling_model_prediction"}
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(chart, path):
    with open(path) as f:
        data = json.load(f)
    return chart.rows(data) if chart.rows else data["rows"]


def test_every_stored_table_has_a_chart_with_numbers_to_draw():
    """A table the README cites without a figure, or a chart naming columns its tables no longer have (a renamed
    column drew an empty panel), fails here; nothing is drawn (fast)."""
    assert len(STORED) > 40
    rows_of = {}  # chart -> the rows of every stored table it draws
    for path in STORED:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in OWN_FIGURE:
            continue
        chart = charts.chart_for(name)
        assert chart is not None, f"{path}: no chart in benchmarks/charts.py CHARTS"
        rows = _rows(chart, path)
        assert charts.drawing(chart, rows, name) is not None, path
        rows_of.setdefault(id(chart), (chart, []))[1].extend(rows)
    for chart, rows in rows_of.values():  # every column a panel names is a number in some table of its kind
        for panel in chart.panels:
            for column in panel.values:
                assert any(charts._value(r, column) is not None for r in rows), (chart.labels, column)


def test_longest_prefix_names_the_chart():
    assert charts.chart_for("bench_pool") is charts.CHARTS["bench_pool"]
    assert charts.chart_for("bench_pool_grouped_quick") is charts.CHARTS["bench_pool_grouped"]
    assert charts.chart_for("bench_pool_grouped_compressed_quick") is charts.CHARTS["bench_pool_grouped_compressed"]
    assert charts.chart_for("methods_gpu") is charts.CHARTS["methods_gpu"]
    assert charts.chart_for("methods_2048_float32") is charts.CHARTS["methods"]
    assert charts.chart_for("merge_linear_gpu") is charts.CHARTS["merge"]
    assert charts.chart_for("bench_poolside") is None and charts.chart_for("merged") is None


def test_values_are_finite_numbers_or_nothing():
    row = {"a": "0.25", "b": "1.0-1.2", "c": True, "d": float("nan"), "e": {"val": 3}, "f": None, "g": 7}
    assert [charts._value(row, k) for k in ("a", "b", "c", "d", "e.val", "f", "g", "missing", "e.x")] == \
        [0.25, None, None, None, 3.0, None, 7.0, None, None]


@pytest.mark.skipif(not common.has_matplotlib(), reason="needs matplotlib")
def test_write_results_draws_the_chart_and_removes_a_stale_one(tmp_path, monkeypatch):
    """A table written without a plot of its own gets its kind's chart; a table of a kind without one (or
    without numbers) leaves no earlier run's PNG beside it."""
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    rows = [{"N": 8, "pool": "bf16", "x faster": 1.0, "x fewer bytes": 1.0},
            {"N": 8, "pool": "int4", "x faster": 1.4, "x fewer bytes": 3.4}]
    common.write_results("bench_compressed_pool_quick", "cpu", rows, list(rows[0]), "t")
    (folder,) = tmp_path.iterdir()
    assert (folder / "bench_compressed_pool_quick.png").read_bytes()[:8] == PNG
    (folder / "other.png").write_bytes(PNG)
    common.write_results("other", "cpu", rows, list(rows[0]), "t")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["bench_compressed_pool_quick.json", "bench_compressed_pool_quick.md", "bench_compressed_pool_quick.png",
         "other.json", "other.md"])


@pytest.mark.skipif(not common.has_matplotlib(), reason="needs matplotlib")
def test_charts_script_draws_missing_pngs_only(tmp_path):
    """python benchmarks/charts.py draws the PNG of tables that have none (bench_merge's dict of runs here),
    leaves an existing one unless --force, and says which files have no chart."""
    run = {"wall_s": 2.0, "cpu_s": 2.0, "peak_rss_mb": 100.0, "peak_anon_mb": 50.0, "input_gb_per_s": 1.0}
    merge = tmp_path / "merge_ties.json"
    merge.write_text(json.dumps({"method": "ties", "runs": {"mergekit": [run, run], "pymerge": [run]}}))
    (tmp_path / "unknown_kind.json").write_text(json.dumps({"rows": [{"x": 1}]}))
    kept = tmp_path / "bench_pool.png"
    kept.write_bytes(b"kept")
    (tmp_path / "bench_pool.json").write_text(json.dumps({"rows": [{"what": "copy", "ms": 1.0}]}))
    assert charts.main([str(p) for p in sorted(tmp_path.glob("*.json"))]) == 0
    assert (tmp_path / "merge_ties.png").read_bytes()[:8] == PNG
    assert kept.read_bytes() == b"kept" and not (tmp_path / "unknown_kind.png").exists()
    assert charts.main(["--force", str(tmp_path / "bench_pool.json")]) == 0
    assert kept.read_bytes()[:8] == PNG


def test_plot_file_without_matplotlib_removes_the_stale_png_and_says_so(tmp_path, monkeypatch, capsys):
    """bench_pool, bench_methods and bench_merge draw through plot_file: without matplotlib the earlier run's PNG
    stayed beside the new table, without a word (write_results removed it; an audit). The charts script itself
    refuses to run without matplotlib (it would take every stored PNG for stale)."""
    monkeypatch.setattr(common, "has_matplotlib", lambda: False)
    if "common" in sys.modules:  # (plot_file imports it as the scripts do, where benchmarks/ is on sys.path)
        monkeypatch.setattr(sys.modules["common"], "has_matplotlib", lambda: False, raising=False)
    table = tmp_path / "bench_pool.json"
    table.write_text(json.dumps({"rows": [{"what": "copy", "ms": 1.0}]}))
    (tmp_path / "bench_pool.png").write_bytes(PNG)
    assert charts.plot_file(str(table)) is False
    assert not (tmp_path / "bench_pool.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err
    (tmp_path / "bench_pool.png").write_bytes(PNG)
    with pytest.raises(SystemExit):
        charts.main([str(table)])
    assert (tmp_path / "bench_pool.png").exists()
