"""A small causal decoder in the Llama layout, in plain torch, saved and loaded as Hugging Face folders.

RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP, with the tensor names
of transformers' LlamaForCausalLM (model.embed_tokens, model.layers.i.self_attn.q_proj, ...,
lm_head), so a saved folder (config.json + model.safetensors) loads in transformers and merges with
`pymerge merge` or mergekit, and a CheckpointPool materializes merges straight into this module.
"""
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from pymerge.errors import CheckpointError


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """config.json as transformers writes it for LlamaForCausalLM."""
        d = asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", head_dim=self.head_dim, hidden_act="silu",
                 attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 torch_dtype=str(dtype).replace("torch.", ""))
        return d

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "rope_theta"}
        return cls(rope_theta=float(theta), **fields)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # as transformers computes it: normalize in float32, scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = torch.nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = torch.nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(torch.nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(torch.nn.Module):
    """LlamaForCausalLM's `model` part: embeddings, blocks, final norm."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyLlama(torch.nn.Module):
    """forward(ids [B, T]) -> logits [B, T, vocab]. Right padding is harmless: attention is causal."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def save_hf(model: TinyLlama, folder: str, dtype: torch.dtype = torch.float32, extra_files: Optional[dict] = None) -> str:
    """config.json + model.safetensors (tied embeddings stored once, as transformers does)."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    # serialized in memory (the demo's models are small) and written as any file: safetensors' own save_file
    # raised its SafetensorError on a full disk, which no caller took for the system error it is
    files = {"model.safetensors": save(tensors, metadata={"format": "pt"}),
             "config.json": json.dumps(model.config.to_hf(dtype), indent=2).encode(),
             **{name: json.dumps(payload, indent=2).encode() for name, payload in (extra_files or {}).items()}}
    for name, data in files.items():
        path = os.path.join(folder, name)
        try:
            with open(path, "wb") as fh:
                fh.write(data)
        except OSError as exc:  # a failed write or close names no file
            raise OSError(exc.errno, exc.strerror, path) from None
    return folder


def load_hf(folder: str, dtype: torch.dtype = torch.float32) -> TinyLlama:
    """A folder written by save_hf (or a merge of such folders) as a TinyLlama."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = LlamaConfig.from_hf(json.load(fh))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable Llama config.json ({e})") from None
    model = TinyLlama(config)
    state = load_file(os.path.join(folder, "model.safetensors"))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing")
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.to(dtype)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["LlamaConfig", "TinyLlama", "save_hf", "load_hf", "num_params"]
