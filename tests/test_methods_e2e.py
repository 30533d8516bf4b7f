"""End-to-end checks of the non-linear merge methods through `pymerge merge` (the CLI's own entry,
in process) against `mergekit-yaml` 0.1.5 on small generated Llama checkpoints.

1. Parity: every deterministic method (ties, breadcrumbs, breadcrumbs_ties, slerp, nuslerp,
   model_stock, passthrough; dare/della at density 1) with gradients and filters, float32 out:
   same names and dtypes, values within 1e-5 relative per tensor. mergekit runs once, in one
   subprocess, over every config.
2. Invalid parameters: exit 2, one line naming the problem, no output (and no temp folder) left.
3. DARE/DELLA: same --random-seed gives identical bytes, another seed other masks, and the kept
   fraction is close to the density.

The fine-tunes are float32 with a large perturbation (30% of each tensor's std), so equal
magnitudes are a handful per tensor and none sits at a threshold of these configs (mergekit's argsort/sort and our stable rank selection agree
only up to the order of exactly equal |d|), and SLERP takes its spherical branch (|cos| well
below mergekit's 0.9995 lerp cut-off).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import llama_factory as lf
from mergekit_runner import run_mergekit_driver
from pymerge import cli

pytest.importorskip("mergekit", reason="mergekit 0.1.5 is not installed (pip install mergekit==0.1.5)")

DIMS = lf.LlamaDims(hidden=64, layers=4, intermediate=96, vocab=128, heads=4, kv_heads=2)
PERTURB = 0.3


def _configs(base, fts):
    """name -> mergekit config (every one float32, every one with gradients and/or filters)."""
    b, (f1, f2, f3) = str(base), [str(f) for f in fts]
    mlp_or = lambda mlp, other: [{"filter": "mlp", "value": mlp}, {"value": other}]  # noqa: E731
    return {
        "ties": {"merge_method": "ties", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": mlp_or(0.2, 0.5), "density": [0.3, 0.7]}},
            {"model": f2, "parameters": {"weight": 0.8, "density": 0.5}},
            {"model": f3, "parameters": {"weight": [0.1, 0.9],
                                         "density": [{"filter": "self_attn", "value": 0.9}, {"value": 0.2}]}}],
            "dtype": "float32"},
        "ties_lambda_no_normalize_rescale": {"merge_method": "ties", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": -0.4}}, {"model": f2, "parameters": {"weight": 0.7}},
            {"model": f3}],
            "parameters": {"weight": [0.3, 1.0], "density": [0.1, 0.6, 0.35], "normalize": False,
                           "rescale": True, "lambda": 1.3}, "dtype": "float32"},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": mlp_or(0.6, 0.3), "density": [0.6, 0.9],
                                         "gamma": mlp_or(0.05, 0.01)}},
            {"model": f2, "parameters": {"weight": 0.5, "density": 0.8, "gamma": [0.0, 0.1]}}],
            "dtype": "float32"},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b, "models": [
            {"model": f, "parameters": {"weight": w, "density": d}}
            for f, w, d in ((f1, [0.5, 1.0], 0.7), (f2, mlp_or(-0.3, 0.4), [0.9, 0.5]), (f3, 0.6, 0.85))],
            "parameters": {"gamma": [{"filter": "self_attn", "value": 0.02}, {"value": [0.0, 0.05]}],
                           "lambda": 0.8}, "dtype": "float32"},
        "dare_linear_d1": {"merge_method": "dare_linear", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": [0.2, 0.8, 0.5]}},
            {"model": f2, "parameters": {"weight": mlp_or(0.7, -0.3)}}],
            "parameters": {"density": 1.0}, "dtype": "float32"},
        "dare_ties_d1": {"merge_method": "dare_ties", "base_model": b, "models": [
            {"model": f, "parameters": {"weight": w}} for f, w in ((f1, mlp_or(0.9, 0.2)), (f2, 0.5), (f3, [1, 0]))],
            "parameters": {"density": 1.0, "normalize": True, "lambda": 1.1}, "dtype": "float32"},
        "della_d1": {"merge_method": "della", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": [0.3, 0.6]}}, {"model": f2, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 1.0, "epsilon": 0.1}, "dtype": "float32"},
        "della_linear_d1": {"merge_method": "della_linear", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": mlp_or(0.3, 0.9)}}, {"model": f3, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 1.0, "lambda": 0.7}, "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": f1}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 1.0]},
                                       {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]},
                  "dtype": "float32"},
        "nuslerp_base": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": [0.2, 0.8]}}, {"model": f2, "parameters": {"weight": mlp_or(1, 0.5)}}],
            "dtype": "float32"},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "models": [
            {"model": f2, "parameters": {"weight": 0.3}}, {"model": f3, "parameters": {"weight": [0.9, 0.1]}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "float32"},
        "nuslerp_cols_base": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": f1, "parameters": {"weight": 0.6}}, {"model": f3, "parameters": {"weight": 0.4}}],
            "parameters": {"nuslerp_flatten": False}, "dtype": "float32"},
        "model_stock": {"merge_method": "model_stock", "base_model": b,
                        "models": [{"model": f} for f in (f1, f2, f3)], "dtype": "float32"},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b,
                                    "models": [{"model": f} for f in (f1, f2)],
                                    "parameters": {"filter_wise": True}, "dtype": "float32"},
        "passthrough": {"merge_method": "passthrough", "models": [
            {"model": f2, "parameters": {"scale": [{"filter": "mlp", "value": [0.5, 2.0]},
                                                   {"filter": "norm", "value": 1.5}]}}], "dtype": "float32"},
    }


NAMES = list(_configs("b", ["a", "a", "a"]))


def _mergekit(jobs):
    """Runs mergekit-yaml's own entry point over (config, out) pairs in one process."""
    driver = ("import sys\nfrom mergekit.scripts.run_yaml import main\n"
              "a = sys.argv[1:]\n"
              "for cfg, out in zip(a[::2], a[1::2]):\n"
              "    main([cfg, out, '--quiet'], standalone_mode=False)\n")
    args = [str(x) for job in jobs for x in job]
    proc = run_mergekit_driver(driver, args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base, fts = lf.make_family(root / "fp32", n_finetunes=3, dims=DIMS, dtype=torch.float32, perturb=PERTURB)
    return root, base, fts


@pytest.fixture(scope="module")
def parity(fam):
    root, base, fts = fam
    configs = _configs(base, fts)
    jobs = []
    for name, c in configs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(c, sort_keys=False))
        jobs.append((path, root / "mk" / name))
    _mergekit(jobs)
    return root, configs


_load = lf.load_folder


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit_cli(parity, name, tmp_path, capsys):
    root, _ = parity
    out = tmp_path / "out"
    rc, err = run_cli(["merge", root / f"{name}.yml", out, "--quiet"], capsys)
    assert rc == 0, err
    ours, theirs = _load(out), _load(root / "mk" / name)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for k, b in theirs.items():
        a = ours[k]
        assert a.dtype == b.dtype == torch.float32, (k, a.dtype, b.dtype)
        assert a.shape == b.shape, k
        a64, b64 = a.double(), b.double()
        rel = float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30))
        assert rel <= 1e-5, (name, k, rel)


def test_e2e_data_has_no_magnitude_ties_and_slerp_is_spherical(fam):
    """The premises the parity tests rely on (see the module docstring)."""
    _, base, fts = fam
    b, f = _load(base), _load(fts[0])
    for k in b:
        d = (f[k] - b[k]).abs().reshape(-1)
        assert d.numel() - d.unique().numel() <= max(1, d.numel() // 1000), k  # equal |d|: a handful at most
        if b[k].numel() > 100:
            cos = torch.nn.functional.cosine_similarity(b[k].reshape(-1).double(), f[k].reshape(-1).double(), dim=0)
            assert cos < 0.99, (k, float(cos))


# ---- invalid parameters ------------------------------------------------------------------------
def _invalid(b, f1, f2, f3):
    tv = lambda method, params, **top: {"merge_method": method, "base_model": b, "models": [  # noqa: E731
        {"model": f1, "parameters": {"weight": 0.5, **params}}, {"model": f2, "parameters": {"weight": 0.5}}],
        **top}
    return {
        "density_above_1": (tv("ties", {"density": 1.5}), ["density", "[0, 1]", "1.5"]),
        "density_below_0": (tv("dare_ties", {"density": -0.1}), ["density", "[0, 1]", "-0.1"]),
        "density_gradient_leaves_range": (tv("breadcrumbs", {"density": [0.5, 1.2]}),
                                          ["density", "[0, 1]", "model.layers."]),
        "gamma_above_1": (tv("breadcrumbs_ties", {"density": 0.5, "gamma": 2.0}), ["gamma", "[0, 1]"]),
        "epsilon_too_large": (tv("della", {"density": 0.5, "epsilon": 0.6}), ["epsilon", "0.6", "(0, 1)"]),
        "epsilon_too_large_linear": (tv("della_linear", {"density": 0.8, "epsilon": 0.25}), ["epsilon", "0.25"]),
        "slerp_three_models": ({"merge_method": "slerp", "base_model": b, "models": [{"model": f1}, {"model": f2}],
                                "parameters": {"t": 0.5}}, ["slerp", "exactly two models", "got 3"]),
        "slerp_no_base": ({"merge_method": "slerp", "models": [{"model": f1}, {"model": f2}],
                           "parameters": {"t": 0.5}}, ["slerp", "base_model"]),
        "model_stock_one_model": ({"merge_method": "model_stock", "base_model": b, "models": [{"model": f1}]},
                                  ["model_stock", "at least two"]),
        "nuslerp_three_models": ({"merge_method": "nuslerp", "models": [
            {"model": f, "parameters": {"weight": 1.0}} for f in (f1, f2, f3)]}, ["nuslerp", "exactly two", "got 3"]),
        "ties_no_base": ({"merge_method": "ties", "models": [{"model": f1, "parameters": {"weight": 1.0}}]},
                         ["ties", "base_model"]),
        "slerp_no_t": ({"merge_method": "slerp", "base_model": b, "models": [{"model": f1}]}, ["'t'"]),
    }


INVALID = list(_invalid("b", "a", "a", "a"))


@pytest.mark.parametrize("case", INVALID)
def test_invalid_parameters_exit_2_one_line_no_output(fam, case, tmp_path, capsys):
    _, base, fts = fam
    cfg, words = _invalid(str(base), *[str(f) for f in fts])[case]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    rc, err = run_cli(["merge", path, out, "--quiet"], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymerge: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_invalid_parameter_exit_2_as_a_process(fam, tmp_path):
    """The real `python -m pymerge` process: exit status 2 and one stderr line."""
    _, base, fts = fam
    cfg, words = _invalid(str(base), *[str(f) for f in fts])["density_above_1"]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "density" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- DARE / DELLA through the CLI ----------------------------------------------------------------
def _random_cfg(method, base, f1, density, **extra):
    """One fine-tune, weight 1, no rescale: out = base + keep * d, so the kept fraction is exact."""
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(f1), "parameters": {"weight": 1.0, "density": density, **extra}}],
            "parameters": {"rescale": False}, "dtype": "float32"}


@pytest.mark.parametrize("method, density, extra", [
    ("dare_linear", 0.3, {}), ("dare_ties", [0.2, 0.7], {}), ("della", 0.5, {"epsilon": 0.1}),
    ("della_linear", 0.4, {"epsilon": 0.2})])
def test_random_methods_seeded_through_cli(fam, tmp_path, capsys, method, density, extra):
    _, base, fts = fam
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_random_cfg(method, base, fts[0], density, **extra), sort_keys=False))
    outs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        rc, err = run_cli(["merge", path, tmp_path / tag, "--quiet", "--random-seed", seed], capsys)
        assert rc == 0, err
        outs[tag] = _load(tmp_path / tag)
    a, b, c = outs["a"], outs["b"], outs["c"]
    for f in (tmp_path / "a").glob("*.safetensors"):  # bit-identical files, not just tensors
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    base_t, ft_t = _load(base), _load(fts[0])
    kept = total = 0
    differ = 0
    lo, hi = (density, density) if not isinstance(density, list) else (min(density), max(density))
    for k in a:
        assert torch.equal(a[k], b[k]), k
        differ += int((a[k] != c[k]).sum())
        d = ft_t[k] - base_t[k]
        moved = a[k] != base_t[k]
        # kept elements carry the whole delta; dropped ones the base exactly
        assert torch.equal(a[k][moved], (base_t[k] + d)[moved]), k
        kept += int(moved.sum())
        total += a[k].numel()
    frac = kept / total
    assert lo - 0.01 <= frac <= hi + 0.01, (method, frac)
    assert differ > 0.1 * total  # another seed, other masks


def test_dare_kept_fraction_per_tensor(fam, tmp_path, capsys):
    """Each big tensor keeps close to `density` of its elements (binomial: within 5 sigma)."""
    _, base, fts = fam
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_random_cfg("dare_linear", base, fts[1], 0.25), sort_keys=False))
    rc, err = run_cli(["merge", path, tmp_path / "o", "--quiet", "--random-seed", 123], capsys)
    assert rc == 0, err
    out, b = _load(tmp_path / "o"), _load(base)
    for k, t in out.items():
        n = t.numel()
        if n < 1000:
            continue
        frac = float((t != b[k]).double().mean())
        assert abs(frac - 0.25) <= 5 * (0.25 * 0.75 / n) ** 0.5, (k, frac)
