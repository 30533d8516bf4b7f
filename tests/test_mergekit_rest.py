"""The rest of mergekit 0.1.5: sce, multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl;
`slices:` / `modules:`; model IDs from the Hugging Face cache; mergekit-yaml's flags.

1. Each method against a float64 reference (tests/mergekit_rest_reference.py) on awkward shapes,
   float32 and bfloat16 inputs, and against mergekit's own function on the same tensors.
2. Parity through the CLI: `pymerge merge` and `mergekit-yaml` (one subprocess for every config)
   on generated Llama checkpoints (4 and 6 layers, untied and tied embeddings): same tensor names,
   shapes, dtypes, values within 1e-5 relative per tensor, same num_hidden_layers and files.
3. Hub IDs, flags and bad configs: exit 2 with one line, no output.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import llama_factory as lf
import mergekit_rest_reference as ref
from mergekit_runner import run_mergekit_driver
from pymerge import cli
from pymerge.methods.base import TensorTask, get_method

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 is not installed")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SHAPES = [(1,), (7,), (13, 17), (64, 129), (2, 3, 50), (257, 263)]  # the last: native Gram (> 65536)
TOL = 1e-5


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def tensors(shape, n, seed, dtype=torch.float32, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def ours(name, xs, base, model_params, params, out_dtype=torch.float32):
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    task = TensorTask(list(xs), base, model_params, params, name="model.layers.0.mlp.up_proj.weight")
    method = get_method(name)
    method.check_params(task)
    method.merge_tensor(task, out)
    return out


# name -> (ours(xs, base), reference(xs, base), mergekit(xs, base)); three fine-tunes and a base
W = [0.3, 0.5, 0.9]
CASES = {
    "multislerp": (lambda xs, b: ours("multislerp", xs, b, [{"weight": w} for w in W], {}),
                   lambda xs, b: ref.multislerp(xs, W, b),
                   lambda xs, b: mk("multislerp", [b] + xs, 0, {"weight": W})),
    "multislerp_no_base": (lambda xs, b: ours("multislerp", xs[:2], None, [{"weight": 1.0}, {"weight": 3.0}],
                                              {"normalize_weights": False, "eps": 1e-6}),
                           lambda xs, b: ref.multislerp(xs[:2], [1.0, 3.0], None, False, 1e-6),
                           lambda xs, b: mk("multislerp", xs[:2], None, {"weight": [1.0, 3.0],
                                                                         "normalize_weights": False, "eps": 1e-6})),
    "karcher": (lambda xs, b: ours("karcher", xs + [b], None, [{}] * 4, {}),
                lambda xs, b: ref.karcher(xs + [b]),
                lambda xs, b: mk("karcher", xs + [b], None, {})),
    "karcher_3_steps": (lambda xs, b: ours("karcher", xs, None, [{}] * 3, {"max_iter": 3, "tol": 1e-4}),
                        lambda xs, b: ref.karcher(xs, 3, 1e-4),
                        lambda xs, b: mk("karcher", xs, None, {"max_iter": 3, "tol": 1e-4})),
    "nearswap": (lambda xs, b: ours("nearswap", xs[:1], b, [{}], {"t": 0.2}),
                 lambda xs, b: ref.nearswap(b, xs[0], 0.2),
                 lambda xs, b: mk("nearswap", [b, xs[0]], 0, {"t": 0.2})),
    "arcee_fusion": (lambda xs, b: ours("arcee_fusion", xs[:1], b, [{}], {}),
                     lambda xs, b: ref.arcee_fusion(b, xs[0]),
                     lambda xs, b: mk("arcee_fusion", [b, xs[0]], 0, {})),
    "sce": (lambda xs, b: ours("sce", xs, b, [{}] * 3, {}),
            lambda xs, b: ref.sce(b, xs),
            lambda xs, b: mk("sce", [b] + xs, 0, {})),
    "sce_topk": (lambda xs, b: ours("sce", xs, b, [{}] * 3, {"select_topk": 0.4, "int8_mask": True}),
                 lambda xs, b: ref.sce(b, xs, 0.4),
                 lambda xs, b: mk("sce", [b] + xs, 0, {"select_topk": 0.4, "int8_mask": True})),
    "ram": (lambda xs, b: ours("ram", xs, b, [{}] * 3, {"epsilon": 0.25}),
            lambda xs, b: ref.ram(b, xs, 0.25),
            lambda xs, b: mk("ram", [b] + xs, 0, {"epsilon": 0.25})),
    "ramplus_tl": (lambda xs, b: ours("ramplus_tl", xs, b, [{}] * 3, {"epsilon": 0.25, "r": 0.5, "alpha": 0.9}),
                   lambda xs, b: ref.ram(b, xs, 0.25, plus=(0.5, 0.9)),
                   lambda xs, b: mk("ramplus_tl", [b] + xs, 0, {"epsilon": 0.25, "r": 0.5, "alpha": 0.9})),
}


def mk(name, ts, base_index, params):
    return registry.get(name)([TensorGroup.from_tensors(ts, base_index=base_index)], parameters=params)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_float64_reference(case, shape, dtype):
    base, xs = tensors(shape, 3, seed=len(shape) * 7 + shape[-1], dtype=dtype)
    got, want = CASES[case][0](xs, base), CASES[case][1](xs, base)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel(got, want) <= TOL, (case, shape, rel(got, want))


@pytest.mark.parametrize("shape", [(7,), (64, 129)])
@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_mergekit_function(case, shape):
    base, xs = tensors(shape, 3, seed=11)
    assert rel(CASES[case][0](xs, base), CASES[case][2](xs, base)) <= TOL


def test_degenerate_inputs():
    base, xs = tensors((5, 8), 3, seed=2)
    # one model: multislerp and karcher return it unchanged; identical models: their common value
    assert torch.equal(ours("multislerp", xs[:1], base, [{"weight": 2.0}], {}), xs[0])
    assert torch.equal(ours("karcher", xs[:1], None, [{}], {}), xs[0])
    assert rel(ours("karcher", [xs[0]] * 3, None, [{}] * 3, {}), xs[0]) <= 1e-6
    # an exactly antipodal pair with equal weights: mergekit's lerp fallback (a zero delta)
    zero = torch.zeros_like(base)
    got = ours("multislerp", [xs[0], -xs[0]], zero, [{"weight": 1.0}] * 2, {})
    assert torch.equal(got, zero)
    assert torch.equal(mk("multislerp", [zero, xs[0], -xs[0]], 0, {"weight": [1.0, 1.0]}), zero)
    # no change anywhere: base back
    for name, p in (("sce", {}), ("ram", {}), ("ramplus_tl", {}), ("nearswap", {"t": 0.5})):
        n = 1 if name == "nearswap" else 2
        assert torch.equal(ours(name, [base] * n, base, [{}] * n, p), base), name
    # empty tensors
    e = torch.empty(0, 4)
    for name, n, b, p in (("multislerp", 2, None, {"weight": 1.0}), ("karcher", 2, None, {}),
                          ("arcee_fusion", 1, e, {}), ("sce", 2, e, {"select_topk": 0.5}), ("ram", 2, e, {})):
        assert ours(name, [e] * n, b, [p if name == "multislerp" else {}] * n,
                    {} if name == "multislerp" else p).shape == (0, 4)


def test_nearly_cancelling_units_match_float64():
    """Where the weighted unit vectors nearly cancel (nearly antipodal inputs, balancing weights), the result's
    coefficients grow as 1 / |their mean| and the Gram arithmetic cancelled to noise: 70 of 200 1-element
    multislerps matched neither float64 nor mergekit (base +- 0.125 ... 0.5), an antiparallel one was 24 % off,
    karcher on nearly antipodal pairs up to 4e-3 (an audit). Such tensors now run on the float64 vectors."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # a 1-element tensor's task vectors are parallel or antipodal; half cancel
        base = torch.randn(1, generator=g)
        xs = [base + 0.3 * torch.randn(1, generator=g) for _ in range(2)]
        got = ours("multislerp", xs, base, [{"weight": 1.0}] * 2, {})
        want = ref.multislerp(xs, [1.0, 1.0], base)
        assert abs(float(got) - float(want)) <= 1e-6 * max(1.0, abs(float(want))), (xs, base, got, want)
    x = torch.randn(4099, generator=g)
    xs = [x, -x / 1024, -x / 1024]  # units u, -u, -u at 0.5 / 0.25 / 0.25: cancelling but for eps
    got = ours("multislerp", xs, None, [{"weight": w} for w in (0.5, 0.25, 0.25)], {})
    assert rel(got, ref.multislerp(xs, [0.5, 0.25, 0.25])) <= 1e-6
    for n in (2, 64, 4099):
        x = torch.randn(n, generator=g)
        xs = [x, -x * (1 - 1e-4) + 1e-4 * torch.randn(n, generator=g)]
        assert rel(ours("karcher", xs, None, [{}] * 2, {}), ref.karcher(xs)) <= 1e-6, n
    # prepared (a pool prepares every tensor before writing any): the checks ran, no full-size result is kept
    task = TensorTask([x, -x / 1024, -x / 1024], None, [{"weight": w} for w in (0.5, 0.25, 0.25)], {}, name="t")
    method = get_method("multislerp")
    method.prepare(task)
    out = torch.empty_like(x)
    assert task.prepared is None
    method.merge_tensor(task, out)
    assert rel(out, ref.multislerp(task.inputs, [0.5, 0.25, 0.25])) <= 1e-6


def test_zero_tolerances_merge_or_fail_in_one_line():
    """karcher with tol <= 0 and two models met their mean exactly (a zero tangent): ZeroDivisionError, where
    mergekit merges (its float noise never hits 0). multislerp with eps 0 and a model equal to the base
    divided by a zero norm: now a one-line error naming the tensor (mergekit writes NaN)."""
    from pymerge.errors import MergeConfigError
    base, xs = tensors((64, 129), 2, seed=5)
    for tol in (0.0, -1.0):
        got = ours("karcher", xs, None, [{}] * 2, {"tol": tol})
        assert rel(got, mk("karcher", xs, None, {"tol": 1e-12})) <= TOL
    assert rel(ours("multislerp", xs, base, [{"weight": 1.0}] * 2, {"eps": 0.0}),
               mk("multislerp", [base] + xs, 0, {"weight": [1.0, 1.0], "eps": 0.0})) <= TOL
    with pytest.raises(MergeConfigError, match=r"tensor model.layers.0.mlp.up_proj.weight: multislerp: model 1's "
                                               r"task vector is zero and eps is 0"):
        ours("multislerp", [xs[0], base], base, [{"weight": 1.0}] * 2, {"eps": 0.0})


def test_native_nearswap_has_mergekits_bits():
    """The kernel computed t / d where torch (so mergekit) takes reciprocal(d) * t: 3.5 % of float32
    outputs were 1 ulp off."""
    base, xs = tensors((100_003,), 1, seed=9)
    got = ours("nearswap", xs, base, [{}], {"t": 0.37})
    assert torch.equal(got, mk("nearswap", [base, xs[0]], 0, {"t": 0.37}))


def test_elementwise_methods_chunk_like_whole():
    """nearswap and ram are streamed in chunks by the engine: any split gives the whole result."""
    base, xs = tensors((31, 37), 3, seed=5)
    for name, n, p in (("nearswap", 1, {"t": 0.1}), ("ram", 3, {"epsilon": 0.2})):
        assert get_method(name).chunkable
        whole = ours(name, xs[:n], base, [{}] * n, p).reshape(-1)
        pieces = []
        for s in range(0, base.numel(), 101):
            sl = slice(s, s + 101)
            pieces.append(ours(name, [x.reshape(-1)[sl] for x in xs[:n]], base.reshape(-1)[sl], [{}] * n, p))
        assert torch.equal(torch.cat(pieces), whole), name


def test_nan_propagates_without_a_crash():
    """A NaN input element: no exception, and NaN exactly where mergekit's own function puts it."""
    base, xs = tensors((6, 9), 3, seed=3)
    xs[1][2, 3] = float("nan")
    for case in ("multislerp", "sce", "ram", "nearswap", "arcee_fusion"):
        args = (xs if case != "nearswap" else [xs[1]], base)
        got, theirs = CASES[case][0](*args), CASES[case][2](*args).float()
        assert torch.equal(got.isnan(), theirs.isnan()), case


# ---- end to end against mergekit-yaml -----------------------------------------------------------
D4 = lf.LlamaDims(hidden=32, layers=4, intermediate=48, vocab=64, heads=4, kv_heads=2)
D6T = lf.LlamaDims(hidden=32, layers=6, intermediate=48, vocab=64, heads=4, kv_heads=2, tie_embeddings=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest")
    base, fts = lf.make_family(root / "d4", n_finetunes=3, dims=D4, perturb=0.3)
    t_base, t_fts = lf.make_family(root / "d6t", n_finetunes=2, dims=D6T, perturb=0.3)
    return root, [str(p) for p in [base] + fts], [str(p) for p in [t_base] + t_fts]


def _configs(m4, m6):
    b, f1, f2, f3 = m4
    tb, t1, t2 = m6
    mlp_or = lambda mlp, other: [{"filter": "mlp", "value": mlp}, {"value": other}]  # noqa: E731
    f32 = {"dtype": "float32"}
    return {
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": f} for f in (f1, f2, f3)],
                "parameters": {"select_topk": mlp_or(0.5, [0.2, 0.9])}, **f32},
        "sce_all": {"merge_method": "sce", "base_model": tb, "models": [{"model": t1}, {"model": t2}], **f32},
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": [0.2, 0.8]}},
            {"model": f2, "parameters": {"weight": mlp_or(1, 0.4)}},
            {"model": f3, "parameters": {"weight": 0.5}}], **f32},
        "multislerp_no_base": {"merge_method": "multislerp", "models": [
            {"model": t1, "parameters": {"weight": 1.0}}, {"model": t2, "parameters": {"weight": 2.0}}],
            "parameters": {"normalize_weights": False}, **f32},
        "karcher": {"merge_method": "karcher", "base_model": b, "models": [{"model": f1}, {"model": f2}],
                    "parameters": {"max_iter": 5}, **f32},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": f1}],
                     "parameters": {"t": [0.001, 0.05]}, **f32},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": tb, "models": [{"model": tb}, {"model": t2}],
                         **f32},
        "ram": {"merge_method": "ram", "base_model": b, "models": [{"model": f} for f in (f1, f2, f3)],
                "parameters": {"epsilon": mlp_or(0.05, 0.02)}, **f32},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": [{"model": f} for f in (f1, f2)],
                       "parameters": {"epsilon": 0.03, "r": [0.5, 1.0], "alpha": 0.9}, **f32},
        # frankenmerge across layer counts: 4-layer and 6-layer models (same widths), untied donor
        "slices_frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 3]}]},
            {"sources": [{"model": t1, "layer_range": [2, 6]}]},
            {"sources": [{"model": f2, "layer_range": [3, 4], "parameters": {"scale": mlp_or(0.5, 1.0)}}]}], **f32},
        # depth up-scaling of a tied-embedding model: layers repeated
        "slices_dus_tied": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": t2, "layer_range": [0, 4]}]},
            {"sources": [{"model": t2, "layer_range": [2, 6]}]}], "dtype": "bfloat16"},
        # per-slice merges of several models, gradients over each slice, parameters at three levels
        "slices_linear": {"merge_method": "linear", "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8]}},
                         {"model": f3, "layer_range": [2, 4]}], "parameters": {"weight": 0.6}},
            {"sources": [{"model": f2, "layer_range": [1, 4], "parameters": {"weight": 1.0}},
                         {"model": f1, "layer_range": [0, 3], "parameters": {"weight": mlp_or(0.3, 2.0)}}]},
            # one layer: a gradient's t is 1 there, as in mergekit (f1 alone), not 0 (f2 alone)
            {"sources": [{"model": f1, "layer_range": [3, 4], "parameters": {"weight": [0.0, 1.0]}},
                         {"model": f2, "layer_range": [0, 1], "parameters": {"weight": [1.0, 0.0]}}]}],
            "parameters": {"normalize": False, "weight": 0.1}, **f32},
        "slices_ties_base": {"merge_method": "ties", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 4]}, {"model": f1, "layer_range": [0, 4]},
                         {"model": f2, "layer_range": [0, 4]}]}],
            "parameters": {"weight": 0.5, "density": [0.3, 0.9]}, **f32},
        "modules_slices": {"merge_method": "multislerp", "modules": {"default": {
            "slices": [{"sources": [{"model": f1, "layer_range": [0, 2]}, {"model": f2, "layer_range": [2, 4]}]},
                       {"sources": [{"model": f3, "layer_range": [1, 4]}, {"model": f1, "layer_range": [0, 3]}]}],
            "parameters": {"weight": [1.0, 0.2]}}}, **f32},
        # a slice's own parameters over its module's, its module's over the top level's
        "modules_slices_linear": {"merge_method": "linear", "modules": {"default": {
            "slices": [{"sources": [{"model": f1, "layer_range": [0, 4]}, {"model": f2, "layer_range": [0, 4]}],
                        "parameters": {"weight": [0.3, 0.9]}}],
            "parameters": {"weight": 1.0, "normalize": False}}}, "parameters": {"weight": 2.0}, **f32},
        "modules_models": {"merge_method": "karcher", "base_model": tb, "modules": {"default": {
            "models": [{"model": t1}, {"model": t2}]}}, **f32},
    }


FLAGGED = {"slices_dus_tied": ["--no-copy-tokenizer"], "karcher": ["--out-shard-size", "20000"]}
NAMES = list(_configs("abcd", "abc"))


def _mergekit(jobs):
    driver = ("import json, sys\nfrom mergekit.scripts.run_yaml import main\n"
              "for cfg, out, extra in json.loads(sys.argv[1]):\n"
              "    main([cfg, out, '--quiet'] + extra, standalone_mode=False)\n")
    proc = run_mergekit_driver(driver, [json.dumps(jobs)], env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def parity(models):
    root, m4, m6 = models
    jobs = []
    for name, c in _configs(m4, m6).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(c, sort_keys=False))
        jobs.append((str(path), str(root / "mk" / name), FLAGGED.get(name, [])))
    _mergekit(jobs)
    return root


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit_yaml(parity, name, tmp_path, capsys):
    out, theirs_dir = tmp_path / "out", parity / "mk" / name
    rc, err = run_cli(["merge", parity / f"{name}.yml", out, "--quiet"] + FLAGGED.get(name, []), capsys)
    assert rc == 0, err
    ours, theirs = lf.load_folder(out), lf.load_folder(theirs_dir)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for k, b in theirs.items():
        a = ours[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        assert rel(a, b) <= TOL, (name, k, rel(a, b))
    cfg = yaml.safe_load((parity / f"{name}.yml").read_text())
    for m in [cfg.get("base_model")] + [e["model"] for e in cfg.get("models", [])]:
        if m:  # a real merge: no input comes out unchanged
            src = lf.load_folder(m)
            assert any(not torch.equal(ours[k], src[k]) for k in src if k in ours), (name, m)
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (out, theirs_dir))
    assert cfg_a["num_hidden_layers"] == cfg_b["num_hidden_layers"]
    files = lambda d: {p.name for p in d.iterdir() if p.suffix != ".safetensors" and p.name not in  # noqa: E731
                       ("README.md", "model.safetensors.index.json")}
    assert files(out) == files(theirs_dir)


def test_slices_renumber_and_repeat_layers(parity, tmp_path, capsys):
    """The frankenmerge's layers are the sources' layers, renumbered (values exact: passthrough)."""
    out = tmp_path / "o"
    assert run_cli(["merge", parity / "slices_dus_tied.yml", out, "--quiet"], capsys)[0] == 0
    got = lf.load_folder(out)
    cfg = yaml.safe_load((parity / "slices_dus_tied.yml").read_text())
    src = lf.load_folder(cfg["slices"][0]["sources"][0]["model"])
    for out_layer, src_layer in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        k = f"model.layers.{out_layer}.mlp.down_proj.weight"
        assert torch.equal(got[k], src[f"model.layers.{src_layer}.mlp.down_proj.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    assert "lm_head.weight" not in got  # tied embeddings stay tied


# ---- hub IDs, flags, bad configs ---------------------------------------------------------------------
def _fake_cache(root, model_dir, org_name, commit, branch="main"):
    repo = root / ("models--" + org_name.replace("/", "--"))
    (repo / "snapshots").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "snapshots" / commit).symlink_to(model_dir, target_is_directory=True)
    (repo / "refs" / branch).write_text(commit)


def test_hub_cache_refs_that_would_pick_another_model_are_refused(models, tmp_path, capsys, monkeypatch):
    """A hunt of the offline hub cache: '@2' (a tag never downloaded) took the commit starting with '2'; an
    empty refs/main named the snapshots folder, one holding an absolute path merged that folder (outside the
    cache) as the model; two snapshots and no refs/main said "not in the cache"; a snapshot's link to a blob
    never written said "no model.safetensors in this folder"."""
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _fake_cache(cache, m4[1], "org/ft", "2" + "a" * 39)
    repo = cache / "models--org--ft"
    cfg = tmp_path / "c.yml"

    def refused(model, *words):
        cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [model]}))
        rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / "out").exists()
    refused("org/ft@2", "revision '2' of org/ft is not in the Hugging Face cache")
    for held in ("", str(m4[2])):
        (repo / "refs" / "main").write_text(held)
        refused("org/ft", "refs/main: holds", "not a commit hash")
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / ("b" * 40)).symlink_to(m4[2], target_is_directory=True)
    refused("org/ft", "org/ft has 2 snapshots in the Hugging Face cache", "no refs/main", "org/name@revision")
    broken = repo / "snapshots" / ("c" * 40)
    broken.mkdir()
    (broken / "model.safetensors").symlink_to("../../blobs/0123deadbeef")
    refused("org/ft@cccc", "model org/ft@cccccccccccc (from the Hugging Face cache): ",  # (it named the path only)
            "model.safetensors: is a broken link to ../../blobs/0123deadbeef")
    # the download advice names the cache pymerge looked in (--transformers-cache sets it for pymerge only)
    refused("org/nothere", "not in the Hugging Face cache", "nor a local folder",
            f"hf download org/nothere --cache-dir {cache} (huggingface-cli download before huggingface_hub 1.0)")
    # a ref naming a commit whose snapshot is missing (an interrupted update) said "not in the cache", hiding the
    # snapshot that is (an audit)
    upd = cache / "models--org--upd"
    (upd / "refs").mkdir(parents=True)
    (upd / "snapshots").mkdir()
    (upd / "snapshots" / ("a" * 40)).symlink_to(m4[2], target_is_directory=True)
    (upd / "refs" / "main").write_text("e" * 40)
    refused("org/upd", f"refs/main names commit {'e' * 12}, whose snapshot is not in the cache; an interrupted "
            f"download? download it again", f"cached: {'a' * 12} (give one as org/upd@<commit>)")
    # the only snapshot, but another revision's (`hf download org/pr --revision refs/pr/1`): merged as org/pr, the
    # card saying org/pr (an audit); one downloaded by its hash (no ref names it) is still the model
    pr = cache / "models--org--pr"
    (pr / "refs" / "refs" / "pr").mkdir(parents=True)  # (huggingface_hub's path for revision refs/pr/1)
    (pr / "snapshots").mkdir()
    (pr / "snapshots" / ("d" * 40)).symlink_to(m4[2], target_is_directory=True)
    (pr / "refs" / "refs" / "pr" / "1").write_text("d" * 40)
    refused("org/pr", "org/pr has no refs/main in the Hugging Face cache; its only snapshot is refs/pr/1's "
            f"(commit {'d' * 12}): give the model as org/pr@refs/pr/1")
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/pr@refs/pr/1"]}))
    assert run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)[0] == 0
    shutil.rmtree(tmp_path / "out")
    (pr / "refs" / "refs" / "pr" / "1").unlink()
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/pr"]}))
    assert run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)[0] == 0
    shutil.rmtree(tmp_path / "out")
    # one model under two spellings: the error named the snapshot's path, neither spelling (an audit)
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "org/pr", "parameters": {"weight": 1.0}}, {"model": f"org/pr@{'d' * 8}", "parameters": {"weight": 1.0}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and f"models[1]: model org/pr@{'d' * 8} is listed twice (models[0] as org/pr)" in err, err
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [  # the mapping form, as MODEL@REV
        {"model": "org/pr", "parameters": {"weight": 1.0}},
        {"model": {"model": {"path": "org/pr", "revision": "d" * 6}}, "parameters": {"weight": 1.0}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and f"models[1]: model org/pr@{'d' * 6} is listed twice (models[0] as org/pr)" in err, err
    # a revision on a local folder: the error said the folder 'm@main' was not found
    refused({"model": {"model": {"path": str(m4[1]), "revision": "main"}}},
            f"{m4[1]} is a local folder; a revision (@main) applies to Hugging Face model IDs only")
    refused(f"{m4[1]}@main+{m4[1]}", f"model: {m4[1]} is a local folder; a revision (@main) applies")  # a LoRA side
    # an '@' that is part of a real folder's name is no revision (a review): the missing path is named
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp@lr3").mkdir()
    refused(str(tmp_path / "runs" / "exp@lr3" / "step100"), f"model path not found: {tmp_path}/runs/exp@lr3/step100")
    # a broken single-file link beside a good sharded index: the index loads, as before that check (a review)
    sharded = tmp_path / "sharded"
    shutil.copytree(m4[1], sharded)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(sharded / "a.safetensors"))
    save_file({k: tensors[k] for k in names[2:]}, str(sharded / "b.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "a.safetensors" if i < 2 else "b.safetensors" for i, k in enumerate(names)}}))
    (sharded / "model.safetensors").symlink_to("../../blobs/gone")
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [str(sharded)]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err


def test_hub_cache_variables_are_expanded_as_huggingface_hub_does(tmp_path, monkeypatch):
    """HF_HOME='$SCRATCH/hf' was taken literally: a cache huggingface_hub finds was 'not in the cache' (an audit)."""
    from pymerge import hub
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MYROOT", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$MYROOT/home")
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", "${MYROOT}/cache")
    assert hub.cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~ first, then $VARS (huggingface_hub's order): a ~ a
    monkeypatch.setenv("MYROOT", "~/x")                     # variable brings stays (it finds the same folder)
    monkeypatch.setenv("HF_HUB_CACHE", "$MYROOT/c")
    assert hub.cache_dir() == Path("~/x/c")


def test_a_ctrl_c_as_the_hub_cache_is_set_leaves_it_unset(tmp_path, monkeypatch, ctrl_c):
    """--transformers-cache set HF_HUB_CACHE before the try that puts it back: a Ctrl-C as it was set left it set
    for the rest of the process, every later merge looking up IDs there (an audit)."""
    import time
    import types
    from pymerge.mergekit_flags import hub_cache

    class Environ(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if key == "HF_HUB_CACHE":
                ctrl_c()
                time.sleep(0.01)  # (delivered here, between bytecodes)

    env = Environ(os.environ)
    env.pop("HF_HUB_CACHE", None)
    monkeypatch.setattr(os, "environ", env)
    with pytest.raises(KeyboardInterrupt):
        with hub_cache(types.SimpleNamespace(transformers_cache=str(tmp_path))):
            pass
    assert "HF_HUB_CACHE" not in env


def test_model_ids_from_the_hub_cache(models, tmp_path, capsys, monkeypatch):
    _, m4, _ = models
    cache = tmp_path / "hub"
    _fake_cache(cache, m4[1], "org/ft", "a" * 40)
    _fake_cache(cache, m4[2], "org/ft", "b" * 40, branch="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = tmp_path / "c.yml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "org/ft", "parameters": {"weight": 1.0}}, {"model": "org/ft@v2", "parameters": {"weight": 3.0}}],
        "dtype": "float32"}))
    rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
    assert rc == 0, err
    a, b = lf.load_folder(m4[1]), lf.load_folder(m4[2])
    got = lf.load_folder(out)
    for k in a:
        assert rel(got[k], 0.25 * a[k].double() + 0.75 * b[k].double()) <= 1e-6
    # a commit prefix, and --transformers-cache instead of the environment
    monkeypatch.delenv("HF_HUB_CACHE")
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/ft@bbbbbbbb"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "o2", "--quiet", "--transformers-cache", cache], capsys)
    assert rc == 0, err
    assert torch.equal(lf.load_folder(tmp_path / "o2")["model.norm.weight"], b["model.norm.weight"])
    # for that merge alone: set for good, a later merge in this process still found IDs there (an audit)
    assert "HF_HUB_CACHE" not in os.environ
    rc, err = run_cli(["merge", cfg, tmp_path / "o2b", "--quiet"], capsys)
    assert rc == 2 and "not in the Hugging Face cache" in err
    # $VARS expanded as huggingface_hub does (made absolute first, '$SCRATCH/hf' was a folder under the cwd)
    monkeypatch.setenv("MY_HUB", str(cache))
    rc, err = run_cli(["merge", cfg, tmp_path / "o2c", "--quiet", "--transformers-cache", "$MY_HUB"], capsys)
    assert rc == 0, err
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/other@main"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "o3", "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "org/other@main" in err and "not in the Hugging Face cache" in err
    assert not (tmp_path / "o3").exists()
    # revisions holding '/' (a PR's refs/pr/1, a feature/x branch) resolve as huggingface_hub's do; '..' never
    (cache / "models--org--ft" / "refs" / "refs" / "pr").mkdir(parents=True)
    (cache / "models--org--ft" / "refs" / "refs" / "pr" / "1").write_text("b" * 40)
    for rev, ok in (("refs/pr/1", True), ("../refs/v2", False), ("refs/pr/../../v2", False)):
        cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [f"org/ft@{rev}"]}))
        out = tmp_path / f"rev{len(rev)}"
        rc, err = run_cli(["merge", cfg, out, "--quiet", "--transformers-cache", cache], capsys)
        assert (rc == 0) == ok, (rev, err)
        if ok:
            assert torch.equal(lf.load_folder(out)["model.norm.weight"], b["model.norm.weight"])
    # a commit prefix two cached snapshots share says so (it said 'not in the Hugging Face cache')
    _fake_cache(cache, m4[0], "org/ft", "b" * 39 + "c", branch="other")
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/ft@bbbb"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "amb", "--quiet", "--transformers-cache", cache], capsys)
    assert rc == 2 and "revision 'bbbb' of org/ft is ambiguous" in err and len(err.strip().splitlines()) == 1
    # huggingface_hub's other cache variables: the legacy HUGGINGFACE_HUB_CACHE, and XDG_CACHE_HOME
    xdg = tmp_path / "xdg"
    (xdg / "huggingface").mkdir(parents=True)
    (xdg / "huggingface" / "hub").symlink_to(cache, target_is_directory=True)
    for var, value in (("HUGGINGFACE_HUB_CACHE", cache), ("XDG_CACHE_HOME", xdg)):
        monkeypatch.delenv("HF_HOME", raising=False)
        monkeypatch.setenv(var, str(value))
        cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/ft@v2"]}))
        rc, err = run_cli(["merge", cfg, tmp_path / var, "--quiet"], capsys)
        assert rc == 0, (var, err)
        monkeypatch.delenv(var)


def test_a_custom_code_donors_modules_are_copied(models, tmp_path, capsys):
    """config.json's auto_map named configuration_foo.py, which was not copied: transformers could not load
    the output with trust_remote_code (mergekit writes it; a bug hunt). Another repository's module is not
    copied, nor a path out of the folder."""
    import shutil
    _, m4, _ = models
    donor = tmp_path / "donor"
    shutil.copytree(m4[0], donor)
    config = json.loads((donor / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_foo.FooConfig", "AutoModel": "modeling_foo.FooModel",
                          "AutoModelForCausalLM": "org/repo--modeling_bar.Bar", "Other": "..evil.X"}
    (donor / "config.json").write_text(json.dumps(config))
    for name in ("configuration_foo.py", "modeling_foo.py", "modeling_bar.py"):
        (donor / name).write_text(f"# {name}\n")
    tok = json.loads((donor / "tokenizer_config.json").read_text()) if (donor / "tokenizer_config.json").exists() else {}
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}
    (donor / "tokenizer_config.json").write_text(json.dumps(tok))
    (donor / "tokenization_foo.py").write_text("# tokenizer\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(donor), "parameters": {"weight": 0.5}}, {"model": m4[1], "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    copied = {p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".py"}
    assert copied == {"configuration_foo.py", "modeling_foo.py", "tokenization_foo.py"}
    assert (tmp_path / "out" / "modeling_foo.py").read_text() == "# modeling_foo.py\n"
    # where pymerge writes tokenizer_config.json itself (a chat template, a merged vocabulary) its auto_map's
    # module came along only from a copied file: the output named a module it lacked (a bug hunt)
    tok_only = tmp_path / "tok_only"  # a tokenizer_source folder with a custom tokenizer and no custom model code
    shutil.copytree(m4[1], tok_only)
    (tok_only / "tokenizer_config.json").write_text(json.dumps(tok))
    (tok_only / "tokenization_foo.py").write_text("# the tokenizer source's\n")
    for k, (extra, source) in enumerate((({"chat_template": "chatml"}, donor), ({"tokenizer_source": "union"}, donor),
                                         ({"tokenizer_source": str(tok_only)}, tok_only))):
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", **extra, "models": [
            {"model": str(donor), "parameters": {"weight": 0.5}}, {"model": m4[1], "parameters": {"weight": 0.5}}]}))
        out = tmp_path / f"out{k}"
        rc, err = run_cli(["merge", cfg, out, "--quiet"], capsys)
        assert rc == 0, err
        assert "tokenization_foo" in (out / "tokenizer_config.json").read_text(), extra
        assert (out / "tokenization_foo.py").read_text() == (source / "tokenization_foo.py").read_text(), extra


def test_a_donors_processor_vocabulary_files_and_sibling_modules_are_copied(models, tmp_path, capsys):
    """Three files a merged folder needs that were left behind (an audit): a vision model's processor
    (preprocessor_config.json, processor_config.json: mergekit copies them even with --no-copy-tokenizer), a
    tokenizer's vocabulary in another format (BertTokenizer's vocab.txt: the copied tokenizer_config.json
    loaded and mapped every word to [UNK]; spiece.model, qwen.tiktoken, a file tokenizer_config.json names
    as vocab_file) and a module that custom modeling code imports relatively (from .foo_layers import X).
    A merged vocabulary (tokenizer.json written) replaces the donor's in every format."""
    import shutil
    _, m4, _ = models
    donor = tmp_path / "donor"
    shutil.copytree(m4[0], donor)
    for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        (donor / f).unlink(missing_ok=True)
    vocab = {"vocab.txt": "[PAD]\n[UNK]\nhello\n", "spiece.model": "sp", "qwen.tiktoken": "tk",
             "my_words.list": "named by vocab_file", "weights.bin": "named, but weights",
             "preprocessor_config.json": '{"image_size": 4}', "processor_config.json": '{"processor_class": "P"}'}
    for name, text in vocab.items():
        (donor / name).write_text(text)
    (donor / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                             "vocab_file": "my_words.list", "merges_file": "weights.bin"}))
    config = json.loads((donor / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_foo.FooModel"}
    (donor / "config.json").write_text(json.dumps(config))
    (donor / "modeling_foo.py").write_text("from .foo_layers import SCALE\nimport os\n")
    (donor / "foo_layers.py").write_text("from .foo_utils import helper  # noqa\nSCALE = 2\n")
    (donor / "foo_utils.py").write_text("def helper(): pass\n")
    (donor / "unrelated.py").write_text("# not imported\n")
    cfg = tmp_path / "c.yml"

    def merge(out, *flags, **extra):
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", **extra, "models": [
            {"model": str(donor), "parameters": {"weight": 0.5}}, {"model": m4[1], "parameters": {"weight": 0.5}}]}))
        rc, err = run_cli(["merge", cfg, tmp_path / out, "--quiet", *flags], capsys)
        assert rc == 0, err
        return {p.name for p in (tmp_path / out).iterdir()}, err

    files, err = merge("out")
    for name in ("vocab.txt", "spiece.model", "qwen.tiktoken", "my_words.list", "preprocessor_config.json",
                 "processor_config.json", "modeling_foo.py", "foo_layers.py", "foo_utils.py"):
        assert name in files, name
        assert (tmp_path / "out" / name).read_text() == (donor / name).read_text(), name
    assert "weights.bin" not in files and "unrelated.py" not in files
    assert "vocabulary" not in err, err
    files, _ = merge("bare", "--no-copy-tokenizer")
    assert {"preprocessor_config.json", "processor_config.json"} <= files and "vocab.txt" not in files
    shutil.copy(Path(m4[0]) / "tokenizer.json", donor / "tokenizer.json")  # union needs fast tokenizers
    files, _ = merge("union", tokenizer_source="union")
    assert "tokenizer.json" in files and not {"vocab.txt", "spiece.model", "qwen.tiktoken"} & files
    for name in ("vocab.txt", "spiece.model", "qwen.tiktoken", "my_words.list", "tokenizer.json"):
        (donor / name).unlink()
    files, err = merge("none")
    assert "holds no tokenizer vocabulary pymerge knows" in err and str(donor) in err, err


def test_the_relative_import_scan_stays_on_its_line():
    """Its pattern's leading \\s matched newlines, so every blank line of a donor's module began a match that ran over
    the rest of the file: quadratic, minutes for 200 KB of blank lines (a security audit). A match starts where its
    line does, and the imports transformers follows are still found."""
    from pymerge.merge import _RELATIVE_IMPORT
    text = "\n\n\n  from .foo_layers import X\n\t\nimport .foo_utils\nimport .no extra\nx = 'from .not_one import y'\n"
    found = [(m.start(), m.group(1) or m.group(2)) for m in _RELATIVE_IMPORT.finditer(text)]
    assert found == [(3, "foo_layers"), (text.index("import .foo_utils"), "foo_utils")], found


def test_vocabulary_files_never_clash_with_files_the_merge_writes(models, tmp_path, capsys):
    """A `*_file` key of tokenizer_config.json naming preprocessor_config.json or config.json was copied a second
    time and the merge failed after all its work; a 300 MB foo.model was copied as a vocabulary; a custom
    processor's module (processor_config.json's auto_map) was left behind (a review)."""
    import shutil
    _, m4, _ = models
    donor = tmp_path / "donor"
    shutil.copytree(m4[0], donor)
    (donor / "preprocessor_config.json").write_text('{"auto_map": {"AutoImageProcessor": "image_processing_foo.P"}}')
    (donor / "processor_config.json").write_text('{"auto_map": {"AutoProcessor": "processing_foo.P"}}')
    for name in ("image_processing_foo.py", "processing_foo.py"):
        (donor / name).write_text(f"# {name}\n")
    tok = json.loads((donor / "tokenizer_config.json").read_text()) if (donor / "tokenizer_config.json").exists() else {}
    tok.update({"vocab_file": "preprocessor_config.json", "merges_file": "config.json", "spm_file": "small.model"})
    (donor / "tokenizer_config.json").write_text(json.dumps(tok))
    (donor / "small.model").write_text("sp")
    with open(donor / "big.model", "wb") as f:  # sparse: no disk used
        f.truncate(300 << 20)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(donor), "parameters": {"weight": 0.5}}, {"model": m4[1], "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"small.model", "image_processing_foo.py", "processing_foo.py", "preprocessor_config.json"} <= files
    assert "big.model" not in files


def test_the_model_card_names_hub_ids_and_its_header_is_yaml(models, tmp_path, capsys, monkeypatch):
    """The card listed cached models by their snapshot path (a local path in base_model:, no Hub link), and a
    base_model with ': ' or '#' or '[' made its header other or invalid YAML (a bug hunt)."""
    _, m4, _ = models
    cache = tmp_path / "hub"
    _fake_cache(cache, m4[0], "org/base", "a" * 40)
    _fake_cache(cache, m4[1], "org/ft", "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    odd = tmp_path / "[draft] m #1: x"
    odd.symlink_to(m4[2], target_is_directory=True)
    for i, (base, other) in enumerate((("org/base", "org/ft"), (str(odd), "org/ft"))):
        cfg = tmp_path / f"c{i}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base,
                                       "models": [{"model": other, "parameters": {"weight": 0.5}}]}))
        rc, err = run_cli(["merge", cfg, tmp_path / f"o{i}", "--quiet", "--write-model-card"], capsys)
        assert rc == 0, err
        card = (tmp_path / f"o{i}" / "README.md").read_text()
        header = yaml.safe_load(card.split("---")[1])
        assert header["base_model"] == (["org/base", "org/ft"] if i == 0 else ["org/ft"])
        assert "* [org/ft](https://huggingface.co/org/ft)" in card and str(cache) not in card
        assert ("with [org/base](https://huggingface.co/org/base) as the base." if i == 0 else
                f"with `{odd}` as the base.") in card  # a link inside backticks showed as code
    # org/ft@v1 beside org/ft: both were listed as org/ft (an audit); a revision other than main's names its commit
    v1 = cache / "models--org--ft" / "snapshots" / ("c" * 40)
    v1.symlink_to(m4[2], target_is_directory=True)
    (cache / "models--org--ft" / "refs" / "v1").write_text("c" * 40)
    cfg = tmp_path / "c2.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "org/base", "models": [
        {"model": "org/ft", "parameters": {"weight": 0.5}}, {"model": "org/ft@v1", "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "o2", "--quiet", "--write-model-card"], capsys)
    assert rc == 0, err
    card = (tmp_path / "o2" / "README.md").read_text()
    assert "* [org/ft](https://huggingface.co/org/ft)\n" in card, card
    assert f"* [org/ft@{'c' * 12}](https://huggingface.co/org/ft/tree/{'c' * 40})\n" in card, card
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["org/base", "org/ft"]


def test_mergekit_flags(models, tmp_path, capsys):
    _, m4, _ = models
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "nearswap", "base_model": m4[0], "models": [m4[1]],
                                   "parameters": {"t": 0.01}}))
    flags = ["--lazy-unpickle", "--low-cpu-memory", "--allow-crimes", "--clone-tensors", "--trust-remote-code",
             "--no-cuda", "-j", "1", "--random-seed", "1", "--write-model-card", "--no-copy-tokenizer", "-v",
             "--async-write", "--write-threads", "2", "--out-shard-size", "1B", "--no-multi-gpu"]
    rc, err = run_cli(["merge", cfg, tmp_path / "o", "--quiet"] + flags, capsys)
    assert rc == 0, err
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert "README.md" in names and "tokenizer.json" not in names and "generation_config.json" not in names
    assert "nearswap" in (tmp_path / "o" / "README.md").read_text()
    for bad, word in ((["--unsafe-truncate-embeddings"], "truncate"), (["--no-safe-serialization"], "safetensors")):
        rc, err = run_cli(["merge", cfg, tmp_path / "x", "--quiet"] + bad, capsys)
        assert rc == 2 and word in err and not (tmp_path / "x").exists()
    # mergekit's --no-quiet, and --out-shard-size 0 (one unsplit file there) were refused (a bug hunt)
    rc, err = run_cli(["merge", cfg, tmp_path / "q", "--no-quiet", "--out-shard-size", "0"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "q").iterdir() if "safetensors" in p.name) == ["model.safetensors"]


@pytest.mark.parametrize("flags", [["--no-cuda"], ["--cuda"], ["--gpu-rich"], ["--no-cuda", "--gpu-rich"],
                                   ["--cuda", "--device", "cpu"], ["--no-cuda", "--device", "cuda"]])
def test_cuda_flags_pick_mergekits_device(flags, monkeypatch):
    """--no-cuda was ignored: `--device auto` then picked the GPU where mergekit-yaml computes on the CPU
    (a docs bug hunt). With a GPU present, each flag set picks the device mergekit's own options pick."""
    import pymerge.merge as m
    from mergekit.options import MergeOptions
    from pymerge import mergekit_flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(m, "_gpu_possible", lambda: True)
    args = cli.build_parser().parse_args(["merge", "c.yml", "out"] + flags)
    mergekit_flags.merge_options(args)
    theirs = {"cuda": args.cuda, "gpu_rich": args.gpu_rich, "device": args.device if "--device" in flags else None}
    assert m.pick_device(args.device) == MergeOptions(**{k: v for k, v in theirs.items() if v is not None}).device
    # no flag at all: pymerge's own default (auto: the GPU when there is one) stays; mergekit's is the CPU
    args = cli.build_parser().parse_args(["merge", "c.yml", "out"])
    mergekit_flags.merge_options(args)
    assert m.pick_device(args.device) == "cuda" and MergeOptions().device == "cpu"


def _bad(m4, m6):
    b, f1, f2, _ = m4
    return {
        "nearswap_two_models": ({"merge_method": "nearswap", "base_model": b, "models": [f1, f2],
                                 "parameters": {"t": 0.1}}, ["nearswap", "exactly two models", "got 3"]),
        "nearswap_no_t": ({"merge_method": "nearswap", "base_model": b, "models": [f1]}, ["'t'"]),
        "arcee_no_base": ({"merge_method": "arcee_fusion", "models": [f1, f2]}, ["arcee_fusion", "base_model"]),
        "karcher_fractional_iter": ({"merge_method": "karcher", "models": [f1, f2], "parameters": {"max_iter": 2.5}},
                                    ["max_iter", "whole number"]),
        # YAML reads 1e1 as text, which pydantic's int parsing refuses (it ran 10 iterations here: an audit)
        "karcher_scientific_iter": ({"merge_method": "karcher", "models": [f1, f2], "parameters": {"max_iter": "1e1"}},
                                    ["parameters.max_iter", "'1e1' is not an integer"]),
        "sce_mistyped_param": ({"merge_method": "sce", "base_model": b, "models": [f1],
                                "parameters": {"select_top": 0.5}}, ["unknown parameter 'select_top'", "sce",
                                                                     "did you mean 'select_topk'"]),
        "slice_base_not_a_source": ({"merge_method": "ties", "base_model": b, "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 2]}], "parameters": {"weight": 1.0}}]},
            ["slices[0]", "base model", "not among"]),
        "slice_past_the_end": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f1, "layer_range": [2, 5]}]}]}, ["goes past", "4 layers"]),
        "slice_two_sources_passthrough": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 2]}, {"model": f2, "layer_range": [0, 2]}]}]},
            ["slices[0]", "passthrough", "at most 1"]),
    }


@pytest.mark.parametrize("case", list(_bad("abcd", "abc")))
def test_bad_configs_exit_2(models, case, tmp_path, capsys):
    _, m4, m6 = models
    cfg, words = _bad(m4, m6)[case]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, err = run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymerge: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 4099, 70001])
def test_native_elementwise_kernels_match_torch(n, in_dtype):
    """csrc/cpu/elementwise_mix.cpp against the torch formulas (backend="torch"), awkward sizes,
    every input dtype, NaN and inf passing through as torch passes them."""
    from pymerge.ops import elementwise_mix as em
    base, xs = tensors((n,), 3, seed=n % 97, scale=0.05)
    if n > 10:
        xs[0][3], xs[1][5], base[7] = float("nan"), float("inf"), float("-inf")
    base, xs = base.to(in_dtype), [x.to(in_dtype) for x in xs]
    for out_dtype in (torch.float32, torch.bfloat16):
        for fn, args in ((em.nearswap, (base, xs[0], 0.01)), (em.ram, (xs, base, 0.02))):
            a, b = torch.empty(n, dtype=out_dtype), torch.empty(n, dtype=out_dtype)
            fn(*args, a, backend="cpu")
            fn(*args, b, backend="torch")
            assert torch.equal(a.isnan(), b.isnan()), fn.__name__
            fa, fb = a.float().nan_to_num(0, 1e30, -1e30), b.float().nan_to_num(0, 1e30, -1e30)
            tol = 1e-6 if out_dtype == torch.float32 else 2 ** -7  # one bf16 rounding step at most
            assert torch.allclose(fa, fb, rtol=tol, atol=1e-7), (fn.__name__, out_dtype, (fa - fb).abs().max())


def test_slices_set_the_layer_count_under_the_configs_own_key(tmp_path):
    """GPT-2-family configs count layers as n_layer: the output kept the old n_layer beside a new
    num_hidden_layers (mergekit sets n_layer)."""
    import shutil
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    gpt = tmp_path / "gpt"
    shutil.copytree(ft, gpt)
    config = json.loads((gpt / "config.json").read_text())
    layers = config.pop("num_hidden_layers")
    (gpt / "config.json").write_text(json.dumps({**config, "n_layer": layers}))
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(gpt), "layer_range": [0, layers]}]},
                                                     {"sources": [{"model": str(gpt), "layer_range": [0, 1]}]}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["n_layer"] == layers + 1 and "num_hidden_layers" not in written


def test_slices_write_per_layer_lists_for_the_layers_written(tmp_path):
    """config.json's layer_types (Qwen2, Gemma2, any model transformers 5 saves) stayed at the donor's
    length when slices changed the layer count: transformers refused to load the output. Each output
    layer takes its source layer's entry, from its own model's config."""
    import shutil
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert layers >= 2
    kinds = {str(m): [f"{name}{i}" for i in range(layers)] for m, name in ((base, "base"), (ft, "ft"))}
    for m in (base, ft):
        (m / "config.json").write_text(json.dumps({**config, "layer_types": kinds[str(m)]}))
    cfg = {"merge_method": "passthrough", "base_model": str(base), "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, layers]}]},
        {"sources": [{"model": str(ft), "layer_range": [1, layers]}]}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 2 * layers - 1
    assert written["layer_types"] == kinds[str(base)] + kinds[str(ft)][1:]
    # a source without the list takes the donor's entry for its layer
    (ft / "config.json").write_text(json.dumps(config))
    shutil.rmtree(tmp_path / "out")
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == kinds[str(base)] + kinds[str(base)][1:]
    # a whole-models merge (modules: default: models:) keeps the base model's list, as `models:` does
    (ft / "config.json").write_text(json.dumps({**config, "layer_types": kinds[str(ft)]}))
    for form in ({"models": [{"model": str(ft), "parameters": {"weight": 0.5}}]},
                 {"modules": {"default": {"models": [{"model": str(ft), "parameters": {"weight": 0.5}}]}}}):
        shutil.rmtree(tmp_path / "out")
        run_merge({"merge_method": "task_arithmetic", "base_model": str(base), **form}, tmp_path / "out", device="cpu",
                  quiet=True)
        assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == kinds[str(base)], form


def test_slices_write_layer_index_lists_for_the_layers_written(tmp_path):
    """LFM2's full_attn_idxs (the attention layers among its convolutions) was copied as the donor had it: a slice
    putting an attention layer where the donor has a convolution built a convolution there, its weights left out
    at load and randomly initialized, exit 0 (an audit). Each output layer is listed where its source layer is
    listed in its own model's config (else the donor's); Qwen-MoE's mlp_only_layers alike."""
    import shutil
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert layers >= 2
    own = {str(base): [0], str(ft): [layers - 1]}  # base: its first layer listed; ft: its last
    mlp = {str(base): ["dense"] * layers, str(ft): ["sparse"] * layers}  # GLM-4.7-Flash's per-layer list
    for m in (base, ft):
        (m / "config.json").write_text(json.dumps({**config, "full_attn_idxs": own[str(m)], "mlp_only_layers": [],
                                                    "moe_layers": own[str(m)], "mlp_layer_types": mlp[str(m)],
                                                    "layer_types": ["x"] * layers}))
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, layers]}]},
        {"sources": [{"model": str(ft), "layer_range": [0, layers]}]}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 2 * layers
    assert written["full_attn_idxs"] == [0, 2 * layers - 1] and written["mlp_only_layers"] == []
    # Llama-4's moe_layers and GLM-4.7-Flash's mlp_layer_types were kept as the donor's: the moved MoE layers were
    # built dense, their experts dropped and a random MLP in their place, exit 0 (an audit)
    assert written["moe_layers"] == [0, 2 * layers - 1]
    assert written["mlp_layer_types"] == ["dense"] * layers + ["sparse"] * layers
    # a source without the list: the donor's (the first slice's model's) for its layers
    (ft / "config.json").write_text(json.dumps(config))
    shutil.rmtree(tmp_path / "out")
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["full_attn_idxs"] == [0, layers]


def test_slices_untie_a_head_merged_from_other_sources_than_its_embedding(tmp_path):
    """Models whose config ties the head to the embedding but store it (a copy): the slices take the embedding from
    the first slice's model and the head from the last's, so the two differ, and config.json said tied (a loader
    tying them by the config dropped the merged head: logits 0.8 apart; an audit). Set false, with a warning; kept
    where both come from the same sources. A filter: weighting the head alone, the same."""
    from safetensors.torch import load_file, save_file

    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    layers = config["num_hidden_layers"]
    for m in (base, ft):
        (m / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        for f in m.glob("*.safetensors"):
            sd = load_file(f)
            if "lm_head.weight" in sd:
                sd["lm_head.weight"] = load_file(next(g for g in m.glob("*.safetensors") if "model.embed_tokens.weight"
                                                      in load_file(g)))["model.embed_tokens.weight"].clone()
                save_file(sd, f, metadata={"format": "pt"})
    two = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, 1]}]},
                                                     {"sources": [{"model": str(ft), "layer_range": [1, layers]}]}]}
    result = run_merge(two, tmp_path / "out", device="cpu", quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("tie_word_embeddings set to false" in w for w in result.warnings), result.warnings
    one = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, 1]}]},
                                                     {"sources": [{"model": str(base), "layer_range": [1, layers]}]}]}
    result = run_merge(one, tmp_path / "same", device="cpu", quiet=True)
    assert json.loads((tmp_path / "same" / "config.json").read_text()).get("tie_word_embeddings", True) is True
    assert not any("tie_word_embeddings" in w for w in result.warnings), result.warnings
    # a filter weighting the head alone, in a merge of whole models: the same
    for name, head_weight in (("filtered", 0.9), ("unfiltered", 0.5)):
        linear = {"merge_method": "linear", "models": [
            {"model": str(m), "parameters": {"weight": [{"filter": "lm_head", "value": head_weight}, {"value": 0.5}]}}
            for m in (base, ft)]}
        result = run_merge(linear, tmp_path / name, device="cpu", quiet=True)
        tied_now = json.loads((tmp_path / name / "config.json").read_text()).get("tie_word_embeddings", True)
        assert tied_now is (head_weight == 0.5), (name, result.warnings)


def test_slices_set_a_multimodal_configs_layers_inside_text_config(tmp_path):
    """A config that counts its layers only in text_config got a new top-level num_hidden_layers beside the
    stale text_config count and layer_types (transformers builds the text model from text_config)."""
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    layers = config.pop("num_hidden_layers")
    kinds = [f"kind{i}" for i in range(layers)]
    nested = {"model_type": "gemma3", "text_config": {**config, "num_hidden_layers": layers, "layer_types": kinds},
              "vision_config": {"hidden_size": 8}}
    (base / "config.json").write_text(json.dumps(nested))
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, layers]}]},
                                                     {"sources": [{"model": str(base), "layer_range": [0, 1]}]}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "num_hidden_layers" not in written and written["vision_config"] == {"hidden_size": 8}
    assert written["text_config"]["num_hidden_layers"] == layers + 1
    assert written["text_config"]["layer_types"] == kinds + kinds[:1]


def test_slice_sources_compared_by_resolved_path(tmp_path):
    """One model under two spellings in a slice would count twice: refused, as the same string is."""
    from pymerge.errors import MergeConfigError
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    for second in (str(ft) + "/", str(ft / "model.safetensors") if (ft / "model.safetensors").exists() else str(ft) + "/."):
        cfg = {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
            {"model": str(ft), "layer_range": [0, 1], "parameters": {"weight": 0.5}},
            {"model": second, "layer_range": [1, 2], "parameters": {"weight": 0.5}}]}]}
        with pytest.raises(MergeConfigError, match="same model"):
            run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
        assert not (tmp_path / "out").exists()


def _with_vision_tower(folder, depth, seed):
    """A Llama-family folder given a vision tower with more tensors than the text stack (as Qwen2-VL's)."""
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(folder / "model.safetensors"))
    for i in range(depth):
        for k in range(12):
            tensors[f"visual.blocks.{i}.p{k}.weight"] = torch.randn(4, generator=g)
    save_file(tensors, str(folder / "model.safetensors"))


def test_a_vision_tower_keeps_its_own_layer_positions_and_is_not_sliced(tmp_path):
    """config.json's num_hidden_layers (the text stack's) went to the stack with the most tensors: in a
    vision-language model the vision tower, whose blocks then took the text depth's gradient positions
    (mergekit: t from vision_config.depth; a bug hunt on Qwen2-VL). slices: cut the vision tower and left
    the text stack unsliced, exit 0 (mergekit refuses a model with several stacks there)."""
    import shutil
    from safetensors.torch import load_file
    from pymerge.errors import MergeConfigError
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    depth = layers + 1
    for i, m in enumerate((base, ft)):
        _with_vision_tower(m, depth, seed=i)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(base), "parameters": {"weight": [0.0, 1.0]}},
                      {"model": str(ft), "parameters": {"weight": [1.0, 0.0]}}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    out, a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "out", base, ft))
    for i in range(depth):  # t = i / (depth - 1) along the vision tower's own depth
        t = i / (depth - 1)
        name = f"visual.blocks.{i}.p0.weight"
        torch.testing.assert_close(out[name], t * a[name] + (1 - t) * b[name])
    name = f"model.layers.{layers - 1}.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], a[name])
    shutil.rmtree(tmp_path / "out")
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]}]}
    with pytest.raises(MergeConfigError, match=r"has 2 layer stacks \(model.layers, visual.blocks\)"):
        run_merge(sliced, tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()
    # a one-layer second stack (Qwen3-Next's mtp.layers.0) is a head, not a stack to cut: slices still work
    from safetensors.torch import save_file
    for m in (base, ft):
        tensors = {k: v for k, v in load_file(str(m / "model.safetensors")).items() if not k.startswith("visual.")}
        tensors["mtp.layers.0.proj.weight"] = torch.ones(4)
        save_file(tensors, str(m / "model.safetensors"))
    run_merge(sliced, tmp_path / "out", device="cpu", quiet=True)
    assert "mtp.layers.0.proj.weight" in load_file(str(tmp_path / "out" / "model.safetensors"))


def test_slices_refuse_a_one_layer_text_stack_beside_a_vision_tower(tmp_path):
    """Exempting one-layer stacks (an MTP head) cut the vision tower of a model whose text stack has one
    layer: the stack to cut is the one num_hidden_layers counts, and any other of several layers refuses."""
    from safetensors.torch import save_file
    from pymerge.errors import MergeConfigError
    from pymerge.merge import run_merge
    m = tmp_path / "vl"
    m.mkdir()
    tensors = {"model.embed_tokens.weight": torch.ones(4, 2), "model.layers.0.w": torch.ones(2)}
    tensors.update({f"visual.blocks.{i}.p{k}": torch.ones(2) for i in range(4) for k in range(3)})
    save_file(tensors, str(m / "model.safetensors"))
    (m / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(m), "layer_range": [0, 1]}]}]}
    with pytest.raises(MergeConfigError, match=r"has 2 layer stacks \(model.layers, visual.blocks\)"):
        run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)


def test_a_cached_snapshot_missing_a_shard_says_to_download_again(models, tmp_path, capsys, monkeypatch):
    """A download stopped between shards (its blob left .incomplete) said only "shard ... is missing", where a
    broken link said what to do (a hub-cache audit)."""
    from safetensors.torch import load_file, save_file
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snap = cache / "models--org--cut" / "snapshots" / ("a" * 40)
    shutil.copytree(m4[1], snap)
    tensors = load_file(str(snap / "model.safetensors"))
    (snap / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(snap / "a.safetensors"))  # b.safetensors never arrived
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "a.safetensors" if i < 2 else "b.safetensors" for i, k in enumerate(names)}}))
    (cache / "models--org--cut" / "refs").mkdir()
    (cache / "models--org--cut" / "refs" / "main").write_text("a" * 40)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/cut"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and "shard 'b.safetensors'" in err and "is missing; an incomplete download? download it again" \
        in err and len(err.strip().splitlines()) == 1, err
    # a local folder missing a shard is no download: no such advice
    local = tmp_path / "local"
    shutil.copytree(snap, local)
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [str(local)]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and err.rstrip().endswith("is missing"), err


def test_errors_name_hub_models_by_their_id_not_the_snapshot_path(models, tmp_path, capsys, monkeypatch):
    """A tensor missing from a cached model was reported under <cache>/models--org--m/snapshots/<commit> where
    the config said org/m or org/m@v1 (a hub-cache audit); a revision other than main's shows its commit."""
    from safetensors.torch import load_file, save_file
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _fake_cache(cache, m4[0], "org/base", "a" * 40)
    cut = tmp_path / "cut"
    shutil.copytree(m4[1], cut)
    tensors = load_file(str(cut / "model.safetensors"))
    gone = sorted(tensors)[-1]
    del tensors[gone]
    save_file(tensors, str(cut / "model.safetensors"))
    _fake_cache(cache, cut, "org/cut", "b" * 40, branch="v1")
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "org/base", "models": [
        {"model": "org/cut@v1", "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and f"org/base: has tensor {gone!r} that org/cut@{'b' * 12} lacks" in err, err
    assert str(cache) not in err and len(err.strip().splitlines()) == 1


def test_legacy_ids_without_an_org_and_a_model_only_under_transformers_cache(models, tmp_path, capsys, monkeypatch):
    """`model: gpt2` (an ID from before organizations) was "model path not found" with models--gpt2 cached,
    where mergekit and huggingface_hub take it; a name neither cached nor a folder stays that error. A model only
    under the TRANSFORMERS_CACHE that huggingface_hub no longer reads is pointed to --transformers-cache."""
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    _fake_cache(cache, m4[1], "gpt2", "a" * 40)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["gpt2"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet", "--write-model-card"], capsys)
    assert rc == 0, err
    assert torch.equal(lf.load_folder(tmp_path / "out")["model.norm.weight"], lf.load_folder(m4[1])["model.norm.weight"])
    assert "* [gpt2](https://huggingface.co/gpt2)" in (tmp_path / "out" / "README.md").read_text()
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["gpt3"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out2", "--quiet"], capsys)
    assert rc == 2 and err.rstrip().endswith("model path not found: gpt3"), err
    old = tmp_path / "old_cache"
    _fake_cache(old, m4[2], "org/old", "b" * 40)
    monkeypatch.setenv("TRANSFORMERS_CACHE", str(old))
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/old"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out2", "--quiet"], capsys)
    assert rc == 2 and f"or pass --transformers-cache {old} (HF_HUB_CACHE={old}), where it is" in err, err
    rc, err = run_cli(["merge", cfg, tmp_path / "out2", "--quiet", "--transformers-cache", str(old)], capsys)
    assert rc == 0, err


def test_a_side_file_linking_to_a_blob_never_written_says_so(models, tmp_path, capsys, monkeypatch):
    """config.json in a snapshot, a link into blobs/ whose blob is gone, said "cannot open: No such file or
    directory" with no word of what to do (a hub-cache audit); a model file's link already said it."""
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snap = cache / "models--org--side" / "snapshots" / ("a" * 40)
    shutil.copytree(m4[1], snap)
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to("../../blobs/0abc")
    (cache / "models--org--side" / "refs").mkdir()
    (cache / "models--org--side" / "refs" / "main").write_text("a" * 40)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": ["org/side"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and err.rstrip().endswith("config.json: is a broken link to ../../blobs/0abc (an incomplete "
                                             "download? download the model again)"), err


@pytest.mark.parametrize("rev", ["a" * 5000, "/".join(["a"] * 3000)])
def test_a_revision_too_long_for_a_ref_file_is_one_bounded_line(models, tmp_path, capsys, monkeypatch, rev):
    """org/m@<5,000 characters> of a cached org/m looked up refs/<rev>: ENAMETOOLONG, the whole path echoed (a
    review). Longer than any revision can be, it is no ID: a path not found, echoed in part."""
    _, m4, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _fake_cache(cache, m4[1], "org/m", "a" * 40)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [f"org/m@{rev}"]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 2 and "model path not found: org/m@" in err and len(err) < 1100 and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("keys, moved_ok, moved_bad", [
    # Gemma-2 alternates (layer 0 sliding) without a list; Gemma-3 and Cohere2 by sliding_window_pattern
    ({"model_type": "gemma2"}, [0, 1, 0, 1], [0, 1, 1]),
    ({"sliding_window_pattern": 3}, [0, 1, 2, 0, 1, 2], [0, 1, 0]),
    ({"attn_layer_period": 2, "attn_layer_offset": 1}, [0, 1, 0, 1], [0, 1, 1]),  # Jamba
    ({"first_k_dense_replace": 1}, [0, 1, 1], [0, 1, 0]),  # GLM4-MoE, DeepSeek: dense first layers
    ({"decoder_sparse_step": 2}, [0, 1, 0, 1], [1, 0]),  # Qwen-MoE
    ({"interleave_moe_layer_step": 2}, [0, 1, 0, 1], [1, 0]),  # Llama-4 without moe_layers (a review)
    # Qwen2's family: sliding from max_window_layers on, where use_sliding_window (exit 0 before: an audit); Dots1
    # wherever sliding_window is (its default: 4096); Qwen2-MoE every other layer below max_window_layers
    ({"model_type": "qwen2", "max_window_layers": 1, "use_sliding_window": True}, [0, 1, 1], [1, 0]),
    ({"model_type": "dots1", "max_window_layers": 1}, [0, 1, 1], [1, 0]),
    ({"model_type": "qwen2_5_vl", "max_window_layers": 1, "use_sliding_window": True}, [0, 1, 1], [1, 0]),  # flat
    ({"model_type": "qwen2_moe", "max_window_layers": 3, "use_sliding_window": True}, [0, 1, 2, 1], [1, 0]),
])
def test_slices_refuse_moving_layers_whose_kind_config_json_derives_from_their_position(tmp_path, keys, moved_ok,
                                                                                          moved_bad):
    """Without a per-layer list, transformers builds each layer's kind (sliding or full attention, attention or
    Mamba, dense or MoE) from its index: a stack that moved a layer to an index of another kind was written, exit
    0, and loaded with flipped attention types or random weights (an audit). Refused now; a stack that keeps
    every layer at an index of its kind, or a config with an explicit layer_types list, merges."""
    import shutil
    from pymerge.errors import MergeConfigError
    from pymerge.merge import run_merge
    base, _ = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **keys}))

    def stack(layers):
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(base), "layer_range": [i, i + 1]}]} for i in layers]}
    run_merge(stack(moved_ok), tmp_path / "ok", device="cpu", quiet=True)
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["num_hidden_layers"] == len(moved_ok)
    with pytest.raises(MergeConfigError, match="derives each layer's kind from its position") as refused:
        run_merge(stack(moved_bad), tmp_path / "bad", device="cpu", quiet=True)
    assert not (tmp_path / "bad").exists()
    # a layer_types list is a remedy for attention types only (it was offered for MoE and Mamba layers too)
    assert ("layer_types" in str(refused.value)) == ("(sliding)" in str(refused.value)), str(refused.value)
    if "layer_types" not in keys and ("model_type" in keys or "sliding_window_pattern" in keys):
        # an explicit list says each layer's kind: it is rewritten per layer, and the stack merges
        (base / "config.json").write_text(json.dumps({**config, **keys, "layer_types": [
            f"kind{i}" for i in range(config["num_hidden_layers"])]}))
        run_merge(stack(moved_bad), tmp_path / "listed", device="cpu", quiet=True)
        assert json.loads((tmp_path / "listed" / "config.json").read_text())["layer_types"] == \
            [f"kind{i}" for i in moved_bad]
    shutil.rmtree(tmp_path / "ok")


@pytest.mark.parametrize("keys", [{"model_type": "qwen2", "max_window_layers": 1},  # use_sliding_window: False
                                  {"model_type": "qwen2", "max_window_layers": 1, "use_sliding_window": True,
                                   "sliding_window": None},
                                  {"model_type": "qwen3_moe", "max_window_layers": 1, "use_sliding_window": True},
                                  {"model_type": "qwen3_omni_moe_text", "max_window_layers": 1,
                                   "use_sliding_window": True}])
def test_slices_move_layers_of_one_kind_where_the_config_windows_none_or_all(tmp_path, keys):
    """Qwen2 without a sliding window, and Qwen3-MoE (every layer windowed alike): no position rule, the stack
    merges (a review: a rule keyed on max_window_layers alone refused Qwen3-MoE's)."""
    from pymerge.merge import run_merge
    base, _ = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **keys}))
    run_merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [i, i + 1]}]} for i in (1, 0)]}, tmp_path / "out",
        device="cpu", quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_slices_rewrite_nemotron_h_layer_lists(tmp_path):
    """Nemotron-H (transformers 5) takes its depth from layers_block_type and older configs spell the same as
    hybrid_override_pattern: left at the donor's, the output loaded with the donor's depth, the stacked layers
    dropped as unexpected keys (an audit)."""
    from pymerge.merge import run_merge
    base, _ = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    n = config["num_hidden_layers"]
    kinds = ["mamba", "attention", "mlp", "moe"][:n] + ["mamba"] * max(0, n - 4)
    pattern = "".join({"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}[k] for k in kinds)
    (base / "config.json").write_text(json.dumps({**config, "layers_block_type": kinds,
                                                   "hybrid_override_pattern": pattern}))
    order = list(range(n)) + list(range(1, n))
    run_merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, n]}]},
        {"sources": [{"model": str(base), "layer_range": [1, n]}]}]}, tmp_path / "out", device="cpu", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layers_block_type"] == [kinds[i] for i in order]
    assert written["hybrid_override_pattern"] == "".join(pattern[i] for i in order)


def test_layer_kinds_are_compared_from_each_models_own_config(tmp_path):
    """A source's layer kind comes from its own config.json: its layer_types where it has the list, its positions
    otherwise. Comparing the two forms refused every stack of Gemma-2 models saved by old and new transformers
    (one with layer_types, one without), even one that moved nothing (a review). A list the donor keeps
    (layers_block_type beside Jamba-style periods, as Zamba's) is rewritten, so it is not compared."""
    import shutil
    from pymerge.errors import MergeConfigError
    from pymerge.merge import run_merge
    base, (ft,) = lf.make_family(tmp_path / "m", n_finetunes=1)
    config = json.loads((base / "config.json").read_text())
    n = config["num_hidden_layers"]
    alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    (ft / "config.json").write_text(json.dumps({**config, "model_type": "gemma2", "layer_types": alternating}))
    for first, second in ((base, ft), (ft, base)):
        run_merge({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(first), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(second), "layer_range": [1, n]}]}]}, tmp_path / "out", device="cpu", quiet=True)
        shutil.rmtree(tmp_path / "out")
    with pytest.raises(MergeConfigError, match=r"output layer 1 comes from source layer 0.*\(sliding\)"):
        run_merge({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(ft), "layer_range": [0, 1]}]}]}, tmp_path / "out", device="cpu", quiet=True)
    # Zamba keeps layers_block_type (rewritten per layer) beside its attention period: not refused
    (base / "config.json").write_text(json.dumps({**config, "attn_layer_period": 2, "attn_layer_offset": 1,
                                                   "layers_block_type": ["mamba", "hybrid"] * (n // 2) + ["mamba"] * (n % 2)}))
    run_merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(base), "layer_range": [0, n]}]}]}, tmp_path / "out", device="cpu", quiet=True)


def test_a_cuda_index_past_the_devices_is_one_line(monkeypatch):
    """--device cuda:5 on a machine of 2 GPUs failed inside the merge with CUDA's 'invalid device ordinal',
    after the writer had opened (a review); the pool checked its index, the merge did not."""
    import torch
    from pymerge import merge as m
    from pymerge.errors import InputError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert m.pick_device("cuda:1") == "cuda:1" and m.pick_device("cuda") == "cuda"
    with pytest.raises(InputError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        m.pick_device("cuda:2")
