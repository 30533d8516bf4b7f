"""benchmarks/bench_demo.py's table row: the issue's bar (every margin above the optimized merge's standard
error) and each margin against its own paired standard error."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_demo  # noqa: E402


def _summary(best_single, uniform, greedy_soup, optimized, se, paired, unseen=None):
    return {"best_single": best_single, "uniform": uniform, "greedy_soup": greedy_soup, "optimized": optimized,
            "test_standard_error": se, "paired_standard_errors": paired, "test_unseen": unseen,
            "nonzero_weights": 5, "weights_over_0_01": 3, "checkpoints": 9, "train_seconds": 1.0, "seconds": 2.0,
            "cpu_seconds": 3.0,
            "per_task": {}, "optimized_val": 0.5}


@pytest.mark.parametrize("paired, beats", [({"best_single": 0.001, "uniform": 0.01, "greedy_soup": 0.002}, True),
                                           # the soup's margin (0.004) is under its paired se
                                           ({"best_single": 0.001, "uniform": 0.01, "greedy_soup": 0.005}, False),
                                           # so is the uniform merge's (0.2), though it is not the strongest
                                           ({"best_single": 0.001, "uniform": 0.3, "greedy_soup": 0.002}, False)])
def test_row_judges_each_margin_by_its_own_paired_standard_error(paired, beats):
    r = bench_demo.row(3, _summary(0.70, 0.50, 0.706, 0.71, 0.0035, paired))
    assert r["margin"] == pytest.approx(0.4) and r["beats_all_by_se"] is True
    assert r["beats_all_by_paired_se"] is beats
    assert r["paired_se"] == round(100 * paired["greedy_soup"], 2)  # the strongest baseline's: the soup
    assert r["over_0.01"] == "3/9"  # weights over 0.01, not the summary's count of positive ones (5)


def test_row_of_a_tie():
    """The search returned the soup, which is the best single checkpoint: a zero margin beats nothing."""
    r = bench_demo.row(1, _summary(0.72, 0.40, 0.72, 0.72, 0.0033, {"best_single": 0.0, "uniform": 0.01,
                                                                   "greedy_soup": 0.0}))
    assert (r["margin"], r["paired_se"], r["beats_all_by_se"], r["beats_all_by_paired_se"]) == (0.0, 0.0, False, False)


def test_plot_of_the_margins(tmp_path):
    """The PNG beside the table: rows with and without a paired standard error (older result files)."""
    pytest.importorskip("matplotlib")
    rows = [bench_demo.row(s, _summary(0.70, 0.50, 0.70, 0.70 + m, 0.0035,
                                       {"best_single": 0.001, "uniform": 0.01, "greedy_soup": 0.001}))
            for s, m in ((0, 0.0), (1, 0.01), (2, -0.002))]
    del rows[0]["paired_se"]
    bench_demo.plot(rows, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_results_draws_the_png_only_with_matplotlib(tmp_path, monkeypatch, capsys):
    """common.write_results skips plot() where matplotlib is missing, saying so, as every script needs."""
    from benchmarks import common
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    drawn = []

    def draw(path):  # drawn under a temporary name (.png: savefig's format), then renamed: whole or not at all
        drawn.append(path)
        with open(path, "w") as f:
            f.write("png")
    rows = [{"a": 1}]
    folder = tmp_path / common.machine_label("cpu")
    if common.has_matplotlib():
        common.write_results("t", "cpu", rows, ["a"], "title", plot=draw)
        assert len(drawn) == 1 and drawn[0].endswith(".png") and (folder / "t.png").read_text() == "png"
        assert sorted(os.listdir(folder)) == ["t.json", "t.md", "t.png"]
    monkeypatch.setattr(common, "has_matplotlib", lambda: False)
    drawn.clear()
    (folder / "u.png").parent.mkdir(parents=True, exist_ok=True)
    (folder / "u.png").write_text("an earlier run's")
    common.write_results("u", "cpu", rows, ["a"], "title", plot=draw)
    assert drawn == [] and (folder / "u.md").exists() and not (folder / "u.png").exists()
    assert "matplotlib is not installed or does not import: no u.png" in capsys.readouterr().err


def test_results_of_another_machine_are_kept(tmp_path, monkeypatch, capsys):
    """results/cpu/ holds tables of several machines that the README quotes: a run on another CPU replaced them
    (an audit). Its results go beside them, named after its CPU; the same CPU replaces its own; the JSON records
    the load average and what the script passes."""
    import json
    from benchmarks import common
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    folder = tmp_path / common.machine_label("cpu")
    folder.mkdir()
    (folder / "t.json").write_text(json.dumps({"machine": "Intel(R) Xeon(R) Platinum 8488C, 2 cores, torch 2.13.0+cpu"}))
    monkeypatch.setattr(common, "machine_description", lambda d: "AMD EPYC 9R14, 2 cores, torch 2.13.0+cpu")
    common.write_results("t", "cpu", [{"a": 1}], ["a"], "title", meta={"rounds": 3})
    assert "Xeon" in (folder / "t.json").read_text()
    mine = json.loads((folder / "t_amd-epyc-9r14.json").read_text())
    assert mine["rounds"] == 3 and mine["machine"].startswith("AMD EPYC 9R14") and "load_average" in mine
    assert "this machine's results go to t_amd-epyc-9r14" in capsys.readouterr().err
    monkeypatch.setattr(common, "machine_description", lambda d: "Intel(R) Xeon(R) Platinum 8488C, 4 cores, torch 2.4")
    common.write_results("t", "cpu", [{"a": 2}], ["a"], "title")
    assert json.loads((folder / "t.json").read_text())["rows"] == [{"a": 2}]
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_machine_description_records_the_cpus_family_and_model(tmp_path):
    """Two AVX2 hosts both named "AMD EPYC" (a Zen 3 and a Zen 1 class one, float32 work per cycle 2x apart) were
    told apart only by the JSON's date: the description records family, model and stepping, and result_name
    compares the model name with the family and model (a Zen 3 run replaced the Zen 1 table: an audit)."""
    import torch
    from benchmarks import common
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 2\n\n"
    info = tmp_path / "cpuinfo"
    info.write_text(block.format(0, 23) + block.format(1, 25))  # the first processor's block is the one read
    described = common.machine_description("cpu", cpuinfo=str(info))
    assert described == f"AMD EPYC, {os.cpu_count()} cores, family 23 model 1 stepping 2, torch {torch.__version__}"
    assert common._model_of(described) == "AMD EPYC, family 23 model 1"
    zen1 = tmp_path / "zen1"
    zen1.mkdir()
    (zen1 / "t.json").write_text('{"machine": "%s"}' % described)
    zen3 = described.replace("family 23", "family 25")
    assert common.result_name(str(zen1), "t", zen3) == "t_amd-epyc-family-25-model-1"
    assert common.result_name(str(zen1), "t", described.replace("2 cores", "4 cores")) == "t"  # the same kind
    (zen1 / "old.json").write_text('{"meta": {"cpu": "x86_64"}}')  # a table that records no machine: kept
    assert common.result_name(str(zen1), "old", described) == "old_amd-epyc-family-23-model-1"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\n")  # an Arm host: no family
    assert common.machine_description("cpu", cpuinfo=str(info)).endswith(f" cores, torch {torch.__version__}")
    assert common.machine_description("cpu", cpuinfo=str(tmp_path / "absent")).endswith(f"torch {torch.__version__}")
