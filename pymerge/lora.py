"""`model+lora` references (mergekit 0.1.5): a PEFT LoRA adapter applied to its model, per tensor.

mergekit loads the model with transformers, applies the adapter with peft's merge_and_unload and
saves a merged copy it then merges. pymerge computes the same weights lazily while it streams:
each targeted weight is W + scale * (B @ A) (transposed for Conv1D layers and embeddings, as peft decides),
in float32 and rounded once to the tensor's dtype, exactly peft's arithmetic; every other tensor is
the model's own. scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with r and alpha
per module from rank_pattern / alpha_pattern as peft matches them. The merged copy keeps the
model's dtypes (transformers 5 loads with dtype "auto"; each tensor its own where a checkpoint mixes
them, where that load casts all to config.json's), or all takes --lora-merge-dtype. A LoRA on the
output head of a model that stores none (its head is its input embedding) lands on that shared weight,
after the embedding's own LoRA, as peft's merge does.

What changes more than these weights (DoRA, modules_to_save, LoRA biases, trainable tokens, layer
replication, convolution LoRA, ...) is refused with a one-line reason naming the adapter file.
"""
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pymerge.errors import CheckpointError, MergeConfigError, short
from pymerge.io.checkpoint import Checkpoint, open_tensor_file, read_model_config
from pymerge.io.files import read_json
from pymerge.io.safetensors_file import TensorInfo
from pymerge.methods.base import MAX_MAGNITUDE

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# base_layer.weight: a full copy of a targeted embedding or lm_head, which peft saves (save_embedding_layers)
# and loads over the model's own before merging
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                  r"|base_layer\.weight)")
# adapter_config.json settings that change more than W + scale * B @ A: (key, value that is fine)
_REFUSED = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "modules_to_save (whole replaced modules)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on bare parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


def split_ref(ref: str) -> Tuple[str, Optional[str]]:
    """(model, adapter or None) of a reference; a path that exists as given is never split. With more than one
    '+' (a path holding one: {model: {path: runs/a+b}, lora: ...}), the one split whose two sides are there."""
    if os.path.exists(ref) or "+" not in ref:
        return ref, None
    parts = ref.split("+")
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    from pymerge import hub
    there = lambda p: os.path.exists(p) or hub.looks_like_id(p)  # noqa: E731
    splits = [("+".join(parts[:i]), "+".join(parts[i:])) for i in range(1, len(parts))]
    found = [(m, a) for m, a in splits if m and a and there(m) and there(a)]
    if not found:  # the adapter not there: split after the model that is (missing_side then names the adapter),
        # unless what follows is several adapters that are (MODEL+LORA+LORA)
        found = [(m, a) for m, a in splits if m and a and there(m) and not all(map(there, a.split("+")))]
    if len(found) != 1:
        raise MergeConfigError(f"model {ref}: cannot parse: a reference is MODEL or MODEL+LORA"
                               + (" (more than one '+' splits it into a model and an adapter)" if found else ""))
    return found[0]


def resolve_ref(ref: str) -> str:
    """The reference with each side's cached hub ID replaced by its snapshot folder."""
    from pymerge import hub
    model, adapter = split_ref(ref)
    if adapter is None:
        return hub.resolve_if_cached(ref)
    return f"{hub.resolve_if_cached(model)}+{hub.resolve_if_cached(adapter)}"


def ref_from_mapping(value: dict, where: str) -> str:
    """mergekit's mapping form {model: PATH | {path, revision}, lora: ...} as a MODEL[+LORA] string."""
    extra = set(value) - {"model", "lora"}
    if extra:
        raise MergeConfigError(f"{where}: {short(sorted(extra)[0])} is not supported (a model is given by "
                               f"'model' and optionally 'lora')")
    sides = [_path_of(value.get("model"), f"{where}.model")]
    if value.get("lora") is not None:
        sides.append(_path_of(value["lora"], f"{where}.lora"))
    return "+".join(sides)


def _path_of(value, where: str) -> str:
    if isinstance(value, dict):
        if set(value) - {"path", "revision"} or not isinstance(value.get("path"), str) or not value["path"]:
            raise MergeConfigError(f"{where}: expected a path string or {{path, revision}}, got {short(value)}")
        rev = value.get("revision")
        if rev is not None and (not isinstance(rev, str) or not rev):
            raise MergeConfigError(f"{where}.revision must be a string, got {short(rev)}")
        return value["path"] + (f"@{rev}" if rev else "")
    if not isinstance(value, str) or not value:
        raise MergeConfigError(f"{where} must be a path string, got {short(value)}")
    return value


def missing_side(ref: str) -> Optional[str]:
    """A one-line reason when a MODEL+LORA reference's model or adapter is not there, else None."""
    from pymerge import hub
    model, adapter = split_ref(ref)
    if adapter is None:
        return None
    for what, p in (("model", model), ("LoRA adapter", adapter)):
        if not os.path.exists(p):
            if hub.looks_like_id(p):
                try:
                    hub.resolve(p)
                except MergeConfigError as exc:  # (a local folder given a revision: said so, not "download it")
                    return f"{ref}: {what}: {hub.revision_on_folder(p) or exc}"
            on_folder = hub.revision_on_folder(p)
            if on_folder:
                return f"{ref}: {what}: {on_folder}"
            one = " (a reference is MODEL or MODEL+LORA: one adapter)" if "+" in p and what != "model" else ""
            return f"{ref}: {what} path not found: {p}{one}"
    return None


def open_model(ref: str, lora_dtype: Optional[str] = None):
    """A Checkpoint, or for MODEL+LORA the model with the adapter applied (LoraCheckpoint)."""
    model, adapter = split_ref(ref)
    if adapter is None:
        return _checkpoint(ref)
    ck, opened = _checkpoint(model), None
    try:
        opened = Adapter(adapter)
        return LoraCheckpoint(ck, opened, lora_dtype)
    except BaseException:
        if opened is not None:
            opened.close()
        ck.close()
        raise


def _checkpoint(path: str) -> Checkpoint:
    """Checkpoint(path); a snapshot of the hub cache that cannot be read is named by its model ID too (the error
    named only the cache's path, for a model written org/name@rev)."""
    try:
        return Checkpoint(path)
    except CheckpointError as exc:
        from pymerge import hub
        name = hub.id_of(path)
        if name is None:
            raise
        raise CheckpointError(f"model {name}@{Path(path).name[:12]} (from the Hugging Face cache): {exc}") from None


@dataclass
class _Target:
    a_key: str
    b_key: str
    scale: float
    transpose: bool  # fan_in_fan_out layers and embeddings hold W as (in, out)
    embedding: bool
    base_copy: Optional[str] = None  # the adapter's own copy of W (base_layer.weight), used instead


class Adapter:
    """A PEFT LoRA adapter folder: its config checked, its tensors open (read lazily)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: a LoRA adapter is a folder with {CONFIG_NAME}")
        self.config_path = self.folder / CONFIG_NAME
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.folder}: no {CONFIG_NAME}: not a PEFT adapter")
        weights = next((self.folder / n for n in WEIGHT_NAMES if (self.folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{self.folder}: no {' or '.join(WEIGHT_NAMES)}")
        self.config = _read_config(self.config_path)
        self.file = open_tensor_file(weights)
        try:
            self.targets = self._targets()
        except BaseException:
            self.file.close()
            raise

    def _targets(self) -> Dict[str, _Target]:
        """{weight tensor name in the model: how to apply}, from the adapter file's keys."""
        parts: Dict[str, Dict[str, str]] = {}
        for key in self.file.names():
            m = _KEY.fullmatch(key[len(_PREFIX):]) if key.startswith(_PREFIX) else None
            if m is None:
                raise CheckpointError(f"{self.file.path}: tensor {key!r}: not a LoRA A/B weight "
                                      f"(base_model.model.<module>.lora_A.weight / lora_B.weight); "
                                      f"pymerge applies plain LoRA adapters only")
            parts.setdefault(m["module"], {})[m["part"]] = key
        cfg = self.config
        targets = {}
        for module, got in parts.items():
            copy = got.pop("base_layer.weight", None)
            if not got:
                raise CheckpointError(f"{self.file.path}: tensor {copy!r}: a saved base layer without LoRA weights")
            embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
            a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            if set(got) != {a, b}:
                have = ", ".join(sorted(got))
                raise CheckpointError(f"{self.file.path}: module {module!r} has {have} but not both {a} and {b}")
            r = _pattern_value(cfg["rank_pattern"], module, cfg["r"], "rank_pattern", self.config_path)
            alpha = _pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"], "alpha_pattern", self.config_path)
            if r <= 0:
                raise CheckpointError(f"{self.config_path}: module {module!r}: rank r = {r} must be positive")
            ia, ib = self.file.info(got[a]), self.file.info(got[b])
            if len(ia.shape) != 2 or len(ib.shape) != 2:
                raise CheckpointError(f"{self.file.path}: tensor {got[a]!r}: shape {list(ia.shape)}; pymerge "
                                      f"applies LoRA to linear layers and embeddings only (not convolutions)")
            if ia.shape[0] != r or ib.shape[1] != r:
                raise CheckpointError(f"{self.file.path}: module {module!r}: A {list(ia.shape)} and B "
                                      f"{list(ib.shape)} do not have rank r = {r} of {CONFIG_NAME}")
            scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            transpose = embedding or bool(cfg["fan_in_fan_out"])
            targets[module + ".weight"] = _Target(got[a], got[b], scale, transpose, embedding, copy)
        if not targets:  # (peft merges it as the model itself, exit 0: a wrong save, found only in evaluation)
            raise CheckpointError(f"{self.file.path}: holds no LoRA weights; applied, it would leave the model as "
                                  "it is")
        return targets

    def delta(self, name: str, dtype=None):
        """scale * (B @ A) of one weight, float32 or `dtype` (peft's get_delta_weight: float32, or float64 where
        the base layer is float64, peft's LoRA layers taking its dtype)."""
        import torch
        t = self.targets[name]
        a, b = (self.file.tensor(k).to(dtype or torch.float32) for k in (t.a_key, t.b_key))
        d = (b @ a).mul_(t.scale)  # in place: the product is ours, the bits are the same
        # a NaN or inf in A or B (a diverged training) made the whole weight NaN, exit 0, where a NaN lora_alpha
        # is refused: one reduction over the delta, against the matmul that made it
        if not bool(torch.isfinite(d).all()):
            bad = [k for k in (t.a_key, t.b_key) if not bool(torch.isfinite(self.file.tensor(k)).all())]
            why = f"its tensor {bad[0]!r} holds NaN or inf" if bad else "its B @ A overflows"
            raise CheckpointError(f"{self.file.path}: the LoRA delta of {name!r} is not finite ({why}); applied, "
                                  "it would make that weight NaN or inf")
        return d.T if t.transpose else d

    def delta_shape(self, name: str, transpose: Optional[bool] = None) -> Tuple[int, int]:
        t = self.targets[name]
        rows, cols = self.file.info(t.b_key).shape[0], self.file.info(t.a_key).shape[1]
        return (cols, rows) if (t.transpose if transpose is None else transpose) else (rows, cols)

    @property
    def files(self) -> List[Path]:
        return [self.config_path, self.file.path]

    def close(self) -> None:
        self.file.close()


def _read_config(path: Path) -> dict:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {short(kind)}: only LoRA adapters can be applied")
    for key, what in _REFUSED.items():
        if cfg.get(key) not in (None, False, [], {}, 0):
            raise CheckpointError(f"{path}: {key}: {what} are not supported by pymerge's LoRA application")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias {short(cfg['bias'])}: trained biases are not supported "
                              f"(only bias 'none')")
    init = cfg.get("init_lora_weights", True)
    # (peft's LoRA-GA rewrites the base as PiSSA, OLoRA and CorDA do: "lora_ga".split("_")[0] let it through)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise CheckpointError(f"{path}: init_lora_weights {init!r} changes the base weights; not supported")
    # MiCA's merge rounds every delta to W's dtype before adding it (peft's MiCA variants), as plain LoRA
    # does for embeddings only
    out = {"rounds_delta": isinstance(init, str) and init.lower() == "mica"}
    for key, default in (("r", 8), ("lora_alpha", 8)):
        v = cfg.get(key, default)
        if not _number(v):
            raise CheckpointError(f"{path}: {key} must be a number of size at most {MAX_MAGNITUDE:g}, got {short(v)}")
        out[key] = v
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise CheckpointError(f"{path}: {key} must map module patterns to numbers, got {short(v)}")
        for pattern, x in v.items():  # a NaN or 1e308 here made a NaN or inf weight, exit 0
            if not _number(x):
                raise CheckpointError(f"{path}: {key}: pattern {short(pattern)} must map to a number of size at most "
                                      f"{MAX_MAGNITUDE:g}, got {short(x)}")
        out[key] = v
    for key in ("use_rslora", "fan_in_fan_out"):
        v = cfg.get(key)
        v = False if v is None else v  # (null: false, as peft reads it)
        if not isinstance(v, bool):
            raise CheckpointError(f"{path}: {key} must be true or false, got {short(v)}")
        out[key] = v
    return out


# transformers' Conv1D layers (weights stored (in, out)): peft merges these transposed and every nn.Linear
# not, whatever fan_in_fan_out its config says (it sets the flag per layer, so a GPT-2 adapter on c_proj
# and lm_head is saved with false).
_CONV1D_MODELS = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "jais", "btlm")
_CONV1D_LAYERS = ("c_attn", "c_proj", "c_fc", "c_fc2", "q_attn")  # c_fc2: Jais's and BTLM's gated MLP


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Two tensors' bytes equal, compared in 16 MiB chunks (bounded memory over large embeddings)."""
    a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    b = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    if a.size != b.size:
        return False
    step = 1 << 24
    return all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.size, step))


def _is_head(name: str) -> bool:
    from pymerge.tied import is_head
    return is_head(name)


def _ties_embeddings(ck) -> bool:
    """config.json says tie_word_embeddings: true (peft then merges the head's LoRA into the embedding)."""
    cfg = read_model_config(ck)
    return isinstance(cfg, dict) and cfg.get("tie_word_embeddings") is True


def _model_type(ck) -> Optional[str]:
    cfg = read_model_config(ck)
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    return kind if isinstance(kind, str) else None


def _fan_in_fan_out(model_type: Optional[str], name: str, weight: tuple, lora: tuple, configured: bool) -> bool:
    """Whether a layer's LoRA is merged transposed, as peft decides it per layer: by the layer's type
    (the model's config names the architecture: Conv1D layers transposed, nn.Linear never, as peft resets
    the flag for it and refuses an adapter of the transposed shape), else (an unknown type) by which
    orientation the weight's shape fits, the adapter's fan_in_fan_out for a square one."""
    if model_type in _CONV1D_MODELS:
        return name.rsplit(".", 2)[-2] in _CONV1D_LAYERS
    if model_type is not None:
        return False
    if weight == lora and weight != lora[::-1]:
        return False
    if weight == lora[::-1] and weight != lora:
        return True
    return configured


def _number(v) -> bool:
    """A finite int or float no larger than merge coefficients may be (methods.base.MAX_MAGNITUDE)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_MAGNITUDE


def _pattern_value(patterns: dict, module: str, default, key: str, path: Path):
    """peft's get_pattern_key: the first pattern p with module matching (.*\\.)?(p)$."""
    for p in patterns:
        try:
            if _backtracks(p):
                raise CheckpointError(f"{path}: {key}: pattern {short(p)} nests or chains repetition ((a+)+, (a|aa)*, "
                                      f".*.*.*.*): matching it can take exponential time; name the modules instead")
            if re.match(rf"(.*\.)?({p})$", module):
                return patterns[p]
        except (re.error, RecursionError) as exc:  # (thousands of nested groups: the parser's recursion)
            why = exc if isinstance(exc, re.error) else "nested too deeply"
            raise CheckpointError(f"{path}: {key}: pattern {short(p)} is not a regular expression: {why}") from None
    return default


try:  # the parser re compiles with (sre_parse before Python 3.11)
    from re import _parser as _re_parser
except ImportError:  # pragma: no cover
    import sre_parse as _re_parser


@functools.lru_cache(maxsize=256)
def _backtracks(pattern: str) -> bool:
    """Whether a regex can backtrack catastrophically on a module name. Its choice points (a repeat of variable
    count, ? included, and an alternation) multiply: refused, one inside a repeat of more than one pass
    (exponential: "(.*.*)*!" ran for minutes on a 31-character name, as in peft; "(?:.?){24}!" seconds) and more
    than three in all (polynomial of that degree or exponential, plus the prefix's own). An adapter's patterns are
    module names and simple wildcards."""
    choices = 0

    def walk(sub, inside: bool) -> bool:
        nonlocal choices
        for op, av in sub:
            name = str(op)
            repeat = name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
            if (repeat and av[0] != av[1]) or name == "BRANCH":
                choices += 1
                if inside or choices > 3:
                    return True
            if repeat:
                if walk(av[2], inside or av[1] > 1):
                    return True
                continue
            for x in av if isinstance(av, (tuple, list)) else (av,):
                parts = x if isinstance(x, list) else [x]
                if any(isinstance(y, _re_parser.SubPattern) and walk(y, inside) for y in parts):
                    return True
        return False

    return walk(_re_parser.parse(pattern), False)


class LoraCheckpoint:
    """A model with a LoRA adapter applied: Checkpoint's read interface, targeted weights computed
    when read (one tensor at a time: memory stays bounded by the largest LoRA'd weight, ~6 bytes per element
    of it in float32 temporaries)."""

    def __init__(self, ck: Checkpoint, adapter: Adapter, dtype: Optional[str] = None):
        from pymerge import _native
        self.ck, self.adapter = ck, adapter
        self.path, self.folder = ck.path, ck.folder
        self._dtype = dtype
        # adapter target -> the weight it lands on where that has another name: a tied model's head -> the embedding
        # it shares; a module under the model class's prefix -> the checkpoint's name without it (GPT-2's layout)
        self._onto: Dict[str, str] = {}
        # a tied model's stored head -> its embedding: one weight to peft, so the head is the merged embedding
        self._mirror: Dict[str, str] = {}
        model_type = _model_type(ck)
        copies = self._stored_copies()  # heads a tied model stores beside the embedding, equal to it
        for name in adapter.targets:
            if name not in ck or name in copies:
                name = self._elsewhere(name)
            weight = self._onto.get(name, name)
            target = adapter.targets[name]
            if not target.embedding:
                target.transpose = _fan_in_fan_out(model_type, name, tuple(ck.info(weight).shape),
                                                   adapter.delta_shape(name, transpose=False), target.transpose)
            shape, want = tuple(ck.info(weight).shape), adapter.delta_shape(name)
            if shape != want:
                raise CheckpointError(f"{adapter.file.path}: LoRA for {name!r} is {list(want)}, the weight in "
                                      f"{ck.path} is {list(shape)}")
            copy = adapter.targets[name].base_copy
            if copy and tuple(adapter.file.info(copy).shape) != shape:
                raise CheckpointError(f"{adapter.file.path}: tensor {copy!r} is {list(adapter.file.info(copy).shape)}"
                                      f", the weight in {ck.path} is {list(shape)}")
            if not _native.is_floating(ck.info(weight).dtype_name):
                raise CheckpointError(f"{ck.path}: tensor {weight!r} is {ck.info(weight).dtype_name}; LoRA applies "
                                      f"to floating-point weights")
        for head in copies:
            if self._deltas(copies[head]):
                self._mirror[head] = copies[head]

    @property
    def lora_dtype(self) -> Optional[str]:
        """The dtype the adapter is applied in (mergekit's --lora-merge-dtype), or None: each weight's own."""
        return self._dtype

    def _stored_copies(self) -> Dict[str, str]:
        """{head: embedding} for the heads a tied model (config tie_word_embeddings: true) stores as exact copies
        of its input embedding: transformers ties those (one weight, which peft's merge changes for both), and
        leaves a head that differs, in shape or in value, untied."""
        from pymerge.tied import input_embedding
        if not _ties_embeddings(self.ck):
            return {}
        embedding = input_embedding(self.ck)
        if embedding is None:
            return {}
        heads = [n for n in self.ck.names() if _is_head(n)]
        if not (embedding in self.adapter.targets or any(h in self.adapter.targets for h in heads)):
            return {}  # no LoRA on either: nothing to read
        info = self.ck.info(embedding)
        from pymerge.io.sigbus import MappingGuard
        with MappingGuard([self.ck]) as guard:  # a whole embedding read through the map: a cut is no SIGBUS
            copies = {h: embedding for h in heads if (self.ck.info(h).shape, self.ck.info(h).dtype_name) ==
                      (info.shape, info.dtype_name) and _same_bytes(self.ck.array(h), self.ck.array(embedding))}
            guard.check(sizes=True)
        return copies

    def _elsewhere(self, name: str) -> str:
        """A LoRA whose target the checkpoint stores under another name. On the output head of a model that
        stores none (its head is its input embedding), peft's merge_and_unload adds the head's delta to that
        shared weight, after the embedding's own. Under the model class's prefix where the checkpoint has none
        (openai-community/gpt2 stores h.0.attn.c_attn.weight, which transformers loads into GPT2LMHeadModel's
        transformer.h.0...: adapters name that; mergekit, loading through transformers, applies these, and they
        were refused: an audit). The reverse (an adapter without the prefix on a checkpoint with it) stays
        refused: peft finds no such module there and merges nothing."""
        from pymerge.tied import input_embedding, is_head
        embedding = input_embedding(self.ck) if is_head(name) else None
        weight = embedding if embedding is not None else self._unprefixed(name)
        if weight is None:
            raise CheckpointError(f"{self.adapter.file.path}: LoRA for {name!r}, which {self.ck.path} does not have")
        self._onto[name] = weight
        return name

    def _unprefixed(self, name: str) -> Optional[str]:
        """The stored weight an adapter target names under a leading prefix the checkpoint lacks, or None (also
        where the adapter names that weight itself: one delta per weight, as peft merges)."""
        first, _, rest = name.partition(".")
        if rest and rest in self.ck and rest not in self.adapter.targets \
                and not any(n.startswith(first + ".") for n in self.ck.names()):
            return rest  # the adapter's model wraps the stored one (transformer.h.0... for h.0...)
        return None

    def names(self) -> List[str]:
        return self.ck.names()

    def __contains__(self, name) -> bool:
        return name in self.ck

    def __len__(self) -> int:
        return len(self.ck)

    def info(self, name: str) -> TensorInfo:
        i = self.ck.info(name)
        if not self._changes(name):
            return i
        from pymerge import _native
        dtype = self._dtype or i.dtype_name
        size = _native.itemsize(dtype)
        return TensorInfo(name, dtype, i.shape, int(np.prod(i.shape, dtype=np.int64)) * size, -1)

    def _deltas(self, name: str) -> List[str]:
        """The adapter targets whose deltas land on weight `name`, in peft's merge order: its own, then a
        tied head's (the head shares this weight)."""
        if name in self._mirror:
            return self._deltas(self._mirror[name])
        from pymerge.tied import is_head
        own = [name] if name in self.adapter.targets else []
        # its own under a prefix the checkpoint lacks (GPT-2's transformer.wte for wte) before a head's: in the
        # adapter's (sorted) order lm_head came first, one rounding off peft on a third of wte's elements (an audit)
        return own + sorted((h for h, e in self._onto.items() if e == name), key=is_head)

    def _changes(self, name: str) -> bool:
        if self._deltas(name):
            return True
        from pymerge import _native
        have = self.ck.info(name).dtype_name  # --lora-merge-dtype casts floating tensors, as transformers does
        return self._dtype is not None and have != self._dtype and _native.is_floating(have)

    def tensor(self, name: str):
        if not self._changes(name):
            return self.ck.tensor(name)
        import torch
        from pymerge import _native
        dtype = _native.torch_dtype(self._dtype or self.ck.info(name).dtype_name)
        if name in self._mirror:  # a tied model's stored head: the merged shared weight, in the head's dtype
            return self.tensor(self._mirror[name]).to(dtype)
        deltas = self._deltas(name)
        if not deltas:
            return self.ck.tensor(name).to(dtype)
        # W as peft loads it: the adapter's saved copies of the layers load over the shared weight in order
        # (the embedding's, then the head's: the last one stays)
        copies = [self.adapter.targets[t].base_copy for t in deltas if self.adapter.targets[t].base_copy]
        w = (self.adapter.file.tensor(copies[-1]) if copies else self.ck.tensor(name)).to(dtype)  # loads in dtype
        if w.dtype.itemsize == 1:  # scaled fp8 checkpoints keep scales beside the weight, which this ignores
            raise CheckpointError(f"{self.adapter.file.path}: LoRA on the float8 weight {name!r} is not supported "
                                  "(a float8 checkpoint's values need its scales); merge the LoRA into a 16-bit copy")
        wide = torch.float64 if w.dtype == torch.float64 else torch.float32  # peft's arithmetic for this W
        for target in deltas:  # merged in module order: the embedding, then the head
            delta = self.adapter.delta(target, wide)
            if self.adapter.targets[target].embedding or self.adapter.config["rounds_delta"]:
                delta = delta.to(dtype).to(wide)  # peft rounds an embedding's (and MiCA's) delta to W's dtype first
            # W + delta in float32 (W upcast exactly; float64 for a float64 W, whose LoRA peft holds in float64),
            # into the delta, which is ours: the same bits as w.to(wide) + delta without a copy of W (a bfloat16
            # weight took ~11 bytes per element)
            w = delta.add_(w).to(dtype).contiguous()  # contiguous: a transposed delta kept its strides
        return w

    def byte_view(self, name: str):
        if not self._changes(name):
            return self.ck.byte_view(name)
        import torch
        t = self.tensor(name)
        return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)

    def array(self, name: str) -> np.ndarray:
        if not self._changes(name):
            return self.ck.array(name)
        a = self.byte_view(name).numpy()
        a.flags.writeable = False
        return a

    def file_of(self, name: str) -> Path:
        return self.adapter.file.path if self._deltas(name) else self.ck.file_of(name)

    def prefetch(self, name: str) -> None:
        self.ck.prefetch(name)

    def release(self, name: str) -> None:
        self.ck.release(name)

    @property
    def shards(self) -> list:
        # the adapter's file too: it is mapped and read while merging, so the SIGBUS guard must cover it
        return self.ck.shards + [self.adapter.file]

    @property
    def files(self) -> List[Path]:
        return self.ck.files + self.adapter.files

    @property
    def index_file(self) -> Optional[Path]:
        return self.ck.index_file

    @property
    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.names())

    def check_unchanged(self, read: Sequence = ()) -> None:
        self.ck.check_unchanged(read)  # the model's folder: its side files are the output's

    def note_read(self, path) -> None:
        self.ck.note_read(path)

    def close(self) -> None:
        self.adapter.close()
        self.ck.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"LoraCheckpoint({str(self.path)!r} + {str(self.adapter.folder)!r}, {len(self.adapter.targets)} weights)"
