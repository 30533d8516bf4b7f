"""The benchmark scripts' own plumbing, at tiny sizes (a docs bug hunt): their --help text, the options
--quick must not override, bench_weighted_sum's --threads reaching pymerge's pool, and bench_tokenizer's
row label against the merged model's real vocabulary."""
import ast
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _script(argv, tmp_path, timeout=300, **env_extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYMERGE_BENCH_RESULTS": str(tmp_path / "results"),
           "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_descriptions_are_whole_sentences(tmp_path):
    """--help used the docstring's first line, cutting sentences that wrap ("... held-out scores against
    the"): it now gives the whole first paragraph."""
    names = ["ab_weighted_sum", "bench_compressed_pool_quality", "bench_delta_decode", "bench_demo", "scaling_model",
             "bench_weighted_sum"]
    code = ("import contextlib, io, json, runpy, sys\nout = {}\n"
            f"for name in {names!r}:\n"
            "    sys.argv = [f'benchmarks/{name}.py', '--help']\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n"
            "            runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    out[name] = buf.getvalue()\n"
            "print(json.dumps(out))\n")
    r = _script(["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    helps = json.loads(r.stdout.strip().splitlines()[-1])
    for name in names:
        with open(os.path.join(BENCH, f"{name}.py")) as f:
            first = ast.get_docstring(ast.parse(f.read()), clean=False).split("\n\n")[0]
        # argparse re-wraps the text (and may break after a hyphen): compare without whitespace
        assert "".join(first.split()) in "".join(helps[name].split()), (name, helps[name][:800])


def test_bench_pool_quick_keeps_explicit_params_and_rounds(tmp_path):
    """--quick forced 8e6 parameters and 2 rounds over an explicit --params/--rounds."""
    r = _script([os.path.join(BENCH, "bench_pool.py"), "--quick", "--params", "2e6", "--rounds", "1",
                 "--n", "2", "--k", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*/bench_pool_quick.json")
    meta = json.loads(result.read_text())
    assert " x 2M bf16 params" in meta["title"] and meta["rounds"] == 1, meta["title"]


def test_bench_weighted_sum_threads_reach_pymerges_pool(monkeypatch):
    """--threads set torch's threads only; pymerge's pool still ran on every core, so "x copy" and
    "x compile" compared unequal thread counts."""
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import bench_weighted_sum as bench
    finally:
        sys.path.remove(ROOT)
    seen = []
    real = bench.sum_into
    outs = {"compile": [], "pymerge": []}

    def compiled(f):  # torch.compile's peer writes into a preallocated output, as pymerge's does: a new
        def run(*args):  # output per call was page-faulted and charged to torch.compile (~2x at 32M, an audit)
            assert len(args) == 3 and f(*args) is None
            outs["compile"].append(args[2].data_ptr())
        return run

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_threads", 0))
        outs["pymerge"].append(args[2][0].data_ptr())
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "sum_into", spy)
    monkeypatch.setattr(bench, "CASES", {"cpu": [(2, 4096)]})
    monkeypatch.setattr(bench.torch, "compile", compiled)
    monkeypatch.setattr(bench, "write_results", lambda *a, **k: "")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--threads", "1", "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}, seen
    assert outs["pymerge"][0] in outs["compile"]  # the timed calls share one output


def test_bench_tokenizer_labels_rows_with_the_union_size(tmp_path):
    """The label said vocab + vocab/2 - 3 tokens (200 + 200 -> 297); the merged model has 300 rows."""
    r = _script([os.path.join(BENCH, "bench_tokenizer.py"), "--vocab", "200", "--hidden", "64", "--tools", "pymerge",
                 "--workdir", str(tmp_path / "w")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*/bench_tokenizer*.json")
    (row,) = json.loads(result.read_text())["rows"]
    with open(tmp_path / "w" / "v200-h64" / "out-pymerge" / "config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    assert vocab_size == 300 and row["tokens"] == f"200 + 200 -> {vocab_size}", row


def test_bad_options_are_one_line_and_write_nothing(tmp_path):
    """--rounds 0 silently ran the full default, -1 raised past argparse, --params 1e4 divided by zero (and left
    its checkpoints in /tmp), an unknown --only method wrote an empty table with exit 0, --tools foo was a KeyError
    (an audit). One process runs every script's main, as a user's command line would."""
    cases = [("bench_weighted_sum", ["--rounds", "0"], "--rounds: must be at least 1"),
             ("bench_weighted_sum", ["--device", "tpu"], "invalid choice: 'tpu'"),
             ("bench_weighted_sum", ["--threads", "-1"], "--threads: must be at least 1"),
             ("bench_pool", ["--params", "1e4"], "--params must be from 73728"),
             ("bench_pool", ["--k", "0"], "--k: must be at least 1"),
             ("bench_methods", ["--only", "nosuch"], "--only: unknown method nosuch"),
             ("bench_methods", ["--repeat", "0"], "--repeat: must be at least 1"),
             ("bench_merge", ["--tools", "foo"], "--tools: unknown tool foo"),
             ("bench_merge", ["--repeats", "0"], "--repeats must be at least 1"),
             ("bench_compressed_pool", ["--rounds", "0"], "--rounds: must be at least 1"),
             # tracebacks after the checkpoints were written, and ab's missing .so (an audit)
             ("bench_compressed_pool", ["--backend", "cuda"], "--backend cuda runs on --device cuda"),
             ("ab_weighted_sum", ["/nonexistent/_cpu.so"], "/nonexistent/_cpu.so: not a loadable _cpu extension"),
             ("bench_delta_decode", ["--rounds", "0"], "--rounds: must be at least 1"),
             ("bench_pool_grouped", ["--n", "0"], "--n: must be at least 1"),
             ("bench_demo", ["--threads", "-1"], "--threads must be from 0"),  # was a worker's traceback
             ("bench_demo", ["--seeds", "0", "-5"], "--seeds must be from 0 to 268435455, got -5"),  # ran
             ("bench_demo", ["--budget", str(10**10)], "--budget must be from 1 to 1000000000"),
             # two workers shared one folder: the second's "in use" refusal was a traceback
             ("bench_demo", ["--seeds", "3", "0", "3"], "--seeds names seed 3 more than once")]
    code = ("import contextlib, io, json, runpy, sys\nout = []\n"
            f"for name, args, _ in {cases!r}:\n"
            "    sys.argv = [f'benchmarks/{name}.py'] + args\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        try:\n"
            "            runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "            code = 0\n"
            "        except SystemExit as exc:\n"
            "            code = exc.code\n"
            "    out.append((code, err.getvalue()))\n"
            "print(json.dumps(out))\n")
    temp = tmp_path / "tmp"  # its own TMPDIR: a benchmark another program ran meanwhile made folders in /tmp
    temp.mkdir()
    r = _script(["-c", code], tmp_path, TMPDIR=str(temp))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for (name, args, message), (code, err) in zip(cases, got):
        assert code == 2 and message in err and "Traceback" not in err, (name, args, err[-600:])
    assert not (tmp_path / "results").exists()
    assert not os.listdir(temp)


def test_scaling_model_without_matplotlib_writes_its_tables(tmp_path):
    """Its plot is drawn under a temporary name and renamed: without matplotlib nothing was drawn, and the rename
    raised FileNotFoundError after the tables were written (exit 1; found by review)."""
    code = ("import runpy, sys\nsys.modules['matplotlib'] = None\n"
            "sys.argv = ['benchmarks/scaling_model.py', '--no-measure']\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = _script(["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / "results" / "cpu"
    assert sorted(os.listdir(folder)) == ["scaling_model_prediction.json", "scaling_model_prediction.md"]
    recorded = json.loads((folder / "scaling_model_prediction.json").read_text())  # as every script's (an audit)
    assert recorded["argv"] == ["--no-measure"] and "load_average" in recorded


def test_scaling_fit_never_keeps_a_slope_whose_intercept_it_clamped():
    """A negative intercept was clamped to 0 with the old slope kept: every prediction came out high (an audit).
    The fit is then the best line through the origin."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("scaling_model", os.path.join(BENCH, "scaling_model.py"))
    sm = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCH)
    try:
        spec.loader.exec_module(sm)
    finally:
        sys.path.remove(BENCH)
    eta, fixed = sm.fit([(1.0, 2.0), (2.0, 4.0), (3.0, 6.0)])  # exact: t = 2x
    assert abs(eta - 0.5) < 1e-12 and abs(fixed) < 1e-12
    points = [(1.0, 0.5), (2.0, 2.0), (3.0, 3.6)]  # least squares meets the axis below 0
    eta, fixed = sm.fit(points)
    assert fixed == 0.0
    residuals = [y - x / eta for x, y in points]
    assert abs(sum(r * x for r, (x, _) in zip(residuals, points))) < 1e-9  # the through-origin normal equation
    eta, fixed = sm.fit([(1.0, 3.0), (2.0, 4.0), (3.0, 5.0)])  # a real fixed cost stays
    assert abs(eta - 1.0) < 1e-12 and abs(fixed - 2.0) < 1e-12
