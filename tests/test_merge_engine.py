"""The engine's planning (roles, dtypes, parameters) and streaming details (chunks, whole tensors)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llama_factory as lf
from pymerge.config import parse_config
from pymerge.errors import CheckpointError
from pymerge.merge import make_plan, run_merge
from pymerge.methods import base as mbase
from pymerge.streaming import Scratch, chunks


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base, fts = lf.make_family(root / "f32", n_finetunes=2)
    b16 = lf.make_llama(root / "b16", dtype=torch.bfloat16, perturb_seed=9)
    return base, fts, b16


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_roles_follow_mergekit(fam):
    base, fts, _ = fam
    a, b = str(fts[0]), str(fts[1])
    # linear ignores the base role: an unlisted base_model is one more input, weighted from the top level
    plan = make_plan({"merge_method": "linear", "base_model": str(base), "models": [a, b],
                      "parameters": {"weight": 1.0}})
    assert [m.path for m in plan.inputs] == [a, b, str(base)] and plan.base is None
    # task_arithmetic: a base listed under models is the base, not an input
    plan = make_plan({"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(base), a, b],
                      "parameters": {"weight": 0.5}})
    assert [m.path for m in plan.inputs] == [a, b] and plan.base.path == str(base)
    assert plan.donor.path == base
    plan.close()


def test_dtype_plan(fam):
    base, fts, b16 = fam
    models = [{"model": str(fts[0]), "parameters": {"weight": 1}}, {"model": str(b16), "parameters": {"weight": 1}}]
    p = make_plan({"merge_method": "linear", "models": models, "dtype": "bfloat16", "out_dtype": "float32"})
    t = p.tensors[0]
    assert t.casts == ["bfloat16", None]               # (dtype names) float32 input rounded to bfloat16 first, as mergekit loads it
    assert (t.result_dtype, t.out_dtype, t.double_round) == ("bfloat16", "float32", True)
    p = make_plan({"merge_method": "linear", "models": models, "dtype": "float32", "out_dtype": "bfloat16"})
    t = p.tensors[0]
    assert t.casts == [None, None] and not t.double_round  # bf16 -> fp32 is exact: read in place
    p = make_plan({"merge_method": "linear", "models": models})
    assert p.tensors[0].out_dtype == "float32"            # no dtype: the inputs' promoted dtype
    assert p.input_bytes == sum(t.in_bytes for t in p.tensors) and p.output_bytes > 0


def test_chunks_are_whole_rows_and_cover_the_tensor():
    class TP:
        numel, shape, casts = 96 * 64, (96, 64), [None]
    pieces = chunks(TP, budget_bytes=64 * 10 * 4 + 64 * 6, per_element=4)
    assert pieces[0] == (0, 640) and all(n % 64 == 0 for _, n in pieces[:-1])
    assert sum(n for _, n in pieces) == TP.numel
    assert [o for o, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(len(pieces))]


def test_scratch_regions_are_aligned_and_bounded():
    s = Scratch(torch.empty(1000, dtype=torch.uint8))
    a = s.take(torch.float32, 3)
    b = s.take(torch.bfloat16, 5)
    assert a.numel() == 3 and b.data_ptr() % 64 == 0
    with pytest.raises(AssertionError):
        s.take(torch.float32, 1000)


@pytest.fixture
def whole_method():
    """A whole-tensor (non-chunkable) method: out = mean of the inputs, checking it sees full shapes."""
    seen = []

    class WholeMean(mbase.MergeMethod):
        name = "_test_whole_mean"
        chunkable = False

        def merge_tensor(self, task, out):
            assert all(x.shape == out.shape for x in task.inputs) and task.offset == 0
            seen.append(tuple(out.shape))
            out.copy_(torch.stack([x.float() for x in task.inputs]).mean(0))

    mbase.register(WholeMean)
    yield seen
    del mbase._REGISTRY["_test_whole_mean"]


@pytest.mark.parametrize("chunk", [1 << 20, 64 << 20])
def test_whole_tensor_methods_get_full_tensors(fam, tmp_path, whole_method, chunk):
    base, fts, _ = fam
    cfg = {"merge_method": "_test_whole_mean", "models": [str(f) for f in fts]}
    run_merge(cfg, tmp_path / "out", quiet=True, chunk_bytes=chunk)
    out, a, b = _load(tmp_path / "out"), _load(fts[0]), _load(fts[1])
    assert set(out) == set(a) and len(whole_method) == len(a)
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + b[k]) / 2)


def test_linear_equals_reference(fam, tmp_path):
    base, fts, _ = fam
    cfg = {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 0.5},
           "models": [{"model": str(fts[0]), "parameters": {"weight": [1.0, 3.0]}}, {"model": str(fts[1])}]}
    report = run_merge(cfg, tmp_path / "out", quiet=True, chunk_bytes=1 << 20)
    assert report.tensors == len(lf.tensor_shapes(lf.TINY)) and report.method == "linear"
    out, x0, x1, xb = _load(tmp_path / "out"), _load(fts[0]), _load(fts[1]), _load(base)
    for k in out:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        w0 = 1.0 + 2.0 * (layer / (lf.TINY.layers - 1)) if layer is not None else 1.0
        ref = (w0 * x0[k].double() + 0.5 * x1[k].double() + 0.5 * xb[k].double()) / (w0 + 1.0)
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-7)


def _with_buffer(folders, root, values):
    """Copies of the model folders under root, model i holding the int64 buffer values[i] as model.position_ids."""
    from safetensors.torch import load_file, save_file
    out = []
    for i, (f, v) in enumerate(zip(folders, values)):
        t = load_file(str(Path(f) / "model.safetensors"))
        t["model.position_ids"] = v
        (root / f"m{i}").mkdir(parents=True)
        save_file(t, str(root / f"m{i}" / "model.safetensors"))
        out.append(str(root / f"m{i}"))
    return out


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_non_float_tensors_are_copied_when_every_model_agrees(fam, tmp_path, method):
    """A buffer (not floating point) is written as the models hold it, dtype and bits; the floats merge as
    without it. (mergekit merges such buffers as numbers and writes them as floats.)"""
    base, fts, _ = fam
    ids = torch.arange(8).view(1, 8)
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.7}

    def config(models, base_model):
        cfg = {"merge_method": method, "dtype": "float32", "models": [{"model": m, "parameters": params} for m in models]}
        return {**cfg, "base_model": base_model} if method == "ties" else cfg

    models = _with_buffer(fts, tmp_path / "in", [ids] * len(fts))
    base_copy = _with_buffer([base], tmp_path / "base", [ids])[0]
    run_merge(config(models, base_copy), tmp_path / "out", device="cpu", quiet=True)
    run_merge(config([str(f) for f in fts], str(base)), tmp_path / "plain", device="cpu", quiet=True)
    out, ref = lf.load_folder(tmp_path / "out"), lf.load_folder(tmp_path / "plain")
    assert out["model.position_ids"].dtype == torch.int64 and torch.equal(out["model.position_ids"], ids)
    assert set(out) == set(ref) | {"model.position_ids"}
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def test_non_float_tensors_that_differ_are_refused(fam, tmp_path):
    base, fts, _ = fam
    n = len(fts)
    models = _with_buffer(fts, tmp_path / "a", [torch.arange(8)] + [torch.arange(8).flip(0)] * (n - 1))
    with pytest.raises(CheckpointError, match=r"m1: tensor 'model.position_ids' \(int64\) differs from .*m0's"):
        run_merge({"merge_method": "linear", "models": models, "parameters": {"weight": 1}}, tmp_path / "out",
                  device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()
    mixed = _with_buffer(fts, tmp_path / "b", [torch.arange(8)] + [torch.arange(8, dtype=torch.int32)] * (n - 1))
    with pytest.raises(CheckpointError, match=r"m1: tensor 'model.position_ids' has dtype int32 and shape \[8\], .*m0 has int64"):
        make_plan(parse_config({"merge_method": "linear", "models": mixed, "parameters": {"weight": 1}}))


def _gpt_neox(folder, layers: int, seed: int, hidden: int = 16, vocab: int = 40, buffers: bool = False):
    """A tiny GPT-NeoX checkpoint: its output head `embed_out` is named like an embedding. buffers: each layer
    also holds what Pythia's checkpoints do (a boolean causal mask, masked_bias, rotary inv_freq)."""
    import json
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    t = {"gpt_neox.embed_in.weight": torch.randn(vocab, hidden, generator=g),
         "gpt_neox.final_layer_norm.weight": torch.randn(hidden, generator=g),
         "gpt_neox.final_layer_norm.bias": torch.randn(hidden, generator=g),
         "embed_out.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        for name, shape in (("attention.query_key_value", (3 * hidden, hidden)), ("attention.dense", (hidden, hidden)),
                            ("mlp.dense_h_to_4h", (4 * hidden, hidden)), ("mlp.dense_4h_to_h", (hidden, 4 * hidden)),
                            ("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,))):
            t[f"gpt_neox.layers.{i}.{name}.weight"] = torch.randn(shape, generator=g)
            t[f"gpt_neox.layers.{i}.{name}.bias"] = torch.randn(shape[0], generator=g)
        if buffers:
            t[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
            t[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            t[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.tensor([1.0, 0.01])
    folder.mkdir(parents=True)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_attention_heads": 2, "num_hidden_layers": layers, "vocab_size": vocab}))
    return t


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_gpt_neox_slices_take_the_head_from_the_last_slice(tmp_path, method, buffers):
    """GPT-NeoX's output head is `embed_out`, named like an embedding: a slices merge takes it (with the
    final norm) from the last slice's models and the input embedding from the first's, as mergekit's
    gpt-neox architecture lists it among the post weights (pymerge took it from the first slice)."""
    a, b = _gpt_neox(tmp_path / "a", 3, seed=1, buffers=buffers), _gpt_neox(tmp_path / "b", 2, seed=2, buffers=buffers)
    weight = {"parameters": {"weight": 1.0}} if method == "linear" else {}
    cfg = {"merge_method": method, "dtype": "float32", "slices": [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 2], **weight}]},
        {"sources": [{"model": str(tmp_path / "b"), "layer_range": [1, 2], **weight}]}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    out = lf.load_folder(tmp_path / "out")
    assert len(out) == 4 + 3 * (15 if buffers else 12)
    if buffers:  # Pythia's boolean masks are copied (they were refused: not floating point)
        assert all(out[f"gpt_neox.layers.{i}.attention.bias"].dtype == torch.bool for i in range(3))
        assert torch.equal(out["gpt_neox.layers.2.attention.bias"], b["gpt_neox.layers.1.attention.bias"])
    for name in ("embed_out.weight", "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"):
        assert torch.equal(out[name], b[name]), name
    assert torch.equal(out["gpt_neox.embed_in.weight"], a["gpt_neox.embed_in.weight"])
    assert torch.equal(out["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"], a["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"])
    assert torch.equal(out["gpt_neox.layers.2.mlp.dense_4h_to_h.weight"], b["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"])


def test_whole_models_of_different_depths_are_refused(tmp_path):
    """modules: default: models: with a 3-layer model before a 2-layer one: the slice spanned the first's
    count, so a shorter first model dropped the others' last layers (exit 0), and a longer first model was
    refused as "layer 2 ... differ" (mergekit: "All inputs to a slice must contain the same number of layers")."""
    from pymerge.errors import MergeConfigError
    _gpt_neox(tmp_path / "a", 3, seed=1), _gpt_neox(tmp_path / "b", 2, seed=2)
    for order in (("b", "a"), ("a", "b")):
        cfg = {"merge_method": "linear", "dtype": "float32", "modules": {"default": {"models": [
            {"model": str(tmp_path / m), "parameters": {"weight": 0.5}} for m in order]}}}
        with pytest.raises(MergeConfigError, match=r"every model must have as many layers, got .*(/a 3.*/b 2|/b 2.*/a 3)"):
            run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
        assert not (tmp_path / "out").exists()


def test_a_slice_setting_is_named_where_the_config_holds_it(tmp_path):
    """A typo in a slice's, a source's or a module's parameters was reported as the top-level `parameters:`
    or as a `models[0]` the config does not have."""
    from pymerge.errors import MergeConfigError
    _gpt_neox(tmp_path / "a", 2, seed=1), _gpt_neox(tmp_path / "b", 2, seed=2)
    src = lambda m, **p: {"model": str(tmp_path / m), "layer_range": [0, 2], **({"parameters": p} if p else {})}  # noqa: E731
    top = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}}
    for sliced, where in (
            ({"slices": [{"sources": [src("a"), src("b")], "parameters": {"wieght": 1}}]}, r"slices\[0\]\.parameters"),
            ({"slices": [{"sources": [src("a", wieght=1), src("b")]}]}, r"slices\[0\]\.sources\[0\] \(.*/a\)\.parameters"),
            ({"modules": {"default": {"slices": [{"sources": [src("a"), src("b", wieght=1)]}]}}},
             r"modules\.default\.slices\[0\]\.sources\[1\] \(.*/b\)\.parameters"),
            ({"modules": {"default": {"slices": [{"sources": [src("a"), src("b")]}], "parameters": {"wieght": 1}}}},
             r"modules\.default\.parameters"),
            ({"modules": {"default": {"models": [{"model": str(tmp_path / "a"), "parameters": {"wieght": 1}}]}}},
             r"modules\.default\.models\[0\] \(.*/a\)\.parameters")):
        with pytest.raises(MergeConfigError, match=rf": {where}: unknown parameter 'wieght'"):
            run_merge({**top, **sliced}, tmp_path / "out", device="cpu", quiet=True)
    # the top-level parameters of a slices config: a typo merged in silence, a bad value raised a traceback
    sliced = {"slices": [{"sources": [src("a"), src("b")]}]}
    for params, message in (({"wieght": 1}, r"parameters: unknown parameter 'wieght'"),
                            ({"weight": "abc"}, r"parameters\.weight: 'abc' is not a number"),
                            ({"weight": [1, float("nan")]}, r"parameters\.weight\[1\]: nan is not a finite number")):
        with pytest.raises(MergeConfigError, match=message):
            run_merge({**top, **sliced, "parameters": params}, tmp_path / "out", device="cpu", quiet=True)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("hole", ["counted, not stored", "one missing"])
def test_a_slice_over_layers_the_file_lacks_is_refused(tmp_path, hole):
    """A layer config.json counts but the file lacks: a slice over it wrote a model with that layer's
    tensors missing and num_hidden_layers counting it (exit 0); a count of 10**9 looped without end."""
    from safetensors.torch import save_file
    t = _gpt_neox(tmp_path / "a", 4, seed=1)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    if hole == "counted, not stored":
        config["num_hidden_layers"] = 10 ** 9
        (tmp_path / "a" / "config.json").write_text(json.dumps(config))
        missing, ranges = 4, [[2, 6]]
    else:
        save_file({k: v for k, v in t.items() if ".layers.2." not in k}, str(tmp_path / "a" / "model.safetensors"),
                  metadata={"format": "pt"})
        missing, ranges = 2, [[0, 4]]
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(tmp_path / "a"), "layer_range": r}]} for r in ranges]}
    with pytest.raises(CheckpointError, match=rf"/a: has no tensors of layer {missing} \(gpt_neox.layers.{missing}"):
        run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("claimed", [5, 1000])
def test_a_config_claiming_layers_the_tensors_lack_is_refused(tmp_path, claimed):
    """The donor's config.json said 1000 layers for tensors of 4: gradient weights were placed for 1000 (layer 3
    got t = 0.003 instead of 1) and the output's config.json claimed 1000 layers (exit 0; an audit). Refused,
    naming the file, where a gradient uses the positions; fewer than the tensors hold stays allowed (DeepSeek-V3's
    multi-token-prediction block sits past num_hidden_layers), with the gradient over the config's count as
    mergekit places it."""
    _gpt_neox(tmp_path / "a", 4, seed=1)
    _gpt_neox(tmp_path / "b", 4, seed=2)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / "a"), "parameters": {"weight": [0.0, 1.0]}},
        {"model": str(tmp_path / "b"), "parameters": {"weight": [1.0, 0.0]}}]}
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": claimed}))
    with pytest.raises(CheckpointError, match=rf"/a/config.json: num_hidden_layers is {claimed}, but the checkpoints "
                                              r"hold 4 layers \(gpt_neox.layers.0 to gpt_neox.layers.3\)"):
        run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)  # fewer: merged, positions over 3 layers
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    # no gradient: the count is unused, so not checked (LongCat-Flash's config counts 2 sublayers per layer)
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": claimed}))
    flat = {**cfg, "models": [{**m, "parameters": {"weight": 0.5}} for m in cfg["models"]]}
    run_merge(flat, tmp_path / "flat", device="cpu", quiet=True)
    assert json.loads((tmp_path / "flat" / "config.json").read_text())["num_hidden_layers"] == claimed


def test_gpt_neox_with_buffers_merges(tmp_path):
    """Pythia-style checkpoints (a boolean causal mask in every layer): a plain merge copies the mask and
    merges the floats, masked_bias and inv_freq included."""
    a, b = _gpt_neox(tmp_path / "a", 2, seed=1, buffers=True), _gpt_neox(tmp_path / "b", 2, seed=2, buffers=True)
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / "a"), "parameters": {"weight": 0.25}},
        {"model": str(tmp_path / "b"), "parameters": {"weight": 0.75}}]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    out = lf.load_folder(tmp_path / "out")
    assert set(out) == set(a)
    for k in a:
        if a[k].dtype == torch.bool:
            assert out[k].dtype == torch.bool and torch.equal(out[k], a[k]), k
        else:
            ref = 0.25 * a[k].double() + 0.75 * b[k].double()
            torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-6)



def test_a_merge_of_more_shard_files_than_4096_runs(tmp_path):
    """16 checkpoints of 300 shards: the SIGBUS guard's table held 4096 mapped files, and the merge ended in a
    traceback ("sigbus guard: too many mapped files at once"), exit 1."""
    import json
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    folders = []
    for m in range(2):
        folder = tmp_path / f"m{m}"
        folder.mkdir()
        weight_map = {}
        for i in range(2100):
            fname = f"model-{i + 1:05d}-of-02100.safetensors"
            save_file({f"t{i}": torch.randn(3, generator=g)}, str(folder / fname))
            weight_map[f"t{i}"] = fname
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        folders.append(folder)
    run_merge({"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in folders]},
              tmp_path / "out", quiet=True, copy_tokenizer=False)
    got, a, b = _load(tmp_path / "out"), _load(folders[0]), _load(folders[1])
    assert len(got) == 2100 and all(torch.equal(got[k], 0.5 * a[k] + 0.5 * b[k]) for k in ("t0", "t1234", "t2099"))


def _moe(folder, model_type: str, seed: int, layers: int = 2, experts: int = 2, h: int = 8, i: int = 12):
    """A tiny mixture-of-experts checkpoint in its per-expert layout on disk (Mixtral's block_sparse_moe
    w1/w2/w3, Qwen3-MoE's mlp.experts.N.*_proj), as such models are published."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = {"model.embed_tokens.weight": r(16, h), "model.norm.weight": r(h), "lm_head.weight": r(16, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t.update({p + "self_attn.q_proj.weight": r(h, h), p + "input_layernorm.weight": r(h)})
        moe, names = (("block_sparse_moe.", ("w1", "w2", "w3")) if model_type == "mixtral"
                      else ("mlp.", ("gate_proj", "down_proj", "up_proj")))
        t[p + moe + "gate.weight"] = r(experts, h)
        for e in range(experts):
            for w in names:
                t[p + moe + f"experts.{e}.{w}.weight"] = r(h, i) if w in ("w2", "down_proj") else r(i, h)
    folder.mkdir()
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": layers}))
    return t


@pytest.mark.parametrize("model_type,filt,hits", [
    ("mixtral", "mlp", ("block_sparse_moe.",)),           # the router and every expert: mlp.gate, mlp.experts.*
    ("mixtral", "gate_up", (".w1.", ".w3.")),
    ("mixtral", "experts.down_proj", (".w2.",)),
    ("qwen3_moe", "up_proj", ("gate_proj", "up_proj")),  # both halves of the fused gate_up_proj
    ("qwen3_moe", ".weight", ("embed", "norm", "lm_head", "q_proj", "layernorm", "mlp.gate.")),  # experts: no .weight
    # model types without a mergekit JSON file: read through transformers' conversion mapping (an audit: qwen2_moe)
    ("qwen2_moe", "gate_up_proj", ("gate_proj", "up_proj")),
    ("deepseek_v3", "experts.down_proj", ("down_proj",)),
    ("olmoe", ".weight", ("embed", "norm", "lm_head", "q_proj", "layernorm", "mlp.gate.")),
    ("llama", "gate_up_proj", ()),  # a dense model type: the names on disk
])
@pytest.mark.parametrize("sliced", [False, True])
def test_filters_see_mergekits_fused_expert_names(tmp_path, model_type, filt, hits, sliced):
    """mergekit 0.1.5 reads these per-expert checkpoints as transformers 5's fused tensors and matches
    `filter:` against those names; pymerge matched the names on disk (filter: mlp missed every Mixtral
    expert and its router)."""
    a = _moe(tmp_path / "a", model_type, 1)
    b = _moe(tmp_path / "b", model_type, 2)
    weight = [{"filter": filt, "value": 0.9}, {"value": 0.1}]
    if sliced:
        spec = {"merge_method": "linear", "slices": [{"sources": [
            {"model": str(tmp_path / "a"), "layer_range": [0, 2], "parameters": {"weight": weight}},
            {"model": str(tmp_path / "b"), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}]}
    else:
        spec = {"merge_method": "linear", "models": [
            {"model": str(tmp_path / "a"), "parameters": {"weight": weight}},
            {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5}}]}
    spec.update(dtype="float32", parameters={"normalize": False})
    run_merge(parse_config(spec), tmp_path / "out")
    out = _load(tmp_path / "out")
    for name, x in a.items():
        if sliced and "layers." not in name:
            continue  # outside the stack: a slice merge takes those from its donor
        wa = 0.9 if any(s in name for s in hits) else 0.1
        torch.testing.assert_close(out[name], wa * x + 0.5 * b[name], msg=f"{name}: weight of a is not {wa}")


@pytest.mark.parametrize("prefix", ["", "transformer."])
@pytest.mark.parametrize("filt,hits", [("transformer.h.1.", ("h.1.",)), ("transformer.wte", ("wte.",)),
                                       ("h.0.attn", ("h.0.attn.",))])
def test_filters_see_gpt2_names_under_transformer(tmp_path, prefix, filt, hits):
    """mergekit's GPT-2 files name every tensor under `transformer.` (openai-community/gpt2's own unprefixed
    names are aliases) and `filter:` sees those names: a filter written for mergekit matched nothing in pymerge
    on an unprefixed checkpoint, silently (a bug hunt, checked against mergekit-yaml)."""
    from safetensors.torch import save_file
    tensors = []
    for k, folder in enumerate((tmp_path / "a", tmp_path / "b")):
        g = torch.Generator().manual_seed(k)
        t = {prefix + n: torch.randn(*s, generator=g) for n, s in (
            ("wte.weight", (16, 8)), ("wpe.weight", (8, 8)), ("ln_f.weight", (8,)), ("h.0.attn.c_attn.weight", (8, 24)),
            ("h.0.ln_1.weight", (8,)), ("h.1.attn.c_attn.weight", (8, 24)), ("h.1.mlp.c_fc.weight", (8, 32)))}
        folder.mkdir()
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
        tensors.append(t)
    spec = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False}, "models": [
        {"model": str(tmp_path / "a"), "parameters": {"weight": [{"filter": filt, "value": 0.9}, {"value": 0.1}]}},
        {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5}}]}
    run_merge(parse_config(spec), tmp_path / "out")
    out = _load(tmp_path / "out")
    for name, x in tensors[0].items():
        wa = 0.9 if any(name[len(prefix):].startswith(h) for h in hits) else 0.1
        torch.testing.assert_close(out[name], wa * x + 0.5 * tensors[1][name], msg=f"{name}: weight of a is not {wa}")


def test_rescale_takes_its_rule_names_in_a_config(tmp_path):
    """`rescale: l1` / `inverse_density` (documented, and taken by the pool API) were refused in every config as
    "not a boolean" (a bug hunt). One fine-tune, TIES at density 0.5 without normalizing: inverse_density
    doubles the kept task vector; l1 is true; a gradient picks per layer; other words are refused."""
    from pymerge.errors import MergeConfigError
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=1, perturb=0.3)

    def merged(rescale, name):
        spec = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "parameters": {"normalize": False, "rescale": rescale},
                "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0, "density": 0.5}}]}
        run_merge(parse_config(spec), tmp_path / name)
        return _load(tmp_path / name)
    b = _load(base)
    off, inv, l1, true = (merged(r, n) for r, n in ((False, "off"), ("inverse_density", "inv"), ("l1", "l1"),
                                                    (True, "true")))
    assert any(not torch.equal(off[k], b[k]) for k in b)
    for k in b:
        torch.testing.assert_close(inv[k] - b[k], 2 * (off[k] - b[k]), msg=k)
        assert torch.equal(l1[k], true[k]), k
    picked = merged(["inverse_density", False], "picked")  # the first layer doubled, the last not
    layers = sorted({int(k.split(".")[2]) for k in b if ".layers." in k})
    first, last = (f"model.layers.{i}.mlp.down_proj.weight" for i in (layers[0], layers[-1]))
    assert torch.equal(picked[first], inv[first]) and torch.equal(picked[last], off[last])
    with pytest.raises(MergeConfigError, match="'sometimes' is not a boolean or one of l1, inverse_density"):
        merged("sometimes", "bad")


def test_a_filter_that_matches_no_tensor_is_warned_about(fam):
    """A `filter:` with a typo (self_atn) silently gave its values to no tensor (a bug hunt's suggestion): the plan
    warns, once per filter, naming it; filters that match (or '*') do not warn."""
    base, fts, _ = fam
    spec = {"merge_method": "linear", "parameters": {"weight": [{"filter": "self_atn", "value": 0.2}, {"value": 0.5}]},
            "models": [{"model": str(fts[0]), "parameters": {"weight": [{"filter": "mlp", "value": 0.9},
                                                                        {"filter": "*", "value": 0.1}]}},
                       {"model": str(fts[1]), "parameters": {"weight": {"filter": "self_atn", "value": 0.3}}}]}
    plan = make_plan(parse_config(spec))
    try:
        said = [w for w in plan.warnings if "matches no tensor" in w]
        assert len(said) == 1 and said[0].startswith("filter 'self_atn' of weight matches no tensor it applies to"), \
            plan.warnings
    finally:
        plan.close()


def test_a_filter_that_matches_no_tensor_of_a_sliced_merge_is_warned_about(fam):
    """The same in a `slices:` merge, in each of its scopes (the top level, a slice, a source); filters that match
    a source's (shifted) layer name, an output name or '*' do not warn."""
    base, fts, _ = fam
    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as h:
        n = 1 + max(int(k.split(".")[2]) for k in h.keys() if ".layers." in k)
    def source(m, lo, hi, **params):
        return {"model": str(m), "layer_range": [lo, hi], **({"parameters": params} if params else {})}
    spec = {"merge_method": "linear", "parameters": {"weight": [{"filter": "embed_tokns", "value": 0.2},
                                                                {"filter": "lm_head", "value": 0.3}, {"value": 0.5}]},
            "slices": [{"sources": [source(fts[0], 0, n, weight=[{"filter": "mlp", "value": 0.9}, {"value": 0.1}]),
                                    source(fts[1], 0, n, weight=[{"filter": "self_atn", "value": 0.3},
                                                                 {"filter": f"layers.{n - 1}.", "value": 0.4},
                                                                 {"value": 0.2}])],
                        "parameters": {"normalize": [{"filter": "nrm", "value": False}, {"filter": "*", "value": True}]}}]}
    plan = make_plan(parse_config(spec))
    try:
        said = sorted(w.split(" matches")[0] for w in plan.warnings if "matches no tensor" in w)
        assert said == ["filter 'embed_tokns' of weight", "filter 'nrm' of normalize", "filter 'self_atn' of weight"], \
            plan.warnings
    finally:
        plan.close()


def test_a_sliced_merges_filters_are_checked_against_the_names_they_see(fam):
    """Per-model parameters (weight) see the sources' tensor names, global ones (normalize) the output's: a
    weight filter naming an output layer no source slice has, or a normalize filter naming a source layer the
    output renumbers, is never used (both went unwarned, checked against either name: found by a review)."""
    base, fts, _ = fam
    spec = {"merge_method": "linear",
            "parameters": {"weight": [{"filter": "model.layers.0.", "value": 0.9}, {"filter": "layers.2.", "value": 0.7},
                                      {"value": 0.5}],
                           "normalize": [{"filter": "layers.2.", "value": False}, {"filter": "layers.1.", "value": False},
                                         {"value": True}]},
            "slices": [{"sources": [{"model": str(m), "layer_range": [1, 3]} for m in fts[:2]]}]}
    plan = make_plan(parse_config(spec))
    try:
        said = [w.split(" matches")[0] for w in plan.warnings if "matches no tensor" in w]
        assert said == ["filter 'model.layers.0.' of weight", "filter 'layers.2.' of normalize"], plan.warnings
        (weight,) = [w for w in plan.warnings if "'model.layers.0.' of weight" in w]
        assert "names such as 'model.layers.1." in weight or "names such as 'model.layers.2." in weight, \
            plan.warnings  # a name weight's filters see, not an output name the filter matches
    finally:
        plan.close()


def test_a_slices_own_filters_are_checked_against_that_slice(fam):
    """A filter in one slice's parameters (or its sources') that matches only another slice's tensors is never
    used (the output was the same without it, found by a review); the merge's own parameters see every slice."""
    base, fts, _ = fam
    def sl(lo, hi, weight):
        return {"sources": [{"model": str(m), "layer_range": [lo, hi]} for m in fts[:2]],
                "parameters": {"weight": weight}}
    spec = {"merge_method": "linear", "parameters": {"weight": [{"filter": "layers.2.", "value": 0.3}, {"value": 1}]},
            "slices": [sl(0, 2, [{"filter": "layers.2.", "value": 0.2}, {"filter": "embed", "value": 0.4}, {"value": 1}]),
                       sl(2, 3, [{"filter": "layers.2.", "value": 0.6}, {"filter": "lm_head", "value": 0.5},
                                 {"filter": "embed", "value": 0.7}, {"value": 1}])]}
    plan = make_plan(parse_config(spec))
    try:
        said = [w.split(" matches")[0] for w in plan.warnings if "matches no tensor" in w]
        assert said == ["filter 'layers.2.' of weight", "filter 'embed' of weight"], plan.warnings
        (slice0,) = [w for w in plan.warnings if "'layers.2.' of weight" in w]
        assert "layers.2." not in slice0.split("names such as")[1], plan.warnings  # slice 0's names
    finally:
        plan.close()


def test_slice_errors_name_each_models_own_tensor_and_the_zip_cut(fam, tmp_path):
    """Two audit findings on messages: a shape mismatch inside `slices:` named the output's tensor (layer 0),
    not the models' (layer 1: m/a's was fine); a last slice with more sources than the first (mergekit zips the
    tensors after the layers to the first's count) said the base "is not among this slice's sources" while it
    was listed there, past the cut."""
    from safetensors.torch import load_file, save_file
    from pymerge.errors import MergeConfigError
    base, fts, _ = fam
    odd = tmp_path / "odd"
    shutil.copytree(fts[0], odd)
    f = next(odd.glob("*.safetensors"))
    t = load_file(f)
    w = t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.1.mlp.up_proj.weight"] = torch.cat([w, w[:1]])
    save_file(t, f, metadata={"format": "pt"})
    src = lambda m, a, b: {"model": str(m), "layer_range": [a, b]}  # noqa: E731
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "slices": [{"sources": [src(fts[1], 1, 2), src(odd, 1, 2)]}]}
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.up_proj.weight': shape \[\d+, \d+\] in "
                       r".*ft2 \(its 'model.layers.1.mlp.up_proj.weight'\) but \[\d+, \d+\] in .*odd \(its "
                       r"'model.layers.1.mlp.up_proj.weight'\)"):
        make_plan(parse_config(cfg))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 1.0},
           "slices": [{"sources": [src(base, 0, 1), src(fts[0], 0, 1)]},
                      {"sources": [src(fts[0], 1, 2), src(fts[1], 1, 2), src(base, 1, 2)]}]}
    with pytest.raises(MergeConfigError, match=r"slices\[1\] \(the tensors after the layers take its first 2 sources, "
                       r"as many as slices\[0\] has: mergekit's rule\): the base model .*base is not among"):
        make_plan(parse_config(cfg))


def test_models_whose_index_lists_no_file_are_named_empty_not_the_same(tmp_path):
    """Two folders each with {"weight_map": {}} were "the same model; list it once" (their empty file sets equal)."""
    from pymerge.errors import MergeConfigError
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / m), "parameters": {"weight": 1.0}}
                                                for m in ("a", "b")]}
    with pytest.raises(MergeConfigError, match=r"models\[0\] \(.*a\): holds no tensors \(its index lists no file\)"):
        run_merge(parse_config(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_merge_leaves_the_callers_config_as_it_was(fam, tmp_path):
    """run_merge of a MergeConfig wrote its lora_merge_dtype into the caller's object (the next call without one
    merged MODEL+LORA models in that dtype) and appended each run's warnings to it (reported again by every later
    run; an audit). The object is copied now."""
    base, fts, _ = fam
    cfg = parse_config({"merge_method": "linear", "models": [
        {"model": str(fts[0]), "parameters": {"weight": 0.5, "normalize": True}},  # a global parameter: a warning
        {"model": str(fts[1]), "parameters": {"weight": 0.5}}]})
    said = []
    for i, dtype in enumerate([None, "bfloat16", None]):
        report = run_merge(cfg, tmp_path / f"out{i}", device="cpu", quiet=True, lora_merge_dtype=dtype)
        said.append(len(report.warnings))
    assert cfg.lora_merge_dtype is None and cfg.warnings == []
    assert said[0] >= 1 and said == [said[0]] * 3, said


def test_run_merge_gives_torchs_thread_count_back(fam, tmp_path):
    """run_merge(threads=1) of a merge torch computes left torch at one thread for the caller's later work (an
    audit)."""
    base, fts, _ = fam
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        spec = {"merge_method": "ties", "base_model": str(base), "models": [
            {"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]}
        run_merge(parse_config(spec), tmp_path / "out", device="cpu", quiet=True, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag", ["force", "quiet", "copy_tokenizer", "model_card"])
def test_run_merge_flags_are_bools_never_strings(fam, tmp_path, flag):
    """force="False" was true (a string's length): run_merge replaced an existing OUT and the user's file in it (an
    audit). A string (or a list) is one line now, nothing touched; bools, numpy's and integers work."""
    from pymerge.errors import InputError
    base, fts, _ = fam
    spec = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match=f"^{flag} must be True or False, got 'False'"):
        run_merge(parse_config(spec), out, device="cpu", **{"quiet": True, flag: "False"})
    assert (out / "mine.txt").read_text() == "keep"
    import numpy as np
    run_merge(parse_config(spec), tmp_path / "o2", device="cpu", **{"quiet": True, flag: np.bool_(True)})


def _lstat_fails(monkeypatch, failing: str) -> None:
    """os.lstat of `failing` raises EIO (a failing disk) until monkeypatch.undo()."""
    import errno
    import os
    real = os.lstat

    def lstat(path, *a, **kw):
        if os.fspath(path) == failing:
            raise OSError(errno.EIO, "Input/output error", failing)
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "lstat", lstat)


def test_a_side_file_that_cannot_be_looked_up_fails_the_merge(fam, tmp_path, monkeypatch):
    """An EIO from lstat() of the donor's config.json or tokenizer files read as 'absent' (os.path.lexists): the
    merge exited 0 with the file missing from OUT (an audit). Only a name that is not there is absent now; any
    other failure is a one-line error naming the file, and nothing is written."""
    import os
    base, fts, _ = fam
    cfg = {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 0.5},
           "models": [{"model": str(fts[0])}, {"model": str(fts[1])}]}
    side = sorted(f.name for f in base.iterdir() if not f.name.endswith(".safetensors"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(side)
    for name in side:
        failing = str(base / name)
        _lstat_fails(monkeypatch, failing)
        with pytest.raises(CheckpointError, match=f"^{failing}: cannot look it up: Input/output error$"):
            run_merge(cfg, tmp_path / "out", quiet=True)
        monkeypatch.undo()
        assert os.listdir(tmp_path) == []
    run_merge(cfg, tmp_path / "out", quiet=True)
    assert side == sorted(f.name for f in (tmp_path / "out").iterdir() if f.name in side)


def test_a_custom_module_that_cannot_be_looked_up_fails_the_merge(fam, tmp_path, monkeypatch):
    """The donor's custom code (config.json's auto_map), checked with os.path.isfile: an EIO left it out of OUT,
    which then could not be loaded with trust_remote_code, exit 0."""
    import os
    base, fts, _ = fam
    donor = tmp_path / "donor"
    shutil.copytree(base, donor)
    config = json.loads((donor / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (donor / "config.json").write_text(json.dumps(config))
    (donor / "modeling_x.py").write_text("from .x_layers import Block\n")
    (donor / "x_layers.py").write_text("Block = None\n")
    cfg = {"merge_method": "linear", "base_model": str(donor), "parameters": {"weight": 0.5},
           "models": [{"model": str(fts[0])}, {"model": str(fts[1])}]}
    for name in ("modeling_x.py", "x_layers.py"):
        failing = str(donor / name)
        _lstat_fails(monkeypatch, failing)
        with pytest.raises(CheckpointError, match=f"^{failing}: cannot look it up: Input/output error$"):
            run_merge(cfg, tmp_path / "out", quiet=True)
        monkeypatch.undo()
        assert not (tmp_path / "out").exists()
    run_merge(cfg, tmp_path / "out", quiet=True)
    assert {"modeling_x.py", "x_layers.py"} <= set(os.listdir(tmp_path / "out"))


def test_chunks_are_whole_rows_when_the_budget_holds_part_of_a_row():
    """Room for 10 rows and 5 elements gave 645-element chunks, every one after the first starting mid-row,
    though the doc promises whole rows where a row fits (a mutation audit; the test above used whole rows)."""
    class TP:
        numel, shape, casts = 96 * 64, (96, 64), [None]
    pieces = chunks(TP, budget_bytes=64 * 10 * 4 + 64 * 6 + 4 * 5, per_element=4)
    assert pieces[0] == (0, 640) and all(o % 64 == 0 and n % 64 == 0 for o, n in pieces)
    assert sum(n for _, n in pieces) == TP.numel


def _one_tensor_model(folder, t):
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"w": t.contiguous()}, str(folder / "model.safetensors"))
    return str(folder)


def test_a_chunked_torch_free_linear_merge_reads_each_source_at_its_own_itemsize(tmp_path, monkeypatch):
    """The torch-free path offset every source's chunk by the first source's itemsize: a bfloat16 model
    listed before a float32 one read the float32 model's chunks 2 to n from the wrong place (error 2.0,
    or a segfault the other way round; a mutation audit). Several 1 MiB chunks, against float64."""
    from pymerge import streaming
    monkeypatch.delenv(streaming.FORCE_TORCH_ENV, raising=False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(768, 1024, generator=g).bfloat16(), torch.randn(768, 1024, generator=g)
    cfg = {"merge_method": "linear", "models": [
        {"model": _one_tensor_model(tmp_path / "a", a), "parameters": {"weight": 0.7}},
        {"model": _one_tensor_model(tmp_path / "b", b), "parameters": {"weight": 0.3}}]}
    plan = make_plan(cfg)
    tp = plan.tensors[0]
    assert streaming.torch_free(plan) and len(chunks(tp, 1 << 20, streaming.scratch_per_element(tp))) > 2
    plan.close()
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True, chunk_bytes=1 << 20)
    got = _load(tmp_path / "out")["w"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), 0.7 * a.double() + 0.3 * b.double(), rtol=0, atol=1e-6)


def test_a_chunked_merge_that_rounds_twice_has_scratch_for_the_narrow_result(tmp_path):
    """ties in bfloat16 written as float32 rounds twice, and needs scratch for the bfloat16 result too: counted
    without it, a chunk overran its scratch (AssertionError: scratch overflow; a mutation audit). Chunked equals
    unchunked."""
    from pymerge.streaming import scratch_per_element
    g = torch.Generator().manual_seed(1)
    base, a, b = (_one_tensor_model(tmp_path / n, torch.randn(512, 512, generator=g)) for n in "cab")
    cfg = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16", "out_dtype": "float32",
           "parameters": {"density": 1.0, "weight": 0.5}, "models": [{"model": a}, {"model": b}]}
    plan = make_plan(cfg)
    tp = plan.tensors[0]
    assert tp.double_round and len(chunks(tp, 1 << 20, scratch_per_element(tp))) > 1
    plan.close()
    run_merge(cfg, tmp_path / "chunked", device="cpu", quiet=True, chunk_bytes=1 << 20)
    run_merge(cfg, tmp_path / "whole", device="cpu", quiet=True, chunk_bytes=64 << 20)
    got, ref = _load(tmp_path / "chunked")["w"], _load(tmp_path / "whole")["w"]
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_float8_models_merge_to_bfloat16(tmp_path):
    """A linear merge of float8 (e4m3) models with no dtype is written in bfloat16, as _promote documents
    (float8 results come out as bfloat16); float16 was not noticed (a mutation audit)."""
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn) for _ in range(2)]
    cfg = {"merge_method": "linear", "models": [
        {"model": _one_tensor_model(tmp_path / n, t), "parameters": {"weight": 0.5}} for n, t in zip("pq", ts)]}
    plan = make_plan(cfg)
    assert plan.tensors[0].out_dtype == "bfloat16"
    plan.close()
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    got = _load(tmp_path / "out")["w"]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ((ts[0].float() + ts[1].float()) / 2).bfloat16())


def test_a_text_config_claiming_layers_the_tensors_lack_is_refused(fam, tmp_path):
    """A multimodal config.json counts its layers under text_config: a count above the stored layers, with a
    gradient, was not read there and merged, the gradient placed over the wrong count (a mutation audit)."""
    base, fts, _ = fam
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(fts[0], b)
    config = json.loads((a / "config.json").read_text())
    config["text_config"] = {"num_hidden_layers": config.pop("num_hidden_layers") + 3}
    (a / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": [0.0, 1.0]}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    with pytest.raises(CheckpointError, match=rf"/a/config.json: num_hidden_layers is {lf.TINY.layers + 3}, "
                                              rf"but the checkpoints hold {lf.TINY.layers} layers"):
        run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("force_torch", ["0", "1"])
def test_an_interrupt_as_the_writer_thread_starts_leaves_no_thread(fam, tmp_path, monkeypatch, force_torch):
    """The streaming merge's writer thread was started in its constructor, before the try that stops it: a Ctrl-C
    between the two left a thread waiting forever, holding the chunk buffers, one per interrupt (an audit)."""
    import threading
    from pymerge.streaming import FORCE_TORCH_ENV
    monkeypatch.setenv(FORCE_TORCH_ENV, force_torch)  # the raw C++ path and the torch one
    base, fts, _ = fam
    real_start = threading.Thread.start

    def start(thread):
        real_start(thread)
        if thread.name == "pymerge-writer":
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    before = {t for t in threading.enumerate() if t.name == "pymerge-writer"}
    with pytest.raises(KeyboardInterrupt):
        run_merge({"merge_method": "linear", "models": [str(f) for f in fts], "parameters": {"weight": 1}},
                  tmp_path / "out", device="cpu", quiet=True)
    monkeypatch.undo()
    for t in threading.enumerate():
        if t.name == "pymerge-writer" and t not in before:
            t.join(timeout=10)
            assert not t.is_alive(), "the writer thread was left running"
    assert os.listdir(tmp_path) == []
