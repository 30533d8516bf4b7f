"""The demo in its --quick form (CI): runs end to end, prints one JSON object last, writes its outputs."""
import json
import os

import pytest

from pymerge import demo


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert demo.main(["--quick", "--json", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("best_single", "uniform", "optimized", "greedy_soup", "best_single_in_hindsight"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["evaluations"] == 60
    assert len(summary["optimized_weights"]) == 8
    assert abs(sum(summary["optimized_weights"]) - 1.0) < 1e-6
    for f in ("results.json", "demo.png", "search/history.json", "search/history.csv", "search/search.png"):
        assert os.path.getsize(out / f) > 0, f
    assert len(os.listdir(out / "checkpoints")) == 8
    # the optimized merge is picked on validation: it cannot score below the uniform merge there
    details = json.load(open(out / "results.json"))["details"]
    val = lambda r: sum(r["val"].values()) / 2  # noqa: E731
    assert val(details["optimized"]) >= val(details["uniform"])
