"""`tokenizer_source:` and `tokenizer:` of a mergekit config, checked and typed (no files read here).

    tokenizer_source: base | union | <model>
    tokenizer:
      source: union                       # base | union | <model>; mergekit's default is union
      pad_to_multiple_of: 64
      tokens:
        <|im_start|>: {source: ./chat-model}                       # that model's row for the token
        <|im_end|>: {source: {kind: model_token, model: ./chat-model, token: "</s>"}, force: true}
        <pad>: {source: {kind: zero}}
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from pymerge.errors import described, short as _short

SOURCE_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from when a model lacks the token (or always, forced).
    kind: "model" (the model's own row of this token), "model_token" (the model's row of ``token``
    or ``token_id``), "zero", or "none" (no source given: an error if the row is ever needed)."""
    kind: str
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource
    force: bool = False


@dataclass
class TokenizerSpec:
    source: str                                  # "base", "union" or a model path
    tokens: Dict[str, TokenSetting] = field(default_factory=dict)  # in the config's order
    pad_to_multiple_of: Optional[int] = None
    key: str = "tokenizer_source"                # the config key it came from, for messages


def parse_tokenizer(data: dict, err: Callable[[str], Exception],
                    model_path: Callable[[object, str], str]) -> Optional[TokenizerSpec]:
    """The tokenizer settings of a config mapping, or None when it has neither key.
    model_path(value, where) turns a model reference into a path (raising err)."""
    plain, section = data.get("tokenizer_source"), data.get("tokenizer")
    if plain is not None and section is not None:
        raise err("give either tokenizer_source or tokenizer, not both (mergekit refuses both too)")
    if plain is not None:
        return TokenizerSpec(_source(plain, "tokenizer_source", err, model_path))
    if section is None:
        return None
    if not isinstance(section, dict):
        raise err(f"tokenizer must be a mapping with {', '.join(SOURCE_KEYS)}, got {described(section)}")
    bad = [k for k in section if k not in SOURCE_KEYS]
    if bad:
        raise err(f"tokenizer: unknown key {_short(bad[0])} (known: {', '.join(SOURCE_KEYS)})")
    source = section.get("source")
    if source is None and "source" in section:  # left out means union; a null is a typo mergekit refuses
        raise err("tokenizer.source is null; give base, union or a model, or leave the key out (union)")
    spec = TokenizerSpec("union" if source is None else _source(source, "tokenizer.source", err, model_path),
                         key="tokenizer.source")
    spec.pad_to_multiple_of = _pad(section.get("pad_to_multiple_of"), err)
    tokens = section.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, dict):
            raise err(f"tokenizer.tokens must be a mapping of tokens to settings, got {described(tokens)}")
        for tok, setting in tokens.items():
            where = f"tokenizer.tokens[{_short(tok)}]"
            if not isinstance(tok, str) or not tok:
                raise err(f"{where}: a token must be a non-empty string")
            spec.tokens[tok] = _token_setting(setting, where, err, model_path)
    return spec


def _source(value, where, err, model_path) -> str:
    if value in ("base", "union"):
        return value
    if isinstance(value, dict) and value:  # mergekit's {model: ..., lora: ...}, as under models: (an audit)
        return model_path(value, where)
    if not isinstance(value, str) or not value:
        raise err(f"{where} must be base, union or a model path (or a mapping of model and lora), "
                  f"got {described(value)}")
    return model_path(value, where)


def _pad(value, err) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdecimal():  # (isdigit: "²", which int() refuses)
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 24:
        raise err(f"tokenizer.pad_to_multiple_of must be a whole number from 0 to {1 << 24}, got {_short(value)}")
    return value or None


def _token_setting(setting, where, err, model_path) -> TokenSetting:
    if setting is None:
        setting = {}
    if not isinstance(setting, dict):
        raise err(f"{where} must be a mapping with {', '.join(TOKEN_KEYS)}, got {described(setting)}")
    bad = [k for k in setting if k not in TOKEN_KEYS]
    if bad:
        raise err(f"{where}: unknown key {_short(bad[0])} (known: {', '.join(TOKEN_KEYS)})")
    force = setting.get("force", False)
    if not isinstance(force, bool):
        raise err(f"{where}.force must be true or false, got {_short(force)}")
    return TokenSetting(_token_source(setting.get("source"), f"{where}.source", err, model_path), force)


def _token_source(src, where, err, model_path) -> TokenSource:
    if src is None:
        return TokenSource("none")
    if isinstance(src, str):
        return TokenSource("model", model=model_path(src, where))
    if not isinstance(src, dict):
        raise err(f"{where} must be a model, {{kind: zero}} or {{kind: model_token, model, token | token_id}}, "
                  f"got {described(src)}")
    if "kind" not in src and "model" in src and set(src) <= {"model", "lora"}:  # mergekit's {model, lora} form
        return TokenSource("model", model=model_path(src, where))
    kind = src.get("kind")
    if kind == "zero":
        if set(src) != {"kind"}:
            raise err(f"{where}: {{kind: zero}} takes no other keys")
        return TokenSource("zero")
    if kind != "model_token":
        raise err(f"{where}.kind must be zero or model_token, got {_short(kind)}")
    bad = [k for k in src if k not in ("kind", "model", "token", "token_id")]
    if bad:
        raise err(f"{where}: unknown key {_short(bad[0])} (known: kind, model, token, token_id)")
    if "model" not in src:
        raise err(f"{where}: 'model' is missing")
    token, token_id = src.get("token"), src.get("token_id")
    if (token is None) == (token_id is None):
        raise err(f"{where}: give exactly one of token and token_id")
    if token is not None and not isinstance(token, str):
        raise err(f"{where}.token must be a string, got {described(token)}")
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise err(f"{where}.token_id must be a whole number >= 0, got {_short(token_id)}")
    return TokenSource("model_token", model=model_path(src["model"], f"{where}.model"), token=token,
                       token_id=token_id)
