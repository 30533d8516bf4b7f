"""README.md for a merged model (`--write-model-card`): the merge method, the models, the config.

mergekit writes its own template; this card carries the same facts (Hub metadata header with the
base model and tags, the method, every model merged, the YAML), not the same wording.
"""
from pathlib import Path


def model_card(plan, name: str) -> str:
    cfg = plan.config
    models = []
    for part in plan.parts:
        for spec in part.inputs + ([part.base] if part.base is not None else []):
            if spec.path not in models:
                models.append(spec.path)
    header = ["---", "library_name: transformers", "tags:", "- mergekit", "- merge", "- pymerge"]
    if cfg.base_model:
        header += ["base_model:", f"- {cfg.base_model}"]
    lines = header + ["---", f"# {name}", "",
                      "This is a merge of pre-trained language models made with "
                      "pymerge from a [mergekit](https://github.com/arcee-ai/mergekit) config.",
                      "", "## Merge details", "", f"Merge method: `{cfg.merge_method}`"
                      + (f", with `{cfg.base_model}` as the base." if cfg.base_model else "."),
                      "", "Models merged:", ""] + [f"* {m}" for m in models]
    source = Path(cfg.source)
    if source.is_file():
        lines += ["", "## Configuration", "", "```yaml", source.read_text(encoding="utf-8").rstrip(), "```"]
    return "\n".join(lines) + "\n"
