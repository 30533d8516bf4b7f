"""Tokenizer merge benchmark: `mergekit-yaml` 0.1.5 vs `pymerge merge` on a union of two vocabularies.

Two Llama-shaped models (WordLevel tokenizers of --vocab tokens each, half of them shared, the
rest each model's own), merged linearly with `tokenizer_source: union`: the output has 1.5x
--vocab tokens, and half the rows of each model are filled from the other. Each tool runs
--repeats times on a warm page cache; wall time, CPU time and peak memory (bench_merge.run_tool).
With --slices the same union goes through `slices:` (a linear merge of both models' layers 0-1,
then of a's layer 0 with b's layer 1). Prints a table and writes JSON + markdown under
benchmarks/results/cpu/ (bench_tokenizer, or bench_tokenizer_slices).

    .venv/bin/python benchmarks/bench_tokenizer.py --vocab 8000 --hidden 512 [--slices]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None):
    from bench_merge import run_tool, tools_option, warm
    from common import positive_int, write_results
    import llama_factory as lf
    import test_tokenizer_merge as tm

    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=positive_int, default=8000)
    ap.add_argument("--hidden", type=positive_int, default=512)
    ap.add_argument("--repeats", type=positive_int, default=1)  # (0 wrote an empty table over the results)
    ap.add_argument("--slices", action="store_true", help="the union through slices: (per-slice merges)")
    ap.add_argument("--tools", default="mergekit,pymerge")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pymerge-bench-tokenizer"))
    args = ap.parse_args(argv)
    tools = tools_option(ap, args.tools)

    work = args.workdir / f"v{args.vocab}-h{args.hidden}"
    half = args.vocab // 2
    special = tm.SPECIAL
    words_a = special + [f"w{i}" for i in range(args.vocab - 3)]
    words_b = special + [f"w{i}" for i in range(half, half + args.vocab - 3)]
    union = len(set(words_a) | set(words_b))  # vocab + half, counted (the label said vocab + half - 3)
    dims = dict(hidden=args.hidden, intermediate=args.hidden, heads=4, kv_heads=4)
    orig = lf.LlamaDims
    lf.LlamaDims = lambda **kw: orig(**{**kw, **dims})  # tm.write_model's layers, our width
    try:
        a = tm.write_model(work / "a", words_a)
        b = tm.write_model(work / "b", words_b, perturb_seed=1)
    finally:
        lf.LlamaDims = orig
    cfg = work / ("union_slices.yml" if args.slices else "union.yml")
    if args.slices:
        sources = lambda ra, rb: (f"  - sources:\n"  # noqa: E731
                                  f"    - {{model: {a}, layer_range: {ra}, parameters: {{weight: 0.5}}}}\n"
                                  f"    - {{model: {b}, layer_range: {rb}, parameters: {{weight: 0.5}}}}\n")
        models = "slices:\n" + sources([0, 2], [0, 2]) + sources([0, 1], [1, 2])
    else:
        models = (f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                  f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")
    cfg.write_text(f"merge_method: linear\nbase_model: {a}\n{models}dtype: float32\ntokenizer_source: union\n")
    bin_dir = Path(sys.executable).parent
    cmds = {"mergekit": lambda out: [str(bin_dir / "mergekit-yaml"), str(cfg), str(out), "--quiet", "--no-cuda"],
            "pymerge": lambda out: [sys.executable, "-m", "pymerge", "merge", str(cfg), str(out), "--quiet",
                                    "--device", "cpu"]}
    rows = []
    for _ in range(args.repeats):
        for tool in tools:
            warm([a, b])
            r = run_tool(cmds[tool](work / f"out-{tool}"), work / f"out-{tool}")
            rows.append({"tool": tool, "tokens": f"{args.vocab} + {args.vocab} -> {union}",
                         "hidden": args.hidden, **r})
            print(rows[-1], flush=True)
    how = "linear per slice, `slices:`" if args.slices else "linear"
    table = write_results("bench_tokenizer_slices" if args.slices else "bench_tokenizer", "cpu", rows,
                          ["tool", "tokens", "hidden", "wall_s", "cpu_s", "peak_rss_mb", "peak_anon_mb"],
                          f"Tokenizer merge (union of two vocabularies, {how}), end to end")
    print(table)


if __name__ == "__main__":
    main()
