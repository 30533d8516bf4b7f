"""The output vocabulary of a tokenizer merge, and where each model's embedding rows come from.

mergekit 0.1.5's semantics (mergekit/tokenizer/build.py and embed.py):

- The output tokenizer is the base model's (`base`; without a base_model, pymerge takes the first
  model, mergekit an arbitrary one), another model's (`<model>`), or the base's with every other
  model's tokens added (`union`): first their plain tokens that the base lacks (as plain added
  tokens: normalized, not special), then their added tokens, each with its own flags (the first
  model's flags win; one the base has already keeps its id). pymerge adds them model by model
  (base first, then the config's order) in id order; mergekit's order follows a hash, so its new
  ids vary from run to run (the tokens and their rows do not). Tokens named under
  `tokenizer.tokens` that the vocabulary lacks are appended as plain added tokens.
- Each model's rows are permuted to the output ids. A token a model lacks, or a forced one, takes
  a default row shared by all models: its `tokens:` source, else the only model that has it, else
  the base model's row, else the mean of the rows of the models that have it; zero for a token
  no model has.
- `pad_to_multiple_of` pads the row count up; each model's padding rows are the mean of its rows.
"""
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from pymerge.errors import CheckpointError, MergeConfigError
from pymerge.tokenizer.files import Tokenizer, added_entry, read_tokenizer
from pymerge.tokenizer.spec import TokenizerSpec

# Tensors indexed by token id on axis 0, by name (the names mergekit's architectures mark so, and the output
# bias's tied copy that masked-LM checkpoints saved by transformers 4 hold beside it, decoder.bias: merged by
# position, it was the bias a loaded model adds; an audit).
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_in.weight", "embed_out.weight",
                  "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "lm_head.decoder.weight",
                  "lm_head.decoder.bias", "lm_head.linear.weight", "lm_head.linear.bias",
                  "predictions.decoder.weight", "predictions.decoder.bias", "predictions.bias",  # BERT's cls., ALBERT's
                  "vocab_projector.weight", "vocab_projector.bias")
VOCAB_NAMES = ("shared.weight", "output.weight", "backbone.embeddings.weight", "transformer.output_layer.weight")
# phi-1 / phi-1.5's MixFormerSequential head, layers.{num_layers + 1}.linear (its rows were merged by position,
# not by token: an audit); by token only in a checkpoint of that layout (PHI1_EMBEDDING): other models have
# layers.N.linear tensors of their own (Zamba2's hybrid layers)
PHI1_HEAD = re.compile(r"layers\.\d+\.linear\.(weight|bias)")
PHI1_EMBEDDING = "layers.0.wte.weight"

# What a row of the output is, per token (Rows.default_kind)
KEEP, MEAN, ROW, ZERO = 0, 1, 2, 3


def is_vocab_tensor(name: str) -> bool:
    return name in VOCAB_NAMES or any(name == s or name.endswith("." + s) for s in VOCAB_SUFFIXES)


@dataclass
class Vocabulary:
    """The output tokenizer and every model's permutation onto it."""
    tokenizer: Tokenizer               # the output's source tokenizer (its other files come from there)
    doc: dict                          # the output tokenizer.json
    tokens: Dict[str, int]             # output token -> id, ids 0 .. len-1
    size: int                          # rows of the output's vocabulary tensors (padded)
    perms: Dict[str, np.ndarray]       # model path -> its id of each output token, -1 where it lacks it
    originals: Dict[str, Dict[str, int]]  # model path -> its own vocabulary
    spec: TokenizerSpec
    base: Optional[str]                # the config's base_model: its rows win for shared tokens
    _rows: Dict[tuple, "Rows"] = field(default_factory=dict)
    where: Callable[[str], str] = str  # a config key -> its place in messages ("cfg.yml: key")
    phi1: bool = False                 # the models are phi-1's MixFormerSequential layout (PHI1_HEAD)

    def covers(self, name: str) -> bool:
        return is_vocab_tensor(name) or (self.phi1 and PHI1_HEAD.fullmatch(name) is not None)

    def for_base(self, base: Optional[str]) -> "Vocabulary":
        """The same vocabulary whose default rows prefer another base model's (a slice's
        base_model, as mergekit); the row assignments stay cached in one place."""
        return replace(self, base=base)

    def rows_for(self, sources: Sequence[str], rows: Sequence[int], name: str) -> "Rows":
        """Where each source's rows of tensor ``name`` come from (sources: model paths in plan order,
        rows: each source's row count in that tensor)."""
        key = (tuple(sources), tuple(rows), self.base)
        for s, r in zip(sources, rows):
            top = int(self.perms[s].max(initial=-1))
            if top >= r:
                raise CheckpointError(f"{s}: tensor {name!r} has {r} rows, but the tokenizer uses id {top}; "
                                      f"its vocabulary is larger than the embedding")
        if key not in self._rows:
            self._rows[key] = _assign(self, list(sources), list(rows), name)
        return self._rows[key]


@dataclass
class Rows:
    """Per source i: src[i][j] = the source's row for output row j; -1: the default row of token j;
    -2: a padding row (the mean of the source's rows 0 .. n_tokens-1)."""
    src: List[np.ndarray]
    n_tokens: int
    default_kind: np.ndarray           # per token: KEEP (no default needed), MEAN, ROW or ZERO
    default_source: np.ndarray         # ROW: which source; MEAN: unused
    default_row: np.ndarray            # ROW: the row in that source


def build_vocabulary(spec: TokenizerSpec, models: Sequence[str], donor: str, base: Optional[str],
                     vocab_sizes: Dict[str, int], where: Callable[[str], str] = str) -> Vocabulary:
    """models: every model of the merge (paths); donor: the base model, else the first; vocab_sizes:
    each model's number of embedding rows that tokens may use (config.json's vocab_size); where: a config
    key's place in messages (the config file's name before it, as the config's other errors)."""
    toks = {m: read_tokenizer(m) for m in [donor] + [m for m in models if m != donor]}
    for m, tok in toks.items():
        over = [(t, i) for t, i in tok.vocab.items() if i >= vocab_sizes[m]]
        if over:
            t, i = max(over, key=lambda e: e[1])
            raise CheckpointError(f"{tok.path}: token {t!r} has id {i}, but the model has only {vocab_sizes[m]} "
                                  f"embedding rows (config.json vocab_size); its vocabulary is larger than its "
                                  f"embedding")
    if spec.source == "base":
        out = toks[donor]
    elif spec.source == "union":
        out = toks[donor]
    else:
        out = toks.get(spec.source) or read_tokenizer(spec.source)
    doc = _copy_doc(out.doc)
    added = _Added(doc, out)
    if spec.source == "union":
        _union(added, [toks[m] for m in toks], out)
    for tok in spec.tokens:
        if tok not in added.vocab:
            added.add(added_entry(tok, id=-1))
    tokens = added.finish()
    n = len(tokens)
    size = n if not spec.pad_to_multiple_of else -(-n // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    ids = np.fromiter(tokens.values(), dtype=np.int64, count=n)
    perms = {}
    for m, tok in toks.items():
        p = np.full(n, -1, dtype=np.int64)
        own = tok.vocab
        p[ids] = [own.get(t, -1) for t in tokens]
        perms[m] = p
    _check_token_models(spec, models, where)
    return Vocabulary(out, doc, tokens, size, perms, {m: t.vocab for m, t in toks.items()}, spec, base, where=where)


def _copy_doc(doc: dict) -> dict:
    """tokenizer.json with its own added_tokens list (the vocabulary is shared, never modified)."""
    out = dict(doc)
    out["added_tokens"] = [dict(e) for e in doc.get("added_tokens") or []]
    return out


class _Added:
    """tokenizers' AddedVocabulary.add_tokens on a tokenizer.json: an entry equal to one already
    added is skipped; a token the vocabulary has keeps its id (its flags are replaced); a new one
    takes the next id after the model's tokens and the added ones."""

    def __init__(self, doc: dict, tok: Tokenizer):
        _check_ids(tok)
        self.doc, self.vocab, self.path = doc, dict(tok.vocab), tok.path
        self.by_id = {e["id"]: e for e in doc["added_tokens"]}
        self.keys = {_key(e) for e in self.by_id.values()}
        self.next_id = max([tok.model_size] + [e["id"] + 1 for e in doc["added_tokens"]])

    def add(self, entry: dict) -> None:
        if _key(entry) in self.keys:
            return
        content = entry["content"]
        if content in self.vocab:
            entry = dict(entry, id=self.vocab[content])
        else:
            entry = dict(entry, id=self.next_id)
            self.next_id += 1
            self.vocab[content] = entry["id"]
        old = self.by_id.get(entry["id"])
        if old is not None:
            self.keys.discard(_key(old))
        self.by_id[entry["id"]] = entry
        self.keys.add(_key(entry))

    def finish(self) -> Dict[str, int]:
        self.doc["added_tokens"] = [self.by_id[i] for i in sorted(self.by_id)]
        if sorted(self.vocab.values()) != list(range(len(self.vocab))):  # a new token's id took a model token's
            raise CheckpointError(f"{self.path}: adding tokens to it gives two tokens one id (its added_tokens "
                                  f"lie among its vocabulary's ids); cannot build embedding rows for it")
        return self.vocab


def _check_ids(tok: Tokenizer) -> None:
    """The output's source must number its tokens 0 .. n-1, each once: output row i is token i's (new tokens
    then take n, n+1, ...). tokenizers loads a shared id or a gap, but which token owns a row is then a guess."""
    owner: Dict[int, str] = {}
    for t, i in tok.vocab.items():
        if i in owner:
            raise CheckpointError(f"{tok.path}: tokens {owner[i]!r} and {t!r} share id {i}; the output vocabulary "
                                  f"needs one token per id to build its embedding rows")
        owner[i] = t
    gap = next((i for i in range(len(owner)) if i not in owner), None)
    if gap is not None:
        raise CheckpointError(f"{tok.path}: no token has id {gap} ({len(owner)} tokens, ids up to {max(owner)}); "
                              f"the output vocabulary needs ids 0 .. n-1, each once, to build its embedding rows")


def _key(e: dict) -> tuple:
    """An added token as tokenizers compares them: content and flags, not the id."""
    return tuple(e.get(k, False) for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special"))


def _union(added: _Added, toks: List[Tokenizer], base: Tokenizer) -> None:
    extra_added: Dict[str, dict] = {}
    plain: Dict[str, None] = {}
    for tok in toks:
        for e in sorted(tok.added, key=lambda e: e["id"]):
            extra_added.setdefault(e["content"], e)
        for t, _ in sorted(tok.vocab.items(), key=lambda kv: kv[1]):
            plain.setdefault(t, None)
    for t in plain:
        if t not in extra_added and t not in base.vocab:
            added.add(added_entry(t, id=-1))
    for e in extra_added.values():
        added.add(dict(e))


def _check_token_models(spec: TokenizerSpec, models: Sequence[str], where: Callable[[str], str]) -> None:
    import os
    real = {os.path.realpath(m): m for m in models}
    for tok, s in spec.tokens.items():
        if s.source.model is not None and os.path.realpath(s.source.model) not in real:
            missing = "" if os.path.exists(s.source.model) or _not_a_path(s.source.model) else " (no such folder)"
            from pymerge.hub import shown
            raise MergeConfigError(where(f"tokenizer.tokens[{tok!r}].source: model {shown(s.source.model)}{missing} "
                                         "is not one of the models merged"))


def _not_a_path(ref: str) -> bool:
    """A hub id or a MODEL+LORA reference: no folder of that name is expected."""
    from pymerge.hub import looks_like_id
    return looks_like_id(ref) or "+" in ref


def _assign(v: Vocabulary, sources: List[str], rows: List[int], name: str) -> Rows:
    """mergekit's PermutedVocabulary for one tensor's sources: defaults per token, then the rows."""
    import os
    n, k = len(v.tokens), len(sources)
    perms = np.stack([v.perms[s] for s in sources]) if k else np.zeros((0, n), np.int64)
    present = perms >= 0
    count = present.sum(0)
    kind = np.full(n, KEEP, dtype=np.int8)
    dsrc = np.zeros(n, dtype=np.int64)
    drow = np.zeros(n, dtype=np.int64)
    forced = np.zeros(n, dtype=bool)
    configured = np.zeros(n, dtype=bool)
    index = {os.path.realpath(s): i for i, s in enumerate(sources)}
    for tok, setting in v.spec.tokens.items():
        j = v.tokens[tok]
        configured[j] = True
        forced[j] = setting.force
        if not (setting.force or count[j] < k):
            continue  # every model has it: no default needed (mergekit computes none)
        where = v.where(f"tokenizer.tokens[{tok!r}]")
        src = setting.source
        if src.kind == "zero":
            kind[j] = ZERO
            continue
        if src.kind == "none":
            lacking = sources[int(np.argmin(present[:, j]))] if count[j] < k else None
            raise MergeConfigError(f"{where}: needs a source ({'model ' + lacking + ' lacks the token' if lacking else 'force is set'})")
        i = index.get(os.path.realpath(src.model))
        if i is None:
            raise MergeConfigError(f"{where}.source: model {src.model} is not among the models {name!r} is merged "
                                   f"from (with slices:, the first slice's sources give the embeddings, the last "
                                   f"slice's the rest)")
        if src.kind == "model":
            if not present[i, j]:
                raise MergeConfigError(f"{where}.source: model {src.model} lacks the token {tok!r}")
            row = perms[i, j]
        else:
            row = src.token_id
            if row is None:
                own = v.originals[sources[i]]
                if src.token not in own:
                    raise MergeConfigError(f"{where}.source: model {src.model} lacks the token {src.token!r}")
                row = own[src.token]
            if row >= rows[i]:
                raise MergeConfigError(f"{where}.source: token id {row} is out of range for model {src.model} "
                                       f"({rows[i]} rows in {name!r})")
        kind[j], dsrc[j], drow[j] = ROW, i, row
    free = ~configured & (count < k)
    one = free & (count == 1)
    kind[one] = ROW
    dsrc[one] = present[:, one].argmax(0)
    drow[one] = perms[dsrc[one], np.nonzero(one)[0]]
    kind[free & (count == 0)] = ZERO
    rest = free & (count > 1)
    b = index.get(os.path.realpath(v.base)) if v.base else None
    if b is not None:
        from_base = rest & present[b]
        kind[from_base], dsrc[from_base], drow[from_base] = ROW, b, perms[b, from_base]
        rest &= ~from_base
    kind[rest] = MEAN
    src = []
    for i in range(k):
        s = np.full(v.size, -2, dtype=np.int64)
        s[:n] = np.where(present[i] & ~forced, perms[i], -1)
        src.append(s)
    return Rows(src, n, kind, dsrc, drow)
