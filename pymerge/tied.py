"""Tied output heads (mergekit 0.1.5's `tied_names`).

A model that ties its output head (lm_head.weight) to its input embedding stores no head. Merged
with models that store one, it takes part in the head with its input embedding, as mergekit reads
it. When none of the models giving the head stores one, the output has no head either (mergekit
skips the optional weight). A `slices:` merge takes the head from the last slice's models and the
embedding from the first slice's, so either may be the tied one.

mergekit keeps the donor's config.json as it is, even where its tie_word_embeddings then
contradicts the tensors written (an untied config with no head loads a random head; a tied one
discards the merged head); pymerge sets tie_word_embeddings to what the tensors say there.
"""
from typing import List, Optional, Sequence

from pymerge.slices import RenamedCheckpoint, is_neox_head
from pymerge.tokenizer.vocab import is_vocab_tensor

# Output heads that mergekit's architectures tie to the input embedding.
HEAD_SUFFIXES = ("lm_head.weight", "lm_head.decoder.weight", "cls.predictions.decoder.weight",
                 "vocab_projector.weight")
HEAD_NAMES = ("output.weight",)


def is_head(name: str) -> bool:
    return name in HEAD_NAMES or any(name == s or name.endswith("." + s) for s in HEAD_SUFFIXES)


def input_embedding(ck) -> Optional[str]:
    """The model's input embedding (its first vocabulary tensor that is not a head), or None."""
    return embedding_of(ck.names(), lambda n: ck.info(n).shape)


def embedding_of(names: Sequence[str], shape_of) -> Optional[str]:
    """input_embedding over tensor names and a name -> shape function."""
    return next((n for n in names if is_vocab_tensor(n) and not is_head(n) and n.endswith("weight")
                 and not is_neox_head(n) and len(shape_of(n)) == 2), None)


def tied_embedding(names: Sequence[str], shape_of) -> Optional[str]:
    """The input embedding of a checkpoint that stores no output head (tied: the embedding is its head), or None."""
    if any(is_head(n) or is_neox_head(n) for n in names):
        return None
    return embedding_of(names, shape_of)


def head_source(ck, head: str) -> Optional[str]:
    """The tensor of ck that stands for output head `head`: the head itself, else (tied) the input
    embedding; None when ck has neither."""
    if head in ck:
        return head
    return input_embedding(ck) if is_head(head) else None


def heads_of(checkpoints: Sequence) -> List[str]:
    """Heads any of the checkpoints stores, in first-seen order."""
    return list(dict.fromkeys(n for ck in checkpoints for n in ck.names() if is_head(n)))


def with_tied_heads(checkpoints: Sequence) -> list:
    """The checkpoints, each lacking a head another one stores seen through a view that reads its
    input embedding there (a plain `models:` merge of tied and untied models)."""
    heads = heads_of(checkpoints)
    out = []
    for ck in checkpoints:
        alias = {h: head_source(ck, h) for h in heads if h not in ck}
        alias = {h: src for h, src in alias.items() if src is not None}
        out.append(RenamedCheckpoint(ck, {**{n: n for n in ck.names()}, **alias}, owned=True) if alias else ck)
    return out


def mixes_ties(checkpoints: Sequence) -> bool:
    """Whether some of the checkpoints store a head and others do not."""
    heads = heads_of(checkpoints)
    return bool(heads) and any(not any(h in ck for h in heads) for ck in checkpoints)


def tie_override(model_cfg: Optional[dict], out_names: Sequence[str], warnings: List[str]) -> dict:
    """config.json's tie_word_embeddings for the output tensors out_names, in a merge that mixes
    tied and untied models: {} where the donor's value already says so (else a warning too)."""
    heads = [n for n in out_names if is_head(n)]
    tied = not heads
    if not isinstance(model_cfg, dict) or model_cfg.get("tie_word_embeddings") == tied:
        return {}
    why = f"the output has {heads[0]}" if heads else "the models giving the output head store none (tied)"
    warnings.append(f"config.json: tie_word_embeddings set to {str(tied).lower()}: {why}; mergekit keeps the "
                    f"donor's value")
    return {"tie_word_embeddings": tied}



def masked_head_override(model_cfg: Optional[dict], tensors: Sequence, method, warnings: List[str]) -> dict:
    """config.json's tie_word_embeddings for a merge whose random masks (DARE, DELLA) are drawn per tensor name, of
    models whose config ties the head to the embedding yet stores it (many uploads keep a copy): the two merge to
    different values, and a loader that ties them by the config drops the merged head, where transformers 5 keeps
    it (an audit: logits 4 % apart, the top token differing at 12 % of positions). Set to false, with a warning,
    where a mask is drawn for them (a density below 1). tensors: the plan's (name, model_params)."""
    sparsification = getattr(method, "sparsification", None)  # a task-vector method's (torch is loaded then)
    if sparsification is None or not isinstance(model_cfg, dict) or model_cfg.get("tie_word_embeddings") is not True:
        return {}
    from pymerge.ops.task_vector_ops import SEEDED
    heads = [t.name for t in tensors if is_head(t.name)]
    drawn = any(float(mp.get("density", 1.0)) < 1 for t in tensors if is_head(t.name) or is_vocab_tensor(t.name)
                for mp in t.model_params)
    if sparsification not in SEEDED or not heads or not drawn:
        return {}
    warnings.append(f"config.json: tie_word_embeddings set to false: {method.name}'s random masks, drawn per "
                    f"tensor, give {heads[0]} other values than the input embedding it is tied to (the models store "
                    "it as a copy); mergekit keeps the donor's value")
    return {"tie_word_embeddings": False}


def head_unlike_embedding_override(model_cfg: Optional[dict], tensors: Sequence, warnings: List[str]) -> dict:
    """config.json's tie_word_embeddings where the models' config ties the head to the embedding yet stores it (a
    copy, as many uploads do), and the merge gives the two other sources (slices: the embedding the first slice's,
    the head the last's) or other parameters (a filter: weighting lm_head): they differ, so false, with a warning.
    Left true, a loader tying them by the config dropped the merged head (an audit: logits 0.8 apart; transformers
    5 warns and unties them). tensors: (TensorPlan, its sources' paths)."""
    from pymerge.tokenizer.vocab import is_vocab_tensor
    if not isinstance(model_cfg, dict) or model_cfg.get("tie_word_embeddings") is not True:
        return {}
    head = next(((tp, src) for tp, src in tensors if is_head(tp.name)), None)
    embedding = next(((tp, src) for tp, src in tensors if is_vocab_tensor(tp.name) and not is_head(tp.name)), None)
    if head is None or embedding is None or (head[1], head[0].params, head[0].model_params) == \
            (embedding[1], embedding[0].params, embedding[0].model_params):
        return {}
    warnings.append(f"config.json: tie_word_embeddings set to false: {head[0].name} is merged from other sources or "
                    f"parameters than the input embedding {embedding[0].name} it is tied to (the models store it as a "
                    "copy); mergekit keeps the donor's value")
    return {"tie_word_embeddings": False}
