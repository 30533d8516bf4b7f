"""Tensors a kernel must not be handed (pymerge/ops/_memory.py): a storage freed with resize_(0) (as FSDP
frees sharded parameters), read-only memory (a safetensors view, a pool's map on the mmap tier), a
tensor smaller than the op's others, wrong dtypes or devices, through the public ops, torch.ops.pymerge
and CheckpointPool. Each was a segmentation fault or a silent out-of-bounds read (found by fuzzing);
each must be one clear error, with nothing written."""
import errno
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pymerge
from pymerge import _native
from pymerge.errors import InputError
from pymerge.ops import _memory
from test_cli import ROOT

needs_cpu_ext = pytest.mark.skipif(_native.cpu is None, reason="the C++ extension is not built")
N = 1 << 16


def freed(n: int = N) -> torch.Tensor:
    t = torch.ones(n)
    t.untyped_storage().resize_(0)
    return t


def test_a_read_only_page_inside_a_writable_output_is_refused():
    """Only the output's first and last bytes were probed: a read-only page between them (an mprotect-ed map)
    passed, and the kernels died on it (SIGSEGV) in weighted_sum, weighted_sum_many and a pool's materialize.
    Run in a child process: if the check misses it, the crash must not take pytest with it."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import ctypes, mmap, sys, torch, pymerge
        page = mmap.PAGESIZE
        m = mmap.mmap(-1, 3 * page)
        libc = ctypes.CDLL(None, use_errno=True)
        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mprotect(ctypes.c_void_p(start + page), page, mmap.PROT_READ) == 0
        o = torch.frombuffer(m, dtype=torch.float32)
        x = torch.randn(o.numel())
        calls = [lambda: pymerge.weighted_sum([x], [1.0], out=o),
                 lambda: pymerge.weighted_sum_many([x], [[1.0]], outs=[o]),
                 lambda: pymerge.CheckpointPool([{"a": x}, {"a": x}]).materialize([0.5, 0.5], {"a": o})]
        for call in calls:
            try:
                call()
                print("written")
            except (ValueError, pymerge.errors.InputError) as exc:
                print("refused" if "read-only memory" in str(exc) else exc)
        # unaligned: the last element starts on the writable page and ends on the read-only one
        straddle = torch.frombuffer(m, dtype=torch.float32, count=4, offset=page - 14)
        try:
            pymerge.weighted_sum([torch.ones(4)], [1.0], out=straddle)
            print("written")
        except ValueError as exc:
            print("refused" if "read-only memory" in str(exc) else exc)
        w = torch.frombuffer(mmap.mmap(-1, 3 * page), dtype=torch.float32)  # writable throughout: written
        pymerge.weighted_sum([x], [2.0], out=w)
        print(torch.equal(w, 2 * x))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["refused", "refused", "refused", "refused", "True"], r.stdout


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_writable_probe_tells_read_only_from_writable_and_changes_nothing():
    a = np.arange(1000, dtype=np.float32)
    t = torch.from_numpy(a)  # foreign memory, writable: probed
    assert not t.untyped_storage().resizable()
    assert _memory.write_problem(t) is None and _memory.write_problem(t[3:7]) is None
    assert np.array_equal(a, np.arange(1000, dtype=np.float32))  # the probe wrote each byte back
    ro = torch.frombuffer(mmap.mmap(-1, 4096, prot=mmap.PROT_READ), dtype=torch.float32)
    assert "read-only memory" in _memory.write_problem(ro)
    assert _memory.write_problem(torch.zeros(5)) is None  # torch's own: not probed
    os.write(_memory._probe_fds[1], b"\x7f")  # as a probe interrupted between its write and its read leaves
    assert _memory.write_problem(t) is None and np.array_equal(a, np.arange(1000, dtype=np.float32))
    assert _memory.backing_problem(torch.zeros(5)) is None
    assert "storage holds 0 bytes but the tensor spans" in _memory.backing_problem(freed(7))
    assert _memory.backing_problem(torch.zeros(10).as_strided((3,), (4,), 1)) is None  # reaches element 9 of 10
    short = torch.zeros(10).as_strided((3,), (4,), 1)
    short.untyped_storage().resize_(20)  # shrunk under the view: 5 of the 10 elements left
    assert "holds 20 bytes but the tensor spans 40" in _memory.backing_problem(short)


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_a_probe_without_descriptors_says_so_in_one_line(monkeypatch):
    """Out of descriptors (ulimit -n), the probe's pipe raised a bare 'Too many open files', naming nothing."""
    from pymerge.errors import InputError
    t = torch.from_numpy(np.arange(10, dtype=np.float32))

    def no_pipe():
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(_memory, "_probe_fds", None)
    monkeypatch.setattr(_memory.os, "pipe", no_pipe)
    with pytest.raises(InputError, match="checks a tensor's memory is writable: Too many open files .*ulimit -n"):
        _memory.write_problem(t)


@needs_cpu_ext
def test_torch_ops_check_what_the_kernels_trust():
    import pymerge.ops.library  # noqa: F401  (registers torch.ops.pymerge)
    P = torch.ops.pymerge
    x = torch.randn(N)
    cases = [
        (lambda: P.weighted_sum_out([x], torch.ones(1), torch.empty(1)), "output 0 has 1 elements, the op works on"),
        (lambda: P.weighted_sum([x, torch.ones(1)], torch.ones(2), torch.float32),
         r"input 1 has shape \(1,\) but input 0 has \(65536,\)"),  # (the shape check, before the kernel's count)
        (lambda: P.weighted_sum([x.double()], torch.ones(1), torch.float32), "input 0 is torch.float64 on cpu; this kernel takes bfloat16"),
        (lambda: P.weighted_sum_out([x], torch.ones(3), torch.empty(N)), r"weights of shape \(3,\) for 1 inputs"),
        # a transposed table of as many numbers was read as [K, N]: wrong sums, no error (an audit)
        (lambda: P.weighted_sum_many_out([x, x, x], torch.ones(3, 2), [torch.empty(N), torch.empty(N)]),
         r"weights of shape \(3, 2\) for 3 inputs: \[K, N\] needs N = 3"),
        (lambda: P.weighted_sum_many_out([x, x], torch.ones(2, 2), [torch.empty(N)]),
         r"weights of shape \(2, 2\) for 1 outputs: \[K, N\] needs K = 1"),
        (lambda: P.weighted_sum_many([x, x], torch.ones(2, 3), torch.float32), r"weights of shape \(2, 3\) for 2 inputs"),
        (lambda: P.group_lincomb_out([torch.randn(10)], None, False, 2, 5, 1, torch.ones(4, dtype=torch.complex64),
                                     torch.empty(10)), "^group_lincomb: coef must be real numbers, got a torch.complex64"),
        (lambda: P.select_ranks(x, torch.ones(1), [1], True), r"input 1 has shape \(1,\)"),
        (lambda: P.group_dots([torch.randn(10)], None, False, 100000, 100, 1), "100000 x 100 view"),
        (lambda: P.group_lincomb_out([torch.randn(10)], None, False, 2, 5, 1, torch.ones(3), torch.empty(10)),
         "coef has 3 entries; 2 groups x 2 need 4"),
        (lambda: P.group_lincomb_out([torch.randn(10)], None, False, 2, 5, 1, torch.ones(4), torch.empty(3)),
         "output 0 has 3 elements"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@needs_cpu_ext
def test_ops_refuse_inputs_smaller_than_their_output():
    from pymerge.ops import interp
    from pymerge.ops import task_vector_ops as tv
    from pymerge.ops.consensus_ops import ramplus_tl, sce
    from pymerge.ops.elementwise_mix import nearswap, ram
    small, base, out = torch.ones(1), torch.zeros(N), torch.empty(N)
    cases = [
        (lambda: sce([small, base], base, 0.5, out), r"sce: input 0 has shape \(1,\) but the base has \(65536,\)"),
        (lambda: ramplus_tl([small, small], small, .5, .5, .1, out), "ramplus_tl: output 0 has 65536 elements, the op works on 1"),
        (lambda: ram([small, small], small, 0.1, out), "ram: output 0 has 65536 elements, the op works on 1"),
        (lambda: nearswap(small, small, 0.5, out), "nearswap: output 0 has 65536 elements"),
        (lambda: interp.group_dots([torch.randn(N), small], None, False, "whole"), r"input 1 has shape \(1,\)"),
        (lambda: interp.group_lincomb([torch.randn(N)] * 2, None, False, "whole", torch.ones(3), torch.empty(1)),
         "output 0 has 1 elements"),
        (lambda: tv.task_vector_merge([torch.ones(N)], base, torch.empty(1), [tv.Sparsifier()], [1.0],
                                      consensus=False, normalize=False), "tv_merge: output 0 has 1 elements"),
        (lambda: tv.task_vector_merge([torch.ones(8)], torch.zeros(8), torch.empty(8, device="meta"),
                                      [tv.Sparsifier()], [1.0], consensus=False, normalize=False), "on meta"),
        (lambda: tv.merge_planned([base], base, [tv.ModelPlan(mode=tv.BITS, bits=torch.zeros(1, dtype=torch.int64))],
                                  torch.empty(N), consensus=True, normalize=True),
         f"bitmask 0 has 64 bits, fewer than the {N}"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_pool_refuses_freed_sources():
    with pytest.raises(InputError, match="source 1: tensor 'w': its storage holds 0 bytes"):
        pymerge.CheckpointPool([{"w": torch.ones(N)}, {"w": freed()}])
    with pytest.raises(InputError, match="source 0: tensor 'w': its storage holds 0 bytes"):
        pymerge.CheckpointPool([{"w": freed()}], base={"w": torch.zeros(N)}, compress="int8")


# Each of these was a segmentation fault: run in a child process, so a regression fails the test
# instead of killing pytest.
_RUN_CASES = r"""
for name, case in cases.items():
    try:
        case()
        print(f"{name}: no error")
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
    sys.stdout.flush()
"""  # the child scripts' last part: every case, one line each, even after an error

_CRASHES = r"""
import mmap, sys, torch, pymerge
from pymerge.io import Checkpoint
from safetensors.torch import save_file
path, N = sys.argv[1], 1 << 16
def freed(n=N):
    t = torch.ones(n); t.untyped_storage().resize_(0); return t
save_file({"w": torch.zeros(N)}, path)
view = Checkpoint(path).tensor("w")
mapped = pymerge.CheckpointPool([path], residency="mmap")
def pool():
    return pymerge.CheckpointPool([{"w": torch.ones(N)}, {"w": torch.full((N,), 3.0)}])
def borrowed_then_freed():
    a = torch.ones(N)
    p = pymerge.CheckpointPool([{"w": a}, {"w": torch.ones(N)}], residency="mmap")
    p.materialize([0.5, 0.5], {"w": torch.empty(N)})
    a.untyped_storage().resize_(0)
    p.materialize([0.5, 0.5], {"w": torch.empty(N)})
def borrowed_base_freed():
    base = {"w": torch.zeros(N)}
    p = pymerge.CheckpointPool([{"w": torch.ones(N)}, {"w": torch.ones(N)}], base=base, residency="mmap")
    base["w"].untyped_storage().resize_(0)
    p.materialize([0.5, 0.5], {"w": torch.empty(N)}, method="task_arithmetic")
def borrowed_reallocated():
    a = torch.ones(N)
    p = pymerge.CheckpointPool([{"w": a}, {"w": torch.ones(N)}], residency="mmap")
    out = {"w": torch.empty(N)}
    p.materialize([0.5, 0.5], out)  # caches a native table with a's address
    old, blockers = a.data_ptr(), []
    for _ in range(8):  # back, elsewhere (FSDP's free and re-gather); the allocator may hand the same block back
        a.untyped_storage().resize_(0)
        blockers.append(torch.empty(N))  # holds the freed block meanwhile
        a.untyped_storage().resize_(4 * N)
        if a.data_ptr() != old:
            break
    p.materialize([0.5, 0.5], out)
def borrowed_shrunk_in_place():  # (smaller at the same address: the address check alone missed it; a review)
    for _ in range(50):
        a = torch.ones(N)
        p = pymerge.CheckpointPool([{"w": a}, {"w": torch.ones(N)}], residency="mmap")
        p.materialize([0.5, 0.5], {"w": torch.empty(N)})
        old = a.data_ptr()
        a.untyped_storage().resize_(0)
        a.untyped_storage().resize_(4 * N - 4096)
        if a.data_ptr() == old:
            break
    p.materialize([0.5, 0.5], {"w": torch.empty(N)})
def cached_target_then_freed():
    p, m = pool(), {"w": torch.empty(N)}
    p.materialize([0.5, 0.5], m)
    m["w"].untyped_storage().resize_(0)
    p.materialize([0.5, 0.5], m)
cases = {
    "weighted_sum into a safetensors view": lambda: pymerge.weighted_sum([torch.ones(N)], [1.0], out=view),
    "weighted_sum into a freed tensor": lambda: pymerge.weighted_sum([torch.ones(N)], [1.0], out=freed()),
    "weighted_sum of a freed tensor": lambda: pymerge.weighted_sum([freed(), freed()], [1.0, 1.0]),
    "materialize into a safetensors view": lambda: pool().materialize([0.5, 0.5], {"w": view}),
    "materialize into a mapped pool's view": lambda: pool().materialize([0.5, 0.5], {"w": mapped._inputs["w"][0]}),
    "materialize into a read-only map": lambda: pool().materialize([0.5, 0.5], {"w": torch.frombuffer(
        mmap.mmap(-1, 4 * N, prot=mmap.PROT_READ), dtype=torch.float32)}),
    "materialize into a freed tensor": lambda: pool().materialize([0.5, 0.5], {"w": freed()}),
    "a borrowed source freed after a merge": borrowed_then_freed,
    "a borrowed base freed": borrowed_base_freed,
    "a borrowed source reallocated": borrowed_reallocated,
    "a borrowed source shrunk in place": borrowed_shrunk_in_place,
    "a cached target freed": cached_target_then_freed,
}
""" + _RUN_CASES + r"""assert float(view.sum()) == 0.0  # nothing was written into the file's view
print("done")
"""


@needs_cpu_ext
def test_unusable_targets_and_freed_storage_are_errors_not_crashes(tmp_path):
    p = subprocess.run([sys.executable, "-c", _CRASHES, str(tmp_path / "m.safetensors")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and p.stdout.endswith("done\n"), (p.returncode, p.stdout[-3000:], p.stderr[-2000:])
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines()[:-1])
    read_only = "it is read-only memory (a view of a memory-mapped file"
    no_data = "its storage holds 0 bytes but the tensor spans 262144"
    assert lines["weighted_sum into a safetensors view"].startswith(f"ValueError: weighted_sum: output 0: {read_only}")
    assert lines["weighted_sum into a freed tensor"] == \
        f"ValueError: weighted_sum: output 0: {no_data} (freed or shrunk with resize_, as FSDP frees a sharded " \
        "parameter's storage); it has no data to use"
    assert lines["weighted_sum of a freed tensor"].startswith(f"ValueError: weighted_sum: input 0: {no_data}")
    for case in ("a safetensors view", "a mapped pool's view", "a read-only map"):
        assert lines[f"materialize into {case}"].startswith(f"InputError: tensor 'w': {read_only}"), case
        assert lines[f"materialize into {case}"].endswith("nothing was written"), case
    assert lines["materialize into a freed tensor"].startswith(f"InputError: tensor 'w': {no_data}")
    assert lines["a cached target freed"].startswith(f"InputError: tensor 'w': {no_data}")
    assert lines["a borrowed source freed after a merge"].startswith(
        f"InputError: source 0: tensor 'w', which the pool reads in place: {no_data}")
    assert lines["a borrowed base freed"].startswith(f"InputError: base: tensor 'w', which the pool reads in place: {no_data}")
    assert lines["a borrowed source shrunk in place"].startswith(
        "InputError: source 0: tensor 'w', which the pool reads in place: its storage holds 258048 bytes but the "
        "tensor spans 262144")
    assert lines["a borrowed source reallocated"].startswith(
        "InputError: source 0: tensor 'w', which the pool reads in place: its storage was reallocated")


# A strided view over a storage shrunk with resize_ to a non-zero size (not freed): the ops copied it
# (contiguous(), float()) before their checks looked at it, and the copy read 16 MB past a 64-byte
# storage (a segmentation fault, found by a bug hunt). Run in a child process, as _CRASHES.
_SHRUNK = r"""
import sys, torch, pymerge
from pymerge.ops import consensus_ops as co, elementwise_mix as em, interp, select, task_vector_ops as tv
def shrunk(n):
    t = torch.zeros(n * 4096).as_strided((n,), (4096,))
    t.untyped_storage().resize_(64)
    return t
v, w, y, P, S = shrunk(1024), shrunk(2), torch.zeros(1024), torch.ops.pymerge, tv.Sparsifier
cut = torch.zeros(1 << 20)[:1024]  # contiguous: the kernels' own check saw it, the torch backend wrote past it
cut.untyped_storage().resize_(64)
cases = {
    "weighted_sum": lambda: pymerge.weighted_sum([v, y], [1.0, 1.0]),
    "weighted_sum torch": lambda: pymerge.weighted_sum([v, y], [1.0, 1.0], backend="torch"),
    "weighted_sum_many": lambda: pymerge.weighted_sum_many([y, v], [[1.0, 1.0]]),
    "weighted_sum out": lambda: pymerge.weighted_sum([y, y], [1.0, 1.0], out=cut, backend="torch"),
    "weighted_sum weights": lambda: pymerge.weighted_sum([y, y], w),
    "op weighted_sum": lambda: P.weighted_sum([v, y], torch.ones(2), torch.float32),
    "op weighted_sum weights": lambda: P.weighted_sum([y, y], w, torch.float32),
    "task_vector_merge": lambda: tv.task_vector_merge([v], y, torch.empty(1024), [S()], [1.0], consensus=False,
                                                      normalize=False),
    "task_vector_merge ties": lambda: tv.task_vector_merge([y], v, torch.empty(1024), [S("magnitude", 0.5)], [1.0],
                                                           consensus=True, normalize=True),
    "op tv_merge_out": lambda: P.tv_merge_out([v], y, [None], [0] * 7, [1.0, 1.0], False, False, 1.0, 1.0, 0, 0, 0,
                                              0, torch.empty(1024)),
    "select_ranks": lambda: select.select_ranks(v, y, [3], True),
    "op select_ranks": lambda: P.select_ranks(y, v, [3], True),
    "group_dots": lambda: interp.group_dots([y, v], y, True, "whole"),
    "op group_dots": lambda: P.group_dots([y, v], None, False, 1, 1024, 0),
    "group_lincomb": lambda: interp.group_lincomb([v], y, True, "whole", torch.ones(1, 2), torch.empty(1024)),
    "op group_lincomb_out": lambda: P.group_lincomb_out([y], None, False, 1, 1024, 0, w, torch.empty(1024)),
    "arcee_fusion": lambda: co.arcee_fusion(y, v, torch.empty(1024)),
    "sce torch": lambda: co.sce([v, y], y, 0.5, torch.empty(1024), backend="torch"),
    "ramplus_tl torch": lambda: co.ramplus_tl([y, v], y, 0.5, 0.2, 1e-3, torch.empty(1024), backend="torch"),
    "nearswap torch": lambda: em.nearswap(y, v, 0.1, torch.empty(1024), backend="torch"),
}
""" + _RUN_CASES + r"""print("done")
"""


@needs_cpu_ext
def test_a_view_over_a_shrunk_storage_is_an_error_before_anything_reads_it():
    p = subprocess.run([sys.executable, "-c", _SHRUNK], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and p.stdout.endswith("done\n"), (p.returncode, p.stdout[-3000:], p.stderr[-2000:])
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines()[:-1])
    for name, line in lines.items():
        assert line.startswith("ValueError: ") and "its storage holds 64 bytes but the tensor spans" in line, (name, line)
    assert lines["weighted_sum"].startswith("ValueError: weighted_sum: input 0: its storage holds 64 bytes")
    assert lines["weighted_sum out"].startswith("ValueError: weighted_sum: output 0: its storage")
    assert lines["weighted_sum weights"].startswith("ValueError: weights: its storage")
    assert lines["op weighted_sum weights"].startswith("ValueError: weighted_sum: weights: its storage")
    assert lines["task_vector_merge ties"].startswith("ValueError: tv_merge: input 1: its storage")  # the base
    assert lines["op group_lincomb_out"].startswith("ValueError: group_lincomb: coef: its storage")


@needs_cpu_ext
@pytest.mark.parametrize("group", ["whole", "rows", "cols"])
def test_group_lincomb_into_a_strided_output(group):
    """Was written by address as if contiguous: wrong elements, silently. Against float64."""
    from pymerge.ops import interp
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 5, generator=g) for _ in range(3)]
    base = torch.randn(6, 5, generator=g)
    k = len(xs)
    n_groups = {"whole": 1, "rows": 6, "cols": 5}[group]
    coef = torch.randn(n_groups, k + 1, generator=g)
    out = torch.zeros(5, 6).t()  # [6, 5], not contiguous
    interp.group_lincomb(xs, base, True, group, coef, out)
    c = coef.double()
    v = [x.double() - base.double() for x in xs]
    if group == "whole":
        ref = c[0, k] * base.double() + sum(c[0, i] * v[i] for i in range(k))
    elif group == "rows":
        ref = c[:, k:k + 1] * base.double() + sum(c[:, i:i + 1] * v[i] for i in range(k))
    else:
        ref = c[:, k] * base.double() + sum(c[:, i] * v[i] for i in range(k))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_cpu_ext
@pytest.mark.parametrize("sparsifier, offset, message", [
    (dict(method="della", density=0.5), 0, "input 0: unknown sparsification 'della'"),
    (dict(method="della_magprune", density=0.5, epsilon=5.0), 0, "input 0: epsilon must keep density"),
    # a negative epsilon past density: 1.5 and -0.5, clamped, kept none of the largest magnitudes (an audit)
    (dict(method="della_magprune", density=0.5, epsilon=-1.0), 0, "input 0: epsilon must keep density"),
    (dict(), 2**70, "offset must be an integer from 0 to 2\\*\\*62 - 1"),
    (dict(), -1, "offset must be an integer from 0"),
])
def test_task_vector_merge_checks_sparsifiers_and_offset(sparsifier, offset, message):
    """Were pybind11's "incompatible function arguments" (listing raw addresses)."""
    from pymerge.ops import task_vector_ops as tv
    with pytest.raises(ValueError, match=message):
        tv.task_vector_merge([torch.randn(100)], torch.zeros(100), torch.empty(100), [tv.Sparsifier(**sparsifier)],
                             [1.0], consensus=False, normalize=False, offset=offset)


@pytest.mark.parametrize("many", [False, True])
def test_an_out_past_its_storage_is_reported_as_such_before_any_overlap(many, monkeypatch):
    """An out= view past its shrunk storage was reported as "out partially overlaps input 0" wherever the
    allocator put the storage's new 64-byte block next to an input (CI, once): the storage is checked before
    the overlap test, which here is made to see an overlap whatever the addresses."""
    from pymerge.ops import _checks
    monkeypatch.setattr(_checks, "_overlaps_partially", lambda a, b: True)
    y = torch.zeros(1024)
    cut = torch.zeros(1 << 20)[:1024]
    cut.untyped_storage().resize_(64)
    with pytest.raises(ValueError, match="weighted_sum: output 0: its storage holds 64 bytes"):
        if many:
            pymerge.weighted_sum_many([y, y], [[1.0, 1.0]], outs=[cut], backend="torch")
        else:
            pymerge.weighted_sum([y, y], [1.0, 1.0], out=cut, backend="torch")


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested"])
@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|nested tensors).*:UserWarning")
def test_sparse_and_nested_inputs_are_named_errors(kind):
    """torch raised its own internal errors ("Cannot access storage of SparseTensorImpl", "NestedTensorImpl
    doesn't support sizes") from the ops' argument checks."""
    from pymerge.ops import consensus_ops, task_vector_ops
    x = torch.randn(4, 8)
    odd = {"sparse_coo": x.to_sparse, "sparse_csr": x.to_sparse_csr,
           "nested": lambda: torch.nested.nested_tensor([x])}[kind]
    calls = {
        "weighted_sum": lambda: pymerge.weighted_sum([x, odd()], [0.5, 0.5]),
        "weighted_sum_many": lambda: pymerge.weighted_sum_many([odd(), x], [[0.5, 0.5]]),
        "weighted_sum out": lambda: pymerge.weighted_sum([x, x], [0.5, 0.5], out=odd()),
        "weighted_sum_many outs": lambda: pymerge.weighted_sum_many([x, x], [[0.5, 0.5]], outs=[odd()]),
        "sce": lambda: consensus_ops.sce([x, odd()], x, 0.5, torch.empty(4, 8)),
        "tv_merge": lambda: task_vector_ops.task_vector_merge(
            [x, x], odd(), torch.empty(4, 8), [task_vector_ops.Sparsifier("magnitude", 0.5)] * 2, [0.5, 0.5],
            consensus=False, normalize=False),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=rf"(input [01]|the base|out): is a {kind} tensor; merges read dense"):
            call()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("op", ["group_lincomb", "task_vector_merge", "sce", "ramplus_tl", "ram", "nearswap",
                                "arcee_fusion"])
def test_an_out_partly_over_an_input_is_refused_on_every_backend(op, backend):
    """The native kernels refused it; the torch paths (backend="torch", and group_lincomb on every GPU: SLERP,
    NuSLERP, Model Stock) wrote block by block over what a later block read: 1000 elements wrong (an audit)."""
    from pymerge.ops import consensus_ops, elementwise_mix, interp, task_vector_ops as tv
    n, shift = (1 << 20) + 4096, 1000
    big = torch.arange(n + shift, dtype=torch.float32)
    x, out, base = big[:n], big[shift:], torch.zeros(n)
    before = big.clone()
    calls = {
        "group_lincomb": lambda: interp.group_lincomb([x], None, False, "whole", torch.tensor([[2.0, 0.0]]), out,
                                                      backend=backend),
        "task_vector_merge": lambda: tv.task_vector_merge([x], base, out, [tv.Sparsifier()], [1.0], consensus=False,
                                                          normalize=False, backend=backend),
        "sce": lambda: consensus_ops.sce([x, base.clone()], base, 1.0, out, backend=backend),
        "ramplus_tl": lambda: consensus_ops.ramplus_tl([x, base.clone()], base, 0.1, 0.2, 1e-5, out, backend=backend),
        "ram": lambda: elementwise_mix.ram([x, base.clone()], base, 1e-5, out, backend=backend),
        "nearswap": lambda: elementwise_mix.nearswap(base, x, 0.5, out, backend=backend),
        "arcee_fusion": lambda: consensus_ops.arcee_fusion(base, x, out, backend=backend)}
    with pytest.raises(ValueError, match=r"output 0 partially overlaps input \d"):
        calls[op]()
    assert torch.equal(big, before)


def test_a_negated_output_view_is_told_to_merge_into_a_tensor_of_its_own():
    """The advice was an input's, 'pass t.resolve_neg()': for an output that is a copy, the result lost (an audit)."""
    import pymerge
    z = torch.zeros(1, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"output 0 is a lazily negated view .*merge into a tensor of your own$"):
        pymerge.weighted_sum([torch.ones(1)], [2.0], out=z.conj().imag)


def test_num_threads_far_past_the_cores_starts_at_most_4_workers_per_core():
    """num_threads=65536 (accepted: the op's bound) left ~3,000 idle threads for the process's life, and where the
    system refused one, a bare "Resource temporarily unavailable" (an audit). In a fresh process: its own count."""
    code = ("import os, torch\nfrom pymerge.ops import interp\nbefore = len(os.listdir('/proc/self/task'))\n"
            "interp.group_dots([torch.randn(1 << 22)], None, False, 'whole', num_threads=65536)\n"
            "print(len(os.listdir('/proc/self/task')) - before)")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads through /proc")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 0 < int(run.stdout.split()[-1]) <= 4 * (os.cpu_count() or 1), run.stdout


def test_a_read_only_out_is_refused_on_every_path_too(tmp_path):
    """A read-only mapped out= (a safetensors view) was refused on the native paths only: every torch path
    (backend='torch', float64 inputs, a transposed out) wrote it and the process died with SIGSEGV (an API
    fuzzer). Run in a child process: a missed case must not take pytest with it."""
    code = textwrap.dedent("""
        import sys, warnings, torch, pymerge, safetensors.torch
        from pymerge.io.safetensors_file import SafetensorsFile
        from pymerge.ops import elementwise_mix as em, consensus_ops as co, interp, task_vector_ops as tvo
        safetensors.torch.save_file({"w": torch.zeros(64, 64)}, sys.argv[1])
        ro = SafetensorsFile(sys.argv[1]).tensor("w")
        x, y, b = torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64)
        X, Y, B = x.double(), y.double(), b.double()
        calls = {
            "weighted_sum": lambda: pymerge.weighted_sum([x, y], [0.5, 0.5], out=ro, backend="torch"),
            "weighted_sum_many": lambda: pymerge.weighted_sum_many([x, y], [[0.5, 0.5]], outs=[ro], backend="torch"),
            "nearswap": lambda: em.nearswap(B, X, 0.5, ro),
            "nearswap.t": lambda: em.nearswap(b, x, 0.5, ro.t()),
            "ram": lambda: em.ram([X, Y], B, 0.1, ro),
            "sce": lambda: co.sce([X, Y], B, 0.5, ro),
            "arcee_fusion": lambda: co.arcee_fusion(B, X, ro),
            "group_lincomb": lambda: interp.group_lincomb([x, y], b, True, "whole", torch.ones(1, 3), ro.t()),
            "task_vector_merge": lambda: tvo.task_vector_merge([x, y], b, ro, [tvo.Sparsifier()] * 2, [0.5, 0.5],
                                                               consensus=True, normalize=True, backend="torch"),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "written")
            except ValueError as exc:
                print(name, "refused" if "read-only memory" in str(exc) and "\\n" not in str(exc) else exc)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.safetensors")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert [line.split()[1] for line in r.stdout.splitlines()] == ["refused"] * 9, r.stdout
