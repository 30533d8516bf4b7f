"""mergekit's YAML merge config, parsed into a typed MergeConfig, and per-tensor parameter values.

The meaning follows mergekit 0.1.5 (config.py, parameter_resolver.py, plan.py), so users bring
their configs unchanged:

- A parameter setting is a scalar, a gradient (a list of numbers, interpolated linearly over
  t = layer / (L - 1); a list of booleans or strings picks values[int(t * (len - 1))]), or a
  list of {filter, value} conditions (the first whose filter is a substring of the tensor name,
  or has no filter or "*", wins; its value may itself be a gradient). A single {filter, value}
  mapping is a one-element list. An empty list, or conditions that match nothing, give no value.
  The name a filter sees is mergekit's: for the mixture-of-experts layouts mergekit reads as
  transformers 5's fused tensors (Mixtral, Qwen2/3-MoE, DeepSeek...), the fused name; GPT-2's, under
  `transformer.` (see filter_name).
- Tensors outside the layer stack (embeddings, final norm, lm_head) take t = 0. In a model with a
  single layer the layer takes t = 1 (mergekit's rule).
- A model's own parameters are looked at first, then the top-level ones; a scope that yields no
  value falls through to the next. Global (shared) parameters come from the top level only.

Keys neither reads are ignored, as mergekit does, with a warning (config.check_keys), but for a near miss
of a known key (a typo) and a few whose silent drop merges something else (_MISPLACED). Where pymerge is
stricter than mergekit (which ignores them silently): mistyped keys and parameter names, non-finite
numbers, parameters or weighted-sum coefficients beyond 1e6 in size (pymerge/methods/base.py), and
duplicate models (also under other spellings of one path: ./x, x/, a symlink, x/model.safetensors) are
errors; per-model values of global parameters produce a warning (neither tool uses them). A config file
is read safely: a regular file of at most 10 MB, YAML aliases expanding to at most 100_000 values, 50
levels deep.

This module needs no torch: dtypes stay names until the engine maps them.
"""
import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import yaml

from pymerge.errors import CheckpointError, InputError, MergeConfigError, described, short
from pymerge.io.files import read_small_with_mode, text_path, unencodable

TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "slices", "modules")
MODEL_KEYS = ("model", "parameters")
CONDITION_KEYS = ("filter", "value")
# every parameter a built-in method takes (test_config checks it against the registry, which imports torch)
MERGE_PARAMETERS = ("alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter",
                    "normalize", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale",
                    "select_topk", "t", "tol", "weight")
# keys mergekit ignores where ignoring them merges something other than the config asks for: refused, with the fix
_MISPLACED = {
    "revision": "a revision goes with its model (model: {model: {path: M, revision: R}}, or M@R); mergekit ignores "
                "it here and merges the default branch",
    "pattern": "older mergekit's name for filter; mergekit 0.1.5 ignores it and gives the value to every tensor: "
               "rename it filter",
}
DTYPES = ("float32", "bfloat16", "float16")
_MERGEKIT_ONLY_DTYPES = ("float64", "int64")
MAX_CONFIG_BYTES = 10_000_000  # a merge config is a few KB
MAX_CONFIG_NODES = 100_000     # values alias expansion may add: a config with 1000 models has ~10_000 in all
MAX_CONFIG_DEPTH = 50

Scalar = Union[bool, int, float, str]
Setting = Union[Scalar, list, dict]

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


@dataclass
class ModelSpec:
    """One entry of ``models:`` (or the base model). parameters holds raw, checked settings."""
    path: str
    parameters: Dict[str, Setting] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path


@dataclass
class MergeConfig:
    merge_method: str
    models: List[ModelSpec]
    base_model: Optional[str] = None
    parameters: Dict[str, Setting] = field(default_factory=dict)
    dtype: Optional[str] = None          # load/compute dtype name (mergekit's ``dtype``)
    out_dtype: Optional[str] = None      # output dtype name; None: the compute dtype
    tokenizer: Optional[Any] = None      # `tokenizer_source` / `tokenizer:` (pymerge.tokenizer.spec.TokenizerSpec)
    chat_template: Optional[str] = None
    source: str = "<config>"             # the file it came from, for messages
    sliced: Optional[Any] = None         # a `slices:` / `modules:` config (pymerge.slices.SlicedConfig)
    lora_merge_dtype: Optional[str] = None  # dtype of MODEL+LORA models (--lora-merge-dtype; None: their own)
    warnings: List[str] = field(default_factory=list)
    text: Optional[str] = None           # what OUT records of it: the text parsed, or a dict config as YAML
    text_mode: Optional[int] = None      # the permission bits of the file it was read from (None: a dict's)

    def where(self, what: str) -> str:
        return f"{self.source}: {what}"


# ---- parsing ---------------------------------------------------------------------------------
def check_seed(seed, what: str = "seed") -> int:
    """A random seed: an integer from -2**63 to 2**64 - 1, as torch.manual_seed takes (a negative one
    wraps like a uint64, as there). Larger ones wrapped silently: 2**64 gave seed 0's masks."""
    if type(seed) is int and -(1 << 63) <= seed < 1 << 64:  # the common case (the pool's every call), no lookups
        return seed
    try:
        n = None if isinstance(seed, bool) else operator.index(seed)
    except Exception:  # noqa: BLE001  (a float tensor's __index__ raises TypeError, a larger one RuntimeError)
        n = None
    if n is None or not -(1 << 63) <= n < 1 << 64:
        raise InputError(f"{what} must be an integer from {-(1 << 63)} to {(1 << 64) - 1}, got {short(seed)}")
    return n


def load_config(path) -> MergeConfig:
    """Reads and checks a mergekit YAML file; every problem is a MergeConfigError naming the file. OUT records the
    text parsed, with the file's permission bits: copied again by its path as the merge ended, the record was
    whatever the file held by then (another merge's --force replacing it meanwhile: an audit)."""
    path = str(path)
    data, text, mode = _read_yaml_text(path, MergeConfigError)
    cfg = parse_config(data, source=path)
    cfg.text, cfg.text_mode = text, mode
    return cfg


class _UniqueKeysLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The safe loader, except that a key written twice in one mapping is an error (YAML requires unique keys;
    PyYAML kept the last: `weight: 1` then `weight: 0` merged with 0, silently). A key a merge (`<<: *x`)
    brings in may still be overridden, as YAML intends. Checked as each mapping was written: PyYAML flattens a
    mapping merged into another in place (its merged keys beside its own) before constructing it, so the check
    runs in flatten_mapping, first, once per mapping. 1, 1.0 and true are three keys to YAML but one to Python (the
    last would win): refused too."""

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_checked_mappings", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                # a key written "=" (YAML's value tag) is the string "=", as flatten_mapping makes it
                key = "=" if key_node.tag == "tag:yaml.org,2002:value" else self.construct_object(key_node)
                try:
                    first = seen.get(key, seen)
                except TypeError:  # unhashable: the constructor's own error follows
                    continue
                if first is not seen:
                    twice = (f"key {short(key)} appears twice in one mapping" if type(first) is type(key) else
                             f"keys {short(first)} and {short(key)} of one mapping are one key once read")
                    raise yaml.constructor.ConstructorError(None, None, twice, key_node.start_mark)
                seen[key] = key
        super().flatten_mapping(node)


def read_yaml(path, error: Type[InputError] = MergeConfigError) -> Any:
    """A small YAML file (a merge or search config), safely: a regular file of at most
    MAX_CONFIG_BYTES, safe types only, aliases bounded (check_size); one-line errors."""
    return _read_yaml_text(str(path), error)[0]


def _read_yaml_text(path: str, error: Type[InputError]) -> Tuple[Any, str, int]:
    """read_yaml's data, the text it was parsed from, and the file's permission bits."""
    if not os.path.lexists(path):
        raise error(f"{path}: config file not found")
    raw, mode = read_small_with_mode(path, error, limit=MAX_CONFIG_BYTES)  # a FIFO: refused, not waited on
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: cannot read config: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeysLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}: not valid YAML{at}: {short(problem, 200)}") from None
    except RecursionError:
        raise error(f"{path}: not valid YAML: nested too deeply") from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
        # PyYAML's constructors raise these for scalars it parsed but cannot build: 2024-02-30, !!float abc,
        # !!bool maybe, an integer of more than 4300 digits
        raise error(f"{path}: not valid YAML: {short(str(exc), 200)}") from None
    check_size(data, path, error, spelled=len(raw))
    return data, text, mode


_CONTAINERS = (list, tuple, set, frozenset, dict)  # what yaml_text's dump walks (!!pairs and !!omap make tuples)


def check_size(data, source: str = "<config>", error: Type[InputError] = MergeConfigError,
               spelled: Optional[int] = None) -> None:
    """Rejects a config that expands to more than MAX_CONFIG_NODES values beyond what it spells out, nests deeper
    than MAX_CONFIG_DEPTH or refers to itself. YAML aliases share one object, so a 430-byte file can
    stand for billions of values ("billion laughs"): counted here, per shared object once, before
    anything walks or prints the expansion. A config that is merely long (4,000 slices, no aliases) is not
    refused. What it spells out: a file's bytes (`spelled`; each value takes at least one, while a chain of merge
    keys, `<<: *prev`, copies entries into new mappings: millions of values from 65 KB) and its values with each
    shared object's once, the latter alone for a dict the caller built."""
    sizes: Dict[int, Optional[int]] = {}
    distinct = [0]  # values seen so far, each shared object's once

    def size(x, depth: int) -> int:
        if not isinstance(x, _CONTAINERS):
            return 1
        if depth > MAX_CONFIG_DEPTH:
            raise error(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep")
        key = id(x)
        if key in sizes:
            if sizes[key] is None:
                raise error(f"{source}: a YAML alias refers to itself (a recursive structure)")
            return sizes[key]
        sizes[key] = None
        items = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
        n = 1
        distinct[0] += 1
        for v in items:
            if not isinstance(v, _CONTAINERS):
                distinct[0] += 1
            n += size(v, depth + 1)
            if n > MAX_CONFIG_NODES + (distinct[0] if spelled is None else min(spelled, distinct[0])):
                raise error(f"{source}: expands to more than {MAX_CONFIG_NODES} values beyond what it spells out "
                            f"(YAML aliases inside aliases, or chained merge keys?); refusing to evaluate it")
        sizes[key] = n
        return n

    size(data, 0)


def yaml_text(data: dict) -> Optional[str]:
    """A config given as a dict, as the YAML file it could have been (numpy scalars, tuples and paths as the YAML
    values they stand for); None where a value has no YAML form."""
    def plain(x):
        if isinstance(x, dict):
            return {plain(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (str, os.PathLike)):
            text = text_path(x)
            if text is None:  # no YAML form: PyYAML wrote "\\udcff", which its loader refuses (an audit)
                raise ValueError(f"{x!r} is not UTF-8")
            return text
        item = getattr(x, "item", None)  # a numpy or torch scalar
        return item() if callable(item) and getattr(x, "ndim", None) == 0 else x
    try:
        return yaml.safe_dump(plain(data), sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, TypeError, ValueError, RecursionError):
        return None


def _near_miss(key, known: Iterable[str]) -> List[str]:
    """The known names a typo away from key (one edit, a swap of neighbours counting as one; two from 8
    characters on; none under 4 characters), closest first: license is not slices, nor k r."""
    if not isinstance(key, str) or len(key) < 4:
        return []
    most = 1 if len(key) < 8 else 2
    found = sorted((d, name) for name in known if (d := _edits(key, name, most)) <= most)
    return [name for _, name in found]


def _edits(a: str, b: str, most: int) -> int:
    """Edits from a to b (insert, delete, replace, swap of neighbours), or most + 1 where more."""
    if abs(len(a) - len(b)) > most:
        return most + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return min(prev[-1], most + 1)


def check_keys(mapping: dict, known: Sequence[str], where: str, err, ignored: List[str]) -> None:
    """Keys of mapping outside known: mergekit ignores them silently, and so does pymerge, with a warning added to
    ignored (published configs carry LazyMergekit's name:, other methods' parameters, keys of older mergekit:
    refused, they did not switch unchanged; an audit of 51 real configs). Refused, every one named at once: a near
    miss of a known key (dype, merge_methd: a typo, which mergekit's silent default turns into another merge) and a
    key of _MISPLACED."""
    bad = [k for k in mapping if k not in known]
    refused = []
    for k in bad:
        near = _near_miss(k, known)
        if isinstance(k, str) and k in _MISPLACED:
            refused.append(f"{short(k)}: {_MISPLACED[k]}")
        elif near:
            refused.append(f"{short(k)} (did you mean {near[0]!r}?)")
    if refused:
        raise err(f"{where + ': ' if where else ''}unknown key{'s' * (len(refused) > 1)} {'; '.join(refused)} "
                  f"(known: {', '.join(known)})")
    if bad:
        hint = " (a merge parameter goes under parameters:)" if any(k in MERGE_PARAMETERS for k in bad) else ""
        ignored.append(f"{where or 'config'}: {', '.join(map(short, bad))}: not read by mergekit 0.1.5 nor pymerge "
                       f"here; ignored{hint}")


def parse_config(data: Any, source: str = "<config>") -> MergeConfig:
    """Checks a config already loaded from YAML (a dict) and returns a MergeConfig."""
    def err(msg):
        return MergeConfigError(f"{source}: {msg}")

    check_size(data, source)
    if not isinstance(data, dict):
        raise err(f"the config must be a mapping of keys, got {described(data)}")
    ignored: List[str] = []  # warnings for the keys neither tool reads
    check_keys(data, TOP_KEYS, "", err, ignored)
    sliced = None
    if data.get("slices") is not None or data.get("modules") is not None:
        from pymerge.slices import parse_sliced
        sliced = parse_sliced(data, err, ignored)  # (None: an empty one beside `models:`, absent as mergekit reads it)

    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise err("'merge_method' is missing" if method is None else f"'merge_method' must be a name, got {short(method)}")

    base = data.get("base_model")
    if base is not None:
        base = _model_path(base, "base_model", err)

    models_raw = data.get("models") if sliced is None else []
    if models_raw is None:
        raise err("'models' is missing: list the models to merge")
    if not isinstance(models_raw, list) or (not models_raw and sliced is None):
        raise err(f"'models' must be a non-empty list, got {described(models_raw)}")
    models, seen = [], {}
    for i, entry in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise err(f"{where} must be a mapping with 'model' and 'parameters', got {described(entry)}")
        check_keys(entry, MODEL_KEYS, where, err, ignored)
        if "model" not in entry:
            raise err(f"{where}: 'model' is missing")
        path = _model_path(entry["model"], f"{where}.model", err)
        spelled = entry["model"]  # as written (an ID's path is its snapshot's), a mapping as MODEL[@REV][+LORA]
        if isinstance(spelled, dict):
            from pymerge import lora
            spelled = lora.ref_from_mapping(spelled, f"{where}.model")
        if path in seen:
            first_where, first = seen[path]
            also = "" if first == spelled else f" as {_shown(first)}"
            raise err(f"{where}: model {_shown(spelled)} is listed twice ({first_where}{also})")
        seen[path] = (where, spelled)
        models.append(ModelSpec(path, _parameters(entry.get("parameters"), f"{where} ({path}).parameters", err,
                                                  ignored)))

    cfg = MergeConfig(
        merge_method=method, models=models, base_model=base,
        parameters=_parameters(data.get("parameters"), "parameters", err, ignored),
        dtype=_dtype(data.get("dtype"), "dtype", err), out_dtype=_dtype(data.get("out_dtype"), "out_dtype", err),
        source=source, sliced=sliced, warnings=ignored)

    from pymerge.tokenizer.spec import parse_tokenizer
    cfg.tokenizer = parse_tokenizer(data, err, lambda value, where: _model_path(value, where, err))
    chat = data.get("chat_template")
    if chat is not None:
        if not isinstance(chat, str):
            raise err(f"chat_template must be a string, got {described(chat)}")
        cfg.chat_template = chat or None  # "" is no template, as in mergekit (it was exit 2 here)
    return cfg


def _shown(path: str) -> str:
    """A path or ID as given where it reads as one ("m\\0x", "  ": visible, quoted)."""
    return path if path.isprintable() and path.strip() == path and path else short(path)


def _model_path(value, where, err) -> str:
    from pymerge import lora
    if not isinstance(value, (str, dict)) or not value:
        raise err(f"{where} must be a path, got {described(value)}")
    try:  # MODEL, MODEL+LORA, or mergekit's mapping {model: ..., lora: ...}
        return lora.resolve_ref(lora.ref_from_mapping(value, where) if isinstance(value, dict) else value)
    except MergeConfigError as exc:
        raise err(str(exc)) from None


def _dtype(value, key, err) -> Optional[str]:
    if value is None or value == "":  # (mergekit reads an empty name as unset)
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name in DTYPES:
        return name
    if name in _MERGEKIT_ONLY_DTYPES:
        raise err(f"{key}: {name} is not supported by pymerge; use one of {', '.join(DTYPES)}")
    raise err(f"{key}: unknown dtype {short(value)}; use one of {', '.join(DTYPES)}")


def _parameters(value, where, err, ignored: List[str]) -> Dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(f"{where} must be a mapping of parameter names to values, got {described(value)}")
    for name, setting in value.items():
        if not isinstance(name, str):
            raise err(f"{where}: parameter name {short(name)} is not a string")
        _check_setting(setting, f"{where}.{name}", err, ignored)
    return dict(value)


def _check_setting(setting, where, err, ignored: List[str], nested=False) -> None:
    """Structure only (types of values are checked against the method in check_method_params)."""
    if _is_scalar(setting):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        raise err(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, "
                  f"got {described(setting)}")
    if all(_is_scalar(e) for e in setting):
        return
    if nested:
        raise err(f"{where}: a condition's value must be a number or a list of numbers")
    if not all(isinstance(e, dict) for e in setting):
        raise err(f"{where}: a list must hold only numbers or only {{filter, value}} entries, not both")
    for j, cond in enumerate(setting):
        check_keys(cond, CONDITION_KEYS, f"{where}[{j}]", err, ignored)
        if "value" not in cond:
            raise err(f"{where}[{j}]: 'value' is missing")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise err(f"{where}[{j}].filter must be a string, got {described(cond['filter'])}")
        _check_setting(cond["value"], f"{where}[{j}].value", err, ignored, nested=True)


def _is_scalar(x) -> bool:
    return isinstance(x, (bool, int, float, str))


# ---- values ----------------------------------------------------------------------------------
class FlagOrName:
    """A parameter that takes a boolean or one of a few names (rescale: true, false, l1, inverse_density);
    picked, not interpolated, along a gradient."""

    def __init__(self, *names: str):
        self.names = names


def kind_of(spec) -> Any:
    """A method parameter's value type (mergekit declares types; our Param has defaults): its own kind if it
    declares one, else bool defaults make bool parameters, str defaults str ones, anything else (incl.
    REQUIRED) float."""
    if getattr(spec, "kind", None) is not None:
        return spec.kind
    if isinstance(spec.default, bool):
        return bool
    if isinstance(spec.default, str):
        return str
    return float


def coerce(value, kind: type):
    """One scalar as mergekit's pydantic (lax mode) would take it; ValueError when it cannot."""
    if kind is int:  # a count (karcher's max_iter): a number as for float (the method checks it is whole), but text
        # must be an integer's, as pydantic parses one: "1e1" ran 10 iterations where mergekit refuses it (an audit)
        if isinstance(value, str) and not re.fullmatch(r"[+-]?\d+(_\d+)*(\.0+)?", value.strip(), re.ASCII):
            raise ValueError(f"{short(value)} is not an integer")
        return coerce(value, float)
    if kind is float:
        if isinstance(value, str):
            try:  # Python's float as pydantic's: "1_000" but not "1__0" or "_1"; ASCII digits only (not "١")
                if not value.isascii():
                    raise ValueError
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{short(value)} is not a number") from None
        elif not isinstance(value, (int, float)):
            raise ValueError(f"{short(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer of 400 digits
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{short(value)} is not a finite number")
        return number
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:  # no spaces around it, as pydantic
            return value.lower() in _TRUE
        raise ValueError(f"{short(value)} is not a boolean")
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{short(value)} is not a string")
        return value
    if isinstance(kind, FlagOrName):
        if isinstance(value, str) and value.strip().lower() in kind.names:
            return value.strip().lower()
        try:
            return coerce(value, bool)
        except ValueError:
            raise ValueError(f"{short(value)} is not a boolean or one of {', '.join(kind.names)}") from None
    raise TypeError(f"unsupported parameter kind {kind}")


def evaluate_setting(setting: Setting, tensor_name: str, t: float = 0.0, kind: type = float,
                     memo: Optional[dict] = None):
    """The value of one setting for one tensor at layer position t, or None when it gives none.

    Mirrors mergekit.config.evaluate_setting: gradients interpolate numbers, pick among others. memo (a resolver's
    own dict, living no longer than the config) keeps each gradient's values converted once: converting every
    anchor on every evaluation cost evaluations x anchors (133 s for 16,000 layers of one anchor each).
    """
    wrapped = isinstance(setting, dict)
    if wrapped:
        setting = [setting]
    if _is_scalar(setting):
        return coerce(setting, kind)
    if not setting:
        return None
    if memo is None or wrapped:  # (a wrapper made per call is no key: memo would keep every one)
        values = _gradient_values(setting, kind)
    else:
        hit = memo.get((id(setting), kind))
        if hit is None or hit[0] is not setting:  # (memo holds the list itself: its id is not reused meanwhile)
            hit = memo[(id(setting), kind)] = (setting, _gradient_values(setting, kind))
        values = hit[1]
    if values is not None:
        return _interpolate(values, t, kind)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, kind, memo)
    return None


def _gradient_values(setting, kind: type) -> Optional[list]:
    """A gradient's anchors as `kind` (an anchor that is not one raises), or None for a list of conditions."""
    return [coerce(e, kind) for e in setting] if all(_is_scalar(e) for e in setting) else None


def _interpolate(values: list, t: float, kind: type):
    """A gradient's value at layer position t: numbers interpolated between anchors, others picked."""
    if kind not in (float, int):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return coerce((1 - frac) * values[i0] + frac * values[i1], kind)


# mergekit 0.1.5 matches `filter:` against its architecture's names, not the checkpoint's: its JSON files' (Mixtral,
# Qwen3-MoE name only transformers 5's fused expert tensors) and, for a model type without one (its "auto" path), the
# names of transformers' own model, to which transformers' conversion_mapping.py renames and fuses a checkpoint's
# tensors. So with `filter: mlp`, Mixtral's block_sparse_moe.experts.N.w1 is an mlp tensor, and with `filter:
# gate_up_proj` so is Qwen2-MoE's mlp.experts.N.up_proj (it was not: an audit). The families below are those
# mappings' expert renames and fusions (transformers 5.25; glm4_moe and granitemoehybrid have JSON files naming the
# checkpoint's tensors, afmoe a class naming each expert; param2moe and sarvam_moe, whose mappings split a fused qkv
# into three tensors, are not here). And GPT-2's files name every tensor under `transformer.`, the unprefixed names of
# openai-community/gpt2's own checkpoint (h.0.attn.c_attn.weight) being aliases: `filter: transformer.h.1.` matches
# it. Patterns: re.sub, in order.
_FUSED_MLP_EXPERTS = ((r"mlp\.experts\.\d+\.(?:gate|up)_proj\.weight$", "mlp.experts.gate_up_proj"),
                      (r"mlp\.experts\.\d+\.down_proj\.weight$", "mlp.experts.down_proj"))
_MIXTRAL = ((r"\.block_sparse_moe\.", ".mlp."),
            (r"\.experts\.\d+\.w[13]\.weight$", ".experts.gate_up_proj"),
            (r"\.experts\.\d+\.w2\.weight$", ".experts.down_proj"))
_GRANITE_MOE = ((r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
                (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj"),
                (r"block_sparse_moe\.router\.layer\.weight$", "block_sparse_moe.router.weight"))
_FILTER_NAMES = {
    "gpt2": ((r"^(?=(?:wte|wpe|ln_f|h\.\d+)\.)", "transformer."),),
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2")},
    "phimoe": _MIXTRAL + ((r"\.gate\.weight$", ".router.weight"),),
    **{t: _FUSED_MLP_EXPERTS for t in (
        "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text", "qwen3_omni_moe_thinker",
        "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "hunyuan_v1_moe", "glm4_moe_lite",
        "glm4v_moe", "glm_moe_dsa", "longcat_flash", "mellum", "sarvam_mla", "solar_open", "cohere2_moe", "beam")},
    "mimo_v2_flash": _FUSED_MLP_EXPERTS + ((r"self_attn\.attention_sink_bias$", "self_attn.sinks"),),
    "minicpm5_moe": _FUSED_MLP_EXPERTS + ((r"self_attn\.q_proj\.", "self_attn.q_gate_proj."),),
    "qwen4_exp_text": ((r"^model\.language_model\.", "model."),) + _FUSED_MLP_EXPERTS,
    "lfm2_moe": ((r"feed_forward\.experts\.\d+\.w[13]\.weight$", "feed_forward.experts.gate_up_proj"),
                 (r"feed_forward\.experts\.\d+\.w2\.weight$", "feed_forward.experts.down_proj")),
    "nemotron_h": ((r"^backbone\.", "model."), (r"mixer\.experts\.\d+\.up_proj\.weight$", "mixer.experts.up_proj"),
                   (r"mixer\.experts\.\d+\.down_proj\.weight$", "mixer.experts.down_proj")),
    "ernie4_5_moe": _FUSED_MLP_EXPERTS + ((r"mlp\.moe_statics\.e_score_correction_bias$",
                                           "mlp.gate.moe_statics.e_score_correction_bias"),),
    "exaone_moe": _FUSED_MLP_EXPERTS + ((r"mlp\.e_score_correction_bias$", "mlp.gate.e_score_correction_bias"),),
    "qwen3_5_moe_text": ((r"^model\.language_model\.", "model."),) + _FUSED_MLP_EXPERTS,
    "jamba": ((r"feed_forward\.experts\.\d+\.(?:gate|up)_proj\.weight$", "feed_forward.experts.gate_up_proj"),
              (r"feed_forward\.experts\.\d+\.down_proj\.weight$", "feed_forward.experts.down_proj")),
    **{t: _GRANITE_MOE for t in ("granitemoe", "granitemoeshared")},
}


def filter_name(tensor_name: str, model_type: Optional[str]) -> str:
    """The name a `filter:` is matched against: the tensor's, or as mergekit names it (_FILTER_NAMES): for a model
    type it reads as fused experts, the fused tensor it belongs to (model.layers.0.block_sparse_moe.experts.3.w1
    .weight -> model.layers.0.mlp.experts.gate_up_proj); GPT-2's h.1.ln_1.weight -> transformer.h.1.ln_1.weight."""
    for pattern, name in _FILTER_NAMES.get(model_type, ()) if isinstance(model_type, str) else ():
        tensor_name = re.sub(pattern, name, tensor_name)
    return tensor_name


def resolve_params(value: Setting, tensor_name: str, n_layers=None, kind: type = float):
    """One setting's value for one tensor: t from the tensor's layer index (see layer_t)."""
    return evaluate_setting(value, tensor_name, layer_t(tensor_name, n_layers), kind)


def resolve_one(name: str, scopes: Iterable[Optional[Mapping[str, Setting]]], tensor_name: str, t: float,
                kind: type = float, memo: Optional[dict] = None):
    """The first scope (highest precedence first) whose setting for ``name`` yields a value (memo: see
    evaluate_setting)."""
    for scope in scopes:
        if scope and name in scope:
            v = evaluate_setting(scope[name], tensor_name, t, kind, memo)
            if v is not None:
                return v
    return None


# ---- layers ----------------------------------------------------------------------------------
# The first ".layers.N." / ".h.N." / ".blocks.N." (and BERT's ".layer.N.", T5's ".block.N.") in a
# name; the part before N names the stack.
_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block))\.(\d{1,18})\.")  # longer: not a layer index


def layer_of(tensor_name: str) -> Optional[Tuple[str, int]]:
    """(stack prefix, layer index) for a tensor inside a layer stack, else None."""
    m = _LAYER_RE.match(tensor_name)
    return (m.group(1), int(m.group(2))) if m else None


def layer_stacks(names: Iterable[str]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(layers, tensors) per stack prefix: its max layer index + 1, and how many tensors it holds."""
    layers: Dict[str, int] = {}
    tensors: Dict[str, int] = {}
    for n in names:
        li = layer_of(n)
        if li:
            layers[li[0]] = max(layers.get(li[0], 0), li[1] + 1)
            tensors[li[0]] = tensors.get(li[0], 0) + 1
    return layers, tensors


def main_stack(layers: Dict[str, int], tensors: Dict[str, int], num_hidden_layers: Optional[int]) -> str:
    """The stack config.json's num_hidden_layers counts: the one with as many layers, else the one with the
    most tensors. In a vision-language model the vision tower can hold more tensors than the text stack
    (Qwen2-VL: 32 x 12 against 28 x 12): taken as the main stack, its blocks got the text's positions."""
    return max(tensors, key=lambda p: (layers[p] == num_hidden_layers, tensors[p]))


def count_layers(names: Iterable[str], num_hidden_layers: Optional[int] = None,
                 config_path: Optional[str] = None) -> Dict[str, int]:
    """Layers per stack: max index + 1, except the main stack (main_stack) takes config.json's
    num_hidden_layers when given (mergekit counts layers from the config). With config_path (the file that
    count comes from; given where a gradient setting uses the positions), a count above the layers the tensors
    hold is refused: gradient weights were placed for it (layer 1 of 2 got t = 0.001 for a config saying 1000).
    Fewer is allowed: DeepSeek-V3 keeps a multi-token-prediction block past its num_hidden_layers, which counts
    the positions as mergekit does. Without gradients the count is unused and not checked: LongCat-Flash's
    config counts two sublayers per stored layer (56 for 28)."""
    layers, tensors = layer_stacks(names)
    if num_hidden_layers and tensors:
        n = int(num_hidden_layers)
        stack = main_stack(layers, tensors, n)
        if config_path is not None and n > layers[stack]:
            raise CheckpointError(f"{config_path}: num_hidden_layers is {n}, but the checkpoints hold {layers[stack]} "
                                  f"layers ({stack}.0 to {stack}.{layers[stack] - 1}); fix the config or the checkpoints")
        layers[stack] = n
    return layers


def layer_t(tensor_name: str, n_layers: Union[None, int, Mapping[str, int]] = None) -> float:
    """The gradient position of a tensor: layer / (L - 1) inside a stack of L layers (1 when L = 1),
    0 outside any stack. n_layers: L, or {stack prefix: L} from count_layers, or None (t = 0)."""
    li = layer_of(tensor_name)
    if li is None or n_layers is None:
        return 0.0
    prefix, idx = li
    L = n_layers.get(prefix) if isinstance(n_layers, Mapping) else n_layers
    if not L:
        return 0.0
    if L <= 1:
        return 1.0
    return min(1.0, idx / (L - 1))  # indices past L (extra layers) clamp to the last position


# ---- parameters against a method -------------------------------------------------------------
def check_method_params(cfg: MergeConfig, method, inputs: Sequence[ModelSpec], params_where: str = "parameters",
                        model_wheres: Optional[Sequence[str]] = None) -> None:
    """Names and value types of every setting, against the method's declared parameters. params_where and
    model_wheres (one per model): where the config holds cfg.parameters and each model's (a slice's own)."""
    model_params, global_params = method.model_params, method.global_params
    known = sorted(set(model_params) | set(global_params))
    ignored: Dict[str, List[str]] = {}  # a parameter the method does not take -> where: one warning for each

    def check(scope, where, allow_global: bool):
        for name, setting in scope.items():
            if name not in model_params and name not in global_params:
                # mergekit ignores a parameter its method does not take: configs carry a weight for every model
                # whatever the method, other methods' parameters (normalize under sce), older ones; ignored with a
                # warning. A near miss of one (wieght, desnity: mergekit's default would stand in) is refused
                near = [] if name in MERGE_PARAMETERS else _near_miss(name, set(known) | set(MERGE_PARAMETERS))
                if near:
                    raise MergeConfigError(cfg.where(f"{where}: unknown parameter {short(name)} for merge_method "
                                                     f"{method.name} (did you mean {near[0]!r}? known: "
                                                     f"{', '.join(known) or 'none'})"))
                ignored.setdefault(name, []).append(where)
                continue
            if name not in model_params and not allow_global:
                cfg.warnings.append(f"{where}: {name} is a global parameter of {method.name}; set it under the "
                                    f"top-level parameters (a per-model value is ignored, as in mergekit)")
            spec = model_params.get(name) or global_params.get(name)
            kind = kind_of(spec)
            for leaf, leaf_where in _leaves(setting, f"{where}.{name}"):
                try:
                    coerce(leaf, kind)
                except ValueError as exc:
                    raise MergeConfigError(cfg.where(f"{leaf_where}: {exc}")) from None

    check(cfg.parameters, params_where, True)
    for i, m in enumerate(cfg.models):
        check(m.parameters, model_wheres[i] if model_wheres else f"models[{i}] ({m.path}).parameters", False)
    for name, wheres in ignored.items():
        more = f" and {len(wheres) - 1} more" if len(wheres) > 1 else ""
        what = f"takes no {name}" if name in MERGE_PARAMETERS else \
            f"takes no parameter {short(name)} (nor does any method)"
        cfg.warnings.append(f"{wheres[0]}{more}: merge_method {method.name} {what}; it is ignored, as in mergekit")


def _leaves(setting, where):
    if _is_scalar(setting):
        yield setting, where
    elif isinstance(setting, dict):
        yield from _leaves(setting["value"], f"{where}.value")
    else:
        for j, e in enumerate(setting):
            yield from _leaves(e["value"] if isinstance(e, dict) else e, f"{where}[{j}]")


class ParamResolver:
    """Resolves a method's parameters for every tensor of a merge, caching by layer position when
    no setting has filters (then values depend on t only)."""

    def __init__(self, cfg: MergeConfig, method, inputs: Sequence[ModelSpec], model_type: Optional[str] = None):
        self.cfg, self.method, self.inputs, self.model_type = cfg, method, list(inputs), model_type
        scopes = [cfg.parameters] + [m.parameters for m in self.inputs]
        self._by_name = any(_has_filter(s) for scope in scopes for s in scope.values())
        self._cache: Dict[float, Tuple[Dict[str, Any], List[Dict[str, Any]]]] = {}
        self._gradients: dict = {}  # each gradient's values, converted once (evaluate_setting's memo)

    def __call__(self, tensor_name: str, t: float) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        if not self._by_name and t in self._cache:
            g, per = self._cache[t]
            return dict(g), [dict(p) for p in per]
        seen = filter_name(tensor_name, self.model_type) if self._by_name else tensor_name
        g = {name: self._value(name, spec, [self.cfg.parameters], tensor_name, seen, t, None)
             for name, spec in self.method.global_params.items()}
        per = [{name: self._value(name, spec, [m.parameters, self.cfg.parameters], tensor_name, seen, t, m)
                for name, spec in self.method.model_params.items()} for m in self.inputs]
        if not self._by_name:
            self._cache[t] = (g, per)
            return dict(g), [dict(p) for p in per]
        return g, per

    def _value(self, name, spec, scopes, tensor_name, seen, t, model: Optional[ModelSpec]):
        v = resolve_one(name, scopes, seen, t, kind_of(spec), self._gradients)
        if v is not None:
            return v
        if spec.required:
            who = f"model {model.path}" if model is not None else "the merge"
            # (a merge-wide parameter set in a model's parameters is ignored: that advice led back here; an audit)
            where = ("the model's parameters or the top-level parameters" if model is not None else
                     "the top-level parameters: it is the merge's, not a model's")
            raise MergeConfigError(self.cfg.where(f"no value of required parameter {short(name)} for {who} at "
                                                  f"tensor {tensor_name} (set it in {where})"))
        return spec.default


def unmatched_filters(scopes: Iterable[Mapping[str, Setting]], names: Sequence[str],
                      params: Optional[Iterable[str]] = None) -> List[Tuple[str, str]]:
    """(parameter, `filter:` string) of these parameter scopes (of the parameters named, or all) where no name
    (as filter_name gives it) contains the filter."""
    found: List[Tuple[str, str]] = []
    params = None if params is None else set(params)
    for scope in scopes:
        for key, setting in (scope or {}).items():
            if params is not None and key not in params:
                continue
            for cond in [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else ():
                f = cond.get("filter") if isinstance(cond, dict) else None  # (a condition's value holds none)
                if isinstance(f, str) and f != "*" and (key, f) not in found:
                    found.append((key, f))
    return [(key, f) for key, f in found if not any(f in n for n in names)]


def unmatched_filter_warnings(scopes: Iterable[Mapping[str, Setting]], names: Sequence[str]) -> List[str]:
    """A warning per `filter:` of these scopes that no name (as filter_name gives it) contains: a typo, likely."""
    return [unmatched_filter_warning(key, f, names) for key, f in unmatched_filters(scopes, names)]


def unmatched_filter_warning(param: str, f: str, names: Sequence[str]) -> str:
    return f"filter {f!r} of {param} matches no tensor it applies to (names such as {names[len(names) // 2]!r}); " \
        "its values there are never used"


def uses_positions(cfg: MergeConfig) -> bool:
    """Whether any setting is a gradient (a list of values over the layers), whose values depend on each tensor's
    layer position and so on the layer count."""
    def gradient(setting) -> bool:
        if isinstance(setting, dict):
            return gradient(setting["value"])
        return isinstance(setting, list) and any(not isinstance(e, dict) or gradient(e["value"]) for e in setting)
    return any(gradient(s) for scope in [cfg.parameters] + [m.parameters for m in cfg.models] for s in scope.values())


def _has_filter(setting) -> bool:
    if isinstance(setting, dict):
        return True
    return isinstance(setting, list) and any(isinstance(e, dict) for e in setting)


def check_paths(cfg: MergeConfig) -> None:
    """Every referenced model exists locally (pymerge reads local checkpoints only)."""
    refs = ([("base_model", cfg.base_model)] if cfg.base_model else []) + \
        [(f"models[{i}]", m.path) for i, m in enumerate(cfg.models)]
    if cfg.sliced is not None:
        refs += cfg.sliced.model_refs()
    if cfg.tokenizer is not None and cfg.tokenizer.source not in ("base", "union"):
        refs.append((cfg.tokenizer.key, cfg.tokenizer.source))  # was "nothere/tokenizer.json: not found"
    for where, p in refs:
        if os.path.exists(p):
            continue
        why = unencodable(p)  # (exists() said False: "model path not found" for a folder that is there)
        if why is not None:
            raise MergeConfigError(cfg.where(f"{where}: {why}"))
        from pymerge import hub, lora
        try:
            missing = lora.missing_side(p)
        except MergeConfigError as exc:
            raise MergeConfigError(cfg.where(f"{where}: {exc}")) from None
        if missing:
            raise MergeConfigError(cfg.where(f"{where}: {missing}"))
        if lora.split_ref(p)[1] is not None:
            continue
        if hub.looks_like_id(p):
            try:
                hub.resolve(p)
            except MergeConfigError as exc:  # (a local folder given a revision: said so, not "download it")
                raise MergeConfigError(cfg.where(f"{where}: {hub.revision_on_folder(p) or exc}")) from None
        # ({path: ./m, revision: main}: the error said ./m@main is missing)
        raise MergeConfigError(cfg.where(f"{where}: {hub.revision_on_folder(p) or f'model path not found: {_shown(p)}'}"))
