"""mergekit-yaml 0.1.5's command-line flags on `pymerge merge`, so scripts can swap the command.

Each flag has mergekit's spelling (booleans as --flag/--no-flag) and either its meaning or a
documented no-op (docs/mergekit-compat.md); the two that would change the output in ways pymerge
does not support fail with a one-line reason.
"""
import argparse
import contextlib
import os
from typing import Any, Dict

from pymerge.errors import InputError

_BOOL = argparse.BooleanOptionalAction

# flag -> (default, help); booleans take --no-<flag>
_NO_OPS = {
    "allow-crimes": (False, "accepted; pymerge merges any checkpoints with the same tensor names and shapes"),
    "low-cpu-memory": (False, "accepted; pymerge always streams with bounded memory"),
    "clone-tensors": (False, "accepted; pymerge never writes shared tensors"),
    "trust-remote-code": (False, "accepted; pymerge runs no model code"),
    "lazy-unpickle": (False, "accepted; pymerge memory-maps safetensors (and loads .bin files lazily)"),
    "read-to-gpu": (False, "accepted; the GPU path stages inputs through pinned memory"),
    "multi-gpu": (False, "accepted; pymerge merges on one device"),
    "async-write": (False, "accepted; pymerge always writes on a separate thread"),
}


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mergekit-yaml compatibility (same meaning, or accepted with no effect)")
    # default None: an explicit --no-cuda must be told apart from no flag (see merge_options)
    g.add_argument("--cuda", action=_BOOL, default=None,
                   help="compute on the GPU (same as --device cuda); --no-cuda: on the CPU, as in mergekit-yaml")
    g.add_argument("--gpu-rich", action="store_true", help="alias for --cuda")
    g.add_argument("-j", "--num-threads", type=int, default=None, metavar="N", help="same as --threads")
    g.add_argument("--copy-tokenizer", action=_BOOL, default=True,
                   help="copy the donor model's tokenizer files and generation_config.json (default)")
    g.add_argument("--write-model-card", action=_BOOL, default=False,
                   help="write a README.md describing the merge (mergekit writes one by default)")
    g.add_argument("--transformers-cache", metavar="DIR", default=None,
                   help="the Hugging Face hub cache where model IDs are looked up (else HF_HUB_CACHE, HF_HOME)")
    g.add_argument("--safe-serialization", action=_BOOL, default=True,
                   help="safetensors output (the only format pymerge writes)")
    g.add_argument("--unsafe-truncate-embeddings", action=_BOOL, default=False, help="not supported")
    g.add_argument("--lora-merge-cache", metavar="DIR", default=None,
                   help="accepted; pymerge applies LoRA adapters while streaming and caches nothing")
    g.add_argument("--lora-merge-dtype", metavar="DTYPE", default=None,
                   help="dtype of models given as MODEL+LORA (default: their own)")
    g.add_argument("-v", "--verbosity", action="count", default=0, help="accepted; pymerge logs warnings only")
    g.add_argument("--write-threads", type=int, default=1, metavar="N", help="accepted; one writer thread")
    for flag, (default, text) in _NO_OPS.items():
        g.add_argument(f"--{flag}", action=_BOOL, default=default, help=text)


def merge_options(args) -> Dict[str, Any]:
    """Keyword arguments for run_merge from the flags (after the checks)."""
    if args.unsafe_truncate_embeddings:
        raise InputError("--unsafe-truncate-embeddings is not supported by pymerge: models must share their "
                         "vocabulary size")
    if not args.safe_serialization:
        raise InputError("--no-safe-serialization is not supported: pymerge writes safetensors only")
    if args.num_threads is not None:  # checked even beside --threads (-j 0 passed there)
        from pymerge.merge import check_thread_flag
        check_thread_flag(args.num_threads, "-j/--num-threads")
        if args.threads is not None and args.threads != args.num_threads:  # which one wins is nowhere said
            raise InputError(f"--threads {args.threads} and -j/--num-threads {args.num_threads} disagree; "
                             "give one of them")
        args.threads = args.num_threads
    if (args.cuda or args.gpu_rich) and args.device == "auto":
        args.device = "cuda"
    elif args.cuda is False and args.device == "auto":
        # mergekit-yaml's --no-cuda computes on the CPU; `auto` would pick a GPU where one exists.
        # An explicit --device wins, as in mergekit.
        args.device = "cpu"
    return {"copy_tokenizer": args.copy_tokenizer, "model_card": args.write_model_card,
            "lora_merge_dtype": args.lora_merge_dtype}


@contextlib.contextmanager
def hub_cache(args):
    """HF_HUB_CACHE set to --transformers-cache (~ and $VARS expanded, as huggingface_hub does, then made absolute)
    for this merge alone: set for good, a later merge in the same process (cli.main called from Python) still
    looked up IDs there, without the flag (an audit)."""
    if not args.transformers_cache:
        yield
        return
    before = os.environ.get("HF_HUB_CACHE")
    cache = os.path.abspath(os.path.expandvars(os.path.expanduser(args.transformers_cache)))
    try:  # (set inside: a Ctrl-C as it was set, before the try, left it set for good; an audit)
        os.environ["HF_HUB_CACHE"] = cache
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = before
