"""Delta-compressed pools: each checkpoint held as its task vector delta_i = theta_i - base, quantized.

Fine-tunes of one base differ by small deltas that quantize well, so a pool holds the base exactly
and every checkpoint as codes plus per-block scales; a merge reads about P*2 + N*P*bits/8 bytes
instead of (N+1)*P*2, and decodes inside the kernel:

    out = (sum_i w_i) * base + sum_i w_i * decode(delta_i)          (linear)
    out = c_base * base + sum_i c_i * (base + decode(delta_i))      (any weighted-sum method)

Stored formats (per tensor and checkpoint), with their documented error bounds:
  zero   the tensor equals the base: 0 bytes, exact.
  int4   codes in [-7, 7], two per byte, one bfloat16 scale per BLOCK elements; 4.25 bits per element.
         Each GROUP of 128 elements is 64 bytes read as 16 little-endian 32-bit words: bits 4h..4h+3
         of word i hold element 16h + i as code + 8 (the layout the kernels unpack without shuffles).
  int8   codes in [-127, 127], one per byte, same scales; 8.25 bits per element.
  exact  the checkpoint's own tensor as the pool holds it (the fallback), exact.
For int4/int8 every element satisfies |decode(delta) - delta| <= s_b / 2, where s_b is max|delta|
over its block divided by qmax (7 or 127), rounded up to bfloat16 (so at most (1 + 2^-7) times
that quotient, and at least bfloat16's smallest subnormal, 2^-133, for a nonzero block).
delta is measured in float64 between the tensors as the pool would hold them (dtype=).

compress="int8"/"int4" uses that format everywhere (exact where error_budget, if given, is not
met); "auto" picks per tensor and checkpoint the cheapest format whose measured relative error
||decode(delta) - delta|| / ||delta|| is within error_budget (default 1e-2). A sparse top-k
format is not offered: to match int4's error (10-15 % relative on dense, heavy-tailed deltas) a
magnitude top-k must keep about 60 % of the entries, over 14 bits per element with a 16-bit index
and an 8-bit value (benchmarks/bench_compressed_pool.py measures it).

Kernels: C++ (csrc/cpu/delta_decode.cpp) on the CPU, Triton (kernels/delta_decode.py) on CUDA
or in the interpreter, the CUDA extension (csrc/cuda/delta_decode.cu, backend="cuda"), eager
torch as the reference. The C++ paths (AVX-512, AVX2, plain), Triton and CUDA compute the same
float32 operations in the same order (coef = w * scale per block, then one fma per term from
-0.0), so they agree bit for bit (NaN payloads aside: the GPU's are canonical); torch agrees on
the sign of zero and within the float32 accumulation bound. Methods that are not weighted sums (TIES,
DARE, ...) run on decoded inputs: base + decode(delta_i) in float32, selection on decoded deltas.

A pool on the C++ backend of a CPU whose best path is AVX2 holds its int4 checkpoints two by two
(pair_int4; the same bytes, a layout csrc/cpu/delta_decode.cpp documents) and sums each block's int4
terms in int32 with each coefficient w * s rounded to 15 bits of the block's largest (two
checkpoints per vpmaddwd: the float decode's instruction count was the AVX2 kernel's limit). That
adds at most sum_t |code_t| * 2^-14 * max_t |w_t * s_t| per element to the float32 accumulation's
error: at N = 16, below 2^-7 of the largest term's quantization step w * s; and a block whose
paired terms sum to exactly zero starts from +0.0 where the float path may give -0.0 (so torch's
sign of zero can differ there). An odd checkpoint out,
AVX-512 CPUs (whose float path, one table permute per 16 values, was measured at 1.94x the bf16
pool; the integer path has no AVX-512 build) and every other backend keep the float path. Saved
files hold the unpaired layout.
"""
import errno
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from pymerge import _native
from pymerge.errors import CheckpointError, InputError, short
from pymerge.io.files import check_replaceable, kernel_folder, replace_file
from pymerge.io.safetensors_file import write_tensors
from pymerge.ops._checks import FLOAT32_MAX, as_flag
from pymerge.pool.sources import check_range

BLOCK = 64            # elements per scale
GROUP = 128           # int4 packing unit (two blocks): 16 words, nibble h of word i is element 16h + i
COMPRESS_MODES = ("int8", "int4", "auto")
FORMATS = ("zero", "int4", "int8", "exact")
DEFAULT_BUDGET = 1e-2
KIND_Q8, KIND_Q4 = 16, 17  # csrc/cpu/delta_decode.cpp and kernels/delta_decode.py
KIND_Q4_FIRST, KIND_Q4_SECOND = 18, 19  # a pair of int4 checkpoints in one buffer (C++ only)
MAX_PAIRS = 1024           # per tensor, as csrc/cpu/delta_decode.cpp (its int32 sums)
_HELD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
META_KEY = "pymerge.compressed_pool"
VERSION = 2           # 1: int4 in byte strips of 32 (byte j: element j low, j + 16 high); read and repacked


def check_options(compress, error_budget, has_base: bool, residency) -> Optional[float]:
    """Validates compress= and error_budget= before anything is read; returns the budget in force."""
    if not isinstance(compress, str) or compress not in COMPRESS_MODES:
        raise InputError(f"compress must be one of {', '.join(COMPRESS_MODES)}, got {compress!r}")
    if not has_base:
        raise InputError(f"compress={compress!r} stores each checkpoint as its delta from a base: pass base=")
    if residency is not None:
        raise InputError("a compressed pool is held resident; residency= does not apply (drop it)")
    if _native.cpu is None:  # its encoder is C++ only (a RuntimeError from deep inside the build otherwise)
        raise InputError(f"compress={compress!r} needs pymerge's C++ extension, which is not built here "
                         f"({_native.CPU_IMPORT_ERROR}); reinstall pymerge where a C++17 compiler is found")
    if error_budget is None:
        return DEFAULT_BUDGET if compress == "auto" else None
    if isinstance(error_budget, bool) or not isinstance(error_budget, (int, float, np.floating, np.integer)):
        raise InputError(f"error_budget must be a number > 0, got {error_budget!r}")
    try:
        budget = float(error_budget)  # an int past float's range (10**400) overflows here
    except OverflowError:
        budget = math.inf
    if not math.isfinite(budget) or budget <= 0:
        raise InputError(f"error_budget must be finite and > 0, got {short(error_budget)}")
    return budget


def check_backend(backend: str, device: torch.device) -> None:
    """The decode kernels: C++ for CPU tensors, Triton on CUDA (or in its interpreter), the CUDA
    extension on CUDA tensors, torch anywhere."""
    if backend not in ("cpu", "triton", "cuda", "torch"):
        raise InputError(f"backend {backend!r} has no delta-decode kernel; use cpu, triton, cuda or torch")
    if backend == "cpu" and device.type != "cpu":
        raise InputError(f"backend 'cpu' computes on CPU tensors; the pool is on {device}")
    if backend == "cuda" and (device.type != "cuda" or not hasattr(_native.cuda, "delta_accumulate")):
        raise InputError(f"backend 'cuda' needs a pool on a CUDA device and pymerge's CUDA extension "
                         f"(pool on {device}, extension {'missing' if _native.cuda is None else 'without the kernel'})")


def held_dtype(dtype: torch.dtype, forced: Optional[torch.dtype], readable=_HELD_DTYPES) -> torch.dtype:
    """What a pool stores a tensor of `dtype` as: forced (dtype=), else its own dtype where the kernels
    read it (`readable`: a compressed pool's decode kernels read these three), else a float8 widens to
    bfloat16 exactly, float64 narrows to float32."""
    if forced is not None:
        return forced
    if dtype in readable:
        return dtype
    return torch.bfloat16 if dtype.itemsize == 1 else torch.float32


def _common(dtypes) -> torch.dtype:
    """One dtype that holds every one of dtypes exactly: their own where they agree, else float32."""
    return dtypes[0] if all(d == dtypes[0] for d in dtypes) else torch.float32


# ---- one encoded tensor -----------------------------------------------------------------------------
@dataclass
class Encoded:
    """One checkpoint's tensor: format, payload and the relative error measured at compression."""
    fmt: str
    rel_error: float
    delta_norm: float                        # ||delta||_2 (float64), to combine errors over tensors
    codes: Optional[torch.Tensor] = None     # int8 [padded] or uint8 [padded / 2]; None while paired
    scales: Optional[torch.Tensor] = None    # bfloat16 [blocks]
    exact: Optional[torch.Tensor] = None     # the checkpoint's tensor as held (format "exact")
    pair: Optional[torch.Tensor] = None      # int4 held paired with another checkpoint: the shared buffer
    slot: int = 0                            # ... of which this is the first (0) or second (1) half
    group: Optional[torch.Tensor] = None     # int4 held interleaved with `width` checkpoints (interleave_int4)
    width: int = 1                           # ... of which this is checkpoint `slot`

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.exact) if t is not None)
        shared = self.pair.numel() // 2 if self.pair is not None else 0
        return own + shared + (self.group.numel() // self.width if self.group is not None else 0)

    @property
    def unpaired_nbytes(self) -> int:
        """nbytes as a pool holding its int4 codes unpaired holds them (whole GROUPs per checkpoint): the same on
        every machine (a pool of the AVX2 path pairs them; a tensor of an odd number of blocks then holds less)."""
        if self.scales is None:
            return self.nbytes
        return code_count(self.scales.numel() * BLOCK, self.fmt) + self.scales.numel() * self.scales.element_size()

    def int_codes(self, numel: int) -> Optional[torch.Tensor]:
        """The codes in the saved layout: held, or taken out of the pair or interleaved buffer."""
        if self.pair is not None:
            return unpair_int4(self.pair, numel, self.slot)
        if self.group is not None:
            return self.group.view(-1, self.width, 64)[:, self.slot].reshape(-1)
        return self.codes


def padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def code_count(numel: int, fmt: str) -> int:
    """Entries of a codes tensor: int8 padded to whole blocks, int4 (bytes) to whole groups."""
    return padded(numel) if fmt == "int8" else -(-numel // GROUP) * GROUP // 2


def quantize(theta: torch.Tensor, base: torch.Tensor, fmt: str, num_threads: int = 0):
    """theta - base (held tensors, CPU, contiguous) as int8/int4 codes and bfloat16 scales, padded to
    BLOCK, by the C++ encoder (threaded). Returns (codes, scales, sum of squared errors, sum of squared
    deltas, first element whose delta is not finite in float32 or -1); sums in float64."""
    n, p = theta.numel(), padded(theta.numel())
    codes = torch.empty(code_count(n, fmt), dtype=torch.int8 if fmt == "int8" else torch.uint8)
    scales = torch.empty(p // BLOCK, dtype=torch.bfloat16)
    err2, norm2, bad = _native.require_cpu().delta_quantize(
        theta.data_ptr(), _native.DTYPE_CODES[theta.dtype], base.data_ptr(), _native.DTYPE_CODES[base.dtype], n,
        8 if fmt == "int8" else 4, codes.data_ptr(), scales.data_ptr(), num_threads)
    return codes, scales, err2, norm2, bad


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, numel: int) -> torch.Tensor:
    """float32 values of int8/int4 codes (exact: a code times a bfloat16 scale fits float32)."""
    if fmt == "int4":
        codes = (int4_nibbles(codes).to(torch.int16) - 8)[:padded(numel)]
    values = codes.view(-1, BLOCK).float() * scales.float()[:, None]
    return values.view(-1)[:numel]


def int4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 code + 8 of every element of int4 codes, in element order (padding included)."""
    words = codes.view(-1, 16, 4)                                   # [group, word i, byte k]
    nib = torch.stack([words & 15, words >> 4], dim=3)              # [group, i, k, s]: nibble h = 2k + s
    return nib.view(-1, 16, 8).transpose(1, 2).reshape(-1)          # element 16h + i


def int4_pack(nibbles: torch.Tensor, numel: int) -> torch.Tensor:
    """int4_nibbles' inverse: element-order code + 8 of a numel-element tensor (at most its whole groups;
    what is missing up to them is padding, code 0) as int4 codes."""
    full = torch.full((code_count(numel, "int4") * 2,), 8, dtype=torch.uint8)
    full[:nibbles.numel()] = nibbles
    nib = full.view(-1, 8, 16).transpose(1, 2).reshape(-1, 16, 4, 2)     # [group, word i, byte k, s]
    return (nib[..., 0] | (nib[..., 1] << 4)).reshape(-1).contiguous()


def pair_int4(first: torch.Tensor, second: torch.Tensor, numel: int) -> torch.Tensor:
    """Two checkpoints' int4 codes (of one tensor) in the paired layout: per block of 64 elements 64
    bytes, 16 little-endian words; element 8j + i (j = 4r + h) in word 8r + i, bits 4h.. for the
    first checkpoint and 16 + 4h.. for the second, as code + 8."""
    nb = padded(numel) // BLOCK
    halves = []
    for codes in (first, second):
        nib = int4_nibbles(codes)[:nb * BLOCK].view(nb, 2, 4, 8).transpose(2, 3)   # [block, r, i, h]
        halves.append(nib[..., 0::2] | (nib[..., 1::2] << 4))                      # bytes 2 per word
    return torch.cat(halves, dim=3).reshape(-1).contiguous()                        # [block, r, i, 4 bytes]


def unpair_int4(pair: torch.Tensor, numel: int, slot: Optional[int] = None):
    """pair_int4's inverse: the two checkpoints' codes in the unpaired layout (padding: code 0), or
    only the first's (slot 0) or the second's (1)."""
    nb = padded(numel) // BLOCK
    words = pair.view(nb, 2, 8, 4)
    out = []
    for s in (0, 1) if slot is None else (slot,):
        half = words[..., 2 * s: 2 * s + 2]
        nib = torch.stack([half & 15, half >> 4], dim=4).reshape(nb, 2, 8, 4).transpose(2, 3).reshape(-1)
        out.append(int4_pack(nib, numel))
    return out if slot is None else out[0]


def repack_v1_int4(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """int4 codes saved by version 1 (strips of 32: byte j holds element j low, j + 16 high) in
    today's layout."""
    strips = codes.view(-1, 16)
    values = torch.cat([strips & 15, strips >> 4], dim=1).view(-1)   # code + 8, element order
    return int4_pack(values, numel)


def pairs_pay() -> bool:
    """Whether a CPU pool pairs its int4 checkpoints: where the C++ kernels run their AVX2 path."""
    return _native.cpu is not None and _native.cpu.simd_level() == "avx2"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def encode(theta: torch.Tensor, base: torch.Tensor, mode: str, budget: Optional[float], where: str,
           stored: torch.dtype, base_top: float, num_threads: int = 0) -> Encoded:
    """One checkpoint tensor (as held) against the base (as held, same dtype) in compress mode `mode`;
    stored: the tensor's dtype in its file, whose range its decoded values keep (as the held one's);
    base_top: max |base| (the same base for every checkpoint: the caller takes it once)."""
    theta, base = theta.reshape(-1).contiguous(), base.reshape(-1).contiguous()
    # the dtypes whose range decoded values must keep: both where both are (float16 held, bfloat16 stored)
    kept = [d for d in {stored, theta.dtype} if d in _RANGED]
    for fmt in ("int4", "int8") if mode == "auto" else (mode,):
        codes, scales, err2, norm2, bad = quantize(theta, base, fmt, num_threads)
        if bad >= 0 and _same_bits(theta, base):  # a mask buffer of -inf, unchanged: costs nothing, as documented
            return Encoded("zero", 0.0, 0.0)
        if bad >= 0:
            raise InputError(f"{where}: delta from the base is not finite at element {bad} "
                             f"(checkpoint {float(theta[bad])}, base {float(base[bad])}); "
                             "a compressed pool needs deltas finite in float32")
        if norm2 == 0:
            return Encoded("zero", 0.0, 0.0)
        if mode == "auto" and codes.nbytes + scales.nbytes >= theta.nbytes:
            continue  # a tiny tensor (<= 33 elements at 16 bits, <= 16 at 32): codes and scale cost more
        reach = float(scales.abs().max()) * (7 if fmt == "int4" else 127)
        if reach > FLOAT32_MAX:
            continue  # a delta near float32's limit: code * scale would decode to inf (the fused kernel adds the
            #           base first and stays finite, but pool.tensor() and the selection methods decode it alone)
        if any(reach + base_top > torch.finfo(d).max and _decodes_past(d, base, codes, scales, fmt) for d in kept):
            continue
        err = math.sqrt(err2 / norm2)
        if budget is None or err <= budget:
            return Encoded(fmt, err, math.sqrt(norm2), codes=codes, scales=scales)
    return Encoded("exact", 0.0, math.sqrt(norm2), exact=theta.clone())


_RANGED = (torch.float16, torch.bfloat16, torch.float32)


def _decodes_past(dtype: torch.dtype, base: torch.Tensor, codes, scales, fmt: str) -> bool:
    """Whether base + code * scale rounds to inf in dtype (the checkpoint's own) somewhere: near the dtype's
    largest value a block's scale, rounded up to bfloat16, takes code 127 (7) past it, and weight 1 on that
    checkpoint gave inf where the exact pool gives the checkpoint (float32 too: the fused kernel's float32 sum
    base + code * scale overflows there). encode() decodes only where max |base| plus the largest
    |code * scale| says it may."""
    return bool(torch.isinf((base.float() + dequantize(codes, scales, fmt, base.numel())).to(dtype)).any())


# ---- the store --------------------------------------------------------------------------------------
@dataclass
class _Terms:
    """One tensor's kernel terms: the base first, then every checkpoint that is not 'zero'."""
    tensors: List[torch.Tensor]       # data per term (kept alive here)
    scales: List[Optional[torch.Tensor]]
    kinds: List[int]
    strides: List[int]                # int4 terms: bytes from one group of codes to the next (64: contiguous)
    cols: np.ndarray                  # checkpoint index of terms 1..
    exact_cols: np.ndarray            # checkpoints held exact (their tensor carries the base)


def _path(path, what: str) -> str:
    """A str or os.PathLike path as a str; anything else (None, a number) a one-line InputError."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise InputError(f"{what}: the path must be a str or os.PathLike naming a .safetensors file, got "
                         f"{type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:  # (os calls raise a bare "embedded null byte")
        raise InputError(f"{what}: the path {short(path)} holds a NUL character")
    return path


def _install_new(tmp: str, path: str) -> None:
    """Puts the complete file tmp at path, unless something is there by now: save checks exists() long
    before, and os.replace here replaced a file that appeared while the pool was being written."""
    try:
        os.link(tmp, path)  # atomic, and fails where anything is at path (a link too: never followed)
    except FileExistsError:
        raise InputError(f"{path}: already exists; pass overwrite=True to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        # no hard links on this filesystem: claim the name with an exclusive create, then rename over
        # that empty file of our own (a reader may see it empty for that moment; nothing else is replaced)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise InputError(f"{path}: already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def _held(source, name: str, held: torch.dtype) -> torch.Tensor:
    """A checkpoint's tensor in the pool's held dtype, refused where that makes its values inf (check_range)."""
    t = source.tensor(name).detach()
    h = t.to("cpu", held)
    check_range(h, t, source.label, name)
    return h


class CompressedStore:
    """The base (exact) and every checkpoint's encoded delta, per tensor; kernels run from here."""

    def __init__(self, names: List[str], shapes: Dict[str, tuple], base: Dict[str, torch.Tensor],
                 entries: Dict[str, List[Encoded]], labels: List[str], mode: str, budget: Optional[float],
                 skipped: Sequence[str] = ()):
        self.names, self.shapes, self.base, self.entries = names, shapes, base, entries
        self.labels, self.mode, self.budget, self.skipped = list(labels), mode, budget, list(skipped)
        self.tied_embedding: Optional[str] = None  # the pool's tied-head rule, saved with it (pool.py sets it)
        self._terms: Dict[str, _Terms] = {}

    def __getstate__(self) -> dict:
        """Copied without the kernels' term cache: its views into an interleaved int4 buffer pickled that whole
        buffer once per checkpoint (a pool of 16 held 13x its size after a round trip; an audit)."""
        return {**self.__dict__, "_terms": {}}

    @classmethod
    def build(cls, opened, base_src, names, shapes, mode: str, budget: Optional[float],
              dtype: Optional[torch.dtype], skipped=(), num_threads: int = 0) -> "CompressedStore":
        """num_threads: the encoder's CPU threads (the pool's; 0: every core)."""
        base, entries = {}, {}
        for name in names:
            b = base_src.tensor(name).detach()
            # Wide enough for the base and every checkpoint: a float32 fine-tune of a bfloat16 base rounded
            # to bfloat16 before its delta was taken lost deltas below bfloat16's step (80 % error, reported 0.5 %).
            held = dtype or _common([held_dtype(d, None) for d in [b.dtype] + [s.info(name)[0] for s in opened]])
            base[name] = b.to("cpu", held, copy=True).contiguous()
            check_range(base[name], b, base_src.label, name)
            top = float(base[name].abs().max()) if base[name].numel() else 0.0  # once, not per checkpoint
            entries[name] = [encode(_held(s, name, held), base[name], mode, budget, f"{s.label}: tensor {name!r}",
                                    s.info(name)[0], top, num_threads) for s in opened]
        return cls(names, shapes, base, entries, [s.label for s in opened], mode, budget, skipped)

    def to(self, device: torch.device) -> "CompressedStore":
        """The store with every tensor on `device` (itself on the CPU), unpaired off the CPU."""
        if device.type == "cpu":
            return self
        move = (lambda t: None if t is None else t.to(device))
        base = {n: move(t) for n, t in self.base.items()}
        entries = {n: [Encoded(e.fmt, e.rel_error, e.delta_norm, move(e.int_codes(self.base[n].numel())),
                               move(e.scales), move(e.exact)) for e in es] for n, es in self.entries.items()}
        return CompressedStore(self.names, self.shapes, base, entries, self.labels, self.mode, self.budget, self.skipped)

    def interleave_int4(self) -> "CompressedStore":
        """Holds each tensor's int4 checkpoints block-interleaved in one buffer (group g of every checkpoint,
        then group g + 1, ...) for the C++ float path: one memory stream instead of one per checkpoint,
        the same bytes and the same bits (the kernel reads each term with a group stride). Returns self."""
        for name in self.names:
            q4 = [e for e in self.entries[name] if e.fmt == "int4" and e.pair is None and e.group is None]
            if len(q4) < 2:
                continue
            buf = torch.stack([e.codes.view(-1, 64) for e in q4], dim=1).reshape(-1)
            for slot, e in enumerate(q4):
                e.group, e.slot, e.width, e.codes = buf, slot, len(q4), None
        self._terms.clear()
        return self

    def pair_int4(self) -> "CompressedStore":
        """Holds each tensor's int4 checkpoints two by two, in checkpoint order, for the C++ kernel's
        integer path (module docstring); the same bytes, so nbytes barely moves. Returns self."""
        for name in self.names:
            numel = self.base[name].numel()
            q4 = [e for e in self.entries[name] if e.fmt == "int4" and e.pair is None and e.group is None]
            held = sum(e.pair is not None for e in self.entries[name]) // 2
            for a, b in list(zip(q4[0::2], q4[1::2]))[:max(0, MAX_PAIRS - held)]:
                buf = pair_int4(a.codes, b.codes, numel)
                a.pair, a.slot, a.codes = buf, 0, None
                b.pair, b.slot, b.codes = buf, 1, None
        self._terms.clear()
        return self

    # ---- sizes and report ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: the base plus every encoded checkpoint."""
        return self.model_nbytes() + sum(e.nbytes for es in self.entries.values() for e in es)

    def model_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def report(self) -> List[dict]:
        """One row per tensor and checkpoint: format, bytes held, measured relative error of the delta."""
        rows = []
        for name in self.names:
            for i, e in enumerate(self.entries[name]):
                rows.append({"tensor": name, "checkpoint": i, "label": self.labels[i], "format": e.fmt,
                             "bytes": e.nbytes, "rel_error": e.rel_error, "delta_norm": e.delta_norm,
                             "numel": int(np.prod(self.shapes[name], dtype=np.int64))})
        return rows

    def checkpoint_errors(self) -> List[float]:
        """Relative error of each checkpoint's whole delta (all tensors together)."""
        out = []
        for i in range(len(self.labels)):
            num = sum((e[i].rel_error * e[i].delta_norm) ** 2 for e in self.entries.values())
            den = sum(e[i].delta_norm ** 2 for e in self.entries.values())
            out.append(math.sqrt(num / den) if den > 0 else 0.0)
        return out

    def describe(self) -> str:
        counts = {}
        for es in self.entries.values():
            for e in es:
                counts[e.fmt] = counts.get(e.fmt, 0) + 1
        mix = ", ".join(f"{counts[f]} {f}" for f in FORMATS if f in counts)
        worst = max(self.checkpoint_errors(), default=0.0)
        return f"compressed {self.mode} ({mix}; worst checkpoint delta error {worst:.2e})"

    def decoded(self, i: int, name: str) -> torch.Tensor:
        """Checkpoint i's tensor as the pool reconstructs it: base + decode(delta), float32."""
        e, base = self.entries[name][i], self.base[name].reshape(-1)
        if e.fmt == "exact":
            flat = e.exact.to(torch.float32, copy=True)  # a copy: writing into it must not change the pool
        elif e.fmt == "zero":
            flat = base.to(torch.float32, copy=True)
        else:
            flat = base.float() + dequantize(e.int_codes(base.numel()), e.scales, e.fmt, base.numel())
        return flat.view(self.shapes[name])

    # ---- merging ------------------------------------------------------------------------------------
    def terms(self, name: str) -> _Terms:
        hit = self._terms.get(name)
        if hit is None:
            tensors, scales, kinds, cols, exact_cols = [self.base[name]], [None], [_dense_kind(self.base[name])], [], []
            strides = [64]
            pairs = [(i, e) for i, e in enumerate(self.entries[name]) if e.pair is not None]
            for i, e in enumerate(self.entries[name]):
                if e.fmt == "zero" or e.pair is not None:
                    continue
                cols.append(i)
                if e.fmt == "exact":
                    exact_cols.append(i)
                    tensors.append(e.exact)
                    scales.append(None)
                    kinds.append(_dense_kind(e.exact))
                    strides.append(64)
                else:
                    # an interleaved checkpoint: its first group in the shared buffer, read with a stride
                    tensors.append(e.codes if e.group is None else e.group[64 * e.slot:])
                    scales.append(e.scales)
                    kinds.append(KIND_Q8 if e.fmt == "int8" else KIND_Q4)
                    strides.append(64 * e.width)
            for i, e in pairs:  # last, first and second of each pair in turn (the kernel's order)
                cols.append(i)
                tensors.append(e.pair)
                scales.append(e.scales)
                kinds.append(KIND_Q4_SECOND if e.slot else KIND_Q4_FIRST)
                strides.append(64)
            hit = self._terms[name] = _Terms(tensors, scales, kinds, strides, np.array(cols, dtype=np.int64),
                                             np.array(exact_cols, dtype=np.int64))
        return hit

    def accumulate(self, name: str, c_base: np.ndarray, coef: np.ndarray, outs: List[torch.Tensor],
                   backend: str, num_threads: int = 0) -> None:
        """outs[k] = c_base[k] * base + sum_i coef[k, i] * theta_i, theta_i = base + decode(delta_i).

        c_base: [K], coef: [K, N] (float64); each out is contiguous, float32/float16/bfloat16.
        """
        T = self.terms(name)
        w = np.empty((len(outs), len(T.kinds)), dtype=np.float64)
        # theta_i = base + delta_i: every checkpoint adds its coefficient to the base's, except those
        # held exact, whose own tensor already carries the base.
        w[:, 0] = c_base + coef.sum(axis=1) - coef[:, T.exact_cols].sum(axis=1)
        w[:, 1:] = coef[:, T.cols]
        run_terms(T.tensors, T.scales, T.kinds, self.base[name].numel(), w.astype(np.float32), outs, backend,
                  num_threads, T.strides)

    # ---- save / load -------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> None:
        """One .safetensors file: codes, scales and exact tensors, plus a JSON header in its metadata."""
        path = _path(path, "save")
        if not path:  # (it wrote the whole file, then failed renaming it to '')
            raise InputError("save: the path is empty; name a .safetensors file")
        if os.path.isdir(path):
            raise InputError(f"{path}: is a folder; save writes one .safetensors file")
        try:
            overwrite = as_flag(overwrite, "overwrite")  # "no" replaced the file
        except TypeError as exc:
            raise InputError(str(exc)) from None
        if os.path.exists(path) and not overwrite:
            raise InputError(f"{path}: already exists; pass overwrite=True to replace it")
        check_replaceable(path)
        parent = kernel_folder(path)
        if not os.path.isdir(parent):
            raise InputError(f"{path}: folder {parent} does not exist")
        tensors, table = {}, []
        for name in self.names:
            tensors[f"base/{name}"] = self.base[name].cpu()
            for i, e in enumerate(self.entries[name]):
                for part, t in (("codes", e.int_codes(self.base[name].numel())), ("scales", e.scales),
                                ("exact", e.exact)):
                    if t is not None:
                        tensors[f"{i}/{name}/{part}"] = t.cpu()
            table.append({"name": name, "shape": list(self.shapes[name]),
                          "formats": [e.fmt for e in self.entries[name]],
                          "errors": [e.rel_error for e in self.entries[name]],
                          "norms": [e.delta_norm for e in self.entries[name]]})
        header = {"version": VERSION, "block": BLOCK, "mode": self.mode, "error_budget": self.budget,
                  "labels": self.labels, "skipped": self.skipped, "tensors": table,
                  "tied_embedding": self.tied_embedding}
        # a fresh temporary name (path.tmp<pid> was predictable: save_file wrote through a link planted there);
        # the old file or the complete new one, never half of it; without overwrite, never a file made meanwhile
        meta = {META_KEY: json.dumps(header), "format": "pt"}
        replace_file(path, lambda tmp: write_tensors(tmp, tensors, meta, label=f"{path} ({len(self.names)} tensors x "
                                                                          f"{len(self.labels)} checkpoints)"),
                     install=os.replace if overwrite else _install_new)

    @classmethod
    def load(cls, path) -> "CompressedStore":
        """A store saved by save(), validated as strictly as any checkpoint (CheckpointError if not)."""
        from types import SimpleNamespace

        from pymerge.io import SafetensorsFile
        from pymerge.io.sigbus import MappingGuard
        path = _path(path, "load")
        # guarded as a merge's reads: a file truncated while it is read is a CheckpointError, not SIGBUS
        with SafetensorsFile(path) as f, MappingGuard([SimpleNamespace(shards=[f])], "being loaded") as guard:
            header = _parse_header(path, f.metadata)
            expected = {}
            for entry in header["tensors"]:
                _expect(expected, entry, header["version"])
            have = set(f.names())
            missing = sorted(set(expected) - have)
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
            extra = sorted(have - set(expected))
            if extra:
                raise CheckpointError(f"{path}: tensor {extra[0]!r} is not part of a compressed pool")
            loaded = {}
            # a base tensor every checkpoint holds bit for bit (format zero) may hold inf/NaN: a mask buffer
            unchanged = {f"base/{e['name']}" for e in header["tensors"] if set(e["formats"]) == {"zero"}}
            for key, (dtypes, shape) in expected.items():
                info = f.info(key)
                if info.dtype not in dtypes or tuple(info.shape) != shape:
                    want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
                    raise CheckpointError(f"{path}: tensor {key!r} is {info.dtype_name} {list(info.shape)}, "
                                          f"expected {want} {list(shape)}")
                t = f.tensor(key).clone()
                if t.is_floating_point() and key not in unchanged and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{path}: tensor {key!r} holds non-finite values")
                if key.endswith("/scales") and bool((t < 0).any()):
                    raise CheckpointError(f"{path}: tensor {key!r} holds negative scales")
                loaded[key] = t
            guard.check(then="no pool was loaded", sizes=True)
        names, shapes, base, entries = [], {}, {}, {}
        for entry in header["tensors"]:
            name = entry["name"]
            names.append(name)
            shapes[name] = tuple(entry["shape"])
            base[name] = loaded[f"base/{name}"].view(shapes[name])
            numel = math.prod(shapes[name])
            entries[name] = [Encoded(fmt, err, norm, _codes_now(loaded.get(f"{i}/{name}/codes"), fmt, numel, header),
                                     loaded.get(f"{i}/{name}/scales"), loaded.get(f"{i}/{name}/exact"))
                             for i, (fmt, err, norm) in enumerate(zip(entry["formats"], entry["errors"], entry["norms"]))]
            for i, e in enumerate(entries[name]):
                if e.exact is not None and e.exact.dtype != base[name].dtype:
                    raise CheckpointError(f"{path}: tensor '{i}/{name}/exact' is {e.exact.dtype}, "
                                          f"its base is {base[name].dtype}")
                if e.scales is not None and e.scales.numel() and \
                        float(e.scales.max()) * (8 if e.fmt == "int4" else 128) > FLOAT32_MAX:  # codes -8 / -128 too
                    raise CheckpointError(f"{path}: tensor '{i}/{name}/scales' holds scales that decode past "
                                          "float32's range (encode() never writes these)")
        store = cls(names, shapes, base, entries, header["labels"], header["mode"], header["error_budget"],
                    header["skipped"])
        store.tied_embedding = header.get("tied_embedding")  # (files saved before it: no rule)
        return store


def _dense_kind(t: torch.Tensor) -> int:
    return _native.DTYPE_CODES[t.dtype]


# ---- the pool's merges ------------------------------------------------------------------------------
def run_linear(store: CompressedStore, plans, tables: List[np.ndarray], backend: str, num_threads: int) -> None:
    """The pool's linear fast path: out = sum_i w_i * theta_i, per candidate and weight group."""
    from pymerge.methods.base import WritePass
    with WritePass(sum(len(p.outs) for p in plans)) as writes:
        for p in plans:
            coef = np.stack([t[p.group if t.shape[0] > 1 else 0] for t in tables])
            store.accumulate(p.name, np.zeros(len(tables)), coef, p.outs, backend, num_threads)
            writes.written += len(p.outs)


class LinearTable:
    """A compressed pool's linear merges into one set of targets, one native call per materialize (C++ backend).

    Built once per set of targets (the pool's plan cache keeps it, as the float pools' GroupedPlan): every
    tensor's terms and outputs are checked then, and each call only gathers every tensor's term weights with a
    few numpy operations and runs the DeltaPlan. The weights are accumulate()'s, bit for bit: the same float64
    sums over the same rows, rounded once to float32. Per tensor (accumulate, then run_terms) a model of 300
    tensors of 1024 elements took 38 ms per candidate on a 2-core AVX2 EPYC at N = 5, ~100 us of Python per tensor;
    2.4 ms in one call (benchmarks/results/cpu-avx2/bench_pool_grouped_compressed.md)."""

    def __init__(self, store: CompressedStore, plans, n_groups: int, n: int):
        k = len(plans[0].outs) if plans else 0  # candidates (every plan has one target per candidate)
        plans = [p for p in plans if store.base[p.name].numel()]  # an empty tensor has no terms to read
        terms = [store.terms(p.name) for p in plans]
        self.native = _native.require_cpu().DeltaPlan(
            [[t.data_ptr() for t in T.tensors] for T in terms],
            [[0 if s is None else s.data_ptr() for s in T.scales] for T in terms],
            [list(T.kinds) for T in terms], [store.base[p.name].numel() for p in plans],
            [[o.data_ptr() for o in p.outs] for p in plans],
            [[_native.DTYPE_CODES[o.dtype] for o in p.outs] for p in plans], [list(T.strides) for T in terms])
        self._terms = terms  # the tensors the native plan reads, alive while it is
        self.shape = (n_groups, k, n)  # [G, K, N]: the coefficients' table
        G, K, N = self.shape
        # tensor t's weights [K, T_t] gathered from [coef (G*K*N values), base coefficients (E*G*K values)]:
        # the base term's per set of checkpoints held exact (few: most tensors have none), then coef's columns
        sets: Dict[tuple, int] = {}
        index = []
        ks = np.arange(K)
        for p, T in zip(plans, terms):
            e = sets.setdefault(tuple(T.exact_cols.tolist()), len(sets))
            base = G * K * N + (e * G + p.group) * K + ks
            cols = (p.group * K + ks)[:, None] * N + T.cols[None, :]
            index.append(np.concatenate([base[:, None], cols], axis=1).ravel())
        self._index = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        self._exact = [np.array(cols, dtype=np.int64) for cols in sets]  # in the order of their numbers e

    def run(self, coef: np.ndarray, num_threads: int = 0) -> None:
        """coef: float64 [G, K, N], candidate k's weights per group (grouped.weight_array)."""
        if coef.shape != self.shape:  # the gather index is laid out for this shape only
            raise ValueError(f"LinearTable.run: a [G, K, N] = {list(self.shape)} table, got {list(coef.shape)}")
        if not self._index.size:  # only empty tensors planned (strict=False into a model of those): nothing to do
            return
        G, K, _ = self.shape
        total = np.zeros((G, K)) + coef.sum(axis=2)  # accumulate's c_base + coef.sum(axis=1), c_base = 0
        base = [total - coef[:, :, cols].sum(axis=2) for cols in self._exact]
        src = np.concatenate([coef.ravel()] + [b.ravel() for b in base])
        self.native.run(src[self._index].astype(np.float32), num_threads)


def run_method(store: CompressedStore, method, per_model, global_params, plans, tables: List[np.ndarray],
               seed: int, backend: str, num_threads: int) -> None:
    """Any registered method. Weighted sums (linear, task_arithmetic, ...) decode inside the fused kernel;
    the rest (TIES, DARE, SLERP, ...) merge base + decode(delta_i) in float32, one tensor at a time,
    after a first pass has checked and prepared every tensor and candidate (nothing is written before that)."""
    from pymerge.methods.base import TensorTask, WritePass, check_magnitudes, merge_prepared
    from pymerge.methods.linear import WeightedSum
    n = len(store.labels)
    weighted = isinstance(method, WeightedSum)

    def tasks_of(p, decode: bool):
        inputs = [store.decoded(i, p.name) for i in range(n)] if decode else None
        out = []
        for table in tables:
            w = table[p.group if table.shape[0] > 1 else 0]
            mp = [dict(per_model[i], weight=float(w[i])) for i in range(n)]
            task = TensorTask(inputs=inputs, base=store.base[p.name], model_params=mp, params=dict(global_params),
                              name=p.name, seed=seed, backend=backend, num_threads=num_threads)
            method.check_params(task)
            check_magnitudes(method, task, store.labels)
            out.append(task)
        return out

    if weighted:
        jobs = []
        for p in plans:
            c_base, coef = np.zeros(len(tables)), np.zeros((len(tables), n))
            for k, task in enumerate(tasks_of(p, decode=False)):
                for src, c in zip(*method.linear_weights(task)):  # (the decoded terms are deltas already)
                    if src < n:
                        coef[k, src] += c
                    else:
                        c_base[k] += c
            jobs.append((p, c_base, coef))
        with WritePass(sum(len(p.outs) for p in plans)) as writes:
            for p, c_base, coef in jobs:
                store.accumulate(p.name, c_base, coef, p.outs, backend, num_threads)
                writes.written += len(p.outs)
        return
    prepared = []  # what MergeMethod.prepare computed (a few numbers per tensor), so its errors come first too
    for p in plans:
        tasks = tasks_of(p, decode=True)
        for task in tasks:
            method.prepare(task)
        prepared.append([task.prepared for task in tasks])
    def pairs():
        for p, kept in zip(plans, prepared):
            for task, out, pre in zip(tasks_of(p, decode=True), p.outs, kept):
                task.prepared = pre
                yield task, out
    merge_prepared(method, pairs(), sum(len(p.outs) for p in plans))


# ---- kernels ------------------------------------------------------------------------------------------
def run_terms(tensors, scales, kinds, numel: int, w: np.ndarray, outs: List[torch.Tensor], backend: str,
              num_threads: int = 0, strides: Optional[List[int]] = None) -> None:
    """outs[k] = sum_t w[k, t] * decode(term_t) on one backend (terms and outs already validated;
    strides: int4 group strides, interleaved terms, C++ only)."""
    if numel == 0:
        return
    if backend == "triton":
        from pymerge import kernels
        if kernels.e4m3_unsupported(tensors[0].device, kinds):  # Triton reads e4m3 from sm_89 on; the extension anywhere
            backend = "cuda" if hasattr(_native.cuda, "delta_accumulate") else "torch"
    if backend == "cpu":
        _native.require_cpu().delta_accumulate(
            [t.data_ptr() for t in tensors], [0 if s is None else s.data_ptr() for s in scales], list(kinds), numel,
            w.reshape(-1).tolist(), [o.data_ptr() for o in outs], [_native.DTYPE_CODES[o.dtype] for o in outs],
            num_threads, list(strides or ()))
    elif any(s != 64 for s in strides or ()):
        raise AssertionError("interleaved int4 terms are held for the C++ kernel only")
    elif backend == "triton":
        from pymerge.kernels import delta_decode
        delta_decode.delta_accumulate(tensors, scales, kinds, numel, w, outs)
    elif backend == "cuda":
        from pymerge.kernels.delta_decode import device_tables, device_weights
        device = tensors[0].device
        data, scale_ptrs, kind_codes = device_tables(tensors, scales, kinds, device)
        weights = device_weights(w, device)  # [K, T], stream-ordered
        aligned = all(t.data_ptr() % 16 == 0 for t in list(tensors) + list(outs))  # 16-byte vector loads/stores
        _native.require_cuda().delta_accumulate(
            data.data_ptr(), scale_ptrs.data_ptr(), kind_codes.data_ptr(), weights.data_ptr(), len(kinds), numel,
            [o.data_ptr() for o in outs], [_native.DTYPE_CODES[o.dtype] for o in outs], aligned,
            torch.cuda.current_stream(device).cuda_stream)
    elif backend == "torch":
        for k, out in enumerate(outs):  # from -0.0 as the kernels: a sum of -0.0 products stays -0.0
            acc = torch.full((numel,), -0.0, dtype=torch.float32, device=out.device)
            for t, (x, s, kind) in enumerate(zip(tensors, scales, kinds)):
                acc.add_(_decode_term(x, s, kind, numel), alpha=float(w[k, t]))
            out.view(-1).copy_(acc)
    else:
        raise AssertionError(backend)  # check_backend ran when the pool was built


def _decode_term(x, s, kind: int, numel: int) -> torch.Tensor:
    if kind == KIND_Q8:
        return dequantize(x, s, "int8", numel)
    if kind == KIND_Q4:
        return dequantize(x, s, "int4", numel)
    if kind in (KIND_Q4_FIRST, KIND_Q4_SECOND):  # a paired store on another backend: the float path
        return dequantize(unpair_int4(x, numel, kind - KIND_Q4_FIRST), s, "int4", numel)
    return x.reshape(-1).float()


# ---- saved-file validation --------------------------------------------------------------------------
# Beyond what encode() can write, and small enough that checkpoint_errors() squares sums of their products
# without an OverflowError (1e308 passed as finite): a relative error is at most sqrt(numel) / 14 (every
# element off by half a scale), a norm of float32 deltas under sqrt(numel) * 2 * FLOAT32_MAX < 1e49.
_MAX_ERROR, _MAX_NORM = 1e10, 1e50
_HEADER_KEYS = {"version", "block", "mode", "error_budget", "labels", "skipped", "tensors"}
_OPTIONAL_HEADER_KEYS = {"tied_embedding"}  # files saved before it lack it
_ENTRY_KEYS = {"name", "shape", "formats", "errors", "norms"}


def _parse_header(path: str, metadata) -> dict:
    def bad(problem):
        return CheckpointError(f"{path}: not a pymerge compressed pool: {problem}")
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        raise bad(f"no {META_KEY!r} entry in the file's metadata")
    try:
        h = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("its header is not valid JSON") from None
    if not isinstance(h, dict) or not _HEADER_KEYS <= set(h) <= _HEADER_KEYS | _OPTIONAL_HEADER_KEYS:
        raise bad(f"its header must be an object with keys {sorted(_HEADER_KEYS)} (and optionally "
                  f"{sorted(_OPTIONAL_HEADER_KEYS)})")
    if type(h["version"]) is not int or h["version"] not in (1, VERSION) or type(h["block"]) is not int \
            or h["block"] != BLOCK:  # (JSON's true == 1 and 2.0 == 2 in Python: a version is a whole number)
        raise bad(f"version {h['version']!r} / block {h['block']!r}; this pymerge reads versions 1-{VERSION}, "
                  f"block {BLOCK}")
    if h["mode"] not in COMPRESS_MODES:
        raise bad(f"mode {h['mode']!r} is not one of {COMPRESS_MODES}")
    budget = h["error_budget"]
    if budget is not None and (not _is_number(budget) or not 0 < budget <= sys.float_info.max):  # 10**400 too
        raise bad(f"error_budget {budget!r} is not a finite number > 0")
    labels = h["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise bad("labels must be a non-empty list of strings")
    if not isinstance(h["skipped"], list) or not all(isinstance(x, str) for x in h["skipped"]):
        raise bad("skipped must be a list of strings")
    tensors = h["tensors"]
    if not isinstance(tensors, list) or not tensors:
        raise bad("tensors must be a non-empty list")
    n, seen = len(labels), set()
    for entry in tensors:
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise bad(f"every tensor entry must be an object with keys {sorted(_ENTRY_KEYS)}")
        name, shape = entry["name"], entry["shape"]
        if not isinstance(name, str) or name in seen:
            raise bad(f"tensor name {name!r} is not a string or appears twice")
        seen.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        for key in ("formats", "errors", "norms"):
            if not isinstance(entry[key], list) or len(entry[key]) != n:
                raise bad(f"tensor {name!r}: {key} must list one value per checkpoint ({n})")
        if not all(f in FORMATS for f in entry["formats"]):
            raise bad(f"tensor {name!r}: formats {entry['formats']!r} must be among {FORMATS}")
        for key, most in (("errors", _MAX_ERROR), ("norms", _MAX_NORM)):  # compared as given: NaN, inf fail
            if not all(_is_number(x) and 0 <= x <= most for x in entry[key]):
                raise bad(f"tensor {name!r}: {key} must be numbers from 0 to {most:g}")
    tied = h.get("tied_embedding")
    if tied is not None and (not isinstance(tied, str) or tied not in seen):
        raise bad(f"tied_embedding {tied!r} is not one of its tensors")
    return h


def _codes_now(codes: Optional[torch.Tensor], fmt: str, numel: int, header: dict) -> Optional[torch.Tensor]:
    """Loaded codes in today's layout (version-1 int4 codes repacked)."""
    if codes is not None and fmt == "int4" and header["version"] == 1:
        return repack_v1_int4(codes, numel)
    return codes


def _expect(expected: dict, entry: dict, version: int) -> None:
    """The tensors (allowed dtypes, shape) the file must hold for one header entry."""
    name, shape = entry["name"], tuple(entry["shape"])
    numel = math.prod(shape)
    dense = _HELD_DTYPES
    expected[f"base/{name}"] = (dense, shape)
    for i, fmt in enumerate(entry["formats"]):
        if fmt in ("int8", "int4"):
            p = padded(numel)
            n_codes = p // 2 if fmt == "int4" and version == 1 else code_count(numel, fmt)
            expected[f"{i}/{name}/codes"] = ((torch.int8 if fmt == "int8" else torch.uint8,), (n_codes,))
            expected[f"{i}/{name}/scales"] = ((torch.bfloat16,), (p // BLOCK,))
        elif fmt == "exact":
            expected[f"{i}/{name}/exact"] = (dense, (numel,))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
