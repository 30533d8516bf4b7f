"""README.md for a merged model (`--write-model-card`): the merge method, the models, the config.

mergekit writes its own template; this card carries the same facts (Hub metadata header with the
base model and tags, the method, every model merged, the YAML), not the same wording. Models from
the hub cache are named by their ID (never the local snapshot path), with the commit where it is not
the main revision's, and
the header's base_model lists hub IDs only, as mergekit's does.
"""
import re
from pathlib import Path

import yaml

from pymerge.hub import cached_sides, id_of
from pymerge.lora import split_ref


def _named(ref: str) -> str:
    """The reference with each cached side as its hub ID (a link to the Hub; with the commit where it is not the
    main revision's: org/m@v1 beside org/m read as one model twice), else as given."""
    sides = cached_sides(ref)
    if all(repo is None for _, repo, _ in sides):
        return ref
    return "+".join(side if repo is None else f"[{repo}](https://huggingface.co/{repo})" if commit is None
                    else f"[{repo}@{commit[:12]}](https://huggingface.co/{repo}/tree/{commit})"
                    for side, repo, commit in sides)


def model_card(plan, name: str) -> str:
    cfg = plan.config
    models = []
    for part in plan.parts:
        for spec in part.inputs + ([part.base] if part.base is not None else []):
            if spec.path not in models:
                models.append(spec.path)
    hub_ids = []
    for ref in ([cfg.base_model] if cfg.base_model else []) + models:
        for side in split_ref(ref):  # a LoRA's ID too, as mergekit lists it
            i = id_of(side) if side is not None else None
            if i is not None and i not in hub_ids:
                hub_ids.append(i)
    meta = {"base_model": hub_ids, "library_name": "transformers", "tags": ["mergekit", "merge", "pymerge"]}
    if not hub_ids:
        del meta["base_model"]
    header = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]
    named = _named(cfg.base_model) if cfg.base_model else None  # a Hub link is no code: not in backticks
    base = "." if named is None else f", with {named if named != cfg.base_model else f'`{named}`'} as the base."
    lines = header + [f"# {name}", "",
                      "This is a merge of pre-trained language models made with "
                      "pymerge from a [mergekit](https://github.com/arcee-ai/mergekit) config.",
                      "", "## Merge details", "", f"Merge method: `{cfg.merge_method}`" + base,
                      "", "Models merged:", ""] + [f"* {_named(m)}" for m in models]
    source = Path(cfg.source)
    text = cfg.text.rstrip() if cfg.text is not None else (
        source.read_text(encoding="utf-8").rstrip() if cfg.source != "<config>" and source.is_file() else None)
    if text is not None:
        # a fence longer than any run of backticks in the config (a chat template's ``` line ended a fixed one)
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
        lines += ["", "## Configuration", "", f"{fence}yaml", text, fence]
    return _utf8("\n".join(lines) + "\n")


def _utf8(text: str) -> str:
    """The card as UTF-8 text: a path's bytes that are not UTF-8 (Linux allows them; Python decodes them to
    lone surrogates, which cannot be written) shown as \\xff escapes, any other lone surrogate as \\udXXX."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate not from a path (a YAML "\ud800" escape)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
