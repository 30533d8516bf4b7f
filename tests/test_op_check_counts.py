"""Each public op checks each tensor once. Every check stays (tests/test_memory_checks.py,
test_crashes.py, test_library_ops.py pin them), but the public wrapper, library.call's kernel and
check_native had come to test the same inputs' storage three times per call: 30 -> 53 us a call at N = 2,
and 1.8x slower per tensor on the pool's per-tensor path. These count, without timing anything, the
storage reads (Tensor.untyped_storage: the test check_readable and check_native make) per tensor for one
call, and torch.compiler.is_compiling() reads; and check that a wrapper's checks are trusted only where
nothing of the caller's can run between them and the kernel (a number type whose __float__ frees an
input's storage is still caught)."""
import collections
import numbers

import numpy as np
import pytest
import torch

import pymerge
from pymerge import _native
from pymerge.ops import consensus_ops, elementwise_mix, interp, select, task_vector_ops as tvo
from pymerge.ops.weighted_sum import weighted_sum_into

pytestmark = pytest.mark.skipif(_native.cpu is None, reason="the C++ extension is not built")


@pytest.fixture
def storage_reads(monkeypatch):
    """Counts Tensor.untyped_storage() per tensor (by id) while the test runs."""
    counts = collections.Counter()
    real = torch.Tensor.untyped_storage

    def counting(self):
        counts[id(self)] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "untyped_storage", counting)
    return counts


def _once_each(counts, tensors):
    return [counts[id(t)] for t in tensors]


def test_weighted_sum_reads_each_input_storage_once(storage_reads):
    for n in (2, 8):
        xs = [torch.randn(64) for _ in range(n)]
        storage_reads.clear()
        got = pymerge.weighted_sum(xs, [1.0 / n] * n)
        assert _once_each(storage_reads, xs) == [1] * n  # three times each before
        torch.testing.assert_close(got, sum(x * (1.0 / n) for x in xs))


def test_weighted_sum_with_out_reads_each_storage_once(storage_reads):
    xs, out = [torch.randn(64) for _ in range(3)], torch.empty(64)
    pymerge.weighted_sum(xs, [0.5, 0.25, 0.25], out=out)
    # the output's: check_readable's test, and whether it may be resized (check_native's writability)
    assert _once_each(storage_reads, xs) == [1, 1, 1] and storage_reads[id(out)] <= 2


def test_weighted_sum_many_reads_each_input_storage_once(storage_reads):
    xs = [torch.randn(64) for _ in range(3)]
    pymerge.weighted_sum_many(xs, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert _once_each(storage_reads, xs) == [1, 1, 1]
    storage_reads.clear()
    outs = [torch.empty(64), torch.empty(64)]
    pymerge.weighted_sum_many(xs, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), outs=outs)
    assert _once_each(storage_reads, xs) == [1, 1, 1] and all(storage_reads[id(o)] <= 2 for o in outs)


def test_weighted_sum_into_reads_each_input_storage_once(storage_reads):
    """The pool's per-tensor path (names= a function, slerp, sharded pools): the kernel checks, once."""
    xs, out = [torch.randn(64) for _ in range(5)], torch.empty(64)
    weighted_sum_into(xs, [[0.2] * 5], [out])
    assert _once_each(storage_reads, xs) == [1] * 5


def test_the_other_ops_read_each_input_storage_once(storage_reads):
    x, y, base = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
    out = torch.empty(4, 16)
    calls = {
        "select_ranks": lambda: select.select_ranks(x, base, [3, 9], True),
        "group_dots": lambda: interp.group_dots([x, y], base, True, "rows"),
        "group_lincomb": lambda: interp.group_lincomb([x, y], base, True, "whole", torch.ones(1, 3), out),
        "whole_dot_parts": lambda: interp.whole_dot_parts([x, y], base, True),
        "merge_planned": lambda: tvo.merge_planned([x, y], base, [tvo.ModelPlan(weight=0.5, model=i) for i in (0, 1)],
                                                   out, consensus=True, normalize=True),
        "nearswap": lambda: elementwise_mix.nearswap(base, x, 0.3, out),
        "ram": lambda: elementwise_mix.ram([x, y], base, 0.01, out),
        "sce": lambda: consensus_ops.sce([x, y], base, 1.0, out),
    }
    for name, call in calls.items():
        storage_reads.clear()
        call()
        seen = [x, base] if name in ("select_ranks", "nearswap") else [x, y, base]
        assert _once_each(storage_reads, seen) == [1] * len(seen), name


def test_raw_ops_and_kernels_still_check_every_tensor_themselves():
    """torch.ops.pymerge.* and the kernels called directly trust nothing a wrapper did."""
    from pymerge.ops import library
    x = torch.ones(64)
    freed = torch.ones(64)
    freed.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="input 1: its storage holds 0 bytes"):
        torch.ops.pymerge.weighted_sum([x, freed], torch.tensor([0.5, 0.5]), torch.float32)
    with pytest.raises(ValueError, match="input 1: its storage holds 0 bytes"):
        library._KERNELS["weighted_sum_many_out"]["cpu"]([x, freed], [[0.5, 0.5]], [torch.empty(64)])
    with pytest.raises(ValueError, match="input 1: its storage holds 0 bytes"):
        torch.ops.pymerge.select_ranks(x, freed, [3], True)
    out = torch.empty(64)
    out.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="output 0: its storage holds 0 bytes"):
        library._KERNELS["weighted_sum_many_out"]["cpu"]([x, x], [[0.5, 0.5]], [out])


def test_is_compiling_is_read_a_few_times_a_call_not_once_per_check(monkeypatch):
    calls = []
    real = torch.compiler.is_compiling
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: calls.append(1) or real())
    xs, out = [torch.randn(64) for _ in range(8)], torch.empty(64)
    for kw in ({}, {"out": out}):
        calls.clear()
        pymerge.weighted_sum(xs, [0.125] * 8, **kw)
        assert len(calls) <= 3, (kw, len(calls))  # 8 before: each helper asked again


class _Freeing:
    """A number whose __float__ (or __index__) frees a tensor's storage: code of the caller's that runs
    after the wrapper checked the tensors, so the kernel must test them again."""

    def __init__(self, value, victim):
        self.value, self.victim = value, victim

    def __float__(self):
        self.victim.untyped_storage().resize_(0)
        return float(self.value)

    def __index__(self):
        self.victim.untyped_storage().resize_(0)
        return int(self.value)

    def __bool__(self):
        self.victim.untyped_storage().resize_(0)
        return bool(self.value)


numbers.Real.register(_Freeing)


def test_code_of_the_callers_between_the_checks_and_the_kernel_is_not_trusted():
    a = [torch.randn(64), torch.randn(64)]
    with pytest.raises(ValueError, match="weighted_sum: input 1: its storage holds 0 bytes"):
        pymerge.weighted_sum(a, [0.5, _Freeing(0.5, a[1])])
    a = [torch.randn(64), torch.randn(64)]
    with pytest.raises(ValueError, match="weighted_sum: input 0: its storage holds 0 bytes"):
        pymerge.weighted_sum_many(a, [[0.5, _Freeing(0.5, a[0])]])
    a = [torch.randn(64), torch.randn(64)]
    with pytest.raises(ValueError, match="select_ranks: input 1: its storage holds 0 bytes"):
        select.select_ranks(a[0], a[1], [3], True, num_threads=_Freeing(0, a[1]))
    a = [torch.randn(64), torch.randn(64)]
    with pytest.raises(ValueError, match="group_dots: input 1: its storage holds 0 bytes"):
        interp.group_dots(a, None, False, "whole", num_threads=_Freeing(0, a[1]))


def test_a_backend_of_a_str_type_of_its_own_is_not_trusted():
    """Its __eq__ runs when the wrapper picks the backend, after the wrapper's checks."""
    a = [torch.randn(64), torch.randn(64)]

    class Auto(str):
        def __eq__(self, other):
            a[1].untyped_storage().resize_(0)
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    with pytest.raises(ValueError, match="weighted_sum: input 1: its storage holds 0 bytes"):
        pymerge.weighted_sum(a, [0.5, 0.5], backend=Auto("auto"))


def _shrinking(victim: torch.Tensor, method: str):
    """A tensor subclass whose `method`, called on it, shrinks victim's storage once (the caller's code, run
    after the wrapper checked victim and before the kernel reads it)."""
    armed = [True]

    class Sneaky(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if armed[0] and getattr(func, "__name__", "") == method:
                armed[0] = False
                victim.untyped_storage().resize_(4)
            return super().__torch_function__(func, types, args, kwargs or {})
    return Sneaky


@pytest.mark.skipif(_native.cpu is None, reason="the C++ extension is not built")
def test_a_tensor_subclass_among_the_arguments_is_not_trusted():
    """A subclass's __torch_function__ is the caller's code: nearswap's out.is_contiguous() and whole_dot_parts'
    x.contiguous() ran it after the inputs were checked, and the kernel read a freed storage (SIGSEGV; a review)."""
    n = 1 << 22  # 16 MiB: freed with munmap
    base, x = torch.ones(n), torch.full((n,), 3.0)
    out = torch.empty(n).as_subclass(_shrinking(base, "is_contiguous"))
    with pytest.raises(ValueError, match=r"^nearswap: input 0: its storage holds 4 bytes"):
        elementwise_mix.nearswap(base, x, 0.5, out)
    a = torch.ones(n)
    s = torch.full((n,), 2.0).as_subclass(_shrinking(a, "contiguous"))
    with pytest.raises(ValueError, match=r"^whole_dots: input 0: its storage holds 4 bytes"):
        interp.whole_dot_parts([a, s], None, False)


_N = 1 << 22  # 16 MiB: freed with munmap


def _hostile_cases():
    def ws(a, b, base, out, h):
        return pymerge.weighted_sum([a, b], [0.5, 0.5], num_threads=h(1))

    def ws_out(a, b, base, out, h):
        return pymerge.weighted_sum([a, b], [0.5, 0.5], out=out, num_threads=h(1))

    def ws_many(a, b, base, out, h):
        return pymerge.weighted_sum_many([a, b], [[0.5, 0.5], [1.0, 0.0]], num_threads=h(1))

    def into(a, b, base, out, h):
        return weighted_sum_into([a, b], [[0.5, h(0.5)]], [out])

    def into_delta(a, b, base, out, h):  # bool(delta) ran in the kernel call, after the storage tests (SIGSEGV)
        return weighted_sum_into([base, a, b], [[1.0, 0.5, 0.5]], [out], delta=h(True))

    return {
        "weighted_sum": ws, "weighted_sum out=": ws_out, "weighted_sum_many": ws_many, "weighted_sum_into": into,
        "weighted_sum_into delta": into_delta,
        "nearswap t": lambda a, b, base, out, h: elementwise_mix.nearswap(base, a, h(0.5), out),
        "nearswap": lambda a, b, base, out, h: elementwise_mix.nearswap(base, a, 0.5, out, num_threads=h(1)),
        "ram eps": lambda a, b, base, out, h: elementwise_mix.ram([a, b], base, h(1e-3), out),
        "ram boosts": lambda a, b, base, out, h: elementwise_mix.ram([a, b], base, 1e-3, out, boosts=[h(1.0), 1.0]),
        "ram": lambda a, b, base, out, h: elementwise_mix.ram([a, b], base, 1e-3, out, num_threads=h(1)),
        "sce": lambda a, b, base, out, h: consensus_ops.sce([a, b], base, 0.5, out, num_threads=h(1)),
        "sce topk": lambda a, b, base, out, h: consensus_ops.sce([a, b], base, h(0.5), out),
        "ramplus_tl": lambda a, b, base, out, h: consensus_ops.ramplus_tl([a, b], base, 0.5, 0.2, 1e-3, out,
                                                                          num_threads=h(1)),
        "ramplus_tl r": lambda a, b, base, out, h: consensus_ops.ramplus_tl([a, b], base, h(0.5), 0.2, 1e-3, out),
        "arcee_fusion": lambda a, b, base, out, h: consensus_ops.arcee_fusion(base, a, out, num_threads=h(1)),
        "group_dots": lambda a, b, base, out, h: interp.group_dots([a, b], base, True, "whole", num_threads=h(1)),
        "whole_dot_parts": lambda a, b, base, out, h: interp.whole_dot_parts([a, b], base, True, num_threads=h(1)),
        "group_lincomb": lambda a, b, base, out, h: interp.group_lincomb([a, b], base, True, "whole",
                                                                         torch.ones(1, 3), out, num_threads=h(1)),
        "select_ranks": lambda a, b, base, out, h: select.select_ranks(a, base, [10], descending=True,
                                                                       num_threads=h(1)),
        # flags and ranks: pybind11 called their __bool__ / __index__ in the kernel call (a review, SIGSEGV)
        "group_dots sub": lambda a, b, base, out, h: interp.group_dots([a, b], base, h(True), "whole"),
        "group_dots rows sub": lambda a, b, base, out, h: interp.group_dots([a.view(64, -1), b.view(64, -1)],
                                                                            base.view(64, -1), h(True), "rows"),
        "whole_dot_parts sub": lambda a, b, base, out, h: interp.whole_dot_parts([a, b], base, h(True)),
        "group_lincomb sub": lambda a, b, base, out, h: interp.group_lincomb([a, b], base, h(True), "whole",
                                                                             torch.ones(1, 3), out),
        "select_ranks descending": lambda a, b, base, out, h: select.select_ranks(a, base, [10], descending=h(True)),
        "merge_planned consensus": lambda a, b, base, out, h: tvo.merge_planned(
            [a, b], base, [tvo.ModelPlan(weight=0.5, model=i) for i in (0, 1)], out, consensus=h(True),
            normalize=False),
        "merge_planned lam": lambda a, b, base, out, h: tvo.merge_planned(
            [a, b], base, [tvo.ModelPlan(weight=0.5, model=i) for i in (0, 1)], out, consensus=False,
            normalize=h(False), lam=h(1.0), offset=h(0)),
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases()))
@pytest.mark.parametrize("victim", ["input", "base", "out"])
def test_a_number_of_the_callers_type_runs_before_the_storage_tests(case, victim):
    """Every number of the caller's is converted before the tensors are tested, so the op reports the freed
    tensor (or, where it never reads it, ignores it). num_threads went to the kernel unconverted, its __index__
    running after the storage test (weighted_sum, sce, ram...: SIGSEGV); nearswap's t, ram's eps and boosts
    were read after it too."""
    a, b = torch.randn(_N), torch.randn(_N)
    base, out = torch.randn(_N), torch.empty(_N)
    target = {"input": a, "base": base, "out": out}[victim]
    try:
        _hostile_cases()[case](a, b, base, out, lambda v: _Freeing(v, target))
    except ValueError as exc:
        assert "storage holds 0 bytes" in str(exc) or "rank out of range" in str(exc), exc


@pytest.mark.skipif(_native.cpu is None, reason="the C++ extension is not built")
def test_a_weights_tensor_is_tested_before_it_is_read():
    """weighted_sum_many_out read a weights tensor (tolist) before testing its storage: a view reaching 64 MiB
    into a storage shrunk to 8 bytes read freed memory (SIGSEGV; a review)."""
    xs, outs = [torch.randn(64), torch.randn(64)], [torch.zeros(64)]
    stride = 16 << 20
    weights = torch.full((stride + 1,), 0.5).as_strided((1, 2), (2, stride))
    weights.untyped_storage().resize_(0)
    weights.untyped_storage().resize_(8)
    with pytest.raises(ValueError, match="weighted_sum: weights: its storage holds 8 bytes"):
        torch.ops.pymerge.weighted_sum_many_out(xs, weights, outs)
    assert torch.equal(outs[0], torch.zeros(64))


def test_ram_takes_one_boost_per_input_on_every_path():
    """The torch path (GPU tensors, backend="torch") zipped the boosts with the inputs: a short list dropped
    inputs silently where the C++ kernel refused it (a review)."""
    xs, base = [torch.randn(16), torch.randn(16)], torch.zeros(16)
    for backend in (["torch", "auto"] if _native.cpu is not None else ["torch"]):
        for boosts in ([1.0], [1.0, 1.0, 1.0]):
            with pytest.raises(ValueError, match="ram: one boost per input"):
                elementwise_mix.ram(xs, base, 1e-3, torch.empty(16), backend=backend, boosts=boosts)


@pytest.mark.parametrize("call", [
    lambda a, b, v: interp.group_dots([a, b], b, v, "whole"),
    lambda a, b, v: interp.whole_dot_parts([a, b], b, v),
    lambda a, b, v: select.select_ranks(a, b, [3], descending=v),
    lambda a, b, v: tvo.merge_planned([a], b, [tvo.ModelPlan(weight=1.0, model=0)], torch.empty(64),
                                      consensus=v, normalize=False),
    lambda a, b, v: weighted_sum_into([a, b], [[0.5, 0.5]], [torch.empty(64)], delta=v),
])
def test_a_flag_is_a_bool_not_a_string(call):
    """Flags are converted before the storage tests (their __bool__ is the caller's): bool() took "False" for
    True, where pybind11 refused a string (a review). What pybind11 took still works."""
    a, b = torch.randn(64), torch.randn(64)
    for bad in ("False", "no", [0], torch.tensor([True, False])):
        with pytest.raises(TypeError, match="must be a bool, got"):
            call(a, b, bad)
    for good in (True, False, np.bool_(True), torch.tensor(False), 1, None):
        call(a, b, good)

    class Zero:  # __index__ and no __bool__: bool() took it for True
        def __index__(self):
            return 0

    same = lambda r: r.tolist() if isinstance(r, torch.Tensor) else r  # noqa: E731
    assert same(call(a, b, Zero())) == same(call(a, b, False))


def test_an_out_over_foreign_memory_is_probed_once_per_call(monkeypatch):
    """Every path now refuses a read-only out (the torch paths segfaulted on one): the wrappers probe it, and
    check_native probed it again on the native path (~100 us each, twice a call; a review)."""
    import pymerge.ops._memory as mem
    probes = [0]
    real = mem.write_problem

    def counting(t):
        probes[0] += 1
        return real(t)
    monkeypatch.setattr(mem, "write_problem", counting)
    xs = [torch.randn(64, 64) for _ in range(3)]
    b = torch.randn(64, 64)
    out = torch.from_numpy(np.zeros((64, 64), np.float32))  # foreign memory: probed
    calls = {"weighted_sum": lambda: pymerge.weighted_sum(xs, [0.2, 0.3, 0.5], out=out),
             "weighted_sum_many": lambda: pymerge.weighted_sum_many(xs, [[0.2, 0.3, 0.5]], outs=[out]),
             "nearswap": lambda: elementwise_mix.nearswap(b, xs[0], 0.5, out),
             "sce": lambda: consensus_ops.sce(xs, b, 0.5, out),
             "group_lincomb": lambda: interp.group_lincomb(xs, b, True, "whole", torch.ones(1, 4), out),
             "tv_merge": lambda: tvo.task_vector_merge(xs, b, out, [tvo.Sparsifier()] * 3, [0.2, 0.3, 0.5],
                                                       consensus=True, normalize=True)}
    for name, call in calls.items():
        probes[0] = 0
        call()
        assert probes[0] == 1, (name, probes[0])
