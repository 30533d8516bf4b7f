"""The tokenizer files of a merge whose tokenizer pymerge changes: a merged vocabulary
(`tokenizer_source` / `tokenizer:`) or a new chat template. What mergekit writes through
transformers' save_pretrained: tokenizer.json, tokenizer_config.json without the template, and
the template in chat_template.jinja (named ones in additional_chat_templates/); the source's
special_tokens_map.json rides along."""
import json
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

from pymerge.errors import CheckpointError
from pymerge.io.files import present, stays_inside
from pymerge.tokenizer.files import TEMPLATE_DIR, TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_JSON, Tokenizer, read_json

SPECIAL_MAP = "special_tokens_map.json"
_FLAGS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def write_tokenizer(plan, writer, donor: Path, copy_tokenizer: bool) -> Tuple[Set[str], Optional[Path]]:
    """Writes what it changes; returns the donor's tokenizer files the caller must not copy, and the folder
    whose tokenizer_config.json it wrote edited (None: it wrote none), whose auto_map modules must ride along."""
    vocab, template = plan.vocabulary, plan.chat_template
    if vocab is not None:  # mergekit saves a merged tokenizer even with --no-copy-tokenizer
        src: Tokenizer = vocab.tokenizer
        # compact: json's indenting encoder is pure Python, seconds for a 150k-token vocabulary
        writer.write_text(TOKENIZER_JSON, json.dumps(vocab.doc, ensure_ascii=False))
        # the source's templates, named ones too (mergekit saves them all); a `chat_template:` replaces them all
        templates = {"default": template} if template is not None else src.templates()
        _write_config(writer, src.config, templates, vocab.doc["added_tokens"])
        special = src.folder / SPECIAL_MAP
        if present(special) and stays_inside(src.folder, special):
            writer.copy_file(special, SPECIAL_MAP)
        return {"tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json"}, src.folder
    if template is None:
        return set(), None
    if not copy_tokenizer:
        plan.warnings.append("chat_template: no tokenizer is written (--no-copy-tokenizer); the template is not saved")
        return set(), None
    cpath = donor / TOKENIZER_CONFIG
    if not (present(cpath) or present(donor / TOKENIZER_JSON)):
        plan.warnings.append(f"chat_template: {donor} has no tokenizer to carry the template; not saved")
        return set(), None
    config = {}
    if present(cpath) and stays_inside(donor, cpath):
        config = read_json(cpath)
        note = getattr(plan.donor, "note_read", None)  # written edited, not copied: compared at the end as read
        if note is not None:
            note(cpath)
        if not isinstance(config, dict):  # (written as {} plus the template: its settings lost, silently)
            raise CheckpointError(f"{cpath}: is not a JSON object; the chat template is saved into it")
    elif present(cpath):  # as without a template (merge.py's side files), but said: its settings are lost
        plan.warnings.append(f"{cpath}: is a link to a file outside the model folder; not copied: the chat template "
                             f"is saved without its settings")
    _write_config(writer, config, {"default": template}, None)
    return {"tokenizer_config.json", "chat_template.jinja", "chat_template.json"}, donor


def _write_config(writer, config: dict, templates: Dict[str, str], added) -> None:
    config = dict(config)
    if templates or isinstance(config.get("chat_template"), str):
        config.pop("chat_template", None)  # transformers saves them as .jinja files
    if added is not None and "added_tokens_decoder" in config:  # transformers 4's copy of added_tokens
        config["added_tokens_decoder"] = {str(e["id"]): {k: e.get(k, False) for k in _FLAGS} for e in added}
    writer.write_json(TOKENIZER_CONFIG, config)
    for name, text in templates.items():  # as transformers' save_pretrained lays them out
        writer.write_text(TEMPLATE_FILE if name == "default" else f"{TEMPLATE_DIR}/{name}.jinja", text)
