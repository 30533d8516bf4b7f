"""`slices:` and `modules:` configs (mergekit 0.1.5): frankenmerges, depth up-scaling and per-slice merges.

    slices:
      - sources: [{model: a, layer_range: [0, 16]}]
      - sources: [{model: b, layer_range: [8, 24], parameters: {...}}]
    merge_method: passthrough

Output layers are the slices' layers in order, renumbered from 0; config.json's num_hidden_layers
becomes their total. Each output layer merges layer (start + offset) of every source of its slice,
with t = offset / (slice length - 1) (1 for a one-layer slice) for gradients. Tensors outside the
layer stack come from the first slice's sources when they sit before the stack (embeddings: any
name with "embed", "wte" or "wpe", except GPT-NeoX's head embed_out) and from the last slice's sources
otherwise (final norm, lm_head, embed_out), with t = 0 and that slice's parameters. Parameter precedence: the source's own, the
slice's, the module's, the top level's; per-model values see the source's tensor name, global
ones the output's (mergekit's rules). `modules:` takes one module, `default` (the only module of
every single-stack architecture mergekit knows), holding `slices:` or `models:`.

With `tokenizer_source:` / `tokenizer:` the output vocabulary is built from every model the config
names (pymerge/tokenizer/), and each vocabulary tensor (embeddings, lm_head) is permuted to it over
its own slice's sources alone, as mergekit does: a token none of them has gets a zero row, and
default rows prefer that slice's base_model, else the config's.

Each group of output tensors with the same sources becomes an ordinary MergePlan whose
checkpoints are renaming views (the output name reads the source's tensor): the executors run
them unchanged, one after the other, into one writer.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pymerge import hub
from pymerge.config import (MODEL_KEYS, MergeConfig, ModelSpec, _model_path, _parameters, check_keys,
                            check_method_params, coerce, filter_name, kind_of, layer_of, layer_stacks, main_stack,
                            resolve_one, unmatched_filter_warning, unmatched_filters)
from pymerge.errors import CheckpointError, MergeConfigError, described, short
from pymerge.io.checkpoint import head_bytes, read_model_config

SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
_PRE_MARKERS = ("embed", "wte", "wpe")


def is_neox_head(name: str) -> bool:
    """GPT-NeoX's output head `embed_out`: named like an embedding, it comes after the layers (mergekit's
    gpt-neox.json lists it among the post weights)."""
    return name.startswith("embed_out.") or ".embed_out." in name


@dataclass
class SourceSpec:
    path: str
    layer_range: Tuple[int, int]
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    sources: List[SourceSpec]
    base_model: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SlicedConfig:
    """What `slices:` or `modules:` describe: slices of one layer stack, module-level parameters,
    and models given as whole stacks (`modules: {default: {models: ...}}`) to expand once their
    layer counts are known."""
    slices: List[SliceSpec]
    module_parameters: Dict[str, Any] = field(default_factory=dict)
    whole_models: Optional[List[ModelSpec]] = None
    where: str = "slices"  # where the config lists the slices: slices or modules.default.slices

    def model_refs(self) -> List[Tuple[str, str]]:
        """(where, path) of every model referenced, for path checks."""
        refs = [(f"{self.where}[{i}].sources[{j}]", x.path)
                for i, s in enumerate(self.slices) for j, x in enumerate(s.sources)]
        refs += [(f"{self.where}[{i}].base_model", s.base_model) for i, s in enumerate(self.slices) if s.base_model]
        return refs + [(f"modules.default.models[{i}]", m.path) for i, m in enumerate(self.whole_models or [])]


# ---- parsing ---------------------------------------------------------------------------------
_EMPTY = {"models": list, "slices": list, "modules": dict}


def present(data: dict, key: str) -> bool:
    """Whether models/slices/modules counts as given: an empty one of its own kind (a list; modules: a mapping)
    is absent, as mergekit reads it (`models: []` beside `slices:` was refused); `slices: {}` is not."""
    value = data.get(key)
    return value is not None and not (isinstance(value, _EMPTY[key]) and not value)


def parse_sliced(data: dict, err, ignored: List[str]) -> Optional[SlicedConfig]:
    """The `slices:` or `modules:` part of a config (exactly one of models/slices/modules), or None where the
    one given is `models:` (beside an empty slices/modules)."""
    keys = ("models", "slices", "modules")
    # (where all are empty or absent, the empty ones, for the error that names them)
    given = [k for k in keys if present(data, k)] or [k for k in keys if data.get(k) is not None]
    if len(given) != 1:
        raise err(f"exactly one of 'models', 'slices' or 'modules' must be given, got {', '.join(given)}")
    if given == ["models"]:
        return None
    if "slices" in given:
        return SlicedConfig(_slices(data["slices"], "slices", err, ignored))
    modules = data["modules"]
    if not isinstance(modules, dict) or not modules:
        raise err(f"'modules' must be a mapping of module names to definitions, got {described(modules)}")
    if list(modules) != ["default"]:
        name = next(k for k in modules if k != "default")
        raise err(f"modules: unknown module {name!r}: pymerge merges single-stack models, whose one module is "
                  f"'default'")
    mod = modules["default"]
    where = "modules.default"
    if not isinstance(mod, dict):
        raise err(f"{where} must be a mapping with 'slices' or 'models', got {described(mod)}")
    check_keys(mod, MODULE_KEYS, where, err, ignored)
    params = _parameters(mod.get("parameters"), f"{where}.parameters", err, ignored)
    if present(mod, "slices") == present(mod, "models"):
        raise err(f"{where}: give exactly one of 'slices' or 'models'")
    if present(mod, "slices"):
        return SlicedConfig(_slices(mod["slices"], f"{where}.slices", err, ignored), params, where=f"{where}.slices")
    models = mod["models"]
    if not isinstance(models, list) or not models:
        raise err(f"{where}.models must be a non-empty list, got {described(models)}")
    specs = []
    for i, m in enumerate(models):
        w = f"{where}.models[{i}]"
        m = {"model": m} if isinstance(m, str) else m
        if not isinstance(m, dict) or "model" not in m:
            raise err(f"{w} must be a mapping with 'model' and optional 'parameters'")
        check_keys(m, MODEL_KEYS, w, err, ignored)
        specs.append(ModelSpec(_model_path(m["model"], f"{w}.model", err),
                               _parameters(m.get("parameters"), f"{w}.parameters", err, ignored)))
    return SlicedConfig([], params, specs)


def _slices(raw, where, err, ignored: List[str]) -> List[SliceSpec]:
    if not isinstance(raw, list) or not raw:
        raise err(f"'{where}' must be a non-empty list of slices, got {described(raw)}")
    out = []
    for i, s in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(s, dict):
            raise err(f"{w} must be a mapping with 'sources', got {described(s)}")
        check_keys(s, SLICE_KEYS, w, err, ignored)
        srcs = s.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise err(f"{w}.sources must be a non-empty list, got {described(srcs)}")
        sources = [_source(src, f"{w}.sources[{j}]", err, ignored) for j, src in enumerate(srcs)]
        lengths = {b - a for a, b in (x.layer_range for x in sources)}
        if len(lengths) > 1:
            raise err(f"{w}: every source of a slice must span the same number of layers, got "
                      f"{[list(x.layer_range) for x in sources]}")
        seen = set()
        for j, x in enumerate(sources):
            if x.path in seen:
                raise err(f"{w}.sources[{j}]: model {x.path} is listed twice in this slice")
            seen.add(x.path)
        rw = s.get("residual_weight")  # mergekit takes it (a float, pydantic's lax rules) and never uses it
        if rw is not None:
            try:
                coerce(rw, float)
            except ValueError:
                raise err(f"{w}.residual_weight must be a number, got {described(rw)}") from None
        base = s.get("base_model")
        out.append(SliceSpec(sources, _model_path(base, f"{w}.base_model", err) if base is not None else None,
                             _parameters(s.get("parameters"), f"{w}.parameters", err, ignored)))
    return out


def _source(src, w, err, ignored: List[str]) -> SourceSpec:
    if not isinstance(src, dict):
        raise err(f"{w} must be a mapping with 'model' and 'layer_range', got {described(src)}")
    check_keys(src, SOURCE_KEYS, w, err, ignored)
    if "model" not in src:
        raise err(f"{w}: 'model' is missing")
    raw = src.get("layer_range")
    lr = list(map(_layer_number, raw)) if isinstance(raw, list) else None
    if lr is None or len(lr) != 2 or None in lr or lr[0] < 0 or lr[1] <= lr[0]:
        raise err(f"{w}.layer_range must be [start, end) with 0 <= start < end, got {short(raw)}")
    return SourceSpec(_model_path(src["model"], f"{w}.model", err), (lr[0], lr[1]),
                      _parameters(src.get("parameters"), f"{w}.parameters", err, ignored))


_INTEGRAL = re.compile(r"\s*([+-]?[0-9](?:_?[0-9]){0,17})(?:\.0*)?\s*")  # "2", " 2 ", "1_0", "2.0" (ASCII digits)


def _layer_number(x) -> Optional[int]:
    """A layer index as mergekit's pydantic takes one: an int, a float with no fraction (2.0) or a string of one
    ("2", "1_0", "2.0"); None for anything else (2.5, "two", 5000 digits). Booleans are refused (pydantic takes
    true for 1)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    m = _INTEGRAL.fullmatch(x) if isinstance(x, str) else None
    return int(m.group(1)) if m else None


# ---- renaming views --------------------------------------------------------------------------
class RenamedCheckpoint:
    """A checkpoint seen under output names: tensor(out) reads the source's tensor names[out].
    The underlying checkpoint is shared and closed by its owner, not by this view, unless owned."""

    def __init__(self, ck, names: Dict[str, str], owned: bool = False):
        self.ck, self.map, self.owned = ck, names, owned
        self.path, self.folder = ck.path, ck.folder

    def names(self) -> List[str]:
        return list(self.map)

    def __contains__(self, name) -> bool:
        return name in self.map

    def info(self, name):
        return self.ck.info(self.map[name])

    def source_name(self, name) -> str:
        return self.map[name]

    def tensor(self, name):
        return self.ck.tensor(self.map[name])

    def array(self, name):
        return self.ck.array(self.map[name])

    def head(self, name, n: int, at: int = 0) -> bytes:
        return head_bytes(self.ck, self.map[name], n, at)

    def prefetch(self, name) -> None:
        self.ck.prefetch(self.map[name])

    def release(self, name) -> None:
        self.ck.release(self.map[name])

    def close(self) -> None:
        if self.owned:
            self.ck.close()

    def __getattr__(self, name):  # anything else (shards, files...) is the underlying checkpoint's
        return getattr(self.ck, name)


# ---- planning --------------------------------------------------------------------------------
class _SliceResolver:
    """ParamResolver's interface for one group of output tensors: each output name knows its t and
    the source tensor names that per-model filters see."""

    def __init__(self, cfg: MergeConfig, method, model_scopes: List[dict], global_scopes: List[dict],
                 model_types: List[Optional[str]], out_type: Optional[str], model_paths: Sequence[str]):
        self.cfg, self.method = cfg, method
        self.model_paths = list(model_paths)  # what an error names per input (as ParamResolver's do)
        self.model_scopes, self.global_scopes = model_scopes, global_scopes
        self.model_types, self.out_type = model_types, out_type  # for the names filters see (filter_name)
        self.where: Dict[str, Tuple[float, List[str]]] = {}  # out name -> (t, source name per input)
        self._gradients: dict = {}  # each gradient's values, converted once (evaluate_setting's memo)

    def __call__(self, out_name: str, _t_ignored: float):
        t, src_names = self.where[out_name]
        g = {n: self._value(n, spec, self.global_scopes, out_name, filter_name(out_name, self.out_type), t, None)
             for n, spec in self.method.global_params.items()}
        per = [{n: self._value(n, spec, [scope] + self.global_scopes, src, filter_name(src, kind), t, i)
                for n, spec in self.method.model_params.items()}
               for i, (scope, src, kind) in enumerate(zip(self.model_scopes, src_names, self.model_types))]
        return g, per

    def _value(self, name, spec, scopes, tensor_name, seen, t, model):
        v = resolve_one(name, scopes, seen, t, kind_of(spec), self._gradients)
        if v is not None:
            return v
        if spec.required:
            who = "the merge" if model is None else f"model {self.model_paths[model]}"
            where = ("the source's parameters or the top-level parameters" if model is not None else
                     "the top-level parameters: it is the merge's, not a source's")
            raise MergeConfigError(self.cfg.where(f"no value of required parameter {name!r} for {who} at tensor "
                                                  f"{tensor_name} (set it in {where})"))
        return spec.default


@dataclass
class SlicedPlan:
    """A plan made of several MergePlans (parts) written into one output; the interface run_merge
    and the executors use."""
    config: MergeConfig
    method: Any
    parts: list
    donor: Any
    checkpoints: list                       # the real (opened) checkpoints, closed by close()
    config_overrides: Dict[str, Any]
    warnings: List[str] = field(default_factory=list)
    chat_template: Optional[str] = None     # the resolved `chat_template:` (pymerge/merge.py)
    vocabulary: Any = None                  # a tokenizer merge's output vocabulary (pymerge.tokenizer.vocab)

    @property
    def tensors(self):
        return [tp for p in self.parts for tp in p.tensors]

    @property
    def copies(self):
        return [c for p in self.parts for c in p.copies]

    @property
    def input_bytes(self) -> int:
        return sum(p.input_bytes for p in self.parts)

    @property
    def output_bytes(self) -> int:
        return sum(p.output_bytes for p in self.parts)

    def close(self) -> None:
        for ck in self.checkpoints:
            ck.close()


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # GPT-2, GPTBigCode, Jais: n_layer
# one entry per layer (transformers checks the length; Nemotron-H takes its depth from layers_block_type)
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "layers_block_type", "mlp_layer_types")  # (GLM-4.7-Flash's)
_PER_LAYER_STRINGS = ("hybrid_override_pattern",)  # one character per layer (Nemotron-H: M, *, -)
# lists of the indices of some layers: LFM2's attention layers (beside its convolutions), Qwen-MoE's dense-MLP
# layers, Bamba's and GraniteMoeHybrid's attention layers (beside Mamba), Llama-4's MoE layers
_LAYER_INDEX_KEYS = ("full_attn_idxs", "mlp_only_layers", "attn_layer_indices", "moe_layers")


# transformers' sliding_window_pattern where a config leaves it out (Gemma-2 alternates, layer 0 sliding)
_SLIDING_DEFAULTS = {"gemma2": 2, "gemma3_text": 6, "cohere2": 4}
# sliding attention from layer max_window_layers on (its default here), where use_sliding_window says so (Dots1:
# wherever sliding_window is set); transformers 5's configs (an audit and a review)
_WINDOW_FROM = {"qwen2": 28, "qwen3": 28, "qwen2_vl": 80, "qwen2_5_vl": 80, "qwen2_vl_text": 80, "qwen2_5_vl_text": 80,
                "qwen2_5_omni_text": 28, "dots1": 62}  # (the VL configs on the hub are flat: their text keys on top)


def _positional_kinds(cfg, i: int) -> dict:
    """What a config derives for layer i from its position alone, where no per-layer list says it (a list is
    rewritten per layer instead): sliding or full attention (Gemma-2 alternates; Gemma-3 and Cohere2 by
    sliding_window_pattern; Qwen2's family by max_window_layers, with use_sliding_window (_WINDOW_FROM, and
    Qwen2-MoE's alternation); not with layer_types), attention or Mamba (Jamba's attn_layer_period/offset; not
    with layers_block_type, which Zamba's transformers honours), MoE or dense MLP (Jamba's expert_layer_period/offset;
    DeepSeek's and GLM4-MoE's first_k_dense_replace and moe_layer_freq; Qwen-MoE's decoder_sparse_step; Llama-4's
    interleave_moe_layer_step, without moe_layers).
    transformers builds these from the layer's index: moved to another index, a layer is built as another kind."""
    if not isinstance(cfg, dict):
        return {}

    def number(key, default=None):
        v = cfg.get(key, default)
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    kinds = {}
    pattern = number("sliding_window_pattern", _SLIDING_DEFAULTS.get(cfg.get("model_type")))
    if "layer_types" not in cfg and pattern and pattern > 0:
        kinds["sliding"] = bool((i + 1) % pattern)
    model_type = cfg.get("model_type")
    if "layer_types" not in cfg and model_type in _WINDOW_FROM:  # transformers' defaults for keys left out
        start = number("max_window_layers", _WINDOW_FROM[model_type])
        windowed = cfg.get("sliding_window", 4096) is not None and (model_type == "dots1" or
                                                                   bool(cfg.get("use_sliding_window", False)))
        if windowed and start is not None:
            kinds["sliding"] = i >= start
    if "layer_types" not in cfg and model_type == "qwen2_moe" and bool(cfg.get("use_sliding_window", False)):
        below = number("max_window_layers", 28)  # Qwen2-MoE: every other layer below it (transformers 5)
        if below is not None:
            kinds["sliding"] = bool((i + 1) % 2) and i < below
    for period, offset, listed in (("attn_layer_period", "attn_layer_offset", "layers_block_type"),
                                   ("expert_layer_period", "expert_layer_offset", None)):
        p, o = number(period), number(offset, 0)
        if p and p > 0 and o is not None and (listed is None or listed not in cfg):
            kinds[period] = i % p == o
    k = number("first_k_dense_replace")
    if k is not None:
        freq = max(number("moe_layer_freq", 1) or 1, 1)
        kinds["moe"] = i >= k and i % freq == 0
    step = number("decoder_sparse_step")
    if step and step > 0:
        kinds["sparse"] = (i + 1) % step == 0
    step = number("interleave_moe_layer_step")  # Llama-4 without moe_layers: MoE at step-1, 2*step-1, ... (a review)
    if step and step > 0 and cfg.get("moe_layers") is None:
        kinds["moe"] = (i + 1) % step == 0
    return kinds


def _listed_kinds(cfg, i: int) -> dict:
    """The kinds a config's own per-layer list gives layer i (layer_types: sliding or not)."""
    types = cfg.get("layer_types") if isinstance(cfg, dict) else None
    return {"sliding": types[i] == "sliding_attention"} if isinstance(types, list) and i < len(types) else {}


def _check_positional_kinds(model_cfg, origins: List[Tuple[Optional[dict], int]]) -> None:
    """Exit 2 where an output layer would be built as another kind than its source layer: the kinds the written
    config.json derives from positions cannot be rewritten per layer (Gemma-2's attention types flipped, Jamba's
    and GLM4-MoE's moved layers loaded with random weights, exit 0: an audit; mergekit crashes or does the same).
    A source layer's kind comes from its own config: its list where it has one, else its positions."""
    for k, (src_cfg, layer) in enumerate(origins):
        built = _positional_kinds(model_cfg, k)
        if not built:
            continue
        src = src_cfg if isinstance(src_cfg, dict) else model_cfg
        was = {**_positional_kinds(src, layer), **_listed_kinds(src, layer)}
        differ = [aspect for aspect, value in built.items() if aspect in was and was[aspect] != value]
        if differ:
            # only attention types have a per-layer list transformers reads (an audit: the hint was given for
            # Qwen2-MoE's decoder_sparse_step, whose models had layer_types already)
            listable = "give the models' config.json an explicit per-layer list (layer_types) or " \
                if differ == ["sliding"] else ""
            raise MergeConfigError(
                f"slices: output layer {k} comes from source layer {layer}, but config.json derives each layer's kind "
                f"from its position ({', '.join(differ)}): loaded, it would be built as another kind of layer; "
                f"{listable}keep the layers at positions of their kind")


def _layer_count(model_cfg, layers: int) -> dict:
    """The layer count under the key(s) the donor's config.json uses (num_hidden_layers if none)."""
    keys = [k for k in _LAYER_KEYS if isinstance(model_cfg, dict) and k in model_cfg] or ["num_hidden_layers"]
    return {k: layers for k in keys}


def _layer_overrides(model_cfg, layers: int, origins: List[Tuple[Optional[dict], int]]) -> dict:
    """config.json's keys for `layers` layers from origins (source config, layer): at the top, or inside
    text_config where the donor counts its layers there only (multimodal models: a new top-level count
    beside a stale text_config one built the old depth)."""
    text = model_cfg.get("text_config") if isinstance(model_cfg, dict) else None
    if isinstance(text, dict) and "num_hidden_layers" in text and not any(k in model_cfg for k in _LAYER_KEYS):
        nested = [(c.get("text_config") if isinstance(c, dict) else None, layer) for c, layer in origins]
        return {"text_config": {**text, **_layer_count(text, layers), **_per_layer(text, nested)}}
    return {**_layer_count(model_cfg, layers), **_per_layer(model_cfg, origins)}


def _per_layer(model_cfg, origins: List[Tuple[Optional[dict], int]]) -> dict:
    """The donor's per-layer lists (layer_types: sliding or full attention, ...) for the layers written:
    each output layer takes its source layer's entry (the slice's base model's, else its first source's),
    from that model's config when it has the list (else the donor's). Left at the donor's length,
    transformers refused to load the output."""
    from pymerge.merge import _num_layers
    out = {}
    for key in _PER_LAYER_KEYS + _PER_LAYER_STRINGS:
        kind = str if key in _PER_LAYER_STRINGS else list
        mine = model_cfg.get(key) if isinstance(model_cfg, dict) else None
        if not isinstance(mine, kind) or not mine:
            continue
        values = []
        for src_cfg, layer in origins:
            theirs = src_cfg.get(key) if isinstance(src_cfg, dict) else None
            depth = _num_layers(src_cfg) or (len(theirs) if isinstance(theirs, kind) else None)
            ok = isinstance(theirs, kind) and len(theirs) == depth and layer < len(theirs)
            values.append(theirs[layer] if ok else mine[layer % len(mine)])
        out[key] = "".join(values) if kind is str else values
    _check_positional_kinds(model_cfg, origins)
    # An index list: output layer k is listed where its source layer is listed in its source's config (else the
    # donor's). Copied as the donor had it, LFM2's full_attn_idxs built a convolution where a slice had put an
    # attention layer: its weights were left out at load, randomly initialized, exit 0 (an audit).
    for key in _LAYER_INDEX_KEYS:
        mine = model_cfg.get(key) if isinstance(model_cfg, dict) else None
        if not _index_list(mine):
            continue
        listed = []
        for k, (src_cfg, layer) in enumerate(origins):
            theirs = src_cfg.get(key) if isinstance(src_cfg, dict) else None
            if layer in (theirs if _index_list(theirs) else mine):
                listed.append(k)
        out[key] = listed
    return out


def _index_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def make_sliced_plan(cfg: MergeConfig) -> SlicedPlan:
    from pymerge import merge, tied  # the engine's planning helpers (both import this module)
    from pymerge.lora import open_model
    from pymerge.methods.base import get_method

    sliced: SlicedConfig = cfg.sliced
    try:
        method = get_method(cfg.merge_method)
    except MergeConfigError as exc:
        raise MergeConfigError(cfg.where(str(exc))) from None
    opened: Dict[str, Any] = {}

    def open_ck(path):
        if path not in opened:
            opened[path] = open_model(path, cfg.lora_merge_dtype)
        return opened[path]

    try:
        stacks = {}

        def stack_of(path):  # (prefix, layer count, {layer: [names]}) of a model's main layer stack
            if path not in stacks:
                ck = open_ck(path)
                n = merge._num_layers(read_model_config(ck))
                layers, tensors = layer_stacks(ck.names())
                if not layers:
                    raise CheckpointError(f"{path}: no layer stack (no '.layers.N.' tensors) to slice")
                prefix = main_stack(layers, tensors, n)  # the one num_hidden_layers counts, as count_layers
                others = sorted(p for p in layers if p != prefix and layers[p] > 1)  # not a one-layer MTP head
                if others:  # a vision tower and a text stack: slicing one left the other unsliced
                    raise MergeConfigError(f"{path}: has {len(others) + 1} layer stacks "
                                           f"({', '.join(sorted(others + [prefix]))}); slices: cut one stack, as "
                                           "mergekit, which asks for modules: per stack here, refuses too; merge "
                                           "it with models:")
                by_layer: Dict[int, List[str]] = {}
                for x in ck.names():
                    li = layer_of(x)
                    if li and li[0] == prefix:
                        by_layer.setdefault(li[1], []).append(x)
                stacks[path] = (prefix, n or layers[prefix], by_layer)  # count_layers' count
            return stacks[path]

        slices = list(sliced.slices)
        if sliced.whole_models is not None:  # modules.default.models: one slice of every whole model
            models = list(sliced.whole_models)
            if cfg.base_model and not any(merge._same_model(m.path, cfg.base_model) for m in models):
                models.append(ModelSpec(cfg.base_model, {}))
            counts = {m.path: stack_of(m.path)[1] for m in models}
            if len(set(counts.values())) > 1:  # (a shorter model first dropped the longer ones' last layers)
                raise MergeConfigError(cfg.where("modules.default.models: every model must have as many layers, got "
                                                 + ", ".join(f"{p} {n}" for p, n in counts.items())))
            slices = [SliceSpec([SourceSpec(m.path, (0, counts[m.path]), m.parameters) for m in models])]

        def where(i: int) -> str:  # slice i, as the config holds it (modules.default: one slice of whole models)
            return f"{sliced.where}[{i}]" if sliced.whole_models is None else "modules.default"

        def source_where(i: int, j: int) -> str:
            if sliced.whole_models is None:
                return f"{where(i)}.sources[{j}]"
            return f"modules.default.models[{j}]" if j < len(sliced.whole_models) else "base_model"  # (appended)

        # the top-level parameters once (as a models: config's): a typo there merged in silence, a bad value
        # raised a traceback from the resolver
        _check_scope(cfg, method, cfg.parameters, "parameters")
        for i, s in enumerate(slices):
            _check_params(cfg, method, s, sliced.module_parameters, where(i),
                          [source_where(i, j) for j in range(len(s.sources))])
        donor_path = cfg.base_model or slices[0].sources[0].path
        donor = open_ck(donor_path)
        vocab = None
        if cfg.tokenizer is not None:  # every model of the config, as mergekit's referenced_models
            from pymerge.tokenizer.plan import plan_vocabulary
            models = list(dict.fromkeys([donor_path] + [x.path for s in slices for x in s.sources]))
            vocab = plan_vocabulary(cfg, models, [open_ck(m) for m in models], donor_path, read_model_config)
        first, last = slices[0], slices[-1]
        zipped = SliceSpec(last.sources[:len(first.sources)], last.base_model, last.parameters)  # as mergekit zips
        prefix0 = stack_of(first.sources[0].path)[0]
        pre_names = _outside_names(open_ck(first.sources[0].path), prefix0)[0]
        post_names = list(dict.fromkeys(n for x in zipped.sources
                                        for n in _outside_names(open_ck(x.path), stack_of(x.path)[0])[1]))
        parts, out_layer, origins = [], 0, []  # origins: (source model's config, its layer) per output layer
        seen = [(set(), set()) for _ in slices]  # per slice: the names its per-model / global parameters' filters see
        if pre_names:
            parts.append(_part(cfg, method, first, sliced, [(n, 0.0, {}) for n in pre_names], open_ck, where(0),
                               vocab, seen_names=seen[0]))
        for i, s in enumerate(slices):
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            # whose layers these are, for per-layer config lists: the slice's base model where it is a source
            base_path = s.base_model or cfg.base_model
            origin = next((x for x in s.sources if base_path and merge._same_model(x.path, base_path)), s.sources[0])
            entries = []  # (output name, t, {source index: source name})
            for off in range(length):
                t = off / (length - 1) if length > 1 else 1.0
                per_source = []
                for j, x in enumerate(s.sources):
                    prefix, n_layers, by_layer = stack_of(x.path)
                    src_layer = x.layer_range[0] + off
                    if x.layer_range[1] > n_layers:
                        raise MergeConfigError(cfg.where(f"{source_where(i, j)}: layer_range {list(x.layer_range)} "
                                                         f"goes past {x.path}'s {n_layers} layers"))
                    if src_layer not in by_layer:  # counted by config.json, not in the file: a hole in the output
                        raise CheckpointError(f"{x.path}: has no tensors of layer {src_layer} ({prefix}.{src_layer}.*), "
                                              f"though its config counts {n_layers} layers")
                    per_source.append({_suffix(name, prefix, src_layer): name for name in by_layer[src_layer]})
                suffixes = list(per_source[0])
                for j, names in enumerate(per_source[1:], 1):
                    if set(names) != set(suffixes):
                        odd = sorted(set(names) ^ set(suffixes))[0]
                        raise CheckpointError(f"{s.sources[j].path}: layer {s.sources[j].layer_range[0] + off} "
                                              f"and {s.sources[0].path}'s layer {s.sources[0].layer_range[0] + off} "
                                              f"differ in tensor {odd!r}")
                for suf in suffixes:
                    entries.append((f"{prefix0}.{out_layer}.{suf}", t, {j: per_source[j][suf]
                                                                       for j in range(len(s.sources))}))
                out_layer += 1
                origins.append((origin.path, origin.layer_range[0] + off))
            parts.append(_part(cfg, method, s, sliced, entries, open_ck, where(i), vocab, seen_names=seen[i]))
        if post_names:  # a tied source's embedding stands for the head (pymerge/tied.py)
            entries = [(n, 0.0, {j: tied.head_source(open_ck(x.path), n) or n for j, x in enumerate(zipped.sources)})
                       for n in post_names]
            label = where(len(slices) - 1)
            if len(last.sources) > len(first.sources):  # a base past the cut read "not among this slice's sources"
                label += (f" (the tensors after the layers take its first {len(first.sources)} sources, as many as "
                          f"{where(0)} has: mergekit's rule)")
            parts.append(_part(cfg, method, zipped, sliced, entries, open_ck, label, vocab,
                               filter_by_output=True, seen_names=seen[-1]))
        if vocab is None:
            _check_vocabulary_rows(cfg, parts, open_ck, first.sources[0].path, zipped.sources[0].path)
        try:  # a base_model that is no source was never asked for its layer stack: one it lacks is no error here
            donor_stack = stack_of(donor_path)
        except (MergeConfigError, CheckpointError):
            donor_stack = (None, 0, {})
        _check_donor_shapes(cfg, parts, donor_path, donor, donor_stack, prefix0, vocab is not None)
        donor_cfg = read_model_config(donor)
        configs = {path: read_model_config(open_ck(path)) for path in {path for path, _ in origins}}
        overrides = _layer_overrides(donor_cfg, out_layer, [(configs[path], layer) for path, layer in origins])
        warnings = list(cfg.warnings)
        warnings += _unmatched_filter_warnings(method, [cfg.parameters, sliced.module_parameters], slices, seen)
        if vocab is not None:
            from pymerge.tokenizer.plan import vocab_size_override  # mergekit sets it (padded) whatever the source
            vocab_size_override(donor_cfg, overrides, vocab.size)
        out_tensors = [tp for p in parts for tp in p.tensors]
        if tied.mixes_ties([open_ck(x.path) for x in first.sources + zipped.sources]):
            overrides.update(tied.tie_override(donor_cfg, [tp.name for tp in out_tensors], warnings))
        else:
            overrides.update(tied.masked_head_override(donor_cfg, out_tensors, method, warnings))
            if "tie_word_embeddings" not in overrides:  # the embedding from the first slice, the head from the last
                overrides.update(tied.head_unlike_embedding_override(
                    donor_cfg, [(tp, [c.path for c in p.checkpoints]) for p in parts for tp in p.tensors], warnings))
        return SlicedPlan(cfg, method, parts, donor, list(opened.values()), overrides, warnings, vocabulary=vocab)
    except BaseException:
        for ck in opened.values():
            ck.close()
        raise


def _check_vocabulary_rows(cfg: MergeConfig, parts, open_ck, first: str, last: str) -> None:
    """Without a tokenizer merge, the embedding comes from the first slice's models and lm_head from the last's:
    models of different vocabulary sizes gave an output whose rows disagree (exit 0, a model nothing loads; so
    in mergekit). Refused, unless a source model's own vocabulary tensors already disagree (an architecture
    whose output head has other rows than its embedding)."""
    from pymerge.tokenizer.vocab import is_vocab_tensor

    def rows(path):
        ck = open_ck(path)
        return {ck.info(n).shape[0] for n in ck.names() if is_vocab_tensor(n) and ck.info(n).shape}

    out = [(tp.name, tp.shape[0]) for p in parts for tp in p.tensors if is_vocab_tensor(tp.name) and tp.shape]
    other = next(((n, r) for n, r in out if r != out[0][1]), None)
    if other is None or len(rows(first)) > 1 or len(rows(last)) > 1:
        return
    raise MergeConfigError(cfg.where(
        f"slices: the output's {out[0][0]} would have {out[0][1]} rows (from the first slice's {first}) and its "
        f"{other[0]} {other[1]} (from the last slice's {last}): the models' vocabularies differ; set "
        "tokenizer_source (union, base or a model) to merge them token by token"))


def _check_donor_shapes(cfg: MergeConfig, parts, donor_path: str, donor, donor_stack, out_prefix: str,
                        merged_vocab: bool) -> None:
    """The output's config.json is the donor's (its layer count and per-layer lists set): a tensor shaped
    otherwise than the donor's of that name (outside the layers), or of that kind in a donor whose layers all
    share its shape, made a model nothing loads, exit 0 (as in mergekit): layers of a model with another
    hidden or intermediate size, an embedding of another vocabulary size than the donor's (an audit). With a
    tokenizer merge the vocabulary tensors' rows are the merged vocabulary's, and only their width counts."""
    from pymerge.tokenizer.vocab import is_vocab_tensor
    prefix, _, by_layer = donor_stack
    kinds: Dict[str, set] = {}  # per tensor kind, its shapes over the donor's layers
    for layer, names in by_layer.items():
        for n in names:
            kinds.setdefault(_suffix(n, prefix, layer), set()).add(tuple(donor.info(n).shape))
    donor_names = set(donor.names())
    for tp in (tp for p in parts for tp in p.tensors):
        li = layer_of(tp.name)
        if li and li[0] == out_prefix:
            shapes = kinds.get(_suffix(tp.name, out_prefix, li[1]), ())
            want = next(iter(shapes)) if len(shapes) == 1 else None  # layers of several shapes: per-layer config
        else:
            want = tuple(donor.info(tp.name).shape) if tp.name in donor_names else None
        vocab = is_vocab_tensor(tp.name)
        got = tuple(tp.shape)
        if want is None or (got[1:] if merged_vocab and vocab else got) == (want[1:] if merged_vocab and vocab else want):
            continue
        hint = ("the models' vocabularies differ; set tokenizer_source (union, base or a model) to merge them token "
                "by token" if vocab and got[1:] == want[1:] else "the models differ in shape (hidden or intermediate "
                "size); slice models of one shape")
        raise MergeConfigError(cfg.where(
            f"slices: the output's {tp.name} would be {list(got)}, but {donor_path}, whose config.json the output "
            f"takes, has {list(want)}{'' if vocab else ' in its layers' if li and li[0] == out_prefix else ''}: "
            f"nothing would load that model ({hint})"))


def _unmatched_filter_warnings(method, merge_scopes, slices, seen) -> List[str]:
    """Filters that no tensor they apply to matches, a typo likely: the merge's scopes against every slice's
    names, a slice's own (and its sources') against its own; per-model parameters' filters see the sources'
    tensor names, global ones the output's (as _SliceResolver matches them)."""
    every = tuple(set().union(*(pair[k] for pair in seen)) for k in (0, 1))
    groups = [(merge_scopes, every)] + [([s.parameters] + [x.parameters for x in s.sources], pair)
                                        for s, pair in zip(slices, seen)]
    found: Dict[Tuple[str, str], List[str]] = {}  # (parameter, filter) -> example names
    for scopes, (model_seen, global_seen) in groups:
        for params, names in ((method.model_params, sorted(model_seen)), (method.global_params, sorted(global_seen))):
            for key, f in unmatched_filters(scopes, names, params):
                found.setdefault((key, f), names)
    return [unmatched_filter_warning(key, f, names) for (key, f), names in found.items()]


def _suffix(name: str, prefix: str, layer: int) -> str:
    return name[len(f"{prefix}.{layer}."):]


def _outside_names(ck, prefix: str) -> Tuple[List[str], List[str]]:
    """Tensors outside the main layer stack, split into before it (embeddings) and after it."""
    names = [n for n in ck.names() if (layer_of(n) or ("",))[0] != prefix]
    pre = [n for n in names if any(m in n for m in _PRE_MARKERS) and not is_neox_head(n)]
    return pre, [n for n in names if n not in pre]


def _part(cfg, method, s: SliceSpec, sliced: SlicedConfig, entries, open_ck, label, vocab=None,
          filter_by_output=False, seen_names: Optional[Tuple[set, set]] = None):
    """One MergePlan over the sources of a slice, tensors named as in the output. With a tokenizer
    merge (vocab), its vocabulary tensors are permuted to the output's tokens, default rows
    preferring the slice's base model (mergekit's rule). Filters see each source's tensor name (a
    shifted layer's), or with filter_by_output the output's: a tied model's head is read from its
    embedding but is lm_head.weight to its filters, as mergekit names it. seen_names collects the names
    filters see (for unmatched_filters): those of per-model parameters (source names), then of the merge's
    global ones (output names)."""
    from pymerge import merge

    base_path = s.base_model or cfg.base_model
    specs = [ModelSpec(x.path, x.parameters) for x in s.sources]
    seen = {}
    for x in s.sources:  # the parser refuses a path listed twice; other spellings (./x, x/, a link) too
        key = frozenset(os.path.realpath(f) for f in open_ck(x.path).files)
        if key in seen:
            raise MergeConfigError(cfg.where(f"{label}: {seen[key]} and {x.path} are the same model; "
                                             f"list it once in a slice"))
        seen[key] = x.path
    if method.base_model == "none":
        inputs, base = specs, None
    else:
        base = next((m for m in specs if merge._same_model(m.path, base_path)), None) if base_path else None
        if base_path and base is None:
            raise MergeConfigError(cfg.where(f"{label}: the base model {base_path} is not among this slice's "
                                             f"sources (mergekit requires it there)"))
        if base is None and method.base_model == "required":
            raise MergeConfigError(cfg.where(f"{label}: merge_method {method.name} needs a base_model"))
        inputs = [m for m in specs if m is not base]
    try:
        method.validate(len(inputs), base is not None, base_among=method.base_model == "none" and bool(base_path))
    except MergeConfigError as exc:
        raise MergeConfigError(cfg.where(f"{label}: {exc}")) from None
    order = inputs + ([base] if base is not None else [])
    index = {id(m): j for j, m in enumerate(specs)}  # source position of each model
    views = []
    for m in order:
        j = index[id(m)]
        names = {out: (srcs[j] if srcs else out) for out, _, srcs in entries}
        views.append(RenamedCheckpoint(open_ck(m.path), names))
    labels = [m.path for m in order]
    out_names = [out for out, _, _ in entries]
    if vocab is not None:
        vocab = vocab.for_base(base_path)
    merge.check_compatible(views, labels=[hub.shown(label) for label in labels], names=out_names,
                           rows_may_differ=vocab.covers if vocab else None)
    kinds = [(read_model_config(open_ck(m.path)) or {}).get("model_type") for m in order]
    resolver = _SliceResolver(cfg, method, [m.parameters for m in inputs],
                              [s.parameters, sliced.module_parameters, cfg.parameters], kinds[:len(inputs)], kinds[0],
                              [m.path for m in inputs])
    for out, t, srcs in entries:
        resolver.where[out] = (t, [srcs[index[id(m)]] if srcs and not filter_by_output else out for m in inputs])
        if seen_names is not None:  # as _SliceResolver matches them
            seen_names[0].update(filter_name(src, kind) for src, kind in zip(resolver.where[out][1], kinds))
            seen_names[1].add(filter_name(out, kinds[0]))
    tensors, copies = merge.plan_tensors(cfg, method, resolver, views, labels, out_names, None, base is not None, vocab)
    return merge.MergePlan(cfg, method, inputs, base, views, tensors, views[0], [], copies=copies)


def _check_scope(cfg: MergeConfig, method, scope: dict, where: str) -> None:
    """One scope's global settings (the config's, a slice's, the module's) against the method."""
    check_method_params(MergeConfig(cfg.merge_method, [], parameters=scope, source=cfg.source, warnings=cfg.warnings),
                        method, [], params_where=where)


def _check_params(cfg: MergeConfig, method, s: SliceSpec, module_params: dict, where: str,
                  source_wheres: List[str]) -> None:
    """Names and types of every setting a slice uses, against the method (as for `models:`); errors and
    warnings name where the config holds it."""
    _check_scope(cfg, method, s.parameters, f"{where}.parameters")
    _check_scope(cfg, method, module_params, "modules.default.parameters")
    probe = MergeConfig(cfg.merge_method, [ModelSpec(x.path, x.parameters) for x in s.sources], source=cfg.source,
                        warnings=cfg.warnings)
    check_method_params(probe, method, probe.models,
                        model_wheres=[f"{w} ({x.path}).parameters" for w, x in zip(source_wheres, s.sources)])
