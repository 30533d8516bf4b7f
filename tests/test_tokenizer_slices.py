"""Tokenizer merges with `slices:` and `modules: {default: {slices: ...}}`, against mergekit-yaml 0.1.5.

mergekit's rules: the vocabulary is built from every model the config names (base first); the
embedding comes from the first slice's sources and lm_head from the last slice's, each permuted
to the output tokens over those sources alone (a token none of them has gets a zero row), with
default rows preferring the slice's base_model, else the config's.

1. Parity through the CLI on 4-layer Llama checkpoints whose vocabularies differ (tokenizer_source
   base / union / a model, `tokenizer:` with tokens and padding, depth up-scaling, per-slice
   merges, `modules: {default: {slices | models}}`, tied and untied embeddings): tensors, vocabulary, added tokens, config vocab_size and
   num_hidden_layers, tokenizer files (tests/test_tokenizer_merge.py's checks).
2. The rows themselves on a frankenmerge, from the sources' tensors.
3. Bad input: one line, exit 2, no output.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

import llama_factory as lf
from test_tokenizer_merge import (C_TEMPLATE, SPECIAL, W, X, assert_gpu_matches_cpu, assert_same_merge,
                                  assert_two_ranks_write_one_merge, run_cli, run_mergekit, vocab_of, write_model)

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 is not installed")

F32 = {"dtype": "float32"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokslices")
    out = {}
    for tie in (False, True):
        t = "t" if tie else ""
        out["a" + t] = write_model(root / f"a{t}", SPECIAL + W + ["<pad>"], tie=tie, layers=4)
        out["b" + t] = write_model(root / f"b{t}", SPECIAL + W[:10] + X, perturb_seed=1, tie=tie,
                                   added=["<|im_start|>"], rows=30, layers=4)  # padded embedding (26 tokens)
        out["c" + t] = write_model(root / f"c{t}", SPECIAL + X[:5] + W[:15], perturb_seed=2, tie=tie,
                                   added=["<pad>"], template=C_TEMPLATE, layers=4)
    return root, {k: str(v) for k, v in out.items()}


def src(model, start, end, **params):
    return {"model": model, "layer_range": [start, end], **({"parameters": params} if params else {})}


def configs(m):
    a, b, c, at, bt, ct = (m[k] for k in ("a", "b", "c", "at", "bt", "ct"))
    return {
        # embedding from a, lm_head from b (another vocabulary, padded rows) permuted to a's tokens
        "passthrough_base": {"merge_method": "passthrough", "base_model": a, "slices": [
            {"sources": [src(a, 0, 3)]}, {"sources": [src(b, 1, 4)]}], "tokenizer_source": "base", **F32},
        "passthrough_union": {"merge_method": "passthrough", "base_model": a, "slices": [
            {"sources": [src(a, 0, 2)]}, {"sources": [src(c, 1, 3)]}, {"sources": [src(b, 2, 4)]}],
            "tokenizer_source": "union", **F32},
        "passthrough_model": {"merge_method": "passthrough", "slices": [
            {"sources": [src(b, 0, 2)]}, {"sources": [src(c, 2, 4)]}], "tokenizer_source": c, **F32},
        # depth up-scaling of a tied model with another model's tokenizer, padded
        "dus_tied": {"merge_method": "passthrough", "slices": [
            {"sources": [src(at, 0, 3)]}, {"sources": [src(at, 1, 4)]}],
            "tokenizer": {"source": bt, "pad_to_multiple_of": 8}, "dtype": "bfloat16"},
        # per-slice merges of three models: lm_head's default rows prefer the last slice's base (c)
        "linear_union": {"merge_method": "linear", "base_model": a, "slices": [
            {"sources": [src(a, 0, 2, weight=0.5), src(b, 0, 2, weight=0.3), src(c, 0, 2, weight=[0.1, 0.4])]},
            {"sources": [src(a, 2, 4, weight=0.2), src(b, 1, 3), src(c, 2, 4)], "base_model": c,
             "parameters": {"weight": 0.6}}], "tokenizer_source": "union", **F32},
        "modules_ties_tied": {"merge_method": "ties", "base_model": at, "modules": {"default": {"slices": [
            {"sources": [src(at, 0, 4), src(bt, 0, 4, weight=0.6, density=0.7), src(ct, 0, 4, weight=0.4, density=0.5)]},
            {"sources": [src(at, 3, 4), src(bt, 2, 3, weight=0.6, density=0.7), src(ct, 1, 2, weight=0.4, density=0.5)]}]}},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                "<|im_start|>": {"source": bt},
                "x0": {"source": {"kind": "model_token", "model": ct, "token": "w3"}, "force": True},
                "w1": {"source": {"kind": "zero"}}}},
            "chat_template": "chatml", **F32},
        "modules_models": {"merge_method": "task_arithmetic", "base_model": a, "modules": {"default": {"models": [
            {"model": b, "parameters": {"weight": 0.6}}, {"model": c, "parameters": {"weight": [0.3, 0.8]}}]}},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 16}, **F32},
    }


NAMES = list(configs({k: k for k in ("a", "b", "c", "at", "bt", "ct")}))
LAYERS = {"passthrough_base": 6, "passthrough_union": 6, "passthrough_model": 4, "dus_tied": 6, "linear_union": 4,
          "modules_ties_tied": 5, "modules_models": 4}


@pytest.fixture(scope="module")
def parity(models):
    root, m = models
    return run_mergekit(root, configs(m))


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit_yaml(parity, name, tmp_path, capsys):
    out, theirs = tmp_path / "out", parity / "mk" / name
    rc, err = run_cli(["merge", parity / f"{name}.yml", out, "--quiet"], capsys)
    assert rc == 0, err
    assert_same_merge(out, theirs, yaml.safe_load((parity / f"{name}.yml").read_text()), name)
    layers = [json.loads((d / "config.json").read_text())["num_hidden_layers"] for d in (out, theirs)]
    assert layers == [LAYERS[name]] * 2


def test_frankenmerge_rows(models, tmp_path, capsys):
    """A union frankenmerge: the embedding is a's rows alone (zero for tokens only b or c have),
    lm_head is b's rows (zero for tokens b lacks), layers renumbered, vocab_size the union's."""
    root, m = models
    path = tmp_path / "f.yml"
    path.write_text(yaml.safe_dump(configs(m)["passthrough_union"], sort_keys=False))
    out = tmp_path / "out"
    assert run_cli(["merge", path, out, "--quiet"], capsys)[0] == 0
    got = lf.load_folder(out)
    v, _ = vocab_of(out)
    va, vb, vc = (vocab_of(Path(m[k]))[0] for k in "abc")
    ea, lb = lf.load_folder(m["a"])["model.embed_tokens.weight"], lf.load_folder(m["b"])["lm_head.weight"]
    assert set(v) == set(va) | set(vb) | set(vc) and all(v[t] == i for t, i in va.items())
    emb, head = got["model.embed_tokens.weight"], got["lm_head.weight"]
    assert emb.shape[0] == head.shape[0] == len(v)
    for t, i in v.items():
        assert torch.equal(emb[i], ea[va[t]] if t in va else torch.zeros_like(emb[i])), t
        assert torch.equal(head[i], lb[vb[t]] if t in vb else torch.zeros_like(head[i])), t
    c = lf.load_folder(m["c"])
    for out_layer, src_layer in ((2, 1), (3, 2)):
        k = "mlp.down_proj.weight"
        assert torch.equal(got[f"model.layers.{out_layer}.{k}"], c[f"model.layers.{src_layer}.{k}"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(v) and config["num_hidden_layers"] == 6


def test_without_base_model_the_first_model_gives_the_tokenizer(models, tmp_path, capsys):
    """mergekit takes an arbitrary model of the config (set order); pymerge the first slice's first."""
    _, m = models
    cfg = {"merge_method": "passthrough", "tokenizer_source": "base", "slices": [
        {"sources": [src(m["b"], 0, 2)]}, {"sources": [src(m["c"], 1, 4)]}]}
    path = tmp_path / "f.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)[0] == 0
    assert vocab_of(tmp_path / "out")[0] == vocab_of(Path(m["b"]))[0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_blocks_of_rows_give_the_same_bits(parity, tmp_path, capsys, monkeypatch):
    from pymerge.tokenizer import rows
    for name in ("linear_union", "modules_ties_tied"):
        whole = tmp_path / f"{name}-whole"
        assert run_cli(["merge", parity / f"{name}.yml", whole, "--quiet"], capsys)[0] == 0
        monkeypatch.setattr(rows, "rows_per_block", lambda *a: 3)
        out = tmp_path / f"{name}-3"
        assert run_cli(["merge", parity / f"{name}.yml", out, "--quiet"], capsys)[0] == 0
        a, b = lf.load_folder(out), lf.load_folder(whole)
        assert all(torch.equal(a[k], b[k]) for k in b), name
        monkeypatch.undo()


# ---- bad input -------------------------------------------------------------------------------
def _bad(tmp_path, capsys, cfg, *words):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    rc, err = run_cli(["merge", path, out, "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, (rc, err)
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _franken(*models):
    """Layer i from models[i]; a union tokenizer."""
    return {"merge_method": "passthrough", "base_model": models[0], "tokenizer_source": "union",
            "slices": [{"sources": [src(x, i, i + 1)]} for i, x in enumerate(models)]}


def test_bad_tokenizer_with_slices(models, tmp_path, capsys):
    _, m = models
    # x5's row must come from c, but the embedding is a's alone and lm_head b's (mergekit crashes)
    _bad(tmp_path, capsys, {**_franken(m["a"], m["c"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"x5": {"source": m["c"]}}}},
         "tokenizer.tokens['x5'].source", "not among the models", "first slice")
    _bad(tmp_path, capsys, {**_franken(m["a"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"w15": {"force": True}}}}, "tokenizer.tokens['w15']",
         "needs a source")
    # no tokenizer setting: the embedding would be a's 24 rows and lm_head b's 30 (exit 0 and a model nothing
    # loads, in mergekit too)
    plain = {k: v for k, v in _franken(m["a"], m["b"]).items() if k != "tokenizer_source"}
    _bad(tmp_path, capsys, plain, "model.embed_tokens.weight would have 24 rows", "lm_head.weight 30",
         "set tokenizer_source")
    small = write_model(tmp_path / "small", SPECIAL + W + ["<pad>"], perturb_seed=6, layers=4)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 20
    (small / "config.json").write_text(json.dumps(config))
    _bad(tmp_path, capsys, _franken(m["a"], str(small)), "small/tokenizer.json", "larger than its embedding")
    (small / "tokenizer.json").unlink()
    _bad(tmp_path, capsys, _franken(m["a"], str(small)), "small/tokenizer.json", "not found")


def test_slices_of_another_shape_than_the_donor_are_refused(models, tmp_path, capsys):
    """config.json is the donor's: layers of a model with another hidden or intermediate size, or an embedding
    of another vocabulary size than the donor's, wrote a model nothing loads, exit 0 (in mergekit too; an
    audit). Refused before any output."""
    _, m = models
    dims = lf.LlamaDims(hidden=16, layers=4, intermediate=24, heads=2, kv_heads=1, vocab=24)
    small = lf.make_llama(tmp_path / "small", dims=dims, seed=1)
    wide = lf.make_llama(tmp_path / "wide", dims=lf.LlamaDims(**{**lf.dims_dict(dims), "hidden": 32}), seed=2)
    inter = lf.make_llama(tmp_path / "inter", dims=lf.LlamaDims(**{**lf.dims_dict(dims), "intermediate": 40}), seed=3)
    for other, words in ((wide, ["input_layernorm.weight would be [32]", "has [16] in its layers"]),
                         (inter, ["would be [16, 40]", "has [16, 24] in its layers"])):
        cfg = {"merge_method": "passthrough", "slices": [{"sources": [src(str(small), 0, 2)]},
                                                         {"sources": [src(str(other), 2, 4)]}]}
        _bad(tmp_path, capsys, cfg, "slices: the output's model.layers.2.", *words, "hidden or intermediate size")
        # every layer from the other model, the config from a base_model of another shape
        _bad(tmp_path, capsys, {**cfg, "base_model": str(small), "slices": cfg["slices"][1:]},
             "model.layers.0." if other is inter else "model.embed_tokens.weight would be [24, 32]",
             "hidden or intermediate size")
    # the donor (base_model) b has 30 embedding rows, the output a's 24: config.json said vocab_size 30
    _bad(tmp_path, capsys, {"merge_method": "passthrough", "base_model": m["b"], "slices": [
        {"sources": [src(m["a"], 0, 2)]}]}, "model.embed_tokens.weight would be [24, 16]", f"{m['b']}, whose "
         "config.json the output takes, has [30, 16]", "set tokenizer_source")
    # the same with a tokenizer merge: rows are the merged vocabulary's, and it merges
    cfg = tmp_path / "ok.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "base_model": m["b"], "tokenizer_source": "base",
                                   "slices": [{"sources": [src(m["a"], 0, 2)]}]}))
    assert run_cli(["merge", cfg, tmp_path / "ok", "--quiet"], capsys)[0] == 0


# ---- other executors -------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_write_the_same_merge(parity, tmp_path, capsys):
    """Under a launcher (2 ranks, gloo): the sliced parts split between ranks, the same bits."""
    assert_two_ranks_write_one_merge(parity / "linear_union.yml", tmp_path, capsys,
                                     ("tokenizer.json", "tokenizer_config.json", "config.json"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["linear_union", "modules_ties_tied", "dus_tied"])
def test_gpu_matches_cpu(parity, name, tmp_path):
    assert_gpu_matches_cpu(parity / f"{name}.yml", tmp_path)
