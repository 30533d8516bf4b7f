"""`model+lora` references (pymerge/lora.py): a PEFT adapter applied per tensor while streaming.

1. LoraCheckpoint against peft's merge_and_unload (what mergekit 0.1.5 runs) and a float64
   reference, on generated Llama models with adapters on several modules (attention, MLP,
   embeddings, lm_head), rslora on and off, rank/alpha patterns, fan_in_fan_out, float32 and bf16.
2. Through the CLI: MODEL+LORA, mergekit's mapping form and hub IDs on either side of the '+';
   against mergekit-yaml where it runs here.
3. Adapters pymerge refuses (DoRA, modules_to_save, bad keys, shapes, ranks): exit 2, one line.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import llama_factory as lf
from pymerge import cli
from pymerge.errors import CheckpointError
from pymerge.lora import open_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DIMS = lf.LlamaDims(hidden=48, layers=2, intermediate=80, vocab=96, heads=4, kv_heads=2)
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]


def make_adapter(model_dir: Path, out: Path, *, seed=0, rslora=False, dtype=torch.float32, **extra):
    """A peft adapter for the model with random A and B (B is zero at peft's init)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_rslora=rslora, **extra)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


def peft_merged(model_dir: Path, adapter: Path, dtype=None) -> dict:
    """What mergekit does: load, PeftModel.from_pretrained, merge_and_unload."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def reference(model_dir: Path, adapter: Path) -> dict:
    """float64: W + scale * B @ A from the files, peft's key and scale rules written out."""
    base = lf.load_folder(model_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    out = {k: v.double() for k, v in base.items()}
    for key in ad:
        if not (key.endswith("lora_A.weight") or key.endswith("lora_embedding_A")):
            continue
        emb = key.endswith("lora_embedding_A")
        module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        a, b = ad[key].double(), ad[key.replace("_A", "_B")].double()
        short_name = module.split(".")[-1]
        r = cfg["rank_pattern"].get(short_name, cfg["r"])
        alpha = cfg["alpha_pattern"].get(short_name, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        d = (b @ a) * scale
        out[module + ".weight"] += d.T if emb or cfg["fan_in_fan_out"] else d
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = lf.make_llama(root / "model", dims=DIMS, seed=3)
    model_bf16 = lf.make_llama(root / "model_bf16", dims=DIMS, seed=3, dtype=torch.bfloat16)
    ads = {
        "plain": make_adapter(model, root / "ad_plain", seed=1),
        "rslora": make_adapter(model, root / "ad_rslora", seed=2, rslora=True,
                               rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 5}),
        "bf16": make_adapter(model_bf16, root / "ad_bf16", seed=4, dtype=torch.bfloat16),
    }
    return root, model, model_bf16, ads


def read_all(ck) -> dict:
    return {n: ck.tensor(n).clone() for n in ck.names()}


@pytest.mark.parametrize("kind", ["plain", "rslora"])
def test_matches_peft_and_float64(family, kind):
    root, model, _, ads = family
    with open_model(f"{model}+{ads[kind]}") as ck:
        ours = read_all(ck)
        assert ck.info("model.layers.0.self_attn.q_proj.weight").file_offset == -1
        assert ck.array("model.layers.1.mlp.down_proj.weight").tobytes() == \
            ours["model.layers.1.mlp.down_proj.weight"].numpy().tobytes()
    theirs, ref = peft_merged(model, ads[kind]), reference(model, ads[kind])
    base = lf.load_folder(model)
    changed = 0
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.shape == ref[name].shape, name
        assert torch.equal(t, theirs[name]), name  # peft's arithmetic, bit for bit
        err = (t.double() - ref[name]).abs().max() / ref[name].abs().max()
        assert err < 1e-6, (name, float(err))
        changed += not torch.equal(t, base[name])
    # 2 layers x (q, v, down) + embed_tokens + lm_head
    assert changed == 2 * 3 + 2


def test_rslora_and_patterns_change_the_scale(family):
    root, model, _, ads = family
    with open_model(f"{model}+{ads['rslora']}") as ck:
        t = ck.adapter.targets
        assert t["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(12 / 2)  # 12 / sqrt(4)
        assert t["model.layers.0.mlp.down_proj.weight"].scale == pytest.approx(12 / math.sqrt(2))
        assert t["model.layers.1.self_attn.v_proj.weight"].scale == pytest.approx(5 / 2)


@pytest.mark.parametrize("patterns", [
    {r".*\.(q|v)_proj": 3, r"layers\.[0-9]+\.mlp\..*": 5},  # wildcards and an alternation outside a repeat
    {r"model.layers.1.self_attn.q_proj": 7, "q_proj": 2, r"x{2,5}": 9},  # names; the first that matches wins
    {r"(?:layers\.1)\..*": 4, r"^model\.layers\.0\..*_proj$": 6, r"(q_proj|up_proj)": 8},
    {r".*layers\.\d+\..*attn": 3},  # three choice points (a fourth is refused)
])
def test_patterns_match_as_peft_does(patterns):
    """The refusal of backtracking patterns keeps every ordinary one: the value is that of the first pattern p
    with re.match((.*\\.)?(p)$) on the module, as peft's get_pattern_key."""
    from pymerge.lora import _pattern_value
    modules = [f"model.layers.{i}.{m}" for i in range(3)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
    for module in modules:
        want = next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), -1)
        assert _pattern_value(patterns, module, -1, "rank_pattern", Path("c.json")) == want, module


def test_bf16_model_rounds_once_and_lora_merge_dtype(family):
    root, _, model_bf16, ads = family
    with open_model(f"{model_bf16}+{ads['bf16']}") as ck:
        ours = read_all(ck)
    theirs = peft_merged(model_bf16, ads["bf16"])  # transformers 5 loads bf16 ("auto")
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, theirs[name]), name
    with open_model(f"{model_bf16}+{ads['bf16']}", "float32") as ck:
        ours32 = read_all(ck)
    theirs32 = peft_merged(model_bf16, ads["bf16"], dtype=torch.float32)
    for name, t in ours32.items():
        assert t.dtype == torch.float32 and torch.equal(t, theirs32[name]), name


def test_mica_rounds_each_delta_as_peft_does(family, tmp_path):
    """peft's MiCA variant rounds a linear layer's delta to W's dtype before adding it (plain LoRA does so for
    embeddings only): a bf16 model differed from merge_and_unload by a bf16 step in ~30% of elements (an audit)."""
    root, _, model_bf16, ads = family
    mica = _broken(tmp_path, {"plain": ads["bf16"]}, "mica", lambda c: c.update(init_lora_weights="mica"))
    with open_model(f"{model_bf16}+{mica}") as ck:
        ours = read_all(ck)
    with open_model(f"{model_bf16}+{ads['bf16']}") as ck:
        plain = read_all(ck)
    theirs = peft_merged(model_bf16, mica)
    assert all(torch.equal(t, theirs[n]) for n, t in ours.items())
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           plain["model.layers.0.self_attn.q_proj.weight"])  # the case needs a difference


def test_null_flags_read_as_false(family, tmp_path):
    """peft reads use_rslora / fan_in_fan_out: null as false; they were refused as not true or false."""
    root, model, _, ads = family
    nulls = _broken(tmp_path, ads, "nulls", lambda c: c.update(use_rslora=None, fan_in_fan_out=None))
    with open_model(f"{model}+{nulls}") as ck, open_model(f"{model}+{ads['plain']}") as plain:
        assert all(torch.equal(ck.tensor(n), plain.tensor(n)) for n in ck.names())


def gpt2_lora(tmp_path: Path, targets, fan_in_fan_out: bool) -> dict:
    """A tiny GPT-2 at tmp_path/gpt2, a random peft adapter at tmp_path/ad; returns peft's merged state dict."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50,
                                                                 n_positions=16, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "gpt2")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=7, target_modules=targets,
                                                    fan_in_fan_out=fan_in_fan_out))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "ad")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    return peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).merge_and_unload().state_dict()


@pytest.mark.parametrize("targets", [["c_attn", "c_fc"], ["attn.c_proj", "lm_head"], ["c_attn", "lm_head"]])
def test_fan_in_fan_out(tmp_path, targets):
    # GPT-2's Conv1D holds W as (in, out); peft transposes B @ A for it and for no nn.Linear, whatever the
    # config says: it sets fan_in_fan_out per layer, so an adapter on c_proj and lm_head is saved with false
    # (pymerge applied c_proj's untransposed, square so silently wrong; a fuzz against mergekit)
    theirs = gpt2_lora(tmp_path, targets, fan_in_fan_out=targets[-1] != "lm_head")
    with open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'ad'}") as ck:
        assert sum(name in ck.adapter.targets for name in ck.names()) == len(targets)
        for name in ck.names():
            assert torch.equal(ck.tensor(name), theirs[name]), name


def test_check_unchanged_sees_the_model_folder_replaced(family, tmp_path):
    """MODEL+LORA: the output's config.json and tokenizer are the model's, read after opening: the merge's
    check that the folder is still the one opened must reach through the adapter to the model."""
    root, model, _, ads = family
    shutil.copytree(model, tmp_path / "m")
    shutil.copytree(model, tmp_path / "new")
    with open_model(f"{tmp_path / 'm'}+{ads['plain']}") as ck:
        ck.check_unchanged()
        (tmp_path / "m").rename(tmp_path / "old")
        (tmp_path / "new").rename(tmp_path / "m")
        with pytest.raises(CheckpointError, match="was replaced while it was being merged"):
            ck.check_unchanged()


def run_cli(cfg: dict, tmp_path, out_name="out", extra=()):
    path = tmp_path / f"{out_name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return cli.main(["merge", str(path), str(tmp_path / out_name), "--quiet", *extra])


def test_cli_lora_on_attention_only_in_a_fresh_process(family, tmp_path):
    """The first tensors are written without torch by the writer thread while the main thread imports torch
    for the first LoRA'd one: the writer read the half-imported module (AttributeError: partially initialized
    module 'torch'), 5 crashes in 5 runs. A fresh interpreter, as `pymerge merge` is."""
    root, model, _, _ = family
    other = lf.make_llama(tmp_path / "other", dims=DIMS, seed=3, perturb_seed=8)
    adapter = make_adapter(model, tmp_path / "ad_attn", seed=5)
    cfg_text = yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{model}+{adapter}", "parameters": {"weight": 0.6}},
        {"model": str(other), "parameters": {"weight": 0.4}}]})
    (tmp_path / "c.yml").write_text(cfg_text)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    adapter_cfg["target_modules"] = ["q_proj", "v_proj"]  # only what sits after the first written tensors
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj" in k or "v_proj" in k}, adapter / "adapter_model.safetensors")
    for i in range(2):
        r = subprocess.run([sys.executable, "-m", "pymerge", "merge", str(tmp_path / "c.yml"), str(tmp_path / f"o{i}"),
                            "--quiet"], capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent))
        assert r.returncode == 0, r.stderr[-2000:]


def test_cli_lora_on_each_side_and_hub_ids(family, tmp_path, monkeypatch):
    root, model, _, ads = family
    # a cached hub layout for the model and the adapter
    cache = tmp_path / "hub"
    for repo, src in (("org/base", model), ("org/adapter", ads["plain"])):
        snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        shutil.copytree(src, snap)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    other = lf.make_llama(tmp_path / "other", dims=DIMS, seed=3, perturb_seed=1)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": "org/base+org/adapter", "parameters": {"weight": 0.25}},
                      {"model": {"model": str(other), "lora": {"path": str(ads["rslora"])}},
                       "parameters": {"weight": 0.75}}]}
    assert run_cli(cfg, tmp_path) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = peft_merged(model, ads["plain"]), peft_merged(other, ads["rslora"])
    for name, t in got.items():
        want = 0.25 * a[name].double() + 0.75 * b[name].double()
        assert float((t.double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
    # the bare model and the model with a LoRA are different models
    cfg = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                                                {"model": f"{model}+{ads['plain']}", "parameters": {"weight": 0.5}}]}
    assert run_cli(cfg, tmp_path, "out2") == 0
    # the model card's header lists the adapter's ID too, as mergekit's (it listed the model's alone: an audit)
    cfg = {"merge_method": "passthrough", "models": [{"model": "org/base+org/adapter"}]}
    assert run_cli(cfg, tmp_path, "out3", ["--write-model-card"]) == 0
    header = yaml.safe_load((tmp_path / "out3" / "README.md").read_text().split("---")[1])
    assert header["base_model"] == ["org/base", "org/adapter"]


def test_a_plus_inside_a_path_of_the_mapping_form(family, tmp_path):
    """{model: {path: runs/a+b/m}, lora: {path: ...}} was joined into one MODEL+LORA string and then refused as
    three parts ("cannot parse"); mergekit merges it (an audit). The split whose two sides exist is taken."""
    root, model, _, ads = family
    odd = tmp_path / "a+b" / "m"
    shutil.copytree(model, odd)
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "models": [{"model": {"model": {"path": str(odd)}, "lora": {"path": str(ads["plain"])}}}]}
    assert run_cli(cfg, tmp_path) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    with open_model(f"{model}+{ads['plain']}") as ck:
        want = read_all(ck)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    from pymerge.errors import MergeConfigError
    from pymerge.lora import split_ref
    with pytest.raises(MergeConfigError, match="cannot parse"):  # neither split's sides exist
        split_ref(f"{tmp_path}/x+y+z")
    from pymerge.lora import missing_side  # the model is there, the adapter is not: named as such
    assert missing_side(f"{odd}+{tmp_path}/nothing").endswith(f"LoRA adapter path not found: {tmp_path}/nothing")


@pytest.mark.slow  # one mergekit-yaml subprocess (transformers + peft load): about a minute here
def test_cli_against_mergekit(family, tmp_path):
    pytest.importorskip("mergekit")
    root, model, _, ads = family
    other = lf.make_llama(tmp_path / "other", dims=DIMS, seed=3, perturb_seed=2)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(other), "dtype": "float32",
           "models": [{"model": f"{model}+{ads['rslora']}", "parameters": {"weight": 0.7}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    mk = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(path), str(tmp_path / "mk"),
                         "--lora-merge-cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    if mk.returncode != 0:
        pytest.skip(f"mergekit-yaml does not run here: {mk.stderr.strip().splitlines()[-1:]}")
    assert cli.main(["merge", str(path), str(tmp_path / "pm"), "--quiet"]) == 0
    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    ours = load_file(str(tmp_path / "pm" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and t.shape == theirs[name].shape, name
        scale = float(theirs[name].abs().max())
        assert float((t.double() - theirs[name].double()).abs().max()) <= 1e-5 * scale, name


def _broken(tmp_path, ads, name, edit_cfg=None, edit_weights=None):
    out = tmp_path / name
    shutil.copytree(ads["plain"], out)
    if edit_cfg:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit_cfg(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_weights:
        w = load_file(str(out / "adapter_model.safetensors"))
        edit_weights(w)
        save_file(w, str(out / "adapter_model.safetensors"))
    return out


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _transposed(w, module="base_model.model.model.layers.0.mlp.down_proj"):
    """The LoRA laid out for the weight's transpose (B' A' = (B A)^T, as for a Conv1D): peft refuses it for
    a Llama's nn.Linear; pymerge applied it transposed, exit 0 (a hunt against mergekit)."""
    a, b = w[f"{module}.lora_A.weight"], w[f"{module}.lora_B.weight"]
    w[f"{module}.lora_A.weight"], w[f"{module}.lora_B.weight"] = b.t().contiguous(), a.t().contiguous()


@pytest.mark.parametrize("name, edit_cfg, edit_weights, message", [
    ("dora", lambda c: c.update(use_dora=True), None, r"use_dora: DoRA"),
    ("save", lambda c: c.update(modules_to_save=["lm_head"]), None, r"modules_to_save"),
    # peft 0.21's block-diagonal factors (narrower A or B) were refused as a rank or shape the adapter contradicts
    ("bdlora", lambda c: c.update(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}), None,
     r"use_bdlora: block-diagonal LoRA"),
    ("bias", lambda c: c.update(bias="all"), None, r"bias 'all'"),
    # LoRA-GA rewrites the base as PiSSA does: "lora_ga".split("_")[0] read as plain LoRA, exit 0 (an audit)
    ("lora_ga", lambda c: c.update(init_lora_weights="lora_ga"), None, r"'lora_ga' changes the base weights"),
    ("pissa", lambda c: c.update(init_lora_weights="pissa_niter_4"), None, r"'pissa_niter_4' changes the base"),
    ("ia3", lambda c: c.update(peft_type="IA3"), None, r"peft_type 'IA3'"),
    ("rank", lambda c: c.update(r=3), None, r"do not have rank r = 3"),
    ("pattern", lambda c: c.update(rank_pattern={"(": 2}), None, r"pattern '\(' is not a regular"),
    # catastrophic backtracking: "(.*.*)*!" ran for minutes per module name, as in peft (a security audit)
    ("redos_nested", lambda c: c.update(rank_pattern={"(.*.*)*!": 2}), None,
     r"rank_pattern: pattern '\(\.\*\.\*\)\*!' nests"),
    ("redos_branch", lambda c: c.update(alpha_pattern={"(a|aa)*b": 2}), None, r"alpha_pattern: .* exponential time"),
    ("redos_chain", lambda c: c.update(rank_pattern={".*.*.*.*x": 2}), None, r"rank_pattern: .* nests or chains"),
    # choice points the first guard did not count (a review): ? inside a counted repeat, alternations in a row
    ("redos_optional", lambda c: c.update(rank_pattern={"(?:.?){24}!": 2}), None, r"rank_pattern: .* nests or chains"),
    ("redos_unrolled", lambda c: c.update(rank_pattern={"(?:.|..)" * 26 + "!": 2}), None, r"nests or chains"),
    ("deep", lambda c: c.update(rank_pattern={"(" * 5000 + "q" + ")" * 5000: 2}), None, r"nested too deeply"),
    # a NaN, inf or 1e308 in a pattern made a NaN or inf weight with exit 0, as it would at the top level
    ("alpha_nan", lambda c: c.update(alpha_pattern={"q_proj": float("nan")}), None,
     r"alpha_pattern: pattern 'q_proj' must map to a number of size at most 1e\+06, got nan"),
    ("alpha_inf", lambda c: c.update(alpha_pattern={"q_proj": float("inf")}), None, r"alpha_pattern: .* got inf"),
    ("alpha_huge", lambda c: c.update(alpha_pattern={"q_proj": 1e308}), None, r"alpha_pattern: .* got 1e\+308"),
    ("rank_nan", lambda c: c.update(rank_pattern={"v_proj": float("nan")}), None, r"rank_pattern: pattern 'v_proj'"),
    ("alpha_top_huge", lambda c: c.update(lora_alpha=1e308), None, r"lora_alpha must be a number of size at most"),
    ("alpha_top_nan", lambda c: c.update(lora_alpha=float("nan")), None, r"lora_alpha must be a number .* got nan"),
    ("no_b", None, lambda w: w.pop(Q_A.replace("_A", "_B")), r"q_proj'.*not both lora_A.weight and lora_B"),
    ("odd_key", None, lambda w: w.update({"base_model.model.x.weight": torch.zeros(2)}), r"'base_model.model.x"),
    ("shape", None, lambda w: w.update({Q_A: torch.zeros(4, 7)}), r"q_proj.weight' is \[48, 7\]"),
    ("conv", None, lambda w: w.update({Q_A: torch.zeros(4, 48, 1, 1)}), r"not convolutions"),
    ("empty", None, lambda w: w.clear(), r"holds no LoRA weights"),  # peft: the model itself, exit 0
    ("transposed", None, _transposed, r"LoRA for 'model.layers.0.mlp.down_proj.weight' is \[(\d+), (\d+)\], the weight "
                                      r"in .* is \[\2, \1\]"),
    ("absent", None, lambda w: w.update({"base_model.model.model.nope.lora_A.weight": torch.zeros(4, 3),
                                         "base_model.model.model.nope.lora_B.weight": torch.zeros(3, 4)}),
     r"'model.nope.weight', which .* does not have"),
])
def test_refused_adapters(family, tmp_path, capsys, name, edit_cfg, edit_weights, message):
    root, model, _, ads = family
    bad = _broken(tmp_path, ads, name, edit_cfg, edit_weights)
    with pytest.raises(CheckpointError, match=message):
        open_model(f"{model}+{bad}")
    cfg = {"merge_method": "linear", "models": [{"model": f"{model}+{bad}", "parameters": {"weight": 1.0}}]}
    assert run_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    assert not (tmp_path / "out").exists()


def _set(key, value):
    def edit(w):
        w[key] = w[key].clone()
        w[key].view(-1)[1] = value
    return edit


@pytest.mark.parametrize("name, edit, message", [
    ("nan_a", _set(Q_A, float("nan")), r"its tensor '.*q_proj.lora_A.weight' holds NaN or inf"),
    ("inf_b", _set(Q_A.replace("_A", "_B"), float("-inf")), r"its tensor '.*q_proj.lora_B.weight' holds NaN or inf"),
    ("overflow", lambda w: (_set(Q_A, 3e38)(w), _set(Q_A.replace("_A", "_B"), 3e38)(w)), r"its B @ A overflows"),
])
def test_an_adapter_whose_delta_is_not_finite_is_refused(family, tmp_path, capsys, name, edit, message):
    """NaN or inf in lora_A / lora_B (a diverged training) merged into a NaN or inf weight, exit 0, where a NaN
    lora_alpha doing the same is refused (an audit)."""
    root, model, _, ads = family
    bad = _broken(tmp_path, ads, name, edit_weights=edit)
    cfg = {"merge_method": "linear", "models": [{"model": f"{model}+{bad}", "parameters": {"weight": 1.0}}]}
    assert run_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "LoRA delta of 'model.layers.0.self_attn.q_proj.weight' is " \
        "not finite" in err[0] and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref, message", [
    ("{m}+{tmp}/nowhere", r"models\[0\]: .*LoRA adapter path not found: .*nowhere"),
    ("{tmp}/nowhere+{a}", r"models\[0\]: .*model path not found: .*nowhere"),
    ("{m}+{a}+{a}", r"cannot parse"),
    ("{m}+{a}+{tmp}/nowhere", r"LoRA adapter path not found: .*\+.*nowhere \(a reference is MODEL or MODEL\+LORA: one"),
    ("{m}+nobody/adapter", r"LoRA adapter: model nobody/adapter: nobody/adapter is not in the Hugging Face cache"),
    ("{m}+{m}", r"no adapter_config.json: not a PEFT adapter"),
])
def test_bad_references(family, tmp_path, capsys, monkeypatch, ref, message):
    root, model, _, ads = family
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    cfg = {"merge_method": "linear",
           "models": [{"model": ref.format(m=model, a=ads["plain"], tmp=tmp_path), "parameters": {"weight": 1.0}}]}
    assert run_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_lora_merge_dtype_flag(family, tmp_path, capsys):
    root, model, _, ads = family
    cfg = {"merge_method": "linear", "models": [{"model": f"{model}+{ads['plain']}", "parameters": {"weight": 1.0}}]}
    assert run_cli(cfg, tmp_path, extra=["--lora-merge-dtype", "bfloat16"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = peft_merged(model, ads["plain"], dtype=torch.bfloat16)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, theirs[name]), name
    assert run_cli(cfg, tmp_path, "out3", extra=["--lora-merge-dtype", "int8"]) == 2
    assert "--lora-merge-dtype must be one of" in capsys.readouterr().err


def test_out_inside_an_adapter_folder_is_refused(family, tmp_path, capsys):
    """OUT inside the model folder was refused, inside the adapter's (an input too) it was written there (a
    bug hunt): MODEL+LORA's path is the model's, and the adapter folder was never listed as an input."""
    root, model, _, ads = family
    adapter = tmp_path / "ad"
    shutil.copytree(ads["plain"], adapter)
    cfg = {"merge_method": "linear", "models": [{"model": f"{model}+{adapter}", "parameters": {"weight": 1.0}}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in adapter.iterdir())
    assert cli.main(["merge", str(tmp_path / "c.yml"), str(adapter / "merged"), "--quiet", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lies inside the LoRA adapter folder" in err[0], err
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_tokenizer_merge_reads_the_models_tokenizer(tmp_path, capsys):
    """A tokenizer merge takes MODEL+LORA's tokenizer from MODEL (mergekit: model.model.path): the
    same output as merging a copy of MODEL with the adapter merged in (what mergekit runs)."""
    from test_tokenizer_merge import C_TEMPLATE, SPECIAL, W, X, close, vocab_of, write_model
    a = write_model(tmp_path / "a", SPECIAL + W + ["<pad>"], template=C_TEMPLATE)
    b = write_model(tmp_path / "b", SPECIAL + W[:10] + X, perturb_seed=1, added=["<|im_start|>"])
    ad = make_adapter(a, tmp_path / "ad", seed=5)
    merged = tmp_path / "a_merged"
    shutil.copytree(a, merged)
    save_file({k: v.contiguous() for k, v in peft_merged(a, ad).items()}, str(merged / "model.safetensors"))
    for i, tok in enumerate(["union", f"{a}+{ad}"]):
        outs = []
        for j, first in enumerate([f"{a}+{ad}", str(merged)]):
            source = tok if tok == "union" else str(merged) if j else tok
            cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": source, "chat_template": "auto",
                   "models": [{"model": first, "parameters": {"weight": 0.6}},
                              {"model": str(b), "parameters": {"weight": 0.4}}]}
            capsys.readouterr()
            assert run_cli(cfg, tmp_path, f"out{i}{j}") == 0, capsys.readouterr().err
            outs.append(tmp_path / f"out{i}{j}")
        ours, want = (load_file(str(o / "model.safetensors")) for o in outs)
        assert set(ours) == set(want) and all(close(ours[k], want[k]) for k in want)
        assert vocab_of(outs[0]) == vocab_of(outs[1]) and (outs[0] / "chat_template.jinja").read_text() == C_TEMPLATE


@pytest.mark.parametrize("stored_head", [False, "copy", "differs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", [["lm_head", "v_proj"], ["embed_tokens", "lm_head", "v_proj"],
                                     ["embed_tokens", "v_proj"]])
def test_a_head_lora_on_a_tied_model_lands_on_the_shared_embedding(tmp_path, dtype, targets, stored_head):
    """A tied model stores no lm_head: a LoRA on it was refused ("which MODEL does not have") while peft's
    merge_and_unload (mergekit) adds it to the weight the head shares with the embedding, after the
    embedding's own LoRA (found by a review). A tied model that stores a copy of its head too: the head's
    LoRA went to that copy alone and the embedding kept its old weight (an audit); both are now the merged
    shared weight, as peft's. A stored head that differs from the embedding: transformers leaves it untied,
    and so does the merge (a review)."""
    model = lf.make_llama(tmp_path / "tied", dims=DIMS, seed=5, dtype=dtype)
    weights = load_file(str(model / "model.safetensors"))
    weights.pop("lm_head.weight")
    if stored_head:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        if stored_head == "differs":
            weights["lm_head.weight"] += 1
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(9)
    tied = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    pm = peft.get_peft_model(tied, peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    with open_model(f"{model}+{tmp_path / 'adapter'}") as ck:
        ours = read_all(ck)
    theirs = peft_merged(model, tmp_path / "adapter", dtype=dtype)
    assert ("lm_head.weight" in ours) == bool(stored_head)
    tied_at_load = stored_head != "differs"
    for name, t in ours.items():
        assert torch.equal(t, theirs["model.embed_tokens.weight" if name == "lm_head.weight" and tied_at_load
                                     else name]), name
    changed = tied_at_load or "embed_tokens" in targets  # (an untied head's LoRA leaves the embedding alone)
    assert torch.equal(ours["model.embed_tokens.weight"], weights["model.embed_tokens.weight"]) != changed


def test_a_tied_model_cut_while_its_stored_head_is_compared_is_an_error_not_a_sigbus(tmp_path, monkeypatch):
    """Opening MODEL+LORA compares a stored head with the embedding through the map (the whole embedding: seconds
    on a real model), outside any merge's SIGBUS guard: the model file cut meanwhile (a re-download) killed the
    process with a bus error (an audit). Now a one-line CheckpointError naming the file."""
    import pymerge.lora
    model = lf.make_llama(tmp_path / "tied", dims=DIMS, seed=5)
    weights = load_file(str(model / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    vocab, hidden = weights["lm_head.weight"].shape
    save_file({"base_model.model.lm_head.lora_A.weight": torch.ones(2, hidden),
               "base_model.model.lm_head.lora_B.weight": torch.ones(vocab, 2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["lm_head"]}))
    with open_model(f"{model}+{adapter}") as ck:  # intact: opens
        assert "lm_head.weight" in ck.names()
    real = pymerge.lora._same_bytes

    def cut_then_compare(a, b):
        path = model / "model.safetensors"
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        os.truncate(path, 8 + header)  # the tensors' pages gone under the map
        return real(a, b)
    monkeypatch.setattr(pymerge.lora, "_same_bytes", cut_then_compare)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(model / 'model.safetensors'))}: the file shrank "):
        open_model(f"{model}+{adapter}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_lora_on_checkpoints_of_other_dtypes(family, tmp_path, dtype):
    """W + delta is float32 arithmetic on W as float32 (peft's merge in a float32 model), float64 on a float64 W
    (peft's LoRA layers take a float64 base layer's dtype: the merge was float32, 1e-7 off, an audit). A float8 weight is
    refused in one line: a scaled fp8 checkpoint's values need scales this merge does not read (since the
    arithmetic moved into the delta it was torch's 'Promotion for Float8 Types' error, before that the raw
    values took the delta)."""
    from pymerge.errors import CheckpointError
    root, _, _, ads = family
    model = lf.make_llama(tmp_path / "m", dims=DIMS, seed=3, dtype=dtype)
    adapter = ads["plain"]
    with open_model(f"{model}+{adapter}") as ck:
        if dtype.itemsize == 1:
            with pytest.raises(CheckpointError, match=r"LoRA on the float8 weight '.*' is not supported"):
                ck.tensor(next(iter(ck.adapter.targets)))
            return
        ours = read_all(ck)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        deltas = {n: ck.adapter.delta(n, wide) for n in ck.adapter.targets}
        for n, t in ck.adapter.targets.items():  # peft rounds an embedding's delta to W's dtype first
            if t.embedding:
                deltas[n] = deltas[n].to(dtype).to(wide)
    base = lf.load_folder(model)
    for name, t in ours.items():
        want = (base[name].to(wide) + deltas[name]).to(dtype) if name in deltas else base[name]
        assert t.dtype == dtype and torch.equal(t, want), name
    if dtype == torch.float64:  # and peft's own merge, bit for bit
        theirs = peft_merged(model, adapter, dtype=dtype)
        assert all(torch.equal(t, theirs[name]) for name, t in ours.items())


def test_gpt2_derived_model_types_merge_conv1d_layers_transposed(tmp_path):
    """Jais and BTLM keep GPT-2's Conv1D layers (c_attn, c_proj, c_fc, c_fc2) under their own model_type: a
    square c_proj is merged transposed as peft does for Conv1D, while a Llama whose config carries an
    auto_map (custom code over nn.Linear) still merges untransposed (test_fan_in_fan_out_true_on_a_square_linear_layer)."""
    theirs = gpt2_lora(tmp_path, ["attn.c_proj"], fan_in_fan_out=True)
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    cfg.update(model_type="jais", auto_map={"AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"})
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(cfg))
    name = "h.0.attn.c_proj.weight"
    with open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'ad'}") as ck:
        got = ck.tensor(name if name in ck.names() else "transformer." + name)
    assert torch.equal(got, theirs["transformer." + name])


@pytest.mark.parametrize("auto_map", [False, True])
def test_fan_in_fan_out_true_on_a_square_linear_layer(family, tmp_path, auto_map):
    """peft resets fan_in_fan_out for an nn.Linear whatever the adapter's config says: a Llama adapter
    saved (by hand, or another tool) with true was merged transposed on the square layers (q_proj here),
    off by up to the weight's own size (a fuzz against mergekit). Also where config.json has an auto_map
    over nn.Linear layers (Phi-3, Qwen-1, re-saved Llamas)."""
    root, model, _, ads = family
    custom, adapter = tmp_path / "m", tmp_path / "ad_fifo"
    shutil.copytree(model, custom)
    shutil.copytree(ads["plain"], adapter)
    if auto_map:
        cfg = json.loads((custom / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        (custom / "config.json").write_text(json.dumps(cfg))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["fan_in_fan_out"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    theirs = peft_merged(model, adapter)
    with open_model(f"{custom}+{adapter}") as ck:
        ours = read_all(ck)
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape[0] == q.shape[1]
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def test_same_bytes_compares_every_chunk_and_bit_pattern():
    """The tied-head check compares bytes: a difference in any 16 MiB chunk (the last one short), a sign of
    zero, or sizes that differ tell tensors apart; the same NaN payload does not."""
    import numpy as np
    from pymerge.lora import _same_bytes
    a = np.zeros((1 << 22) + 7, dtype=np.float32)  # 16 MiB + 28 bytes: two chunks
    assert _same_bytes(a, a.copy())
    for at in (0, (1 << 22) - 1, (1 << 22) + 6):
        b = a.copy()
        b[at] = -0.0
        assert not _same_bytes(a, b), at
    n = np.full(5, np.nan, dtype=np.float32)
    assert _same_bytes(n, n.copy())
    assert not _same_bytes(a[:5], a[:6])
    assert _same_bytes(np.zeros(0, np.float32), np.zeros(0, np.float32))


def test_a_lora_reference_given_to_a_pool_says_what_it_is(family):
    """A pool (or `pymerge search`) given MODEL+LORA said "no such file or folder" of two folders that exist."""
    from pymerge.io import Checkpoint
    from pymerge.pool import CheckpointPool
    root, model, _, ads = family
    ref = f"{model}+{ads['plain']}"
    for call in (lambda: CheckpointPool([ref, str(model)]), lambda: Checkpoint(ref)):
        with pytest.raises(CheckpointError, match=r"\+.*: no such file or folder; MODEL\+LORA references are read "
                                                  r"by pymerge merge only"):
            call()
    with pytest.raises(CheckpointError, match=r"nowhere: no such file or folder$"):
        Checkpoint(f"{model}+{root}/nowhere")


@pytest.mark.parametrize("layout", ["unprefixed checkpoint", "unprefixed adapter"])
def test_a_lora_whose_target_names_carry_another_prefix_lands_on_its_weight(tmp_path, layout):
    """openai-community/gpt2 stores h.0.attn.c_attn.weight (no `transformer.`), which transformers loads into
    GPT2LMHeadModel, so adapters trained on it name transformer.h.0...: mergekit (through transformers) applies
    them, pymerge refused them (an audit). The reverse, an adapter without the prefix (h.0...) on a checkpoint of
    GPT2LMHeadModel, stays refused: peft finds no such module and merges nothing."""
    theirs = gpt2_lora(tmp_path, ["c_attn", "c_fc"], fan_in_fan_out=True)
    model, adapter = tmp_path / "gpt2", tmp_path / "ad"
    if layout == "unprefixed checkpoint":
        weights = load_file(str(model / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v.contiguous() for k, v in weights.items()},
                  str(model / "model.safetensors"), metadata={"format": "pt"})
    else:
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        save_file({k.replace("base_model.model.transformer.", "base_model.model."): v for k, v in weights.items()},
                  str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    if layout == "unprefixed adapter":
        with pytest.raises(CheckpointError, match=r"LoRA for 'h.0.attn.c_attn.weight', which .* does not have"):
            open_model(f"{model}+{adapter}")
        return
    with open_model(f"{model}+{adapter}") as ck:
        changed = 0
        for name in ck.names():
            want = theirs[name if name in theirs else "transformer." + name]
            assert torch.equal(ck.tensor(name), want), name
            changed += "c_attn" in name and name.endswith("weight") or "c_fc.weight" in name
        assert changed == 2


def test_a_lora_for_a_weight_the_model_lacks_is_still_refused(tmp_path):
    gpt2_lora(tmp_path, ["c_attn"], fan_in_fan_out=True)
    weights = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    save_file({k.replace(".h.0.", ".h.7."): v for k, v in weights.items()},
              str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"LoRA for 'transformer.h.7.attn.c_attn.weight', which .* does not have"):
        open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'ad'}")


def test_lora_on_an_unprefixed_gpt2_embedding_and_its_tied_head_merges_in_peft_order(tmp_path):
    """openai-community/gpt2's layout (wte.weight, no transformer. prefix, no lm_head) with LoRA on wte and lm_head:
    both deltas land on wte.weight, and the head's was added first (the adapter's sorted order): a third of wte's
    bfloat16 elements one rounding off peft's merge_and_unload (an audit). Now the embedding's own, then the head's."""
    torch.manual_seed(1)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                                             n_positions=32))
    model = tmp_path / "gpt2"
    model.mkdir()
    save_file({k.removeprefix("transformer."): v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()
               if k != "lm_head.weight"}, str(model / "model.safetensors"), metadata={"format": "pt"})
    m.config.save_pretrained(model)
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(model, dtype=torch.float32),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "wte", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "ad")
    base = transformers.GPT2LMHeadModel.from_pretrained(model, dtype=torch.bfloat16)
    want = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).merge_and_unload().transformer.wte.weight
    with open_model(f"{model}+{tmp_path / 'ad'}") as ck:
        assert ck._deltas("wte.weight") == ["transformer.wte.weight", "lm_head.weight"]
        assert torch.equal(ck.tensor("wte.weight"), want.detach())
