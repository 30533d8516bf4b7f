"""Merges mixing tied models (no lm_head.weight) and untied ones, against mergekit-yaml 0.1.5.

mergekit's rules (pymerge/tied.py): lm_head is written when a model giving it stores one (the last
slice's models, or every model of a `models:` merge); a tied model then takes part with its
embedding. With `slices:`, the embedding comes from the first slice, so an untied first slice and a
tied last slice give no lm_head, a tied first slice and an untied last one the last model's lm_head.
config.json's tie_word_embeddings follows the tensors written (mergekit keeps the donor's value).

1. Parity through the CLI (frankenmerges both ways, with and without a tokenizer merge; plain
   linear / task_arithmetic / ties merges; a mixed last slice): the same tensors, config.json
   otherwise the same.
2. The rows themselves, from the sources (float64 reference), without mergekit.
3. Bad input: one line, exit 2, no output.
"""
import json

import pytest
import torch
import yaml

import llama_factory as lf
from test_tokenizer_merge import SPECIAL, W, X, assert_same_merge, close, run_cli, run_mergekit, write_model


def src(model, start, end, **params):
    return {"model": model, "layer_range": [start, end], **({"parameters": params} if params else {})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    out = {"a": write_model(root / "a", SPECIAL + W + ["<pad>"], layers=4),
           "at": write_model(root / "at", SPECIAL + W + ["<pad>"], perturb_seed=3, tie=True, layers=4),
           "bt": write_model(root / "bt", SPECIAL + W[:10] + X, perturb_seed=1, tie=True, rows=30, layers=4)}
    return root, {k: str(v) for k, v in out.items()}


def configs(m):
    a, at, bt = m["a"], m["at"], m["bt"]
    f32 = {"dtype": "float32"}
    lin = lambda *ms: [{"model": x, "parameters": {"weight": w}} for x, w in ms]  # noqa: E731
    return {
        "untied_then_tied": {"merge_method": "passthrough", "base_model": a, "slices": [
            {"sources": [src(a, 0, 3)]}, {"sources": [src(at, 1, 4)]}], **f32},
        "tied_then_untied": {"merge_method": "passthrough", "base_model": at, "slices": [
            {"sources": [src(at, 0, 2)]}, {"sources": [src(a, 1, 4)]}], **f32},
        "untied_then_tied_union": {"merge_method": "passthrough", "base_model": a, "slices": [
            {"sources": [src(a, 0, 2)]}, {"sources": [src(bt, 2, 4)]}], "tokenizer_source": "union", **f32},
        "tied_then_untied_union": {"merge_method": "passthrough", "base_model": bt, "slices": [
            {"sources": [src(bt, 0, 2)]}, {"sources": [src(a, 2, 4)]}], "tokenizer_source": "union", **f32},
        "mixed_last_slice": {"merge_method": "linear", "base_model": at, "slices": [
            {"sources": [src(at, 0, 2, weight=0.5), src(a, 0, 2, weight=0.5)]},
            {"sources": [src(at, 2, 4, weight=0.3), src(a, 2, 4, weight=0.7)]}], **f32},
        # a tied model's head is lm_head.weight to filters (read from its embedding): they saw the embedding's name
        "filtered_tied_head": {"merge_method": "task_arithmetic", "base_model": a, "slices": [
            {"sources": [src(a, 0, 4), src(at, 0, 4, weight=[{"filter": "lm_head", "value": 0.9}, {"value": 0.2}])]}],
            **f32},
        "linear_untied_first": {"merge_method": "linear", "base_model": a, "models": lin((a, 0.6), (at, 0.4)), **f32},
        "task_arithmetic_tied_base": {"merge_method": "task_arithmetic", "base_model": at,
                                      "models": lin((a, 0.7)), **f32},
        "ties_union": {"merge_method": "ties", "base_model": bt, "models": [
            {"model": a, "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": at, "parameters": {"weight": 0.4, "density": 0.5}}], "tokenizer_source": "union", **f32},
    }


NAMES = list(configs({k: k for k in ("a", "at", "bt")}))
HEAD = {"untied_then_tied": False, "tied_then_untied": True, "untied_then_tied_union": False,
        "tied_then_untied_union": True, "mixed_last_slice": True, "filtered_tied_head": True, "linear_untied_first": True,
        "task_arithmetic_tied_base": True, "ties_union": True}


@pytest.fixture(scope="module")
def parity(models):
    pytest.importorskip("mergekit", reason="mergekit 0.1.5 is not installed")
    root, m = models
    return run_mergekit(root, configs(m))


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit_yaml(parity, name, tmp_path, capsys):
    out, theirs = tmp_path / "out", parity / "mk" / name
    cfg = yaml.safe_load((parity / f"{name}.yml").read_text())
    rc, err = run_cli(["merge", parity / f"{name}.yml", out, "--quiet"], capsys)
    assert rc == 0, err
    if "tokenizer_source" in cfg:
        assert_same_merge(out, theirs, cfg, name)
    else:
        ours, mk = lf.load_folder(out), lf.load_folder(theirs)
        assert set(ours) == set(mk), sorted(set(ours) ^ set(mk))
        for k, b in mk.items():
            assert ours[k].dtype == b.dtype and ours[k].shape == b.shape and close(ours[k], b), (name, k)
    assert ("lm_head.weight" in lf.load_folder(out)) == HEAD[name]
    cfg_o, cfg_t = (json.loads((d / "config.json").read_text()) for d in (out, theirs))
    assert cfg_o.pop("tie_word_embeddings") is (not HEAD[name])  # the tensors decide; mergekit keeps the donor's
    for key in ("vocab_size", "num_hidden_layers", "hidden_size", "model_type"):  # the donor's, the same
        assert cfg_o[key] == cfg_t[key], key


def _merge(tmp_path, capsys, cfg):
    tmp_path.mkdir()
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, err = run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    return lf.load_folder(tmp_path / "out"), json.loads((tmp_path / "out" / "config.json").read_text()), err


def test_rows_from_the_sources(models, tmp_path, capsys):
    """Without mergekit: which model's tensor each output head and embedding is, in float64."""
    _, m = models
    a, at = lf.load_folder(m["a"]), lf.load_folder(m["at"])
    cfgs = configs(m)
    got, config, _ = _merge(tmp_path / "1", capsys, cfgs["untied_then_tied"])
    assert "lm_head.weight" not in got and config["tie_word_embeddings"] is True
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], at["model.norm.weight"])
    got, config, _ = _merge(tmp_path / "2", capsys, cfgs["tied_then_untied"])
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 5
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], at["model.embed_tokens.weight"])
    got, config, err = _merge(tmp_path / "3", capsys, {**cfgs["linear_untied_first"], "base_model": m["at"]})
    want = (0.6 * a["lm_head.weight"].double() + 0.4 * at["model.embed_tokens.weight"].double()).float()
    assert config["tie_word_embeddings"] is False and "tie_word_embeddings set to false" in err
    assert torch.allclose(got["lm_head.weight"], want, rtol=1e-6, atol=1e-7)
    for scope in ("source", "global"):  # filters see the head's name, not the embedding it is read from
        cfg = cfgs["filtered_tied_head"]
        if scope == "global":
            cfg = {**cfg, "parameters": {"weight": [{"filter": "lm_head", "value": 0.9}, {"value": 0.2}]},
                   "slices": [{"sources": [src(m["a"], 0, 4), src(m["at"], 0, 4)]}]}
        got, _, _ = _merge(tmp_path / f"filtered_{scope}", capsys, cfg)
        head, embed = a["lm_head.weight"].double(), at["model.embed_tokens.weight"].double()
        assert torch.allclose(got["lm_head.weight"].double(), head + 0.9 * (embed - head), rtol=1e-6, atol=1e-6)
        emb = a["model.embed_tokens.weight"].double()
        assert torch.allclose(got["model.embed_tokens.weight"].double(), emb + 0.2 * (embed - emb), rtol=1e-6,
                              atol=1e-6)
    # every model tied: no head, and the donor's config as it is
    got, config, err = _merge(tmp_path / "4", capsys, {"merge_method": "passthrough", "slices": [
        {"sources": [src(m["at"], 0, 3)]}, {"sources": [src(m["at"], 1, 4)]}]})
    assert "lm_head.weight" not in got and config["tie_word_embeddings"] is True and "tie_word" not in err


def test_bad_mixed_merges(models, tmp_path, capsys):
    """Tied and untied models whose embeddings differ in rows, without a tokenizer merge: one line."""
    _, m = models
    for i, cfg in enumerate([
            {"merge_method": "linear", "models": [{"model": m["a"], "parameters": {"weight": 0.5}},
                                                  {"model": m["bt"], "parameters": {"weight": 0.5}}]},
            {"merge_method": "linear", "slices": [{"sources": [src(m["bt"], 0, 2, weight=0.5),
                                                               src(m["a"], 0, 2, weight=0.5)]}]}]):
        path = tmp_path / f"bad{i}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = tmp_path / f"out{i}"
        rc, err = run_cli(["merge", path, out, "--quiet"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "shape" in err, (rc, err)
        assert not out.exists()


@pytest.mark.parametrize("method, untied", [("dare_ties", True), ("della", True), ("ties", False),
                                            ("dare_linear", True), ("linear", False), ("dare_ties@1", False)])
def test_a_tied_config_with_a_stored_head_under_random_masks(tmp_path, capsys, method, untied):
    """Models whose config ties the head to the embedding and that store it as a copy (many uploads do): DARE's
    and DELLA's masks, drawn per tensor name, gave the two different values while config.json still said tied,
    so loaders that tie by the config dropped the merged head, and transformers 5 kept it (an audit). The config
    says false then, with a warning; a deterministic method keeps them equal and the config as it was."""
    from safetensors.torch import save_file
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=2)
    for folder in [base, *fts]:
        state = lf.load_folder(folder)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        for f in folder.glob("*.safetensors"):
            f.unlink()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    method, _, density = method.partition("@")  # density 1: no mask drawn, the two stay equal (a review)
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": float(density or 0.5)}
    cfg = {"merge_method": method, "models": [{"model": str(f), "parameters": params} for f in fts],
           "dtype": "float32", **({} if method == "linear" else {"base_model": str(base)})}
    got, config, err = _merge(tmp_path / "run", capsys, cfg)
    equal = torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert equal is not untied
    assert config["tie_word_embeddings"] is not untied
    assert ("tie_word_embeddings set to false" in err) is untied, err
