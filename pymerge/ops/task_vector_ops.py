"""The task-vector family (ties, dare_*, breadcrumbs*, della*, task_arithmetic) as one fused op.

Per tensor, for models x_i over base B (float32 arithmetic, as mergekit on float32 inputs):
  d_i = x_i - B                          sparsified, unweighted, by the model's Sparsifier
  v_i = keep_i ? (d_i * r_i) * w_i : d_i * 0     r_i the rescale factor (1 without rescale)
  consensus ("sum"): s = +1 where sum_i v_i >= 0 else -1; m_i = sign(v_i) == s (zeros never agree)
                     mixed = sum_i m_i v_i; divisor = sum_i m_i w_i (1 where 0)
  otherwise:         mixed = sum_i v_i;     divisor = sum_i w_i (1 where |.| < 1e-8)
  normalize: mixed /= divisor;  mixed *= lambda;  out = B + mixed, rounded once to out's dtype.

Work is split in two steps:
1. plan_model(): per model, what the kernel needs -- a rank boundary (magnitude, breadcrumbs), a
   Philox keep-threshold (DARE), or a bitmask (DELLA) -- and the rescale factor from L1 norms.
   Thresholds and norms depend only on (checkpoint tensor, base tensor, density, ...), so a caller
   that re-merges the same tensors with new weights (the pool's search loop) may pass a
   SelectionCache it owns and pay once; nothing is cached otherwise.
2. merge_planned(): one fused pass over the inputs (C++ on the CPU, Triton or CUDA on a GPU, torch
   anywhere as the fallback) reading every input element once.

Sparsifiers (mergekit 0.1.5 semantics; ties broken as documented in pymerge/ops/select.py):
- magnitude: keep the k = max(1, int(density * numel)) largest |d| (none when density <= 0).
- random: keep with probability density (Philox, see pymerge/ops/philox.py).
- magnitude_outliers: ascending ranks [n_bot, n_bot + int(density*N)) with n_top = int(gamma*N),
  n_bot = max(0, N - target - n_top).
- della_magprune: per row (1-D: one row), keep probability (density - eps) + 2 eps * rank/(cols-1),
  rank the ascending stable rank of |d| in the row (a 1-column row uses the mean, p = density).
density >= 1 leaves d untouched (no rescale), as in mergekit.
Rescale: "l1" multiplies by ||d||_1 / ||d * keep||_1 (skipped when either is < 1e-7; both exact
sums rounded once, pymerge/ops/exact_sum.py, so a sharded pool gets the same bits),
"inverse_density" by 1 / density; None leaves the kept values as they are.
"""
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

import torch

from pymerge import _native
from pymerge.errors import short
from pymerge.forks import renew_after_fork
from pymerge.methods import base as method_base
from pymerge.ops import exact_sum, library, philox, select
from pymerge.ops._checks import as_int, check_merge_args, check_weights, float32_param, require_inputs
from pymerge.ops._memory import check_native
from pymerge.ops._versions import mark_written
from pymerge.ops.weighted_sum import BACKENDS  # noqa: F401  (re-exported: the names this op takes)
from pymerge.ops.weighted_sum import pick_backend as _pick_backend

_M = _native.SPARSIFIER_MODES  # the kernels' per-model sparsifier modes (csrc/codes.h)
NONE, TOPK, RANGE, RANDOM, BITS, ZERO = (_M[k] for k in ("none", "topk", "range", "random", "bits", "zero"))
SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
SEEDED = ("random", "della_magprune")  # DARE's and DELLA's: masks drawn from the seed, per tensor name
RESCALES = (None, "l1", "inverse_density")
_TORCH_BLOCK = 1 << 20  # elements per block of the torch fallback: bounds its temporaries


@dataclass(frozen=True)
class Sparsifier:
    method: Optional[str] = None
    density: float = 1.0
    gamma: float = 0.01
    epsilon: float = 0.15
    rescale: Optional[str] = None


@dataclass
class ModelPlan:
    """One model's sparsifier, resolved for one tensor (what every backend's kernel takes)."""
    mode: int = NONE
    lo: select.Boundary = select.Boundary(0, 0)
    hi: select.Boundary = select.Boundary(0, 0)
    thr: int = 0                          # RANDOM: keep iff draw < thr
    bits: Optional[torch.Tensor] = None   # BITS: int64 words, bit e of word e // 64 keeps element e
    scale: float = 1.0                    # rescale factor r_i (float32-rounded)
    weight: float = 1.0
    model: int = 0                        # model index: part of the Philox counter


class SelectionCache:
    """LRU of per-model thresholds and L1 norms, owned by a caller that knows its inputs cannot change.

    No op keeps one by default (run_merge merges each tensor once). A caller that merges the same
    tensors again with new weights (the pool, a benchmark) passes its own: an entry is keyed by
    the tensor name, the caller's key for each input (its position unless cache_keys says more,
    see plan_model) and the sparsifier parameters; never by an address or by sampled values,
    which new data in reused memory can repeat. Entries are a few numbers each.
    """

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self._data: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        renew_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: a lock of its own, and no entries (one may have been half put at the fork)."""
        self._lock = threading.Lock()
        self._data = OrderedDict()

    def get(self, key):
        with self._lock:  # two threads on one pool: one's eviction raced the other's move_to_end (as PlanCache)
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._data.move_to_end(key)
            return value

    def put(self, key, value):
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def __reduce__(self):  # a copied pool starts with an empty cache (and a lock of its own)
        return SelectionCache, (self.max_entries,)

    def clear(self):
        self._data.clear()

    def __len__(self):
        return len(self._data)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32, device="cpu"))


def l1_ratio(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's L1 rescale factor, as float32: before / after, or 1 when either is below eps."""
    before, after = _f32(before), _f32(after)
    if before < eps or after < eps:
        return 1.0
    return float(torch.tensor(before, dtype=torch.float32, device="cpu") /
                 torch.tensor(after, dtype=torch.float32, device="cpu"))


def della_thresholds(density: float, epsilon: float, cols: int) -> torch.Tensor:
    """Per-rank Philox keep-thresholds of one DELLA row (int64, float64 math, computed once; in place, as a
    1-D tensor's row is the whole tensor). IEEE addition commutes: rn * 2eps + (density - eps) is the sum
    (density - eps) + rn * 2eps."""
    if cols == 1:
        p = torch.tensor([density], dtype=torch.float64, device="cpu")
    else:
        p = torch.arange(cols, dtype=torch.float64, device="cpu").div_(cols - 1).mul_(2 * epsilon).add_(density - epsilon)
    # (density - eps) + 2eps may round to 1 where density + eps < 1: 2^32 would wrap to 0 as the native
    # kernel's uint32 (that rank never kept); 2^32 - 1 differs from it only for the draw 2^32 - 1
    return p.clamp_(0, 1).mul_(4294967296.0).floor_().to(torch.int64).clamp_(0, (1 << 32) - 1)


def check_sparsifier(sp: Sparsifier, what: str) -> None:
    """Raises ValueError for parameters no merge can use (the caller adds the tensor name)."""
    if not isinstance(sp, Sparsifier):
        raise TypeError(f"{what}: a sparsifier must be a Sparsifier, got {short(sp)}")
    for field in ("density", "gamma", "epsilon"):
        value = getattr(sp, field)
        try:  # a number, a numpy or 0-d tensor one; not a string float() would parse, nor a bool
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what}: the sparsifier's {field} must be a number, got {short(value)}") from None
    if sp.method not in SPARSIFIERS:
        raise ValueError(f"{what}: unknown sparsification {sp.method!r}")
    if sp.rescale not in RESCALES:
        raise ValueError(f"{what}: rescale must be one of true/false, l1, inverse_density; got {sp.rescale!r}")
    if not (math.isfinite(sp.density) and 0 <= sp.density <= 1):
        raise ValueError(f"{what}: density must be in [0, 1], got {sp.density}")
    if sp.method == "magnitude_outliers" and not (math.isfinite(sp.gamma) and 0 <= sp.gamma <= 1):
        raise ValueError(f"{what}: gamma must be in [0, 1], got {sp.gamma}")
    if sp.method == "della_magprune" and 0 < sp.density < 1:
        # mergekit's test (0 < lo, hi < 1), and both ends probabilities: a negative epsilon inverts the ranks'
        # probabilities, as mergekit's does, and may put an end outside [0, 1] (epsilon -1 kept nothing of the
        # largest magnitudes, where mergekit's bernoulli raises; an audit)
        lo, hi = sp.density - sp.epsilon, sp.density + sp.epsilon
        if not (math.isfinite(sp.epsilon) and 0 < lo <= 1 and 0 <= hi < 1):
            raise ValueError(f"{what}: epsilon must keep density +/- epsilon inside (0, 1); "
                             f"got density {sp.density}, epsilon {sp.epsilon}")


def plan_model(x: torch.Tensor, base: torch.Tensor, sp: Sparsifier, weight: float, model: int, *, name: str = "",
               seed: int = 0, offset: int = 0, cache: Optional[SelectionCache] = None, cache_key: Hashable = None,
               backend: str = "auto", num_threads: int = 0) -> ModelPlan:
    """Resolves one model's sparsifier for this tensor (thresholds, masks, rescale factor).

    With a cache, (name, model index, cache_key, parameters) must name the same x and base for the
    cache's whole life: its owner guarantees that (the pool adds the tensors' version counters)."""
    plan = ModelPlan(weight=float(weight), model=int(model))
    n = x.numel()
    method, density = sp.method, float(sp.density)
    if method is None or density >= 1 or n == 0:
        return plan  # mergekit returns d untouched: no mask, no rescale
    if method in ("magnitude", "della_magprune") and density <= 0:
        plan.mode = ZERO
        return plan
    cpu = _use_cpu(x, backend)
    key = None
    if cache is not None and method != "della_magprune":
        key = (name, int(model), cache_key, method, density, sp.gamma, sp.rescale, offset,
               int(seed) if method == "random" else 0)
        hit = cache.get(key)
        if hit is not None:
            plan.mode, plan.lo, plan.hi, plan.thr, plan.scale = hit
            return plan

    norms = None
    if method == "magnitude":
        k = max(1, int(density * n))
        plan.mode = TOPK
        plan.hi = _global(select.select_ranks(x, base, [k], True, "cpu" if cpu else "torch", num_threads)[0], offset)
    elif method == "magnitude_outliers":
        target = int(density * n)
        n_top = int(sp.gamma * n)
        n_bot = max(0, n - target - n_top)
        plan.mode = RANGE
        plan.lo, plan.hi = (_global(b, offset) for b in select.select_ranks(
            x, base, [min(n_bot, n), min(n_bot + target, n)], False, "cpu" if cpu else "torch", num_threads))
    elif method == "random":
        plan.mode = RANDOM
        plan.thr = philox.keep_threshold(density)
    else:  # della_magprune: the mask needs per-row ranks, so it is computed here, as bits
        plan.mode = BITS
        plan.bits, norms = _della_mask(x, base, sp, model, name, seed, offset, cpu, num_threads)

    if sp.rescale == "l1":
        if norms is None:
            norms = model_l1(x, base, plan, name=name, seed=seed, offset=offset, cpu=cpu, num_threads=num_threads)
        plan.scale = l1_ratio(*norms)
    elif sp.rescale == "inverse_density":
        plan.scale = _f32(1.0 / density) if density > 0 else 1.0
    if key is not None:
        cache.put(key, (plan.mode, plan.lo, plan.hi, plan.thr, plan.scale))
    return plan


def _global(b: "select.Boundary", offset: int) -> "select.Boundary":
    """A boundary found over this piece, its tie index as the kernels compare it: offset + local index
    (a piece at offset 10 kept none of 20 equal magnitudes at density 0.5)."""
    return b if not offset else select.Boundary(b.key, b.index + offset)


def _use_cpu(x: torch.Tensor, backend: str) -> bool:
    return x.device.type == "cpu" and backend in ("auto", "cpu") and _native.cpu is not None


def _spec(x: torch.Tensor, p: ModelPlan) -> tuple:
    """The flat tuple csrc/cpu/task_vectors.cpp reads for one model."""
    ints, floats = plan_rows([p])
    return library.model_specs([x], [p.bits], ints, floats)[0]


def model_l1(x, base, plan: ModelPlan, *, name="", seed=0, offset=0, cpu=True, num_threads=0) -> Tuple[float, float]:
    """(||d||_1, ||d * keep||_1) of one model's delta under its plan: exact sums, rounded once."""
    total, kept = exact_sum.totals(model_l1_parts(x, base, plan, name=name, seed=seed, offset=offset, cpu=cpu,
                                                  num_threads=num_threads))
    return total, kept


def model_l1_parts(x, base, plan: ModelPlan, *, name="", seed=0, offset=0, cpu=True, num_threads=0) -> torch.Tensor:
    """The two L1 norms of model_l1 as exact-sum parts [2, PARTS] (pymerge/ops/exact_sum.py), which
    add across the pieces of a split tensor (elements offset .. offset + numel - 1 of it)."""
    if cpu:  # the dtypes too: a float64 input was a bare KeyError in model_specs
        check_native([x, base], [], x.numel(), "task vectors (L1 norms)", "cpu", _native.DTYPE_CODES)
        h0, h1 = philox.name_hash(name)
        x, base = x.contiguous(), base.contiguous()  # held: the kernel gets bare addresses (a temporary was freed)
        parts = _native.cpu.tv_l1(_spec(x, plan), base.data_ptr(),
                                  _native.DTYPE_CODES[base.dtype], x.numel(), offset, int(seed) & 0xFFFFFFFFFFFFFFFF,
                                  h0, h1, num_threads)
        return torch.from_numpy(parts).view(2, -1)
    out = torch.zeros(2, exact_sum.PARTS, dtype=torch.int64, device="cpu")
    xf, bf = x.reshape(-1), base.reshape(-1)
    block = exact_sum.block_for(x.device)
    for start in range(0, x.numel(), block):
        d = xf[start:start + block].float() - bf[start:start + block].float()
        keep = keep_mask_torch(plan, d, offset + start, name, seed)
        out += l1_parts(d, keep)
    return out


def l1_parts(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[2, PARTS]: exact-sum parts of |d| and |d * keep| (float32 deltas, boolean mask)."""
    a = d.reshape(-1).abs().double()
    return exact_sum.stack([a, a[keep.reshape(-1)]])


def keep_mask_torch(plan: ModelPlan, d: torch.Tensor, e0: int, name: str, seed: int) -> torch.Tensor:
    """Boolean keep-mask of a block of float32 deltas d (flat), elements e0 .. e0+len-1."""
    n = d.numel()
    if plan.mode == NONE:
        return torch.ones(n, dtype=torch.bool, device=d.device)
    if plan.mode == ZERO:
        return torch.zeros(n, dtype=torch.bool, device=d.device)
    idx = torch.arange(e0, e0 + n, device=d.device)
    if plan.mode in (TOPK, RANGE):
        keys = select.magnitude_keys(d)
        if plan.mode == TOPK:
            return select.before(keys, plan.hi, True, idx)
        return select.before(keys, plan.hi, False, idx) & ~select.before(keys, plan.lo, False, idx)
    if plan.mode == RANDOM:
        return philox.draws(seed, name, plan.model, e0, n, d.device) < plan.thr
    return bits_at(plan.bits.to(d.device), idx)


def bits_at(words: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Bits idx (int64 indices) of a bitmask of int64 words (bit e of word e // 64), as bools."""
    return ((words[idx >> 6] >> (idx & 63)) & 1).bool()


def _della_mask(x, base, sp: Sparsifier, model, name, seed, offset, cpu, num_threads):
    """DELLA keep-bitmask (int64 words) and the L1 norms, ranks along dim 1 (1-D: one row)."""
    if x.dim() <= 2 and cpu:
        words, parts = della_native(x, base, sp, model, name, seed, offset, num_threads)
        return words, tuple(exact_sum.totals(parts))
    keep, parts = della_keep_torch(x, base, sp, model, name, seed, offset, norms=True)
    return pack_bits(keep), tuple(exact_sum.totals(parts))


def della_native(x, base, sp: Sparsifier, model, name, seed, offset, num_threads):
    """(bitmask words, [2, PARTS] L1 parts) of DELLA over a CPU tensor of at most 2 dimensions with the native
    kernel; its draws those of elements offset on (a sharded pool's rows, at their global index)."""
    n = x.numel()
    words = torch.zeros((n + 63) // 64, dtype=torch.int64, device=x.device)
    check_native([x, base], [], n, "della", "cpu", _native.DTYPE_CODES)
    rows, cols = (1, n) if x.dim() < 2 else (x.shape[0], n // max(1, x.shape[0]))
    if x.dim() == 2 and rows == 0:  # a rank's shard without rows: its columns still set the thresholds
        cols = x.shape[1]
    thr = della_thresholds(sp.density, sp.epsilon, cols).to(torch.uint32)
    h0, h1 = philox.name_hash(name)
    x, base = x.contiguous(), base.contiguous()  # held across the call, as in model_l1_parts
    spec = _spec(x, ModelPlan(mode=BITS, model=model))
    spec = spec[:8] + (words.data_ptr(),) + spec[9:]
    parts = _native.cpu.tv_della_mask(spec, base.data_ptr(), _native.DTYPE_CODES[base.dtype],
                                      rows, cols, thr.data_ptr(), words.data_ptr(),
                                      int(seed) & 0xFFFFFFFFFFFFFFFF, h0, h1, num_threads, offset)
    return words, torch.from_numpy(parts).view(2, -1)


def della_keep_torch(x, base, sp: Sparsifier, model, name, seed, offset=0, norms: bool = False):
    """Flat boolean DELLA mask with torch ops (any device, any rank). norms: also the exact-sum parts of the
    L1 norms of the delta and of its kept elements (l1_parts), from the same float32 delta of each piece."""
    keep = torch.empty(x.numel(), dtype=torch.bool, device=x.device)
    parts = 0
    for start, xs, bs in _della_slices(x, base):
        d = xs.float() - bs.float()
        k = _della_keep(d, sp, model, name, seed, offset + start)
        keep[start:start + k.numel()] = k
        if norms:
            parts = parts + l1_parts(d, k)  # exact parts add up
    return (keep, parts) if norms else keep


def _della_slices(x, base):
    """(first flat index, x part, base part) pieces whose masks, ranked along their dim 1, make x's. mergekit
    ranks along dim 1, so a tensor of 3 or more dimensions goes a run of indices of dim 0 at a time (the
    argsort of a whole fused MoE tensor took ~70 bytes per element; one index at a time, a conv weight of
    4096 output channels was 4096 small argsorts)."""
    if x.dim() <= 2:
        yield 0, (x if x.dim() == 2 else x.reshape(1, -1)), (base if base.dim() == 2 else base.reshape(1, -1))
        return
    step = math.prod(x.shape[1:])  # not x[0].numel(): a rank's shard of a sharded pool may have no rows
    run = max(1, _DELLA_PIECE // max(1, step))
    for a in range(0, x.shape[0], run):
        yield a * step, x[a:a + run], base[a:a + run]


_DELLA_PIECE = 1 << 20  # elements ranked at a time in a tensor of 3+ dimensions (~60 bytes each meanwhile)


def _della_keep(d, sp: Sparsifier, model, name, seed, offset) -> torch.Tensor:
    """The flat keep-mask of the float32 delta d (2+ dims; element 0 at global index offset), ranks of |d|
    along dim 1."""
    keys = select.magnitude_keys(d).reshape(d.shape)
    order = torch.argsort(keys, dim=1, stable=True)
    cols = d.shape[1]
    pos = torch.arange(cols, device=d.device).view(1, cols, *([1] * (d.dim() - 2)))
    rank = torch.empty_like(order).scatter_(1, order, pos.expand_as(order).contiguous())
    thr = della_thresholds(sp.density, sp.epsilon, cols).to(d.device)
    draws = philox.draws(seed, name, model, offset, d.numel(), d.device).reshape(d.shape)
    return (draws < thr[rank]).reshape(-1)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Flat bool -> int64 words (bit e of word e // 64), two's complement for bit 63; a block at a time
    (the int64 copy of the whole mask took 8 bytes per element)."""
    flat = keep.reshape(-1)
    n = flat.numel()
    words = torch.empty((n + 63) // 64, dtype=torch.int64, device=keep.device)
    shifts = torch.arange(64, device=keep.device, dtype=torch.int64)
    for s in range(0, n, _PACK_BLOCK):
        piece = flat[s:s + _PACK_BLOCK].to(torch.int64)
        if piece.numel() % 64:
            piece = torch.cat([piece, piece.new_zeros(64 - piece.numel() % 64)])
        words[s // 64:s // 64 + piece.numel() // 64] = (piece.view(-1, 64) << shifts).sum(dim=1)
    return words


_PACK_BLOCK = 64 << 16  # bits packed at a time (a multiple of 64)


def linear_divisor(weights: Sequence[float]) -> float:
    """mergekit's non-consensus divisor, to its last bit: torch's float32 sum of the weights (mergekit's), 1 where
    it is under 1e-8 (methods.base.linear_divisor's rule)."""
    total = torch.tensor(list(weights), dtype=torch.float32, device="cpu").sum()  # (cpu: a meta default device)
    return method_base.linear_divisor(weights, float(total))


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    return _pick_backend(device, backend, cuda_entry="tv_merge")


def merge_planned(inputs: Sequence[torch.Tensor], base: torch.Tensor, plans: Sequence[ModelPlan],
                  out: torch.Tensor, *, consensus: bool, normalize: bool, lam: float = 1.0,
                  divisor: float = 1.0, name: str = "", seed: int = 0, offset: int = 0,
                  backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """The fused pass: out = B + lambda * combine(v_i). Inputs, base and out share shape and device."""
    read, read_out = check_merge_args(inputs, base, out, "tv_merge")  # before contiguous() reads them
    # the kernel need not test them again where nothing read since could run code of the caller's (a seed's
    # __int__, a plan of a type of its own: library.trusted)
    trust = read and library.trusted(name, seed, lam, divisor, offset, consensus, normalize, backend, num_threads) \
        and all(type(p) is ModelPlan and type(p.lo) is select.Boundary and type(p.hi) is select.Boundary for p in plans)
    checked = ((library.INPUTS, library.OUTS) if read_out else (library.INPUTS,)) if trust else ()
    n = base.numel()
    if n == 0:
        return out
    chosen = pick_backend(base.device, backend)
    if chosen == "cuda" and backend == "auto" and len(inputs) > _native.cuda.MAX_TV_MODELS:
        chosen = "torch"  # one CUDA launch holds MAX_TV_MODELS models (no Triton here): eager torch takes any number
    backend = chosen
    inputs = [t.contiguous() for t in inputs]
    base = base.contiguous()
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    h0, h1 = philox.name_hash(name)
    seed64 = int(seed) & 0xFFFFFFFFFFFFFFFF
    if backend in ("cpu", "cuda") or (backend == "triton" and base.device.type == "cuda"):
        if base.device.type != ("cpu" if backend == "cpu" else "cuda"):
            raise ValueError(f"backend {backend!r} needs {'cpu' if backend == 'cpu' else 'cuda'} tensors, "
                             f"got tensors on {base.device}")
        ints, floats = plan_rows(plans)
        signed_seed = seed64 - (1 << 64) if seed64 >= 1 << 63 else seed64  # the op's ints are int64
        library.call("tv_merge_out", inputs, base, [p.bits for p in plans], ints, floats, consensus, normalize,
                     float(lam), float(divisor), signed_seed, h0, h1, offset, out,
                     "auto" if backend == "cpu" else backend, num_threads, checked=checked)
    elif backend == "triton":  # CPU tensors: the Triton interpreter (tests)
        from pymerge.kernels import task_vectors as tk
        tk.tv_merge(inputs, base, plans, out, consensus=consensus, normalize=normalize, lam=lam,
                    divisor=divisor, seed=seed64, h0=h0, h1=h1, offset=offset)
    else:
        _merge_torch(inputs, base, plans, out, consensus, normalize, lam, divisor, name, seed, offset)
    mark_written([out])  # (the kernels write by address: a graph that saved out raises on backward)
    return out


def plan_rows(plans: Sequence[ModelPlan]) -> Tuple[List[int], List[float]]:
    """The plans as the flat int and float lists pymerge::tv_merge_out takes (library.PLAN_INTS, PLAN_FLOATS)."""
    ints, floats = [], []
    for p in plans:
        ints += [p.mode, p.lo.key, p.lo.index, p.hi.key, p.hi.index, p.thr, p.model]
        floats += [p.scale, p.weight]
    return ints, floats


def plans_from_rows(bits, ints: Sequence[int], floats: Sequence[float]) -> List[ModelPlan]:
    """The inverse of plan_rows (the Triton launcher takes ModelPlans)."""
    plans = []
    for i, b in enumerate(bits):
        mode, lo_key, lo_idx, hi_key, hi_idx, thr, model = ints[i * library.PLAN_INTS:(i + 1) * library.PLAN_INTS]
        plans.append(ModelPlan(mode=mode, lo=select.Boundary(lo_key, lo_idx), hi=select.Boundary(hi_key, hi_idx),
                               thr=thr, bits=b, scale=floats[2 * i], weight=floats[2 * i + 1], model=model))
    return plans


def _merge_torch(inputs, base, plans, out, consensus, normalize, lam, divisor, name, seed, offset):
    """Blockwise torch version of the fused pass (any device); same float32 operation order."""
    bflat, oflat = base.reshape(-1), out.reshape(-1)
    for start in range(0, base.numel(), _TORCH_BLOCK):
        b = bflat[start:start + _TORCH_BLOCK].float()
        vs = []
        for x, p in zip(inputs, plans):
            d = x.reshape(-1)[start:start + _TORCH_BLOCK].float() - b
            keep = keep_mask_torch(p, d, offset + start, name, seed)
            vs.append(torch.where(keep, (d * p.scale) * p.weight, d * 0.0))
        if consensus:
            s = vs[0].clone()
            for v in vs[1:]:
                s += v
            positive = s >= 0
            mixed = torch.zeros_like(b)
            div = torch.zeros_like(b)
            for v, p in zip(vs, plans):
                agree = torch.where(positive, v > 0, v < 0).float()
                mixed += v * agree
                div += p.weight * agree
            div = torch.where(div == 0, torch.ones_like(div), div)
        else:
            mixed = torch.zeros_like(b)
            for v in vs:
                mixed += v
            div = divisor
        if normalize:
            mixed = mixed / div
        if lam != 1:
            mixed = mixed * lam
        oflat[start:start + _TORCH_BLOCK] = (b + mixed).to(out.dtype)


def task_vector_merge(inputs: Sequence[torch.Tensor], base: torch.Tensor, out: torch.Tensor,
                      sparsifiers: Sequence[Sparsifier], weights: Sequence[float], *, consensus: bool,
                      normalize: bool, lam: float = 1.0, name: str = "", seed: int = 0, offset: int = 0,
                      cache: Optional[SelectionCache] = None, cache_keys: Optional[Sequence[Hashable]] = None,
                      backend: str = "auto", num_threads: int = 0) -> torch.Tensor:
    """Plans every model (thresholds from the caller's cache, if any) and runs the fused pass into out."""
    # the arguments' kinds and values first: a weight of 1e39 (inf in the float32 kernels) or NaN merged in
    # silence, and a wrong kind raised from deep inside (a str name, a str sparsifier, a cache of another type)
    require_inputs(inputs, "tv_merge")
    weights = check_weights(weights, len(inputs), "weights", compiling=False)
    lam = float32_param(lam, "lam", "tv_merge", finite=True)
    if not isinstance(name, str):
        raise TypeError(f"tv_merge: name must be a string (the tensor's name: it seeds its random draws), got {short(name)}")
    if cache is not None and not isinstance(cache, SelectionCache):
        raise TypeError(f"tv_merge: cache must be a SelectionCache or None, got {short(cache)}")
    if isinstance(sparsifiers, (str, bytes)) or len(inputs) != len(sparsifiers):
        raise ValueError("need one sparsifier per input")
    if cache_keys is not None and len(cache_keys) != len(inputs):
        raise ValueError("need one cache key per input")
    index = as_int(offset)
    if index is None:
        raise ValueError(f"offset must be an integer (an element index), got {offset!r}")
    if not 0 <= index < 1 << 62:
        raise ValueError(f"offset must be an integer from 0 to 2**62 - 1 (an element index), got {offset!r}")
    offset = index
    check_merge_args(inputs, base, out, "tv_merge", probe_out=False)  # before plan_model reads them (out is probed
    # for writes once, by merge_planned's)
    if offset + base.numel() > philox.MAX_ELEMENTS:  # the kernels' 32-bit draw counter would wrap
        raise ValueError(f"offset + numel is {offset + base.numel()}; the random draws index at most "
                         f"{philox.MAX_ELEMENTS} elements of one tensor")
    if isinstance(weights, torch.Tensor) and weights.is_meta and not out.is_meta:  # (check_weights keeps it)
        raise ValueError("tv_merge: weights are a meta tensor; the plans need their values")
    for i, x in enumerate(inputs):
        check_sparsifier(sparsifiers[i], f"input {i}")
        if offset and sparsifiers[i].method == "della_magprune":  # its mask ranks whole rows of one tensor
            raise ValueError(f"input {i}: DELLA's mask ranks whole rows of the tensor; call it on the whole "
                             "tensor (offset 0), not on a piece")
    if out.is_meta:  # a shape-only call (the thresholds need data), as the other ops answer it
        return out
    plans = [plan_model(x, base, sp, w, i, name=name, seed=seed, offset=offset, cache=cache,
                        cache_key=None if cache_keys is None else cache_keys[i], backend=backend,
                        num_threads=num_threads)
             for i, (x, sp, w) in enumerate(zip(inputs, sparsifiers, weights))]
    return merge_planned(inputs, base, plans, out, consensus=consensus, normalize=normalize, lam=lam,
                         divisor=linear_divisor(weights), name=name, seed=seed, offset=offset,
                         backend=backend, num_threads=num_threads)
