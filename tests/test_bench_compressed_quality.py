"""benchmarks/bench_compressed_pool_quality.py: its error and standard-error helpers against float64
references, and its --quick run end to end (the demo's --quick checkpoints, every pool kind)."""
import json
import math
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_compressed_pool_quality as bench  # noqa: E402
from benchmarks import common  # noqa: E402


def test_merged_error_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 13), "b": (1,), "c": (0,), "d": (31,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ref = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ref["d"] = base["d"].clone()  # a tensor no checkpoint changed: no delta of its own
    got = {k: v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in ref.items()}
    got["b"] = ref["b"].clone()
    err = bench.merged_error(got, ref, base)
    e2 = {k: sum((float(x) - float(y)) ** 2 for x, y in zip(got[k].reshape(-1), ref[k].reshape(-1))) for k in ref}
    d2 = sum((float(x) - float(y)) ** 2 for k in ref for x, y in zip(ref[k].reshape(-1), base[k].reshape(-1)))
    w2 = sum(float(x) ** 2 for k in ref for x in ref[k].reshape(-1))
    assert err["vs_delta"] == pytest.approx(math.sqrt(sum(e2.values()) / d2), rel=1e-9)
    assert err["vs_weights"] == pytest.approx(math.sqrt(sum(e2.values()) / w2), rel=1e-9)
    worst = err["worst_tensors"]
    assert worst[0]["tensor"] == max(e2, key=e2.get) and sum(w["share_of_error2"] for w in worst) == pytest.approx(1.0)
    assert next(w for w in worst if w["tensor"] == "d")["rel_error_of_delta"] == 0.0  # no delta: 0, not a division
    assert bench.merged_error(ref, ref, base)["vs_delta"] == 0.0


def test_standard_error_of_a_macro_average():
    assert bench.standard_error({"x": 0.5, "y": 0.1}, {"x": 100, "y": 400}) == pytest.approx(
        math.sqrt(0.25 / 100 + 0.09 / 400) / 2)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, monkeypatch, capsys, quick_demo_checkpoints):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    shutil.copytree(quick_demo_checkpoints, tmp_path / "cache" / "quick-seed0")  # the demo's --quick checkpoints
    assert bench.main(["--quick", "--budget", "3", "--auto-budgets", "0.15", "--cache", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    assert "int4: search within 0.2 points" in captured.out and "reusing the checkpoints" in captured.err
    with open(tmp_path / "results" / common.machine_label("cpu") / "bench_compressed_pool_quality_quick.json") as fh:
        rows = json.load(fh)["rows"]
    with open(tmp_path / "results" / common.machine_label("cpu") / "bench_compressed_pool_quality_quick.md") as fh:
        assert "| mean of 1 | int4 |" in fh.read()
    by = {r["pool"]: r for r in rows if r["seed"] == 0}
    assert list(by) == ["uncompressed", "int8", "int4", "auto 0.15"]
    ref, q8, q4, auto = by["uncompressed"], by["int8"], by["int4"], by["auto 0.15"]
    # the uncompressed search is its own reference
    assert ref["d test"] == ref["d @ref w"] == 0.0 and ref["test @ref w"] == ref["test"]
    assert float(ref["err merged delta"]) == 0.0 and ref["formats"] == "-"
    for r in (q8, q4, auto):
        assert r["d test"] == pytest.approx(r["test"] - ref["test"], abs=0.011)
        assert r["d @ref w"] == pytest.approx(r["test @ref w"] - ref["test"], abs=0.011)
        assert 0 <= r["test"] <= 100 and r["evaluations"] == 3 and r["worst_tensors"]
    # int4 holds fewer bytes than int8 and errs more (int8 ~0.5 %, int4 ~10 % of the merged delta)
    assert q4["held KB"] < q8["held KB"] < ref["held KB"]
    assert set(q4["formats"].split()[1::2]) <= {"int4", "zero"} and set(q8["formats"].split()[1::2]) <= {"int8", "zero"}
    assert 0 < float(q8["err merged delta"]) < 0.02 < float(q4["err merged delta"]) < 0.3
    assert q4["held KB"] <= auto["held KB"] <= q8["held KB"]

    with open(tmp_path / "results" / common.machine_label("cpu") / "bench_compressed_pool_quality_quick_diagnosis.json") as fh:
        diag = {r["variant"].split(" (")[0]: r for r in json.load(fh)["rows"]}
    assert diag["int4"]["held KB"] == q4["held KB"] and diag["int4"]["err merged delta"] == q4["err merged delta"]
    # a tighter auto budget holds at least as many bytes and errs no more than int4
    sweep = [diag[f"auto {b:g}"] for b in (0.12, 0.1, 0.05)]
    assert q4["held KB"] <= sweep[0]["held KB"] <= sweep[1]["held KB"] <= sweep[2]["held KB"] <= q8["held KB"]
    # keeping one kind of tensor exact costs bytes and removes that kind's share of the error
    kinds = [r for v, r in diag.items() if v.startswith("int4, ")]
    assert {v.split(", ")[1] for v in diag if v.startswith("int4, ")} >= {"embed_tokens exact", "mlp.up_proj exact"}
    for r in kinds:
        assert r["held KB"] > q4["held KB"] and float(r["err merged delta"]) <= float(q4["err merged delta"])
    assert float(diag["uncompressed, float32 live model"]["err merged delta"]) > 0  # the bf16 live model rounds
