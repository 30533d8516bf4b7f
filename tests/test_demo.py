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
    for key in ("best_single", "uniform", "optimized", "greedy_soup", "best_single_in_hindsight", "optimized_val"):
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
    # the pool trades the tasks off: the single-task runs are far better at their own task (by ~30 points)
    ck = details["checkpoints"]
    assert ck["upright-only"]["val"]["upright"] > ck["upright-only"]["val"]["rotated"] + 0.1
    assert ck["rotated-only"]["val"]["rotated"] > ck["rotated-only"]["val"]["upright"] + 0.1
    assert isinstance(summary["beats_best_single"], bool) and isinstance(summary["beats_uniform"], bool)


def test_pool_runs_see_disjoint_shards():
    """No run sees all the training data: the pretraining part and the shards cut the split without overlap."""
    from pymerge.demo_data import NUM_SHARDS, load_splits, runs, shards
    train = load_splits(0)["train"]
    pre, parts = shards(train, 0)
    assert len(parts) == NUM_SHARDS
    sizes = [len(pre.y["upright"])] + [len(p.y["upright"]) for p in parts]
    assert sum(sizes) == len(train.y["upright"]) and max(sizes) < len(train.y["upright"]) / 3
    rows = {tuple(r.tolist()) for p in [pre] + parts for r in p.x["upright"]}
    assert len(rows) >= 0.95 * len(train.y["upright"])  # disjoint (up to digits that happen to repeat)
    assert len({r.shard for r in runs() if r.parent is None}) == len([r for r in runs() if r.parent is None])
