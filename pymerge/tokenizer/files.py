"""A model folder's tokenizer (tokenizer.json, tokenizer_config.json, chat template), read as JSON.

Only the `tokenizers` library's tokenizer.json is read (what transformers' fast tokenizers load):
its vocabulary is the model's (a mapping for BPE, WordLevel and WordPiece, a list of pieces for
Unigram) plus `added_tokens`, each with its own id. No transformers, no tokenizers library: the
output tokenizer is this file with added tokens appended, as tokenizers' add_tokens would.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from pymerge.errors import CheckpointError
from pymerge.io.files import present, read_json, read_small, stays_inside
from pymerge.io.checkpoint import FolderSnapshot
from pymerge.lora import split_ref

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"  # named templates besides the default, NAME.jinja
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class Tokenizer:
    folder: Path
    doc: dict                      # tokenizer.json
    config: dict                   # tokenizer_config.json, {} when there is none
    vocab: Dict[str, int]          # every token (the model's and the added ones) -> id
    added: List[dict]              # tokenizer.json's added_tokens, checked
    model_size: int                # tokens of the model proper (where tokenizers numbers new tokens from)
    snapshot: Optional[FolderSnapshot] = None  # the folder's when read: templates and special_tokens_map are read later

    @property
    def path(self) -> Path:
        return self.folder / TOKENIZER_JSON

    def template(self) -> Optional[str]:
        """The chat template this tokenizer carries by default (what `chat_template: auto` counts and writes:
        the named ones are neither read nor checked, as mergekit's auto ignores them)."""
        if present(self.folder / TEMPLATE_FILE):
            t = _read_text(self.folder, self.folder / TEMPLATE_FILE)
        elif any(f.name != ".jinja" and f.is_file() for f in (self.folder / TEMPLATE_DIR).glob("*.jinja")):
            t = None  # named template files only: transformers then ignores the config's (as templates() reads them)
        else:
            t = self.config.get("chat_template")
            if isinstance(t, list):  # named templates: transformers' "default" one
                t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
            t = t if isinstance(t, str) else None
        if t is not None:
            _check_unicode(self.folder / TOKENIZER_CONFIG, t, "a chat template is written as UTF-8 text")
        return t

    def templates(self) -> Dict[str, str]:
        """Every chat template by name, as transformers loads them: chat_template.jinja ("default") and
        additional_chat_templates/NAME.jinja where either exists, else tokenizer_config.json's
        chat_template (a string is "default"; a list names each, as transformers 4 saved several).
        What cannot be written out as NAME.jinja in UTF-8 is refused in one line."""
        out = {}
        if present(self.folder / TEMPLATE_FILE):
            out["default"] = _read_text(self.folder, self.folder / TEMPLATE_FILE)
        for f in sorted((self.folder / TEMPLATE_DIR).glob("*.jinja")):
            if f.name != ".jinja" and f.is_file():
                out[f.name[:-len(".jinja")]] = _read_text(self.folder, f)
        if out:
            return out
        t = self.config.get("chat_template")
        if isinstance(t, str):
            out["default"] = t
        for e in t if isinstance(t, list) else ():
            name = e.get("name") if isinstance(e, dict) else None
            if isinstance(name, str) and isinstance(e.get("template"), str):
                if name in ("", ".", "..") or any(c in name for c in "/\\\0"):  # written as NAME.jinja
                    raise CheckpointError(f"{self.folder / TOKENIZER_CONFIG}: chat template name {name!r} is not "
                                          f"a file name")
                out[name] = e["template"]
        for name, t in out.items():  # written to NAME.jinja, UTF-8: the name too
            _check_unicode(self.folder / TOKENIZER_CONFIG, [name, t], "a chat template is written as UTF-8 text")
        return out


def _check_unicode(path: Path, doc, why: str) -> None:
    """A lone surrogate escape ("\\ud800") is JSON that Python reads, but no Unicode text: the tokenizers
    library refuses such a tokenizer.json, and writing it (or a template holding one) out failed."""
    text = json.dumps(doc, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        near = text[max(0, exc.start - 30):exc.end + 30]
        raise CheckpointError(f"{path}: holds a lone surrogate {ascii(text[exc.start])} (in {ascii(near)}), which is "
                              f"not Unicode text; {why}") from None


def _read_text(folder: Path, f: Path) -> str:
    _inside(folder, f)
    try:
        return read_small(f).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{f}: is not UTF-8 text (byte {exc.start})") from None


def model_folder(ref) -> Path:
    """The folder holding a model reference's tokenizer: MODEL's for MODEL+LORA (as mergekit)."""
    return Path(split_ref(os.fspath(ref))[0])


def read_tokenizer(ref) -> Tokenizer:
    """A model's tokenizer; a missing or corrupt file is a CheckpointError naming it."""
    folder = model_folder(ref)
    before = FolderSnapshot(folder)  # before reading: a folder or file replaced after it is caught at the merge's end
    path = folder / TOKENIZER_JSON
    if not present(path):
        raise CheckpointError(f"{path}: not found; merging vocabularies needs each model's tokenizer.json "
                              f"(a fast tokenizer)")
    _inside(folder, path)
    doc = read_json(path, standard=True)  # the tokenizers library refuses NaN: so would it the merged file
    _check_unicode(path, doc, "the tokenizers library cannot load it either")
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{path}: is not a tokenizer.json (no 'model' mapping)")
    vocab = _model_vocab(doc["model"], path)
    model_size = len(vocab)
    added = doc.get("added_tokens") or []
    if not isinstance(added, list):
        raise CheckpointError(f"{path}: 'added_tokens' must be a list")
    for i, e in enumerate(added):
        if (not isinstance(e, dict) or not isinstance(e.get("content"), str) or not _is_id(e.get("id"))
                or any(not isinstance(e.get(k), bool) for k in _ADDED_FLAGS)):  # (tokenizers needs all five)
            raise CheckpointError(f"{path}: added_tokens[{i}] is not a token entry (id, content, flags)")
    added = _number_added(added, vocab, len(doc["model"]["vocab"]))  # (a Unigram may list a piece twice)
    vocab.update((e["content"], e["id"]) for e in added)
    doc = dict(doc, added_tokens=added)
    config = {}
    cpath = folder / TOKENIZER_CONFIG
    if present(cpath):
        _inside(folder, cpath)
        config = read_json(cpath)
        if not isinstance(config, dict):
            raise CheckpointError(f"{cpath}: is not a JSON object")
    return Tokenizer(folder, doc, config, vocab, added, model_size, before)


def _number_added(entries: List[dict], model_vocab: Dict[str, int], size: int) -> List[dict]:
    """The added tokens with the ids the tokenizers library (and so transformers and mergekit) gives them
    when it loads the file, whatever their "id" fields say: in list order, a token the model's vocabulary
    has keeps that id, a repeated content keeps its first id (the later entry's flags win), an empty one is
    dropped, and each new one takes the next id past the model's size (its entry count) and the ids of the
    new ones so far (tokenizers 0.23: not those of tokens the vocabulary has). Files tokenizers saved list
    them so already; a hand-edited list out of order merged rows under the wrong tokens."""
    by_content: Dict[str, dict] = {}
    last_new: Optional[int] = None  # (new ids only grow: the last is the highest)
    for e in entries:
        content = e["content"]
        if not content:
            continue
        if content in by_content:
            token_id = by_content[content]["id"]
        elif content in model_vocab:
            token_id = model_vocab[content]
        else:
            token_id = size if last_new is None or (last_new < size and size) else last_new + 1
            last_new = token_id
        by_content[content] = e if e["id"] == token_id else dict(e, id=token_id)
    return list(by_content.values())


def _model_vocab(model: dict, path: Path) -> Dict[str, int]:
    kind, raw = model.get("type"), model.get("vocab")
    if "type" not in model:  # an older file: tokenizers infers the type from the fields; of its four models
        # only Unigram lists its vocab, and BPE, WordPiece and WordLevel all map tokens to ids, read alike here
        kind = "Unigram" if isinstance(raw, list) else "WordLevel" if isinstance(raw, dict) else None
    if kind == "Unigram" and isinstance(raw, list):
        if not all(isinstance(e, list) and e and isinstance(e[0], str) for e in raw):
            raise CheckpointError(f"{path}: model.vocab of a Unigram model must list [piece, score] pairs")
        return {e[0]: i for i, e in enumerate(raw)}
    if kind in ("BPE", "WordLevel", "WordPiece") and isinstance(raw, dict):
        if not all(isinstance(k, str) and _is_id(v) for k, v in raw.items()):
            raise CheckpointError(f"{path}: model.vocab must map tokens to ids >= 0")
        return dict(raw)
    if kind in ("BPE", "WordLevel", "WordPiece", "Unigram"):
        raise CheckpointError(f"{path}: model.vocab is missing or not a " + (
            "list of [piece, score] pairs" if kind == "Unigram" else "mapping of tokens to ids") + f" ({kind} model)")
    raise CheckpointError(f"{path}: model type {kind!r} is not supported (BPE, WordLevel, WordPiece, Unigram)")


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31


def _inside(folder: Path, path: Path) -> None:
    if not stays_inside(folder, path):  # its contents go into the output
        raise CheckpointError(f"{path}: is a link to a file outside the model folder; copy the file into the "
                              f"folder to use it")


def added_entry(content: str, special: bool = False, normalized: Optional[bool] = None, *, id: int) -> dict:
    """An added_tokens entry as tokenizers writes it (a plain string token is normalized, not special)."""
    return {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def folder_template(ref) -> Optional[str]:
    """The chat template a model carries, if any (for `chat_template: auto`)."""
    folder = model_folder(ref)
    config = {}
    cpath = folder / TOKENIZER_CONFIG
    if present(cpath):
        _inside(folder, cpath)
        config = read_json(cpath)
    holder = Tokenizer(folder, {}, config if isinstance(config, dict) else {}, {}, [], 0)
    return holder.template()
