"""A tokenizer merge's part of planning: each model's vocabulary size, then the output vocabulary."""
import os
from typing import Callable, Dict, Sequence

from pymerge.errors import CheckpointError
from pymerge.tokenizer.vocab import PHI1_EMBEDDING, Vocabulary, build_vocabulary, is_vocab_tensor


def plan_vocabulary(cfg, models: Sequence[str], checkpoints, donor: str, read_config: Callable) -> Vocabulary:
    """models[i] is read from checkpoints[i]; read_config(checkpoint) gives its config.json or None."""
    sizes: Dict[str, int] = {}
    for m, ck in zip(models, checkpoints):
        sizes[m] = _vocab_size(read_config(ck) or {}) or _embedding_rows(m, ck)
    same = {os.path.realpath(m): m for m in reversed(models)}  # other spellings of a model: its label
    base = same.get(os.path.realpath(cfg.base_model)) if cfg.base_model else None
    vocab = build_vocabulary(cfg.tokenizer, list(dict.fromkeys(models)), same[os.path.realpath(donor)], base, sizes,
                             where=cfg.where)
    vocab.phi1 = all(PHI1_EMBEDDING in set(ck.names()) for ck in checkpoints)
    if cfg.chat_template is None:
        vocab.tokenizer.templates()  # written with it: a bad one is an error now, before any output
    return vocab


def _vocab_size(model_cfg: dict):
    """config.json's vocab_size (a multimodal model's text_config holds it)."""
    for c in (model_cfg, model_cfg.get("text_config")):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def vocab_size_override(model_cfg, overrides: dict, size: int) -> None:
    """Sets config.json's vocab_size to size in overrides, where transformers reads it (as mergekit's
    vocab_size_config_key): a multimodal model's text_config.vocab_size, whether the donor wrote that key
    or left it to its default (Gemma3), and the top level where the donor has one. A new top-level key
    beside a stale (or default) text_config one made transformers refuse the output."""
    model_cfg = model_cfg if isinstance(model_cfg, dict) else {}
    text = overrides.get("text_config", model_cfg.get("text_config"))  # slices may have rewritten it already
    nested = isinstance(text, dict)
    if nested:
        overrides["text_config"] = {**text, "vocab_size": size}
    if "vocab_size" in model_cfg or not nested:
        overrides["vocab_size"] = size


def _embedding_rows(label: str, ck) -> int:
    for name in ck.names():
        if is_vocab_tensor(name) and ck.info(name).shape:
            return ck.info(name).shape[0]
    raise CheckpointError(f"{label}: no vocab_size in config.json and no embedding tensor (embed_tokens, "
                          f"lm_head, ...) to count the vocabulary from")
