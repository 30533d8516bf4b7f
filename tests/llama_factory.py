"""Writes small Llama-shaped Hugging Face folders for tests and benchmarks (a helper, not a test).

One base model from a seed, fine-tunes as the base plus seeded perturbations, so merges of them
have a known structure. Each folder holds config.json (LlamaForCausalLM), a tiny tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) and safetensors weights, either
one model.safetensors or shards plus model.safetensors.index.json, in the chosen dtype.

    base = make_llama(tmp / "base", seed=0)
    fts = [make_llama(tmp / f"ft{i}", seed=0, perturb_seed=i + 1, perturb=0.01) for i in range(3)]
    base, fts = make_family(tmp, n_finetunes=3, shards=2)
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaDims:
    hidden: int = 64
    layers: int = 3
    intermediate: int = 96
    vocab: int = 128
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in tensor_shapes(self))


TINY = LlamaDims()
# ~297M parameters: with 5 models in bf16 that is ~2.9 GB, the size BASELINES.md measured.
BENCH_290M = LlamaDims(hidden=1024, layers=18, intermediate=2816, vocab=32000, heads=16, kv_heads=16)


def tensor_shapes(d: LlamaDims) -> List[Tuple[str, Tuple[int, ...]]]:
    """Names and shapes in the order transformers' LlamaForCausalLM lists them."""
    kv = d.kv_heads * d.head_dim
    out = [("model.embed_tokens.weight", (d.vocab, d.hidden))]
    for i in range(d.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (d.hidden, d.hidden)),
            (p + "self_attn.k_proj.weight", (kv, d.hidden)),
            (p + "self_attn.v_proj.weight", (kv, d.hidden)),
            (p + "self_attn.o_proj.weight", (d.hidden, d.hidden)),
            (p + "mlp.gate_proj.weight", (d.intermediate, d.hidden)),
            (p + "mlp.up_proj.weight", (d.intermediate, d.hidden)),
            (p + "mlp.down_proj.weight", (d.hidden, d.intermediate)),
            (p + "input_layernorm.weight", (d.hidden,)),
            (p + "post_attention_layernorm.weight", (d.hidden,)),
        ]
    out.append(("model.norm.weight", (d.hidden,)))
    if not d.tie_embeddings:
        out.append(("lm_head.weight", (d.vocab, d.hidden)))
    return out


def llama_config(d: LlamaDims, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": d.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "transformers_version": "4.46.0",
    }


def _tokenizer_files(vocab: int) -> dict:
    # A word-level tokenizer: enough for transformers to load it and for mergekit to copy it.
    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for c, i in list(words.items())[:3]],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 256, "clean_up_tokenization_spaces": False}
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": special}


def _base_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[-1]))


def make_llama(folder, *, dims: LlamaDims = TINY, dtype: torch.dtype = torch.float32, seed: int = 0,
               perturb_seed: Optional[int] = None, perturb: float = 0.01, shards: int = 1,
               tokenizer: bool = True) -> Path:
    """Writes one model. Same seed => same base weights; perturb_seed adds perturb*std noise.

    Tensors are generated in float32 one at a time (memory stays at one tensor) and then cast.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(dims)
    base_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(10_000 + perturb_seed) if perturb_seed is not None else None

    groups = _split(shapes, shards)
    shards = len(groups)
    names_of = [[n for n, _ in g] for g in groups]
    files = ["model.safetensors"] if shards == 1 else [
        f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, total = {}, 0
    for fname, group in zip(files, groups):
        tensors = {}
        for name, shape in group:
            t = _base_tensor(name, shape, base_gen)
            if noise_gen is not None:
                t += perturb * t.std() * torch.randn(shape, generator=noise_gen)
            tensors[name] = t.to(dtype).contiguous()
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(llama_config(dims, dtype), indent=2))
    if tokenizer:
        for fname, obj in _tokenizer_files(dims.vocab).items():
            (folder / fname).write_text(json.dumps(obj, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert [n for g in names_of for n in g] == [n for n, _ in shapes]
    return folder


def make_family(root, *, n_finetunes: int = 3, dims: LlamaDims = TINY, dtype: torch.dtype = torch.float32,
                shards: int = 1, seed: int = 0, perturb: float = 0.01) -> Tuple[Path, List[Path]]:
    """A base and n fine-tunes of it under root: root/base, root/ft1 ... root/ftN."""
    root = Path(root)
    base = make_llama(root / "base", dims=dims, dtype=dtype, seed=seed, shards=shards)
    fts = [make_llama(root / f"ft{i}", dims=dims, dtype=dtype, seed=seed, perturb_seed=i,
                      perturb=perturb, shards=shards) for i in range(1, n_finetunes + 1)]
    return base, fts


def _split(items: Sequence, n: int) -> List[list]:
    """Up to n contiguous, non-empty groups of roughly equal total size (by element count)."""
    sizes = [math.prod(s) for _, s in items]
    target = max(1, sum(sizes)) / n
    groups, acc = [[] for _ in range(n)], 0
    for item, size in zip(items, sizes):
        k = min(n - 1, int(acc / target))
        groups[k].append(item)
        acc += size
    return [g for g in groups if g]


def dims_dict(d: LlamaDims) -> dict:
    return asdict(d)


def load_folder(folder) -> dict:
    """Every tensor of every .safetensors file in a folder (a merge's output), by name."""
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
