"""Checks before a kernel gets a tensor's raw address: that its memory is there and, for an output,
writable. The kernels trust the address and size they are given, so without these a tensor whose
storage was freed (resize_(0), as FSDP frees a sharded parameter's between uses), one smaller than
the op's other tensors, or a read-only memory map (a safetensors view, a pool's map on the mmap tier)
would crash the process instead of raising.
"""
import ctypes
import mmap
import os
import threading
from typing import Iterable, Optional

import torch
import torch.autograd.forward_ad as fwAD

_probe_lock = threading.Lock()
_probe_fds = None  # (read fd, write fd) of this process's probe pipe, made on first use
_libc = None
PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types whose data is what it says (not a subclass)
_TRUSTED = frozenset((int, float, bool, str, type(None), torch.dtype, *PLAIN))


def trusted(*values) -> bool:
    """Whether reading these arguments runs no code of the caller's: Python numbers, strings, dtypes and plain
    tensors, in lists or tuples (two levels: rows of weights). An object of a type of its own could (a
    __float__, __index__ or __eq__ that shrinks an input's storage after check_readable passed it), so a
    wrapper given one lets the kernel check the tensors itself."""
    for v in values:
        if type(v) in _TRUSTED:
            continue
        if type(v) is not list and type(v) is not tuple:
            return False
        for u in v:
            if type(u) in _TRUSTED:
                continue
            if (type(u) is not list and type(u) is not tuple) or not all(type(x) in _TRUSTED for x in u):
                return False
    return True


def _after_fork_in_child() -> None:
    """A forked child gets a lock of its own (another thread may have held the parent's) and a pipe of
    its own (sharing the parent's would mix their probe bytes)."""
    global _probe_lock, _probe_fds
    _probe_lock = threading.Lock()
    if _probe_fds is not None:
        for fd in _probe_fds:
            os.close(fd)
    _probe_fds = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def extent_bytes(t: torch.Tensor) -> int:
    """Bytes of its storage the tensor reaches: up to its farthest element, from the storage start."""
    if t.numel() == 0:
        return 0
    if t.is_contiguous():
        return t.storage_offset() * t.element_size() + t.nbytes
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def kind_problem(t: torch.Tensor) -> Optional[str]:
    """Why t is not a dense tensor with data a merge can read (sparse, nested, quantized, meta, lazy), or None."""
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):  # its shape and data raise torch's own errors
        return "is an uninitialized lazy parameter (LazyLinear and the like): run a forward pass first"
    problem = layout_problem(t)
    if problem:
        return problem
    if t.device.type == "meta":  # a model built on the meta device has shapes but no weights
        return "is on the meta device and holds no data; load the weights first"
    return None


def layout_problem(t: torch.Tensor) -> Optional[str]:
    """Why t has no strided memory an op can read (sparse, nested, quantized), or None. (A meta tensor
    passes: the ops' fake kernels take it.)"""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).replace('torch.', '')} tensor; merges read dense tensors only"
    if t.is_nested or t.is_quantized:
        return f"is a {'nested' if t.is_nested else 'quantized'} tensor; merges read dense tensors only"
    return None


def negated_problem(t: torch.Tensor) -> Optional[str]:
    """Why a kernel cannot write t by address (a view whose memory holds the negated values), or None."""
    return "is a lazily negated view (x.conj().imag); merge into a tensor of your own" if t.is_neg() else None


TRANSFORMED = ("is inside a torch.func transform (vmap, grad, jacrev, jvp), which pymerge's ops do not support; "
               "use weighted_sum_many for a batch of weights, torch.autograd for gradients")


DUAL = ("is a forward-mode AD dual tensor (torch.autograd.forward_ad), which pymerge's ops do not support: "
        "its tangent would be dropped; use reverse mode (backward, torch.autograd.functional.jvp)")


def is_dual(t: torch.Tensor) -> bool:
    """A tensor with a tangent at the current forward-AD level (torch.library ops drop it silently)."""
    return fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None


def transformed(t: torch.Tensor) -> bool:
    """Whether t is wrapped by a torch.func transform the ops do not support (vmap, grad: no storage to ask
    about, 'Cannot access storage'). functionalize's wrappers are not: make_fx(functionalize(f)) traces the
    ops as one node each."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) and not torch._is_functional_tensor(t)


def backing_problem(t: torch.Tensor) -> Optional[str]:
    """Why t's storage cannot hold every element it addresses, or None."""
    if transformed(t):
        return TRANSFORMED
    if _wrapper(t):  # its storage is a placeholder: a kernel given its address (0) wrote to address 0
        hint = (" (a DTensor: build the pool with shard_like=, or pass .to_local() / .full_tensor())"
                if type(t).__name__ == "DTensor" else "")
        return f"is a {type(t).__name__} whose data lives in tensors inside it; pass plain tensors{hint}"
    have, need = t.untyped_storage().nbytes(), extent_bytes(t)
    if have >= need:
        return None
    return (f"its storage holds {have} bytes but the tensor spans {need} (freed or shrunk with resize_, as FSDP "
            f"frees a sharded parameter's storage); it has no data to use")


def address_problem(t: torch.Tensor) -> Optional[str]:
    """Why a kernel cannot take t's address (a tensor subclass without memory of its own: a wrapper such as
    DTensor or TwoTensor, or a FakeTensor outside tracing, whose data_ptr() is 0), or None. Plain tensors
    pass at the cost of one type lookup."""
    if type(t) in PLAIN or not t.numel() or t.device.type == "meta":
        return None
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(t):  # (its data_ptr() warns)
        return f"is a {type(t).__name__} (a shape without data); a kernel needs real tensors"
    try:
        if t.data_ptr():
            return None
    except RuntimeError:
        pass
    return backing_problem(t) or (f"is a {type(t).__name__} without memory of its own (data_ptr() is 0); "
                                  "pass plain tensors")


def _wrapper(t: torch.Tensor) -> bool:
    """A wrapper subclass (DTensor, torch's TwoTensor): no memory of its own, data_ptr() 0. (A FakeTensor's
    data_ptr() is 0 too, but it is no wrapper: tracing and fake kernels pass it.)"""
    if type(t) in PLAIN or not t.numel() or t.device.type == "meta":
        return False
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if not is_traceable_wrapper_subclass(t):
        return False
    try:
        return t.data_ptr() == 0
    except RuntimeError:
        return False


def overlap_problem(t: torch.Tensor) -> Optional[str]:
    """Why t cannot take one value per element (several elements on one address), or None. Strides
    sorted ascending must each pass the farthest offset the smaller ones reach; a layout that
    interleaves without overlapping fails this too and is refused alike (torch never makes one)."""
    if t.numel() <= 1 or t.is_contiguous():
        return None
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= reach:
            return (f"its strides {tuple(t.stride())} put several elements on one memory location (an expanded "
                    "view) or interleave them; merge into a tensor with memory of its own")
        reach += stride * (size - 1)
    return None


def write_problem(t: torch.Tensor) -> Optional[str]:
    """Why a kernel cannot write t's memory, or None. Storages torch allocated itself always can; one over
    foreign memory (from_numpy, frombuffer: a memory map) is probed, without a signal: its first and last
    bytes are each written into a pipe and read back into place, which fails with EFAULT where it cannot,
    and where they lie on different pages, /proc/self/maps must show every page between them mapped
    writable (a read-only page in the middle of a writable span was a segfault in the kernel; ~0.6 ms)."""
    if t.numel() == 0 or t.untyped_storage().resizable() or t.device.type != "cpu":
        return None
    first = t.data_ptr()
    # the last element's last byte: an unaligned output's last element can straddle into the next page
    last = first + t.element_size() * (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) - 1
    if _byte_writable(first) and _byte_writable(last) and (
            first // mmap.PAGESIZE == last // mmap.PAGESIZE or _mapped_writable(first, last) is not False):
        return None
    return ("it is read-only memory (a view of a memory-mapped file, such as a safetensors tensor); "
            "write into a tensor of your own")


def check_backed(t: torch.Tensor, what: str, error=ValueError) -> None:
    problem = backing_problem(t)
    if problem:
        raise error(f"{what}: {problem}")


def check_readable(tensors: Iterable[Optional[torch.Tensor]], what: str, error=ValueError,
                   compiling: Optional[bool] = None, dense: bool = False, written: bool = False) -> bool:
    """Every tensor (None: absent) backed by its storage, before any torch op reads it: torch trusts a
    view's extent, so a strided view over a storage shrunk with resize_ was read past its end by
    contiguous() or float() (a segfault) before a kernel's check_native saw it. `what` names the
    tensors, each numbered ("sce: input" -> "sce: input 2: ..."). Skipped while tracing (fake tensors;
    the kernels check the real ones) and for tensor subclasses (their own ops read their data), except a
    wrapper (DTensor, TwoTensor): the ops have no rule for one, and one beside plain tensors reached a
    kernel as address 0. Returns whether it checked (not while tracing): a caller that hands these very
    tensors to check_native says so there (inputs_backed=, outs_backed=), which then skips the storage test
    this made. compiling: torch.compiler.is_compiling(), where the caller has read it; dense: the caller
    has just refused other layouts than strided in these very tensors (_checks.check_inputs); written: they are
    outputs, which every path writes: one over read-only memory (a safetensors view) is refused too (the native
    kernels refused it, the torch paths' writes were a segfault: an audit), so check_native need not probe it."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return False
    in_transform = torch._C._functorch.peek_interpreter_stack() is not None  # vmap, grad: wrapped tensors
    dual = fwAD._current_level >= 0  # inside forward_ad.dual_level()
    for i, t in enumerate(tensors):
        if type(t) not in PLAIN:
            if t is not None and _wrapper(t):
                check_backed(t, f"{what} {i}", error)
            continue
        if in_transform and transformed(t):
            raise error(f"{what} {i}: {TRANSFORMED}")
        if dual and is_dual(t):
            raise error(f"{what} {i}: {DUAL}")
        problem = None if dense else layout_problem(t)  # before untyped_storage(), which a sparse tensor raised on
        if problem:
            raise error(f"{what} {i}: {problem}")
        storage = t.untyped_storage()
        if storage.nbytes() < t.storage_offset() * t.element_size() + t.nbytes or not t.is_contiguous():
            check_backed(t, f"{what} {i}", error)  # the exact test (and the message)
        if written and not storage.resizable():  # (foreign memory: torch's own is always writable)
            check_writable(t, f"{what} {i}", error)
    return True


def check_writable(t: torch.Tensor, what: str, error=ValueError) -> None:
    problem = write_problem(t)
    if problem:
        raise error(f"{what}: {problem}")


def check_native(inputs: Iterable[Optional[torch.Tensor]], outs: Iterable[torch.Tensor], numel: int, op: str,
                 device=None, dtypes=None, inputs_backed: bool = False, outs_backed: bool = False) -> None:
    """Every tensor a native kernel reads (None: absent) or writes holds `numel` elements, backed by its
    storage, of one of `dtypes` on `device` (None: not checked); every output is writable. One pass
    of a few attribute reads per tensor; a probe only for an output over foreign memory.

    inputs_backed / outs_backed: check_readable has checked these plain tensors (it returned True), or
    contiguous() made them from tensors it checked: their storage is not tested a second time (the
    same test, the same message; a subclass still is); outputs' writability too (check_readable(written=True)
    probed it: a probe each, ~100 us, was made twice)."""
    cpu = device == "cpu"
    if device is not None and not cpu:
        device = torch.device(device)
    for role, group, backed in (("input", inputs, inputs_backed), ("output", outs, outs_backed)):
        for i, t in enumerate(group):
            if t is None:
                continue
            if type(t) not in PLAIN:  # a subclass's data_ptr() may be 0: the kernel wrote to address 0
                problem = address_problem(t)
                if problem:
                    raise ValueError(f"{op}: {role} {i}: {problem}")
            if t.numel() != numel:
                raise ValueError(f"{op}: {role} {i} has {t.numel()} elements, the op works on {numel}")
            if t.is_neg():  # its memory holds the values' negations: a kernel would read or write them as is
                # (an output's resolve_neg() is a copy: the result would be lost; an audit)
                advice = negated_problem(t) if role == "output" else \
                    "is a lazily negated view (x.conj().imag); pass t.resolve_neg()"
                raise ValueError(f"{op}: {role} {i} {advice}")
            if (dtypes is not None and t.dtype not in dtypes) or (
                    device is not None and (not t.is_cpu if cpu else t.device != device)):
                names = ", ".join(sorted(str(d).split(".")[-1] for d in dtypes or ()))
                raise ValueError(f"{op}: {role} {i} is {t.dtype} on {t.device}; this kernel takes {names} on {device}")
            if backed and type(t) in PLAIN:  # check_readable made this very test (and the wrapper the write probe)
                continue
            st = t.untyped_storage()
            if st.nbytes() < t.storage_offset() * t.element_size() + t.nbytes or not t.is_contiguous():
                check_backed(t, f"{op}: {role} {i}")  # the exact test (and the message)
            if role == "output" and not st.resizable():
                check_writable(t, f"{op}: {role} {i}")


def _mapped_writable(first: int, last: int) -> Optional[bool]:
    """Whether every address from first to last lies in mappings with write permission, by /proc/self/maps
    (its lines sorted by address); None where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    at = first
    for line in lines:
        span, perms = line.split(b" ", 2)[:2]
        lo, hi = (int(a, 16) for a in span.split(b"-"))
        if hi <= at:
            continue
        if lo > at or b"w" not in perms:  # a hole (unmapped) or a page that cannot be written
            return False
        at = hi
        if at > last:
            return True
    return False


def _byte_writable(address: int) -> bool:
    global _libc, _probe_fds
    with _probe_lock:
        if _libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            for fn in (libc.read, libc.write):
                fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t
            _libc = libc
        if _probe_fds is None:
            try:
                _probe_fds = os.pipe()
            except OSError as exc:  # (a bare "Too many open files", naming nothing: an audit)
                from pymerge.errors import InputError
                from pymerge.io.files import fd_advice
                raise InputError(f"cannot open the pipe that checks a tensor's memory is writable: "
                                 f"{exc.strerror or exc}{fd_advice(exc)}") from None
            for fd in _probe_fds:  # never block, even on a pipe an interrupted probe left a byte in
                os.set_blocking(fd, False)
        r, w = _probe_fds
        try:  # a probe interrupted between its write and its read (a signal handler raising) left a byte:
            while os.read(r, 4096):  # drop it, or this probe would write that byte into `address`
                pass
        except BlockingIOError:
            pass
        if _libc.write(w, address, 1) != 1:  # unreadable: not writable either
            return False
        if _libc.read(r, address, 1) == 1:  # the same byte back into place
            return True
        return False  # the byte stays in the pipe: the next probe drops it


def return_freed_heap() -> None:
    """Gives the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). After a build's
    temporaries are freed they stay counted in the process's memory: glibc raises its mmap threshold as large
    blocks are freed, so later ones come from a heap it does not shrink (an int4 pool's re-laid codes left the
    process at 1.6-2.1x the bytes the pool holds; an audit)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows has no CDLL(None))
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
