"""The merge engine: plan everything, check everything, then stream tensors to an atomic output.

    report = run_merge("config.yml", "out/", device="auto")

1. Plan (no output exists yet): parse the config, open every checkpoint (headers are validated),
   check names and shapes agree, pick each tensor's dtypes, resolve the method's parameters for
   every tensor (gradients, filters, per-model overrides) and let the method check them.
   Anything a user can get wrong raises an InputError here.
2. Stream (pymerge/streaming.py): tensors in file order, big ones in chunks of bounded size, into
   a ShardedWriter that writes beside OUT and renames at the end; config.json and tokenizer
   files are added; any error or Ctrl-C leaves no partial model. Before OUT is installed, every input
   folder must still be the one opened (another merge installing a model there would mix the two).
Under torchrun (or any launcher that sets RANK and WORLD_SIZE) the ranks split the tensors and
each streams its part: pymerge/dist/disk_merge.py.

Dtypes follow mergekit: ``dtype`` is the load/compute dtype (inputs are rounded to it first, where
that loses precision), the method's result is rounded to it, then to ``out_dtype``. Arithmetic is
float32 throughout (mergekit's task_arithmetic computes in ``dtype`` itself: with bfloat16 there,
ours is the more accurate of the two).

The plan names dtypes by torch's names ("bfloat16", see pymerge/_native.py) and imports no torch:
a CPU merge with a weighted-sum method (linear, task_arithmetic) runs without it (see
pymerge/streaming.py); other methods, the GPU and a `--device auto` that may find a GPU load it.
"""
import copy
import dataclasses
import glob
import importlib
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from pymerge import _native, hub, tied
from pymerge.config import (MergeConfig, ModelSpec, ParamResolver, check_method_params, check_paths,
                            check_seed, count_layers, filter_name, layer_t, load_config, parse_config,
                            unmatched_filter_warnings, uses_positions, yaml_text)
from pymerge.errors import CheckpointError, InputError, MergeConfigError, short
from pymerge.io import Checkpoint, ShardedWriter, check_compatible
from pymerge.io.writer import swept_name, working_folder_note, working_folder_within
from pymerge.io.checkpoint import read_model_config
from pymerge.io.files import is_or_inside, out_location, present, read_json, repeated_model, same_place, stays_inside
from pymerge.io.sigbus import MappingGuard
from pymerge.default_device import factories_on_cpu
from pymerge.lora import open_model
from pymerge.methods.base import MergeMethod, TensorTask, check_magnitudes, get_method
from pymerge.sizes import MAX_BYTES, MIN_CHUNK_BYTES, parse_size
from pymerge.stop_signals import held_signals

# Scratch memory per chunk in flight (3 in flight). CPU: the output chunk and casts; small enough
# that the writer finds it still in cache. GPU: the pinned staging of inputs and output; big
# copies keep the per-chunk overhead small next to PCIe time.
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_GPU_CHUNK_BYTES = 128 << 20
DEFAULT_SHARD_BYTES = 5_000_000_000
MAX_THREADS = 4096  # the kernels' int thread counts; more is a typo
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}  # config value -> dtype name
# Copied from the donor model (mergekit's list, plus vocab.json which BPE tokenizers need).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "video_preprocessor_config.json")
# Other tokenizers' vocabularies (what transformers' save_pretrained writes for them): without the file, a
# copied tokenizer_config.json loads and maps every word to [UNK] (BertTokenizer's vocab.txt).
VOCABULARY_FILES = ("vocab.txt", "spiece.model", "sentencepiece.bpe.model", "bpe.codes", "tiktoken.model")
VOCABULARY_SUFFIXES = (".model", ".tiktoken", ".spm")  # qwen.tiktoken, source.spm, ice_text.model...
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # never a vocabulary, whatever a config says
MAX_VOCABULARY_BYTES = 256 << 20  # a file matched by its suffix alone and larger is taken for something else
# A vision or speech model's processor (mergekit's "tagalong" files for Mistral3, Gemma3, Llama 4, Qwen-VL,
# Whisper): copied from the donor even with --no-copy-tokenizer, as mergekit does.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "normalizer.json")
# written or copied otherwise: a `*_file` key naming one made the merge fail on the second copy (a review)
_WRITTEN_OTHERWISE = {"config.json", "mergekit_config.yml", "README.md", "model.safetensors.index.json",
                      *PROCESSOR_FILES}
# Converting these to the compute dtype loses nothing, so inputs stay as they are on disk.
_EXACT_UP = {("bfloat16", "float32"), ("float16", "float32")}


@dataclass
class TensorPlan:
    """One output tensor: where its inputs come from, its dtypes and its resolved parameters."""
    name: str
    shape: tuple
    numel: int
    in_dtypes: List[str]                   # per source (inputs..., then base); dtype names ("bfloat16")
    casts: List[Optional[str]]             # per source: round to this dtype before the method runs
    result_dtype: str                      # the method's result is rounded to this...
    out_dtype: str                         # ...then to this (the dtype written)
    params: Dict[str, Any]
    model_params: List[Dict[str, Any]]
    in_bytes: int
    vocab: Optional[Any] = None            # a vocabulary tensor of a tokenizer merge: its rows (pymerge.tokenizer.vocab.Rows)

    @property
    def double_round(self) -> bool:
        # Only a narrower-than-float32 result needs its own rounding step before out_dtype.
        return self.result_dtype != self.out_dtype and _native.itemsize(self.result_dtype) < 4


@dataclass
class CopyPlan:
    """A tensor that is not floating point (a buffer: GPT-NeoX's boolean attention mask, position ids):
    written as the models hold it, which make_plan checked is the same in all of them. mergekit merges
    such buffers as numbers and writes them in the merge's float dtype."""
    name: str
    dtype: str                             # dtype name ("bool", "int64")
    shape: tuple


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    inputs: List[ModelSpec]                # models the method gets as task.inputs, in order
    base: Optional[ModelSpec]              # task.base, or None
    checkpoints: List[Checkpoint]          # one per source: inputs..., then base
    tensors: List[TensorPlan]
    donor: Checkpoint                      # config.json and tokenizer come from here
    warnings: List[str] = field(default_factory=list)
    config_overrides: Dict[str, Any] = field(default_factory=dict)  # keys set in the output config.json
    vocabulary: Optional[Any] = None       # a tokenizer merge's output vocabulary (pymerge.tokenizer.vocab)
    chat_template: Optional[str] = None    # the resolved `chat_template:`, written with the tokenizer
    copies: List[CopyPlan] = field(default_factory=list)  # tensors written as they are (not floating point)

    @property
    def parts(self) -> List["MergePlan"]:
        """The plans the executor runs (a `slices:` merge has several: pymerge/slices.py)."""
        return [self]

    @property
    def input_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return (sum(t.numel * _native.itemsize(t.out_dtype) for t in self.tensors)
                + sum(math.prod(c.shape) * _native.itemsize(c.dtype) for c in self.copies))

    def close(self) -> None:
        for ck in {id(c): c for c in self.checkpoints + [self.donor]}.values():
            ck.close()


@dataclass
class MergeReport:
    out_dir: Path
    method: str
    tensors: int
    input_bytes: int
    output_bytes: int
    seconds: float
    device: str
    shards: List[str]
    warnings: List[str]
    rank: int = 0          # this process's rank in a distributed merge, of world_size
    world_size: int = 1

    @property
    def input_gb_per_s(self) -> float:
        return self.input_bytes / max(self.seconds, 1e-9) / 1e9


def check_thread_flag(threads, flag: str) -> None:
    """None (the default), or a thread count the kernels take; one line naming the flag the user gave."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or not 1 <= threads <= MAX_THREADS):
        raise InputError(f"{flag} must be an integer from 1 to {MAX_THREADS}, got {short(threads)}")


@factories_on_cpu
def run_merge(config_or_path: Union[str, Path, dict, MergeConfig], out_dir, *, device: str = "auto",
              out_shard_size: float = DEFAULT_SHARD_BYTES, threads: Optional[int] = None, force: bool = False,
              quiet: bool = False, chunk_bytes: Optional[int] = None, random_seed: Optional[int] = None,
              progress=None, copy_tokenizer: bool = True, model_card: bool = False,
              lora_merge_dtype: Optional[str] = None) -> MergeReport:
    """Merges per the config into out_dir. Raises InputError (and subclasses) for anything the user
    can fix, before any output exists; on any failure no partial output is left behind.
    lora_merge_dtype: the dtype MODEL+LORA models take (mergekit's --lora-merge-dtype)."""
    t0 = time.perf_counter()
    force, quiet, copy_tokenizer, model_card = (_flag(v, name) for v, name in (
        (force, "force"), (quiet, "quiet"), (copy_tokenizer, "copy_tokenizer"), (model_card, "model_card")))

    def arguments() -> MergeArguments:
        return _check_arguments(config_or_path, out_dir, device, out_shard_size, threads, chunk_bytes, random_seed,
                                lora_merge_dtype, progress)
    from pymerge.dist import disk_merge  # (the layer above: it plans each rank's part through this module)
    if disk_merge.launched():  # every rank checks its arguments after joining: a refusal reaches the others
        return disk_merge.run_ranks(arguments, out_dir, force=force, quiet=quiet, progress=progress,
                                    copy_tokenizer=copy_tokenizer, model_card=model_card)
    args = arguments()
    plan = make_plan(args.config)
    try:
        check_out_spares_inputs(out_dir, plan)
        entries = [(t.name, t.out_dtype, t.shape) for t in plan.tensors] + [(c.name, c.dtype, c.shape)
                                                                            for c in plan.copies]
        inside = working_folder_within(out_dir)  # (before OUT is replaced)
        with ShardedWriter(out_dir, entries, max_shard_bytes=args.out_shard_size, force=force,
                           metadata={"format": "pt"}) as writer:
            write_side_files(plan, writer, copy_tokenizer=copy_tokenizer, model_card=model_card)
            stream_plan(plan, writer, device=args.device, chunk_bytes=args.chunk_bytes, threads=args.threads,
                        seed=args.random_seed or 0, progress=progress, quiet=quiet)
            check_inputs_unchanged(plan, writer.sources)  # before the writer installs OUT
            shards = list(writer.shard_names)
        if inside:
            plan.warnings.append(working_folder_note(inside))
        if writer.not_removed:
            plan.warnings.append(writer.not_removed)
        return MergeReport(Path(out_dir), plan.method.name, len(plan.tensors) + len(plan.copies), plan.input_bytes,
                           plan.output_bytes, time.perf_counter() - t0, args.device, shards, plan.warnings)
    finally:
        plan.close()


@dataclass
class MergeArguments:
    """run_merge's arguments, checked and with their defaults filled in."""
    config: Union[str, Path, dict, MergeConfig]
    device: str
    out_shard_size: int
    threads: Optional[int]
    chunk_bytes: int
    random_seed: Optional[int]


def _flag(value, name: str) -> bool:
    """run_merge's flags: a bool (numpy's too), None or an integer; force="False" was true (a string's length) and
    replaced the user's OUT (an audit). Not the ops' as_flag: this module runs without torch."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return bool(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value in (0, 1):
        return value == 1
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # a 0-d array or tensor
        item = value.item()
        if isinstance(item, (bool, np.bool_)) or isinstance(item, numbers.Real) and item in (0, 1):
            return bool(item)
    raise InputError(f"{name} must be True or False, got {short(value)}")


def _check_arguments(config_or_path, out_dir, device, out_shard_size, threads, chunk_bytes, random_seed,
                     lora_merge_dtype, progress=None) -> MergeArguments:
    """InputError for an argument that cannot work (the config itself is read by make_plan)."""
    if progress is not None and not callable(getattr(progress, "update", None)):  # 5: AttributeError mid-merge
        raise InputError(f"progress must be a progress bar with update(n) (tqdm's), got {short(progress)}")
    if lora_merge_dtype is not None:
        config_or_path = _with_lora_dtype(_as_config(config_or_path), lora_merge_dtype)
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir) or b"\0" in os.fsencode(out_dir):
        raise InputError(f"the output folder must be a path, got {short(out_dir)}")
    if random_seed is not None:
        random_seed = check_seed(random_seed, "--random-seed")
    device = pick_device(device)
    check_thread_flag(threads, "--threads")
    out_shard_size = parse_size(out_shard_size, "--out-shard-size", zero=True) or MAX_BYTES  # 0: unsplit, as mergekit
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_GPU_CHUNK_BYTES if device.startswith("cuda") else DEFAULT_CHUNK_BYTES
    chunk_bytes = parse_size(chunk_bytes, "--chunk-size", minimum=MIN_CHUNK_BYTES)
    return MergeArguments(config_or_path, device, int(out_shard_size), threads, chunk_bytes, random_seed)


def check_out_spares_inputs(out_dir, plan: "MergePlan") -> None:
    """OUT must not be, hold or lie inside anything the merge reads (a model folder, a tensor or
    tokenizer file, the config), symlinks resolved: --force replaces OUT, and would delete it. Both where
    the writer puts the model (files.out_location: a link to a folder with files is replaced, not followed)
    and, for a link, where it leads (writing through a link into an input is refused too)."""
    out = out_location(out_dir)  # (realpath, not Path.resolve(): a symlink loop raised RuntimeError there)
    target = Path(os.path.realpath(out_dir))
    for what, given in _inputs_of(plan):
        p = Path(os.path.realpath(given))
        # The writer first sweeps a killed run's folders beside OUT (.OUT.pymerge-tmp-<pid>, ...): one read as a
        # model was deleted, or put back as OUT, before it was read (an audit). Every folder on the way, as given
        # (a link of such a name is unlinked: a review) and as resolved; the name tested first, the realpath only
        # for the few that match.
        named = Path(os.path.abspath(given))
        leftover = next((a for a in (named, *named.parents, p, *p.parents) if a.name and swept_name(out, a.name)
                         and (Path(os.path.realpath(a.parent)) == out.parent or same_place(a.parent, out.parent))),
                        None)
        if leftover is not None:
            where = "is" if leftover in (named, p) else f"lies in {leftover},"
            raise InputError(f"{out_dir}: the {what} {given} {where} named as a killed run's leftover, which the "
                             "writer for OUT removes; rename it, or choose another OUT")
        if out == p or out in p.parents:
            raise InputError(f"{out_dir}: is or holds the {what} {p}; the merge would replace it "
                             f"(choose an OUT outside the inputs)")
        if p in out.parents:
            raise InputError(f"{out_dir}: lies inside the {what} {p}; choose an OUT outside the inputs")
        if target != out and (target == p or target in p.parents or p in target.parents):
            raise InputError(f"{out_dir}: links to {target}, which is, holds or lies inside the {what} {p}; "
                             f"choose an OUT outside the inputs")
        # the same by device and inode: a folder reached by two paths that no symlink explains (a bind mount)
        if any(is_or_inside(p, where) for where in {out, target}):
            raise InputError(f"{out_dir}: is or holds the {what} {p} (the same folder under another path: a bind "
                             "mount); the merge would replace it (choose an OUT outside the inputs)")
        if any(is_or_inside(where, p) for where in {out, target}):
            raise InputError(f"{out_dir}: lies inside the {what} {p} (the same folder under another path: a bind "
                             "mount); choose an OUT outside the inputs")


def check_inputs_unchanged(plan: "MergePlan", read: Sequence = ()) -> None:
    """A CheckpointError if a model folder (or the tokenizer source) was replaced since the merge opened it, or a
    file of it the merge read: the shards and index, the files read by path (config.json, a tokenizer_config.json
    edited: Checkpoint.note_read), the tokenizer source's and the files in `read` (the writer's copies:
    writer.sources). The open shards keep the old files, but config.json, the tokenizer files and remote code are
    read by path later: another merge installing a model there (--force) or a save_pretrained renaming new files
    over them gave an output with one version's tensors and the other's side files, silently. A file never read
    may change (a download adding generation_config.json to a hub snapshot refused whole merges: an audit). Call
    it after write_side_files, before the output is installed."""
    for ck in {id(c): c for c in plan.checkpoints + [plan.donor]}.values():
        check = getattr(ck, "check_unchanged", None)  # a Checkpoint or a LoraCheckpoint
        if check is not None:
            check(read)
    if plan.vocabulary is not None:
        from pymerge.tokenizer.files import TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_JSON
        tok = plan.vocabulary.tokenizer
        if tok.snapshot is not None:  # (those read as the vocabulary was planned: the ones there then)
            named = [tok.folder / n for n in (TOKENIZER_JSON, TOKENIZER_CONFIG, TEMPLATE_FILE)]
            tok.snapshot.check([f for f in named if tok.snapshot.had(f)] + list(read))


def _inputs_of(plan: "MergePlan"):
    """(what, path) of everything a merge reads: _read_by's, and the refs/ folder of each hub cache snapshot among
    them (resolving `org/name` read it)."""
    seen = set()
    for what, path in _read_by(plan):
        yield what, path
        refs = hub.refs_of(path) if what.endswith("folder") else None
        if refs is not None and refs not in seen:
            seen.add(refs)
            yield "Hugging Face cache refs folder", refs


def _read_by(plan: "MergePlan"):
    """(what, path) of the files and folders a merge reads."""
    for ck in {id(c): c for c in plan.checkpoints + [plan.donor]}.values():
        if ck.path.is_dir():
            yield "model folder", ck.path
        adapter = getattr(ck, "adapter", None)  # `model+lora`: its path is the model's; OUT inside the adapter was taken
        if adapter is not None:
            yield "LoRA adapter folder", Path(adapter.folder)
        for f in ck.files:
            yield "model file", f
        index = getattr(ck, "index_file", None)  # a link into OUT: --force deleted it (an audit)
        if index is not None:
            yield "model index file", index
    for fname in ("config.json",) + TOKENIZER_FILES:
        if (Path(plan.donor.folder) / fname).exists():
            yield "model file", Path(plan.donor.folder) / fname
    folder = Path(plan.donor.folder)  # copied into the output: OUT = <folder>/pkg would delete them
    tokenizer = Path(plan.vocabulary.tokenizer.folder) if plan.vocabulary is not None else folder
    for source, fname in _remote_code_of(folder, read_model_config(plan.donor), tokenizer):
        yield "model file", source / fname
    if plan.vocabulary is not None:  # `tokenizer_source: <model>` may name a folder outside the models
        folder = Path(plan.vocabulary.tokenizer.folder)
        yield "tokenizer folder", folder
        # its files too: a hub snapshot's link into blobs/, resolved, is what the merge reads
        from pymerge.tokenizer.files import TEMPLATE_DIR
        for f in [folder / n for n in TOKENIZER_FILES] + sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            if present(f):
                yield "tokenizer file", f
                if os.path.islink(f):  # and the folder it links into (blobs/), as the model folder is
                    yield "folder of the tokenizer file", Path(os.path.realpath(f)).parent
    if plan.config.source != "<config>" and Path(plan.config.source).exists():
        yield "config file", Path(plan.config.source)


def stream_plan(plan: MergePlan, writer: ShardedWriter, *, device: str, chunk_bytes: int, threads: Optional[int],
                seed: int, progress=None, quiet: bool = False) -> None:
    """Streams every tensor of the plan into the writer (which must hold them all)."""
    from pymerge import streaming  # the executors (CPU, GPU)
    torch_threads = None  # the caller's, given back at the end: a library caller trained on with N (an audit)
    bar = None
    try:
        uses_torch = streaming.uses_torch(plan, device)  # (a sliced plan: any of its parts)
        if uses_torch and "torch" not in sys.modules:
            # imported here, with Ctrl-C and the stop signals held: one landing while torch's C++ start-up ran
            # Python code went through C++ and aborted the process (std::terminate, exit -6, the temporary folder
            # left beside OUT; an audit). A second one too: none acts until torch is in (a review)
            with held_signals(repeat_acts=False):
                importlib.import_module("torch")
        if threads is not None and uses_torch:
            import torch
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        bar = progress if progress is not None else _progress_bar(plan.input_bytes, quiet)
        run = streaming.run_gpu if device.startswith("cuda") else streaming.run_cpu
        for part in plan.parts:  # a `slices:` merge has several (pymerge/slices.py)
            run(part, writer, device=device, chunk_bytes=chunk_bytes, num_threads=threads or op_threads(), seed=seed,
                progress=bar)
            write_copies(part, writer)
    finally:
        if bar is not None and progress is None:
            bar.close()
        if torch_threads is not None:
            import torch
            torch.set_num_threads(torch_threads)


def write_copies(plan: MergePlan, writer: ShardedWriter) -> None:
    """Each CopyPlan's bytes (every checkpoint holds the same: make_plan compared them), read under the
    SIGBUS guard as the executors read."""
    if not plan.copies:
        return
    with MappingGuard(plan.checkpoints) as guard:
        for c in plan.copies:
            data = plan.checkpoints[0].array(c.name)
            guard.check()
            writer.write(c.name, data)
        guard.check(sizes=True)  # a cut inside a file's last page faults nothing: its size says it


def op_threads(processes: int = 1) -> int:
    """Compute threads by default: every core but one, which the writer thread keeps busy (with
    several merging processes on the host, their share of the cores but one each). The kernels
    are memory-bound, so one thread fewer loses little, while a compute thread competing with
    the writer for a core stalls every block it holds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(1, cores // max(1, processes) - 1)


def pick_device(device: str) -> str:
    if not isinstance(device, str):
        raise InputError(f"--device must be auto, cpu or cuda, got {short(device)}")
    if device == "auto":
        if not _gpu_possible():
            return "cpu"
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available (this torch: {torch.__version__})")
        count = torch.cuda.device_count()
        if device != "cuda" and int(device.split(":")[1]) >= count:  # (CUDA's "invalid device ordinal" came late)
            raise InputError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    raise InputError(f"--device must be auto, cpu or cuda, got {short(device)}")


def _gpu_possible() -> bool:
    """False where torch certainly finds no GPU: Linux without NVIDIA, AMD (ROCm) or WSL GPU device
    nodes. Then `--device auto` is the CPU without importing torch (1.5-2 s) just to ask."""
    if not sys.platform.startswith("linux"):
        return True
    nodes = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")
    return any(os.path.exists(p) for p in nodes) or bool(glob.glob("/dev/nvidia[0-9]*"))


# ---- planning --------------------------------------------------------------------------------
def make_plan(config_or_path) -> MergePlan:
    """Every check that can fail on user input, before any output is written."""
    cfg = _as_config(config_or_path)
    try:
        return _make_plan(cfg)
    except MergeConfigError as exc:  # warnings print after a merge: a key ignored, this error's cause, went unsaid
        # (models[0].weight beside parameters:); those holding a merge parameter first (a review: name: hid it)
        ignored = sorted((w for w in cfg.warnings if "ignored" in w), key=lambda w: "merge parameter" not in w)
        if not ignored:
            raise
        more = f"; and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        raise MergeConfigError(f"{exc} (where the config has keys that were ignored: {'; '.join(ignored[:3])}"
                               f"{more})") from None


def _make_plan(cfg: MergeConfig) -> MergePlan:
    if cfg.sliced is not None:
        from pymerge.slices import make_sliced_plan
        check_paths(cfg)
        plan = make_sliced_plan(cfg)
        try:
            plan.chat_template = _chat_template(cfg, list(dict.fromkeys(p for _, p in cfg.sliced.model_refs())))
        except BaseException:
            plan.close()
            raise
        return plan
    try:
        method = get_method(cfg.merge_method)
        inputs, base = _roles(cfg, method)
        method.validate(len(inputs), base is not None,
                        base_among=method.base_model == "none" and bool(cfg.base_model))
    except MergeConfigError as exc:
        msg = str(exc)
        raise MergeConfigError(msg if msg.startswith(cfg.source) else cfg.where(msg)) from None
    check_method_params(cfg, method, inputs)
    check_paths(cfg)

    sources = inputs + ([base] if base is not None else [])
    opened: Dict[str, Checkpoint] = {}
    try:
        checkpoints = []
        for spec in sources:
            if spec.path not in opened:
                opened[spec.path] = open_model(spec.path, cfg.lora_merge_dtype)
            checkpoints.append(opened[spec.path])
        donor_path = cfg.base_model or cfg.models[0].path
        donor = opened.get(donor_path) or open_model(donor_path, cfg.lora_merge_dtype)
        opened[donor_path] = donor
        labels = [s.path for s in sources]
        _check_distinct(cfg, sources, checkpoints)
        mixed_ties = tied.mixes_ties(checkpoints)
        checkpoints = tied.with_tied_heads(checkpoints)  # a tied model's embedding stands for its head
        vocab = None
        if cfg.tokenizer is not None:
            from pymerge.tokenizer.plan import plan_vocabulary
            vocab = plan_vocabulary(cfg, labels, checkpoints, donor_path, read_model_config)
        names = check_compatible(checkpoints, labels=[hub.shown(label) for label in labels],  # IDs, not snapshots
                                 rows_may_differ=vocab.covers if vocab else None)
        if not names:
            raise CheckpointError(f"{labels[0]}: holds no tensors")
        model_cfg = read_model_config(donor)
        n_layers = count_layers(names, _num_layers(model_cfg),
                                config_path=os.path.join(donor.folder, "config.json") if uses_positions(cfg) else None)
        model_type = (model_cfg or {}).get("model_type")
        resolver = ParamResolver(cfg, method, inputs, model_type)
        tensors, copies = plan_tensors(cfg, method, resolver, checkpoints, labels, names, n_layers, base is not None,
                                       vocab)
        plan = MergePlan(cfg, method, inputs, base, checkpoints, tensors, donor, list(cfg.warnings), vocabulary=vocab,
                         chat_template=_chat_template(cfg, labels), copies=copies)
        seen = [filter_name(n, model_type) for n in names]
        plan.warnings += unmatched_filter_warnings([cfg.parameters] + [m.parameters for m in cfg.models], seen)
        if vocab is not None:
            from pymerge.tokenizer.plan import vocab_size_override  # mergekit sets it (padded) whatever the source
            vocab_size_override(model_cfg, plan.config_overrides, vocab.size)
        if mixed_ties:
            plan.config_overrides.update(tied.tie_override(model_cfg, names, plan.warnings))
        else:
            plan.config_overrides.update(tied.masked_head_override(model_cfg, plan.tensors, method, plan.warnings))
            if "tie_word_embeddings" not in plan.config_overrides:  # (a filter: weighting the head alone)
                plan.config_overrides.update(tied.head_unlike_embedding_override(
                    model_cfg, [(tp, None) for tp in plan.tensors], plan.warnings))
    except BaseException:
        for ck in opened.values():
            ck.close()
        raise
    return plan


def _chat_template(cfg: MergeConfig, models: Sequence[str]) -> Optional[str]:
    """`chat_template:` resolved (a built-in name, auto, or the template itself); None when unset."""
    if cfg.chat_template is None:
        return None
    from pymerge.tokenizer.files import folder_template
    from pymerge.tokenizer.templates import resolve_template
    donor = cfg.base_model or models[0]
    order = [donor] + [m for m in models if m != donor]
    return resolve_template(cfg.chat_template, lambda: [folder_template(m) for m in order],
                            cfg.where("chat_template"))


def _check_distinct(cfg: MergeConfig, sources: List[ModelSpec], checkpoints: List[Checkpoint]) -> None:
    """One model listed twice under other spellings would silently count twice (io.files.repeated_model)."""
    labelled = [(next((f"models[{i}]" for i, m in enumerate(cfg.models) if m is spec), "base_model")
                 + f" ({spec.path})", ck.files) for spec, ck in zip(sources, checkpoints)]
    problem = repeated_model(labelled)
    if problem:
        raise MergeConfigError(cfg.where(problem))


def _same_model(a: str, b: Optional[str]) -> bool:
    """Whether two references name one model: the same files read, links resolved (x, ./x/, a link to x, and
    x/model.safetensors where x loads that file; the last was refused as "the same model; list it once" while the
    docs say it is that entry: an audit)."""
    if b is None or a == b:
        return b is not None
    try:
        return _read_as(a) == _read_as(b)
    except (ValueError, OSError):  # a NUL byte: the path checks that follow name it
        return False


def _read_as(path: str) -> str:
    """The file a folder of one weights file loads (Checkpoint's preference), else the path, links resolved."""
    from pymerge.io.checkpoint import BIN_INDEX, BIN_NAME, SAFETENSORS_INDEX, SAFETENSORS_NAME
    real = os.path.realpath(path)
    if os.path.isdir(real):
        for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX, BIN_NAME, BIN_INDEX):
            f = os.path.join(real, name)
            if os.path.isfile(f):
                return os.path.realpath(f) if name in (SAFETENSORS_NAME, BIN_NAME) else real
    return real


def _with_lora_dtype(cfg: MergeConfig, name) -> MergeConfig:
    name = name[len("torch."):] if isinstance(name, str) and name.startswith("torch.") else name
    if name not in _native.OUTPUT_DTYPE_NAMES:
        raise InputError(f"--lora-merge-dtype must be one of {', '.join(sorted(_native.OUTPUT_DTYPE_NAMES))}, "
                         f"got {short(name)}")
    cfg.lora_merge_dtype = name
    return cfg


def _as_config(x) -> MergeConfig:
    if isinstance(x, MergeConfig):  # a copy: a run's lora_merge_dtype and warnings stayed in the caller's object,
        return copy.deepcopy(x)      # and the next run_merge of it used that dtype (an audit)
    if isinstance(x, dict):  # recorded in OUT as a file would be (it left none: an audit)
        cfg = dataclasses.replace(parse_config(x), text=yaml_text(x))
        if cfg.text is None:
            cfg.warnings.append("the config holds values YAML cannot write: OUT records no mergekit_config.yml")
        return cfg
    if not isinstance(x, (str, os.PathLike)):
        raise MergeConfigError(f"the config must be a path, a dict or a MergeConfig, got {short(x)}")
    return load_config(x)


def _roles(cfg: MergeConfig, method: MergeMethod):
    """(inputs, base). mergekit's rules: a method that takes a base gets it as task.base and the
    other models as inputs (a base also listed under models is not an input); a method that
    ignores the base role (linear) treats base_model as one more input, appended after the models
    if not listed, taking its parameters from the top level."""
    if method.base_model == "none":
        inputs = list(cfg.models)
        if cfg.base_model and not any(_same_model(m.path, cfg.base_model) for m in inputs):
            inputs.append(ModelSpec(cfg.base_model, {}))
        return inputs, None
    if cfg.base_model is None:
        if method.base_model == "required":
            raise MergeConfigError(f"merge_method {method.name} needs a base_model")
        return list(cfg.models), None
    base = next((m for m in cfg.models if _same_model(m.path, cfg.base_model)), ModelSpec(cfg.base_model, {}))
    return [m for m in cfg.models if not _same_model(m.path, cfg.base_model)], base


def plan_tensors(cfg, method, resolver, checkpoints, labels, names, n_layers, has_base,
                 vocab=None) -> Tuple[List[TensorPlan], List[CopyPlan]]:
    """The floating-point tensors' TensorPlans and the other tensors' CopyPlans, each in names' order."""
    tensors, copies = [], []
    with MappingGuard(checkpoints) as guard:  # a copy's bytes are read here: guarded like any merge's reads
        for name in names:
            infos = [ck.info(name) for ck in checkpoints]
            if all(_native.is_floating(i.dtype_name) for i in infos):
                tensors.append(_plan_tensor(cfg, method, resolver, labels, name, infos, n_layers, has_base, vocab))
            else:
                copies.append(_plan_copy(labels, name, infos))
                _check_copy_agrees(checkpoints, labels, copies[-1], guard)
    return tensors, copies


_COPY_RULE = ("pymerge merges floating-point tensors and copies the others (buffers such as attention masks) only "
              "where every model holds the same values: give every model the same (a counter such as BatchNorm's "
              "num_batches_tracked: one model's value), or leave that model out")


def _plan_copy(labels, name, infos) -> CopyPlan:
    """A tensor that is not floating point: one dtype (one safetensors can store) and one shape in every model."""
    first = infos[0]
    for info, label in zip(infos[1:], labels[1:]):
        if info.dtype_name != first.dtype_name or tuple(info.shape) != tuple(first.shape):
            raise CheckpointError(f"{label}: tensor {name!r} has dtype {_dname(info.dtype_name)} and shape "
                                  f"{list(info.shape)}, {labels[0]} has {_dname(first.dtype_name)} and "
                                  f"{list(first.shape)}; {_COPY_RULE}")
    if first.dtype_name not in _native.DTYPE_INFO:
        raise CheckpointError(f"{labels[0]}: tensor {name!r} has dtype {first.dtype_name}, which safetensors "
                              f"cannot store")
    return CopyPlan(name, first.dtype_name, tuple(first.shape))


def _check_copy_agrees(checkpoints, labels, c: CopyPlan, guard: MappingGuard) -> None:
    """Every model holds the same bytes in the copied tensor: checked before anything is written (buffers
    are small)."""
    data = checkpoints[0].array(c.name)
    for ck, label in zip(checkpoints[1:], labels[1:]):
        same = np.array_equal(ck.array(c.name), data)
        guard.check()
        if not same:
            raise CheckpointError(f"{label}: tensor {c.name!r} ({_dname(c.dtype)}) differs from {labels[0]}'s; "
                                  f"{_COPY_RULE}")
        ck.release(c.name)
    checkpoints[0].release(c.name)


def _plan_tensor(cfg, method, resolver, labels, name, infos, n_layers, has_base, vocab=None) -> TensorPlan:
    in_dtypes = [i.dtype_name for i in infos]
    compute = DTYPES[cfg.dtype] if cfg.dtype else None
    casts = []
    for dt, label in zip(in_dtypes, labels):
        cast = None
        exact = dt == compute or (dt, compute) in _EXACT_UP or (_native.itemsize(dt) == 1
                                                                 and dt in _native.INPUT_DTYPE_NAMES)
        if compute is not None and not exact:
            cast = compute  # mergekit loads inputs as `dtype`: round them the same way
        elif dt not in _native.INPUT_DTYPE_NAMES:
            raise CheckpointError(f"{label}: tensor {name!r} has dtype {_dname(dt)}, which pymerge cannot "
                                  f"read directly; set `dtype: float32` in the config to convert it")
        casts.append(cast)
    result = compute or _promote([c or d for c, d in zip(casts, in_dtypes)])
    out = DTYPES[cfg.out_dtype] if cfg.out_dtype else result
    if out not in _native.OUTPUT_DTYPE_NAMES:
        raise MergeConfigError(cfg.where(f"tensor {name!r} would be written as {_dname(out)}; set out_dtype "
                                         f"to float32, bfloat16 or float16"))
    params, model_params = resolver(name, layer_t(name, n_layers))
    task = TensorTask(inputs=[], base=None, model_params=model_params, params=params, name=name)
    try:
        method.check_params(task)
        check_magnitudes(method, task, labels[:len(model_params)])
    except InputError as exc:
        raise type(exc)(cfg.where(str(exc))) from None
    shape, rows = tuple(infos[0].shape), None
    if vocab is not None and vocab.covers(name):
        # Each source's rows, permuted to the output vocabulary in the promoted dtype (as mergekit)
        rows = vocab.rows_for(labels, [i.shape[0] for i in infos], name)
        shape = (vocab.size,) + shape[1:]
        in_dtypes, casts = [result] * len(infos), [None] * len(infos)
    return TensorPlan(name, shape, math.prod(shape), in_dtypes, casts, result, out, params, model_params,
                      sum(i.nbytes for i in infos), rows)


def _promote(dtypes: Sequence[str]) -> str:
    """torch.promote_types over float32, float16 and bfloat16 (what inputs can be here): one
    dtype stays itself, any mix is float32."""
    out = None
    for d in dtypes:
        d = "bfloat16" if _native.itemsize(d) == 1 else d  # float8 results come out as bfloat16
        out = d if out is None or out == d else "float32"
    return out


def _dname(dt) -> str:
    return _native.dtype_name(dt)


def _num_layers(model_cfg: Optional[dict]) -> Optional[int]:
    if not model_cfg:
        return None
    for c in (model_cfg, model_cfg.get("text_config") or {}):
        n = c.get("num_hidden_layers") if isinstance(c, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


# ---- side files ------------------------------------------------------------------------------
def write_side_files(plan: MergePlan, writer: ShardedWriter, copy_tokenizer: bool = True,
                     model_card: bool = False) -> None:
    """config.json from the donor (base, else first model) with the output dtype; its tokenizer."""
    cfg, donor = plan.config, plan.donor
    model_cfg = read_model_config(donor)
    if model_cfg is None:
        plan.warnings.append(f"{donor.folder}: no config.json; the output has none either")
    else:
        dtype = cfg.out_dtype or cfg.dtype  # mergekit: out_dtype, else dtype, else as it was...
        written = {t.out_dtype for part in plan.parts for t in part.tensors}
        said = model_cfg.get("torch_dtype", model_cfg.get("dtype"))  # transformers >= 4.56 writes "dtype" only
        if not dtype and len(written) == 1 and said not in (None, *written):
            dtype = written.pop()  # ...unless every tensor is written in another (bf16 and f32 models: f32)
        if dtype:
            model_cfg["torch_dtype"] = dtype
            if "dtype" in model_cfg:  # transformers >= 4.56 writes this name
                model_cfg["dtype"] = dtype
        model_cfg.update(plan.config_overrides)
        writer.write_json("config.json", model_cfg)
    folder = Path(donor.folder)
    from pymerge.tokenizer.output import write_tokenizer
    skip, tokenizer = write_tokenizer(plan, writer, folder, copy_tokenizer)  # a merged vocabulary or a chat template
    # a merged vocabulary (tokenizer.json written) replaces the donor's, in whatever format
    vocabulary = [] if "tokenizer.json" in skip else _vocabulary_files(folder)
    for fname in [*TOKENIZER_FILES, *vocabulary] if copy_tokenizer else ():
        if fname not in skip and present(folder / fname) and _side_file_ok(plan, folder, fname):
            writer.copy_file(folder / fname, fname)
            if fname == "tokenizer_config.json":
                tokenizer = folder
    for fname in PROCESSOR_FILES:
        if present(folder / fname) and _side_file_ok(plan, folder, fname):
            writer.copy_file(folder / fname, fname)
    vocab_files = {"tokenizer.json", "tokenizer.model", "vocab.json"}
    # none written (a merged vocabulary) nor in the donor (one there but not copied was warned of already)
    if (copy_tokenizer and not vocab_files & skip and not vocabulary
            and not any(present(folder / f) for f in vocab_files)):
        plan.warnings.append(f"{folder}: holds no tokenizer vocabulary pymerge knows (tokenizer.json, "
                             "tokenizer.model, vocab.json, vocab.txt, *.model, *.tiktoken...); the output's "
                             "tokenizer, if any, is its configuration alone (enough only for a class that needs "
                             "no vocabulary file, such as ByT5's; tokenizer_source can name another model's)")
    # without them the output cannot be loaded
    for source, fname in _remote_code_of(folder, model_cfg, tokenizer):
        if _side_file_ok(plan, source, fname):
            writer.copy_file(source / fname, fname)
    if model_card:
        from pymerge.model_card import model_card as card
        writer.write_text("README.md", card(plan, Path(writer.out_dir).name))
    # provenance, under the name mergekit and the Hub use ("<config>": a dict, never a file of that name here)
    if cfg.text is not None:  # what was parsed (the file, read again now, may hold another config since)
        writer.write_text("mergekit_config.yml", cfg.text, mode=cfg.text_mode)


def _vocabulary_files(folder: Path) -> List[str]:
    """The donor's vocabulary files beyond TOKENIZER_FILES: known names and suffixes (a suffix's match only up to
    MAX_VOCABULARY_BYTES), and any file its tokenizer_config.json names under a "*_file" key (vocab_file,
    spm_file...; transformers' init arguments), never one the merge writes or copies otherwise."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []

    def small(n: str) -> bool:
        try:
            return os.path.getsize(folder / n) <= MAX_VOCABULARY_BYTES
        except OSError:
            return False
    found = [n for n in names if n in VOCABULARY_FILES or n.endswith(VOCABULARY_SUFFIXES) and small(n)]
    config = folder / "tokenizer_config.json"
    try:
        settings = read_json(config) if _is_file(config) else {}
    except CheckpointError:  # not JSON: copied as it is, names nothing
        settings = {}
    for key, value in (settings.items() if isinstance(settings, dict) else ()):
        if (key.endswith("_file") and isinstance(value, str) and value in names and value not in found
                and not value.endswith(_WEIGHT_SUFFIXES)):
            found.append(value)
    return [n for n in found if n not in TOKENIZER_FILES and n not in _WRITTEN_OTHERWISE and not n.endswith(".py")
            and _is_file(folder / n)]


# transformers' get_relative_import_files: "from .foo import X" and "import .foo" name foo.py beside the module
# ([ \t], not \s: \s matched newlines, so each blank line rescanned the rest of the file, quadratic: minutes for 200 KB
# of them in a donor's module, an audit)
_RELATIVE_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+\.(\w+)[ \t]+import|import[ \t]+\.(\w+)[ \t]*$)", re.MULTILINE)


def _with_relative_imports(folder: Path, modules: List[str]) -> List[str]:
    """modules and every module beside them that they import relatively, recursively (custom modeling code
    split into modeling_foo.py and foo_layers.py loads only with both)."""
    out, todo = list(modules), list(modules)
    while todo:
        module = todo.pop()
        try:
            text = (folder / module).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        here = str(Path(module).parent)
        for m in _RELATIVE_IMPORT.finditer(text):
            name = os.path.normpath(os.path.join(here, f"{m.group(1) or m.group(2)}.py"))
            if name not in out and _is_file(folder / name):
                out.append(name)
                todo.append(name)
    return out


def _remote_code_files(model_cfg: Optional[dict], folder: Path) -> List[str]:
    """The donor's own Python modules that config.json's auto_map names (custom code, loaded with
    trust_remote_code): "configuration_foo.FooConfig" is configuration_foo.py in the folder. A module of
    another repository ("org/repo--modeling_x.X") is loaded from there; absent files are skipped."""
    auto_map = model_cfg.get("auto_map") if isinstance(model_cfg, dict) else None
    refs = []
    for value in (auto_map.values() if isinstance(auto_map, dict) else ()):
        refs += value if isinstance(value, list) else [value]
    out = []
    for ref in refs:
        if not isinstance(ref, str) or "--" in ref or "." not in ref:
            continue
        fname = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"  # no '..' part left: every dot is a '/'
        if fname not in out and not fname.startswith("/") and _is_file(folder / fname):
            out.append(fname)
    return _with_relative_imports(folder, out)


def _remote_code_of(folder: Path, model_cfg: Optional[dict], tokenizer: Optional[Path]) -> List[Tuple[Path, str]]:
    """(folder, module) write_side_files copies: those the donor's config.json's auto_map names, and those the
    auto_map of the output's tokenizer_config.json names (a custom tokenizer's tokenization_foo.py), from
    `tokenizer`, the folder that file was copied or edited from (the donor, or a tokenizer_source), and those the
    donor's processor files name (preprocessor_config.json, processor_config.json)."""
    code = [(folder, m) for m in _remote_code_files(model_cfg, folder)]
    configs = [] if tokenizer is None else [(tokenizer, "tokenizer_config.json")]
    # a custom processor's modules too (Phi-3-vision's processing_phi3_v.py): its files are copied from the donor
    configs += [(folder, f) for f in ("preprocessor_config.json", "processor_config.json")]
    for where, fname in configs:
        config = where / fname
        if not _is_file(config):
            continue
        try:
            modules = _remote_code_files(read_json(config), where)
        except CheckpointError:  # not JSON: copied as it is
            modules = []
        code += [(where, m) for m in modules if m not in {name for _, name in code}]
    return code


def _is_file(path) -> bool:
    """os.path.isfile, but a file that cannot be looked up (EIO) is a one-line error, not a file left out of OUT."""
    return present(path) and os.path.isfile(path)


def _side_file_ok(plan: MergePlan, folder: Path, fname: str) -> bool:
    """A file copied from the model folder must live there: a symlink out of it is skipped (with a
    warning), since it could carry any file the user can read into the merged model."""
    if stays_inside(folder, folder / fname):
        return True
    plan.warnings.append(f"{folder / fname}: is a link to a file outside the model folder; not copied")
    return False


def _progress_bar(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    from pymerge.progress import SafeStream
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merging", dynamic_ncols=True,
                file=SafeStream(),
                smoothing=0.1, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                          "[{elapsed}<{remaining}, {rate_fmt}]")
