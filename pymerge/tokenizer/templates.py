"""`chat_template:` as mergekit 0.1.5 reads it: `auto` (the template most of the models carry), the
name of a built-in template (alpaca, chatml, exaone, llama3, mistral), or a Jinja template itself
(at least 20 characters, with a `{`). The built-ins are pymerge's own texts; rendered by
transformers (trim_blocks, lstrip_blocks) they give the same conversations as mergekit's.
"""
from collections import Counter
from typing import Callable, Optional, Sequence

from pymerge.errors import MergeConfigError, short

BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "exaone": (  # the indentation is mergekit's template's, rendered
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n        ' }}"
        "{{ '\\n\\n' if message['role'] == 'user' else '[|endofturn|]\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is defined else '') + message['content']"
        " + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}{% endif %}"
        "{% endfor %}"),
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (systems | last).content | trim if systems else '' }}\n\n"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
        "{% for message in messages %}"
        "{% if message['role'] in headers %}"
        "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"),
}


def resolve_template(value: str, templates: Callable[[], Sequence[Optional[str]]], where: str) -> Optional[str]:
    """The template text to write, or None (`auto` when no model carries one). templates() lists
    the models' own templates (only called for `auto`)."""
    if value == "auto":
        found = [t.strip() for t in templates() if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in BUILTIN:
        return BUILTIN[value]
    if len(value) < 20 or "{" not in value:
        raise MergeConfigError(f"{where}: {short(value)} is neither a built-in template "  # (where names the key)
                               f"({', '.join(sorted(BUILTIN))}), auto, nor a Jinja template")
    return value
