"""pymerge.config: parsing mergekit YAML, parameter gradients/filters/precedence, layer positions."""
import math
import random
import re

import pytest

from pymerge.config import (ParamResolver, check_method_params, check_paths, coerce, count_layers, evaluate_setting,
                            layer_of, layer_t, load_config, parse_config, read_yaml, resolve_params)
from pymerge.errors import InputError, MergeConfigError
from pymerge.methods.base import get_method


def cfg(**kw):
    base = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                 {"model": "b", "parameters": {"weight": 2.0}}]}
    base.update(kw)
    return base


# ---- parsing -------------------------------------------------------------------------------
def test_an_empty_models_slices_or_modules_beside_another_is_absent():
    """mergekit reads an empty list or mapping as not given; pymerge refused `models: []` beside `slices:`."""
    sliced = {"sources": [{"model": "a", "layer_range": [0, 2]}]}
    assert parse_config(cfg(models=[], slices=[sliced])).models == []
    assert [m.path for m in parse_config(cfg(slices=[], modules={})).models] == ["a", "b"]
    assert parse_config(cfg(models=None, modules={"default": {"slices": [sliced], "models": []}})).models == []
    for wrong_kind in ({"slices": {}}, {"modules": []}):  # mergekit refuses these: an empty one of another kind
        with pytest.raises(MergeConfigError, match="exactly one of 'models', 'slices' or 'modules'"):
            parse_config(cfg(**wrong_kind))


def test_an_empty_dtype_is_unset_as_in_mergekit():
    c = parse_config(cfg(dtype="", out_dtype=""))
    assert (c.dtype, c.out_dtype) == (None, None)


def test_parses_a_full_config(tmp_path):
    p = tmp_path / "m.yml"
    p.write_text("""
merge_method: task_arithmetic
base_model: /m/base
models:
  - model: /m/ft1
    parameters: {weight: [0.1, 0.9]}
  - model: /m/ft2
parameters:
  weight: 0.5
  lambda: 0.8
dtype: torch.float32
out_dtype: bfloat16
""")
    c = load_config(p)
    assert c.merge_method == "task_arithmetic" and c.base_model == "/m/base"
    assert [m.path for m in c.models] == ["/m/ft1", "/m/ft2"]
    assert c.models[0].parameters == {"weight": [0.1, 0.9]} and c.models[1].parameters == {}
    assert c.parameters == {"weight": 0.5, "lambda": 0.8}
    assert (c.dtype, c.out_dtype) == ("float32", "bfloat16")
    assert c.source == str(p)


@pytest.mark.parametrize("data, words", [
    (cfg(dype="float32"), ["unknown key 'dype' (did you mean 'dtype'?)"]),
    (cfg(merge_methd="linear", bogus=1, out_dtyp="float16"),
     ["unknown keys 'merge_methd' (did you mean 'merge_method'?); 'out_dtyp' (did you mean 'out_dtype'?)"]),
    (cfg(slices=[{"sources": []}], models=None), ["slices[0].sources", "non-empty", "got an empty list"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}]), ["exactly one of", "models, slices"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [2, 2]}]}], models=None), ["layer_range", "[2, 2]"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [0, 2.5]}]}], models=None), ["layer_range", "2.5"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [0, True]}]}], models=None), ["layer_range", "True"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": ["0", "two"]}]}], models=None), ["layer_range", "two"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
         models=None), ["slices[0]", "same number of layers"]),
    (cfg(modules={"decoder": {"slices": []}}, models=None), ["unknown module 'decoder'"]),
    (cfg(modules={}, models=None), ["'modules' must be a mapping", "got an empty mapping"]),
    (cfg(tokenizer={"source": "union"}, tokenizer_source="base"), ["either tokenizer_source or tokenizer"]),
    (cfg(tokenizer_source=3), ["tokenizer_source", "base, union or a model path"]),
    (cfg(tokenizer=["union"]), ["tokenizer must be a mapping"]),
    (cfg(tokenizer={"sauce": "union"}), ["tokenizer: unknown key 'sauce'"]),
    (cfg(tokenizer={"pad_to_multiple_of": -8}), ["pad_to_multiple_of", "-8"]),
    (cfg(tokenizer={"pad_to_multiple_of": True}), ["pad_to_multiple_of"]),
    (cfg(tokenizer={"pad_to_multiple_of": "²"}), ["pad_to_multiple_of", "²"]),  # isdigit, int() refuses: a traceback
    (cfg(tokenizer={"tokens": ["a"]}), ["tokenizer.tokens must be a mapping"]),
    (cfg(tokenizer={"tokens": {"x": {"force": "yes"}}}), ["tokenizer.tokens['x'].force"]),
    (cfg(tokenizer={"tokens": {"x": {"source": {"kind": "one"}}}}), ["tokenizer.tokens['x'].source.kind"]),
    (cfg(tokenizer={"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}}), ["exactly one of token"]),
    (cfg(tokenizer={"tokens": {"x": {"source": {"kind": "model_token", "model": "a", "token_id": -1}}}}),
     ["token_id must be a whole number"]),
    (cfg(tokenizer={"tokens": {"x": {"source": {"kind": "zero", "model": "a"}}}}), ["takes no other keys"]),
    (cfg(tokenizer={"tokens": {"x": {"weight": 1}}}), ["unknown key 'weight'"]),
    (cfg(chat_template=["chatml"]), ["chat_template must be a string"]),
    (cfg(merge_method=None), ["merge_method", "missing"]),
    (cfg(models=None), ["models", "missing"]),
    (cfg(models=[]), ["models", "non-empty", "got an empty list"]),
    (cfg(models=[{"model": "a", "paramters": {"weight": 1}}]),
     ["models[0]", "'paramters' (did you mean 'parameters'?)"]),
    (cfg(slices=[{"sources": [{"model": "a", "layer_range": [0, 2], "revision": "v2"}]}], models=None),
     ["slices[0].sources[0]: unknown key 'revision': a revision goes with its model"]),
    (cfg(parameters={"weight": [{"pattern": "mlp", "value": 1}]}), ["'pattern': older mergekit's name for filter"]),
    (cfg(models=[{"parameters": {}}]), ["models[0]", "'model' is missing"]),
    (cfg(models=[{"model": "a"}, {"model": "a"}]), ["models[1]", "listed twice"]),
    (cfg(models=[{"model": {"model": {"path": "x"}, "override_architecture": "X"}}]),
     ["models[0].model", "'override_architecture' is not supported"]),
    (cfg(models=[{"model": {"model": 3}}]), ["models[0].model.model must be a path string"]),
    (cfg(dtype="float64"), ["dtype", "float64", "not supported"]),
    (cfg(out_dtype="int8"), ["out_dtype", "unknown dtype"]),
    (cfg(parameters=[1, 2]), ["parameters", "mapping"]),
    (cfg(parameters={"weight": None}), ["parameters.weight", "got nothing"]),
    (cfg(parameters={"weight": [1, {"filter": "x", "value": 2}]}), ["only numbers or only"]),
    (cfg(parameters={"weight": [{"filter": "x"}]}), ["'value' is missing"]),
    (cfg(parameters={"weight": [{"filter": "x", "value": 1, "vale": 2}]}),
     ["unknown key 'vale' (did you mean 'value'"]),
    (cfg(parameters={"weight": [{"filter": 3, "value": 1}]}), ["filter must be a string"]),
    (cfg(parameters={"weight": {"value": {"value": 1}}}), ["condition's value"]),
    ("just a string", ["mapping"]),
])
def test_bad_configs_name_the_problem(data, words):
    with pytest.raises(MergeConfigError) as e:
        parse_config(data, source="c.yml")
    msg = str(e.value)
    assert msg.startswith("c.yml: ")
    for w in words:
        assert w in msg, (w, msg)


def test_layer_range_numbers_as_mergekit_takes_them():
    """mergekit's pydantic takes [0.0, 2.0] and ["0", "2"] for [0, 2] (an audit: pymerge refused them)."""
    from pymerge.slices import parse_sliced
    for lr in ([0.0, 2.0], ["0", "2"], [0, " 2 "], ["+0", "2.0"], [0, "0_2"]):
        spec = parse_sliced({"slices": [{"sources": [{"model": "a", "layer_range": lr}]}]}, MergeConfigError, [])
        assert spec.slices[0].sources[0].layer_range == (0, 2)
    for bad in ("1" * 5000, "\u0663", "2.5", "1e3", "2_", True):  # 5000 digits: int()'s limit was a traceback
        with pytest.raises(MergeConfigError, match="layer_range must be"):
            parse_sliced({"slices": [{"sources": [{"model": "a", "layer_range": [0, bad]}]}]}, MergeConfigError, [])


@pytest.mark.parametrize("scalar", ["2024-02-30", "2024-13-01 10:00:00", "!!float abc", "!!bool maybe",
                                    "!!timestamp nope", "1" + "0" * 4400])
def test_yaml_scalars_yaml_cannot_build_are_config_errors(tmp_path, scalar):
    """PyYAML parses these but its constructors raise ValueError, KeyError or AttributeError: a traceback
    from pymerge merge and pymerge search (a bug hunt); an integer past Python's printable size crashed the
    error message itself."""
    p = tmp_path / "bad.yml"
    p.write_text(f"merge_method: linear\nmodels: [a]\nnote: {scalar}\n")
    with pytest.raises(MergeConfigError, match=r"bad.yml: not valid YAML: "):
        load_config(p)
    with pytest.raises(MergeConfigError, match=r"<an integer of 16610 bits>"):
        parse_config({"merge_method": 10 ** 5000, "models": ["x"]})


def test_yaml_errors_give_the_line(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    with pytest.raises(MergeConfigError, match=r"bad.yml: not valid YAML at line \d+"):
        load_config(p)
    with pytest.raises(MergeConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_tokenizer_settings_are_parsed():
    c = parse_config(cfg(base_model="a", tokenizer_source="base", chat_template="chatml"))
    assert c.tokenizer.source == "base" and c.tokenizer.tokens == {} and c.chat_template == "chatml"
    assert not c.warnings
    c = parse_config(cfg(tokenizer={"pad_to_multiple_of": "8", "tokens": {
        "<a>": {"source": "b"}, "<b>": {"source": {"kind": "zero"}, "force": True}, "<c>": None,
        "<d>": {"source": {"kind": "model_token", "model": "a", "token": "x"}}}}))
    t = c.tokenizer
    assert t.source == "union" and t.pad_to_multiple_of == 8 and list(t.tokens) == ["<a>", "<b>", "<c>", "<d>"]
    assert (t.tokens["<a>"].source.kind, t.tokens["<a>"].source.model) == ("model", "b")
    assert t.tokens["<b>"].force and t.tokens["<b>"].source.kind == "zero"
    assert t.tokens["<c>"].source.kind == "none" and not t.tokens["<c>"].force
    assert (t.tokens["<d>"].source.model, t.tokens["<d>"].source.token) == ("a", "x")
    assert parse_config(cfg(tokenizer={"source": "a"})).tokenizer.source == "a"
    assert parse_config(cfg()).tokenizer is None


def test_model_as_plain_string_and_missing_paths(tmp_path):
    (tmp_path / "a").mkdir()
    c = parse_config(cfg(models=[str(tmp_path / "a"), str(tmp_path / "b+lora")]))
    assert c.models[0].parameters == {}
    with pytest.raises(MergeConfigError, match=r"models\[1\]: .*b\+lora: model path not found: .*b$"):
        check_paths(c)
    c = parse_config(cfg(models=[{"model": "meta-llama/Llama-3-8B"}]))
    with pytest.raises(MergeConfigError, match="meta-llama/Llama-3-8B is not in the Hugging Face cache"):
        check_paths(c)


# ---- parameters against the method ---------------------------------------------------------
@pytest.mark.parametrize("method", ["sce", "model_stock", "slerp", "arcee_fusion", "nearswap", "karcher"])
def test_a_weight_for_a_method_without_one_is_ignored_with_a_warning(method):
    """Configs carry a weight for every model whatever the method, and mergekit ignores one a method does not
    take; pymerge refused it as an unknown parameter (exit 2), so such a config did not switch unchanged (a
    parity audit, sce). A warning now (as for any parameter the method does not take); a misspelt one stays an
    error."""
    m = get_method(method)
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"weight": 0.7}}], parameters={"weight": 0.5}))
    check_method_params(c, m, c.models)
    # one line for every place (a config of N models gave N + 1 identical warnings)
    assert [w for w in c.warnings if "takes no weight" in w] == [
        f"parameters and 1 more: merge_method {method} takes no weight; it is ignored, as in mergekit"]
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"wieght": 0.7}}]))
    with pytest.raises(MergeConfigError, match=f"unknown parameter 'wieght' for merge_method {method}"):
        check_method_params(c, m, c.models)


def test_keys_mergekit_ignores_are_ignored_with_a_warning():
    """mergekit ignores what it does not read; pymerge refused it, and 11 of 45 published configs mergekit merges
    did not switch unchanged (an audit of 51 real configs): LazyMergekit's name:, normalize under sce, older
    mergekit's embed_slerp, parameters at the top level. Each is now a warning naming where, and the merge reads
    what mergekit reads. A near miss of a known key (a typo) stays an error, every one named in one line."""
    data = cfg(name="my-merge", embed_slerp=True, int8_mask=True, merge_method="sce",
               models=[{"model": "a", "parameters": {"weight": 0.5, "density": 0.4}, "note": "x"}, {"model": "b"}],
               parameters={"normalize": True, "select_topk": 0.5, "int_space": 3, "smooth": False})
    c = parse_config(data)
    check_method_params(c, get_method("sce"), c.models)
    assert c.parameters == data["parameters"]  # (as written; the method reads its own)
    assert c.warnings == [
        "config: 'name', 'embed_slerp', 'int8_mask': not read by mergekit 0.1.5 nor pymerge here; ignored "
        "(a merge parameter goes under parameters:)",
        "models[0]: 'note': not read by mergekit 0.1.5 nor pymerge here; ignored",
        "parameters: merge_method sce takes no normalize; it is ignored, as in mergekit",
        "parameters: merge_method sce takes no parameter 'int_space' (nor does any method); it is ignored, as in "
        "mergekit",
        "parameters: merge_method sce takes no parameter 'smooth' (nor does any method); it is ignored, as in mergekit",
        "models[0] (a).parameters: merge_method sce takes no weight; it is ignored, as in mergekit",
        "models[0] (a).parameters: merge_method sce takes no density; it is ignored, as in mergekit"]
    c = parse_config(cfg(parameters={"desnity": 0.5}))
    with pytest.raises(MergeConfigError, match=r"parameters: unknown parameter 'desnity' for merge_method linear "
                                               r"\(did you mean 'density'\? known: normalize, weight\)"):
        check_method_params(c, get_method("linear"), c.models)


def test_an_error_names_the_keys_that_were_ignored(tmp_path, capsys):
    """Warnings print after a merge: a weight written beside parameters: (ignored, as by mergekit) left only "no
    value of required parameter 'weight'", its cause unsaid. The one error line names the ignored key."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from pymerge import cli
    for n in "ab":
        save_file({"x": torch.ones(4)}, str(tmp_path / f"{n}.safetensors"))
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "a.safetensors"), "weight": 0.5},
        {"model": str(tmp_path / "b.safetensors"), "parameters": {"weight": 0.5}}]}))
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no value of required parameter 'weight'" in err[0], err
    assert err[0].endswith("(where the config has keys that were ignored: models[0]: 'weight': not read by mergekit "
                           "0.1.5 nor pymerge here; ignored (a merge parameter goes under parameters:))"), err
    assert not (tmp_path / "out").exists()


def test_merge_parameters_are_every_methods():
    """config.MERGE_PARAMETERS (torch-free: the registry imports torch) tells another method's parameter from an
    unknown one: it must be every registered method's."""
    from pymerge.config import MERGE_PARAMETERS
    from pymerge.methods.base import method_names
    names = set()
    for name in method_names():
        m = get_method(name)
        names |= set(m.model_params) | set(m.global_params)
    assert sorted(names) == list(MERGE_PARAMETERS)


def test_unknown_and_mistyped_parameters():
    lin = get_method("linear")
    c = parse_config(cfg(parameters={"wieght": 1}))
    with pytest.raises(MergeConfigError, match="unknown parameter 'wieght' for merge_method linear"):
        check_method_params(c, lin, c.models)
    c = parse_config(cfg(parameters={"normalize": "maybe"}))
    with pytest.raises(MergeConfigError, match="parameters.normalize: 'maybe' is not a boolean"):
        check_method_params(c, lin, c.models)
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"weight": [0.1, float("nan")]}}]))
    with pytest.raises(MergeConfigError, match=r"models\[0\] \(a\).parameters.weight\[1\]: nan is not a finite"):
        check_method_params(c, lin, c.models)
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"weight": "inf"}}]))
    with pytest.raises(MergeConfigError, match="inf is not a finite number"):
        check_method_params(c, lin, c.models)
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"weight": "heavy"}}]))
    with pytest.raises(MergeConfigError, match="'heavy' is not a number"):
        check_method_params(c, lin, c.models)
    c = parse_config(cfg(models=[{"model": "a", "parameters": {"weight": 1, "normalize": False}}]))
    check_method_params(c, lin, c.models)
    assert any("normalize is a global parameter" in w for w in c.warnings)


def test_resolver_precedence_defaults_and_missing():
    ta = get_method("task_arithmetic")
    c = parse_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}},
        {"model": "b"}], "parameters": {"weight": 0.3, "lambda": [0.0, 2.0]}})
    r = ParamResolver(c, ta, c.models)
    g, per = r("model.layers.1.mlp.up_proj.weight", 0.5)
    assert g == {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}
    assert per == [{"weight": 0.9, "density": 1.0}, {"weight": 0.3, "density": 1.0}]
    # the model's filter does not match: falls through to the top level
    g, per = r("model.layers.1.self_attn.q_proj.weight", 1.0)
    assert g["lambda"] == 2.0 and per[0]["weight"] == 0.3

    c = parse_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}}]})
    r = ParamResolver(c, ta, c.models)
    assert r("x.mlp.y", 0.0)[1][0]["weight"] == 0.9
    with pytest.raises(MergeConfigError, match="no value of required parameter 'weight' for model a at tensor x.attn"):
        r("x.attn", 0.0)


def test_resolver_converts_each_gradient_once(monkeypatch):
    """Every evaluation converted every anchor of a gradient: evaluations x anchors (16,000 layers of one anchor
    each took 133 s, a scaling audit). The resolver keeps each gradient's values: a 200-anchor gradient under a
    filter (every tensor an evaluation) converts its anchors once, the values are those without the memo, and a
    bad anchor is still refused at the first evaluation."""
    import pymerge.config as config
    ta = get_method("task_arithmetic")
    anchors = [random.Random(1).uniform(-1, 1) for _ in range(200)]
    c = parse_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": anchors}, {"value": [0.5, "0.25"]}]}},
        {"model": "b", "parameters": {"weight": 0.3}}], "parameters": {"lambda": [0.0, 2.0, 1.0]}})
    calls = []
    real = config.coerce
    monkeypatch.setattr(config, "coerce", lambda v, kind: calls.append(v) or real(v, kind))
    r = ParamResolver(c, ta, c.models)
    names = [(f"model.layers.{i}.{part}.weight", i / 299) for i in range(300) for part in ("mlp", "attn")]
    got = [r(n, t) for n, t in names]
    assert len(calls) < 3 * len(names) + 250  # each evaluation's results, and the anchors once
    for (n, t), (g, per) in zip(names, got):
        assert g["lambda"] == evaluate_setting([0.0, 2.0, 1.0], n, t)
        assert per[0]["weight"] == evaluate_setting(c.models[0].parameters["weight"], n, t)
    bad = parse_config({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": [0.1, "x", 0.3]}]}}]})
    r = ParamResolver(bad, ta, bad.models)
    for _ in range(2):
        with pytest.raises(ValueError, match="'x' is not a number"):
            r("model.layers.0.mlp.weight", 0.0)


# ---- values --------------------------------------------------------------------------------
def test_gradients_interpolate_over_t():
    assert evaluate_setting([0.0, 1.0], "n", 0.25) == 0.25
    assert evaluate_setting([0.0, 1.0, 0.0], "n", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([1, 2, 3, 4], "n", 1.0) == 4.0
    assert evaluate_setting([7], "n", 0.6) == 7.0
    assert evaluate_setting([], "n", 0.6) is None
    assert evaluate_setting([True, False], "n", 0.4, kind=bool) is True   # discrete: index int(t*(n-1))
    assert evaluate_setting([True, False], "n", 1.0, kind=bool) is False


@pytest.mark.parametrize("values", [[True, False], [False, True, False], ["a", "b", "c", "d"],
                                    [True, False, True, False, True], [0.5, 2.0, -1.0], [1e-3, "2e-3"]])
def test_gradients_resolve_as_mergekit_does_at_every_t(values):
    """Discrete values (bools, strings) pick index int(t * (n - 1)), numbers interpolate: against mergekit's own
    evaluate_setting at 41 points (a mutation audit: round() for int() went unnoticed)."""
    theirs = pytest.importorskip("mergekit.config").evaluate_setting
    kind = bool if isinstance(values[0], bool) else str if isinstance(values[0], str) else float
    validate = float if kind is float else (lambda v: v)
    for k in range(41):
        t = k / 40
        want = theirs("model.layers.3.x", values, t, validate=validate)
        got = evaluate_setting(values, "model.layers.3.x", t, kind=kind)
        assert got == pytest.approx(want, rel=1e-12) if kind is float else got == want, (t, got, want)
    assert evaluate_setting("1e-1", "n", 0.0) == 0.1


def test_filters_take_the_first_match():
    s = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate_setting(s, "model.layers.3.self_attn.q_proj.weight", 0.3) == 0.1
    assert evaluate_setting(s, "model.layers.3.mlp.up_proj.weight", 0.3) == pytest.approx(0.3)
    assert evaluate_setting(s, "model.norm.weight", 0.3) == 0.5
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0.0) is None
    assert evaluate_setting({"filter": "*", "value": 3}, "anything", 0.0) == 3.0


def test_layer_positions():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12)
    assert layer_of("transformer.h.3.attn.c_attn.weight") == ("transformer.h", 3)
    assert layer_of("vision.blocks.0.attn.qkv") == ("vision.blocks", 0)
    assert layer_of("bert.encoder.layer.5.output.dense.weight") == ("bert.encoder.layer", 5)
    assert layer_of("encoder.block.2.layer.0.SelfAttention.q.weight") == ("encoder.block", 2)
    assert layer_of("model.layers_norm.3.x") is None
    assert layer_of("model.layers.2.mlp.experts.7.w1") == ("model.layers", 2)
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None
    names = [f"model.layers.{i}.x" for i in range(4)] + ["vision.blocks.0.y", "vision.blocks.1.y"]
    n = count_layers(names)
    assert n == {"model.layers": 4, "vision.blocks": 2}
    assert count_layers(names, num_hidden_layers=6)["model.layers"] == 6
    assert layer_t("model.layers.0.x", n) == 0.0 and layer_t("model.layers.3.x", n) == 1.0
    assert layer_t("model.layers.1.x", n) == pytest.approx(1 / 3)
    assert layer_t("vision.blocks.1.y", n) == 1.0
    assert layer_t("model.embed_tokens.weight", n) == 0.0 and layer_t("lm_head.weight", n) == 0.0
    assert layer_t("model.layers.0.x", 1) == 1.0  # mergekit: a single layer takes t = 1
    assert layer_t("model.layers.9.x", 4) == 1.0   # beyond L clamps
    assert resolve_params([0.0, 3.0], "model.layers.2.mlp", 4) == pytest.approx(2.0)


# ---- differential: our evaluate_setting against mergekit's own -----------------------------
def _random_setting(rng):
    def scalar():
        return rng.choice([rng.uniform(-2, 2), rng.randint(-3, 3), round(rng.uniform(0, 1), 2)])

    def grad():
        return [scalar() for _ in range(rng.randint(1, 5))]

    kind = rng.randrange(4)
    if kind == 0:
        return scalar()
    if kind == 1:
        return grad()
    conds = []
    for _ in range(rng.randint(1, 3)):
        c = {"value": scalar() if rng.random() < 0.5 else grad()}
        if rng.random() < 0.8:
            c["filter"] = rng.choice(["mlp", "self_attn", "q_proj", "norm", "*", "layers.1.", "embed"])
        conds.append(c)
    return conds[0] if kind == 2 and len(conds) == 1 else conds


def test_evaluate_setting_matches_mergekit():
    mkc = pytest.importorskip("mergekit.config", reason="mergekit is not installed")
    from pydantic import TypeAdapter
    adapter = TypeAdapter(mkc.ParameterSetting)
    as_float = TypeAdapter(float).validate_python
    rng = random.Random(0)
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
             "model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]
    for _ in range(400):
        raw = _random_setting(rng)
        parsed = adapter.validate_python(raw)
        for name in names:
            t = rng.choice([0.0, 1.0, rng.random(), 1 / 3])
            ours = evaluate_setting(raw, name, t)
            theirs = mkc.evaluate_setting(name, parsed, t, validate=as_float)
            if theirs is None:
                assert ours is None, (raw, name, t)
            else:
                assert ours == pytest.approx(theirs, rel=1e-15, abs=1e-15), (raw, name, t, ours, theirs)


def test_errors_are_input_errors():
    assert issubclass(MergeConfigError, InputError)
    assert math.isfinite(evaluate_setting(1e308, "n", 0.0))


def test_a_key_written_twice_in_one_mapping_is_refused_with_its_line(tmp_path):
    """PyYAML (and so mergekit) keeps the last of two equal keys: `weight: 1` then `weight: 0` merged with 0,
    exit 0. YAML requires unique keys; a merge key (`<<: *x`) may still be overridden, as YAML intends."""
    p = tmp_path / "dup.yml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 0\n")
    with pytest.raises(MergeConfigError, match=r"dup.yml: not valid YAML at line 6, column 7: .*key 'weight' "
                                               r"appears twice in one mapping"):
        load_config(p)
    p.write_text("merge_method: linear\nmerge_method: slerp\nmodels: [a]\n")
    with pytest.raises(MergeConfigError, match=r"line 2, column 1: .*key 'merge_method' appears twice"):
        load_config(p)
    p.write_text("x: &b {weight: 1, density: 0.5}\nmerge_method: ties\nmodels:\n"
                 "  - model: a\n    parameters: {<<: *b, weight: 0.3}\n")
    assert read_yaml(p)["models"][0]["parameters"] == {"weight": 0.3, "density": 0.5}
    # chained merges: PyYAML flattens `tuned` in place (its merged density beside its own) before building it
    p.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: &tuned\n"
                 "      <<: &defaults {weight: 0.5, density: 0.5}\n      density: 0.7\n"
                 "parameters:\n  <<: *tuned\n  weight: 0.4\n")
    data = read_yaml(p)
    assert data["models"][0]["parameters"] == {"weight": 0.5, "density": 0.7}
    assert data["parameters"] == {"weight": 0.4, "density": 0.7}
    p.write_text("a: {1: x, true: y}\n")  # two keys to YAML, one to Python: the last won
    with pytest.raises(MergeConfigError, match=r"keys 1 and True of one mapping are one key once read"):
        read_yaml(p)
    p.write_text("=: 1\nb: 2\n")  # YAML's value tag, a plain string key to PyYAML
    assert read_yaml(p) == {"=": 1, "b": 2}


def test_numbers_and_booleans_in_strings_as_pydantic_takes_them():
    """coerce stripped every '_' and took any Unicode digit: "1__0" was 10, "_1" 1 and "\\u0661" 1, which
    mergekit's pydantic refuses; " true " was True (pydantic refuses the spaces around a boolean)."""
    for text, value in (("1_000", 1000.0), (" 1.5 ", 1.5), ("+1", 1.0), (".5", 0.5), ("1e3", 1000.0)):
        assert coerce(text, float) == value
    for text in ("1__0", "_1", "1_", "\u0661", "0x10", "1 000"):
        with pytest.raises(ValueError, match="is not a number"):
            coerce(text, float)
    assert coerce("TRUE", bool) is True and coerce("off", bool) is False
    with pytest.raises(ValueError, match="is not a boolean"):
        coerce(" true ", bool)
    # an integer's text (karcher's max_iter): "1e1" ran 10 iterations, which pydantic's int parsing refuses (an
    # audit); numbers go through as floats (the method says a fractional count is not a whole number)
    for text, value in (("10", 10.0), (" 1_000 ", 1000.0), ("-3", -3.0), ("+10.00", 10.0), (7, 7.0), (2.5, 2.5)):
        assert coerce(text, int) == value
    for text in ("1e1", "10.5", "10.", ".0", "1__0", "\u0661", "ten", ""):
        with pytest.raises(ValueError, match="is not an integer"):
            coerce(text, int)


def test_residual_weight_takes_what_mergekit_takes():
    """mergekit reads slices[].residual_weight as a float (pydantic's lax rules) and never uses it: "0.5" was
    refused here."""
    from pymerge.slices import parse_sliced
    for rw in ("0.5", True, 1):
        parse_sliced({"slices": [{"residual_weight": rw, "sources": [{"model": "a", "layer_range": [0, 1]}]}]},
                     MergeConfigError, [])
    with pytest.raises(MergeConfigError, match=r"slices\[0\]\.residual_weight must be a number, got the string 'x'"):
        parse_sliced({"slices": [{"residual_weight": "x", "sources": [{"model": "a", "layer_range": [0, 1]}]}]},
                     MergeConfigError, [])


@pytest.mark.parametrize("path, shown", [("m\0x", "'m\\x00x'"), ("  ", "'  '"), ("nope", "nope")])
def test_a_missing_model_path_is_shown_visibly(tmp_path, monkeypatch, path, shown):
    """A NUL byte reached stderr raw, blanks printed as nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    c = parse_config(cfg(models=[path]))
    with pytest.raises(MergeConfigError, match=rf"model path not found: {re.escape(shown)}$"):
        check_paths(c)


def test_a_dict_config_naming_paths_python_could_not_decode_is_recorded_loadably(tmp_path):
    """A path as Python gives it (os.listdir, sys.argv) holds lone surrogates for bytes its filesystem encoding could
    not decode: every non-ASCII one under LC_ALL=C without UTF-8 mode, \\xff under any. mergekit_config.yml wrote them
    as "\\uDCC3" escapes PyYAML's own loader refuses (an audit): now the path's UTF-8 text, and where its bytes are
    no UTF-8, no file but the warning that says so."""
    import os

    import torch
    import yaml
    from safetensors.torch import save_file

    import pymerge
    from pymerge.config import yaml_text
    from pymerge.io.files import text_path
    assert text_path("caf\udcc3\udca9") == "caf\u00e9" and text_path(b"caf\xc3\xa9") == "caf\u00e9"
    assert text_path("\u6a21\u578b") == "\u6a21\u578b" and text_path(os.fsdecode(b"m\xff")) is None
    assert text_path("\ud800") is None and text_path(3) is None
    assert yaml_text({"model": os.fsdecode(b"m\xff")}) is None
    for name in ("caf\u00e9", os.fsdecode(b"m\xff")):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(3)}, str(tmp_path / name / "model.safetensors"))
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "caf\udcc3\udca9"),
                                                   "parameters": {"weight": 1.0}}]}
    pymerge.run_merge(cfg, str(tmp_path / "o1"), quiet=True)
    recorded = yaml.safe_load((tmp_path / "o1" / "mergekit_config.yml").read_text(encoding="utf-8"))
    assert recorded["models"][0]["model"] == str(tmp_path / "caf\u00e9")
    pymerge.run_merge(str(tmp_path / "o1" / "mergekit_config.yml"), str(tmp_path / "o2"), quiet=True)
    cfg["models"][0]["model"] = str(tmp_path / os.fsdecode(b"m\xff"))
    result = pymerge.run_merge(cfg, str(tmp_path / "o3"), quiet=True)
    assert any("OUT records no mergekit_config.yml" in w for w in result.warnings), result.warnings
    assert not (tmp_path / "o3" / "mergekit_config.yml").exists() and (tmp_path / "o3" / "model.safetensors").exists()


def test_out_records_the_config_text_the_merge_parsed(tmp_path, monkeypatch):
    """mergekit_config.yml is the text the merge ran, with the file's permission bits: it was copied again by its
    path as the merge ended, so a config replaced meanwhile (another merge's --force over the folder it sits in)
    was recorded in place of the one merged, silently (an audit: a linear merge recorded as TIES)."""
    import os

    import torch
    from safetensors.torch import save_file

    import pymerge
    import pymerge.merge as merge_mod
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((3,), 1.0 if name == "a" else 3.0)}, str(tmp_path / name / "model.safetensors"))
    text = (f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5}}\n# a comment, kept\n")
    path = tmp_path / "c.yml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o640)
    real = merge_mod.make_plan

    def make_plan(c):  # the config file replaced once it is read
        plan = real(c)
        path.write_text(text.replace("linear", "ties").replace("weight: 0.5", "weight: 0.1"), encoding="utf-8")
        return plan
    monkeypatch.setattr(merge_mod, "make_plan", make_plan)
    pymerge.run_merge(str(path), str(tmp_path / "out"), quiet=True, model_card=True)
    recorded = tmp_path / "out" / "mergekit_config.yml"
    assert recorded.read_text(encoding="utf-8") == text
    assert os.stat(recorded).st_mode & 0o777 == 0o640
    assert "merge_method: linear" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
