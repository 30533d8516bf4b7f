"""Executors for a MergePlan: stream tensors in chunks into a ShardedWriter, memory bounded by
the chunk budget, never by the model.

CPU: the method computes straight from the mapped checkpoint pages into a scratch buffer taken
from a small pool; a writer thread writes it out and hands the buffer back. The next tensor is
prefetched (madvise WILLNEED) while the current one is computed, and a finished tensor's pages are
dropped from the process (MADV_DONTNEED; they stay in the page cache).

GPU: reader threads copy each chunk from the mapped pages into pinned staging buffers (3 slots,
the next chunk is read while the current one is on the GPU); host-to-device copies run on a side
stream and overlap the kernel of the previous chunk; results come back through pinned buffers on
another stream to the writer thread, which hands the slot back once the chunk is on disk.
Chunks are never copied to the device from the mapping itself: pageable copies run at a fraction of pinned
speed. (A whole-tensor method's tensor larger than a slot and a tokenizer merge's embedding are: plain copies,
once per such tensor, after the pipeline is drained.)

CPU without torch: for a weighted-sum method (pymerge/methods/linear.py: linear, task_arithmetic;
``weights_for`` gives the sources and coefficients, ``delta`` the form) whose inputs need no rounding to ``dtype`` and
whose result needs no second rounding, the executor hands raw pointers into the mapped
checkpoints (numpy views) and into numpy output buffers straight to the C++ kernel that
ops.weighted_sum calls, with the same arguments: the same bits, and torch is never imported
(it costs more than the merge). Otherwise, or with PYMERGE_FORCE_TORCH=1 in the environment,
the torch executor runs; those roundings use torch's conversions, hence the fallback.
"""
import ctypes
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np

from pymerge import _native
from pymerge.io.sigbus import MappingGuard
from pymerge.methods.base import TensorTask

N_SLOTS = 3              # buffers in flight: one being computed, up to two waiting for the writer
_ALIGN = 64
_COPY_PIECE = 8 << 20    # bytes per reader-thread memcpy on the GPU path


# ---- shared helpers --------------------------------------------------------------------------
class Scratch:
    """Carves aligned, typed, flat regions out of one byte buffer (reset per chunk)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, dtype, n: int):
        """An aligned region of n elements; dtype is a torch dtype or its name."""
        if isinstance(dtype, str):
            dtype = _native.torch_dtype(dtype)
        start = -(-self.pos // _ALIGN) * _ALIGN
        end = start + n * dtype.itemsize
        if end > self.buf.numel():
            raise AssertionError(f"scratch overflow: {end} > {self.buf.numel()} bytes")
        self.pos = end
        return self.buf[start:end].view(dtype)

    def reset(self) -> "Scratch":
        self.pos = 0
        return self


def scratch_per_element(tp) -> int:
    """Bytes of scratch one output element needs: the output, rounded inputs, a narrow result."""
    n = _size(tp.out_dtype) + sum(_size(c) for c in tp.casts if c is not None)
    if tp.double_round:
        n += _size(tp.result_dtype)
    return n


def _size(dtype) -> int:
    """Itemsize of a dtype name or torch dtype."""
    return _native.itemsize(dtype)


def _in_bytes_per_element(tp) -> int:
    return sum(_size(d) for d in tp.in_dtypes)


def chunks(tp, budget_bytes: int, per_element: int) -> List[Tuple[int, int]]:
    """(element offset, count) pieces of a tensor, each needing at most budget_bytes of scratch
    (with room for alignment); whole rows where a row fits."""
    return chunks_of(tp, (budget_bytes - _slack(tp)) // per_element)


def _slack(tp) -> int:
    return _ALIGN * (4 + 2 * len(tp.casts))  # alignment padding of the regions carved per chunk


def chunks_of(tp, room: int) -> List[Tuple[int, int]]:
    """Pieces of at most ``room`` elements."""
    room = max(1, room)
    if tp.numel <= room:
        return [(0, tp.numel)]
    row = tp.numel // tp.shape[0] if tp.shape and tp.shape[0] else tp.numel
    step = room - room % row if row <= room else room
    return [(off, min(step, tp.numel - off)) for off in range(0, tp.numel, step)]


def compute_chunk(plan, tp, sources: list, out, scratch: Scratch, *, offset: int,
                  seed: int, num_threads: int) -> None:
    """Runs the method on one chunk: rounds inputs to the compute dtype where mergekit would,
    and the result to the compute dtype before out_dtype where that is narrower than float32."""
    ins = []
    for x, cast in zip(sources, tp.casts):
        if cast is not None:
            c = scratch.take(cast, x.numel()).view(x.shape)
            c.copy_(x)
            x = c
        ins.append(x)
    dst = scratch.take(tp.result_dtype, out.numel()).view(out.shape) if tp.double_round else out
    n_in = len(plan.inputs)
    task = TensorTask(inputs=ins[:n_in], base=ins[n_in] if plan.base is not None else None,
                      model_params=tp.model_params, params=tp.params, name=tp.name, offset=offset, seed=seed,
                      num_threads=num_threads)
    plan.method.merge_tensor(task, dst)
    if dst is not out:
        out.copy_(dst)


def _unique(checkpoints):
    return list({id(c): c for c in checkpoints}.values())


class _Sink:
    """The writer thread: writes chunks in arrival order, then hands their buffer back."""

    def __init__(self, writer, progress, on_done, guard=None):
        self.writer, self.progress, self.on_done = writer, progress, on_done
        self.guard = guard  # MappingGuard: a chunk computed from a truncated input is never written
        # SimpleQueue: a put is one C call, never a Python lock a signal can leave held (a KeyboardInterrupt
        # inside Queue.put, just after it took its mutex, left abandon()'s put(None) waiting forever; bpo-29988)
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.error: Optional[BaseException] = None
        self._pending = 0                      # chunks queued or being written
        self._idle = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="pymerge-writer", daemon=True)

    def start(self) -> None:
        """Inside the caller's try that abandons the sink (a thread started in __init__ and a Ctrl-C before that try
        leaked a thread, and its chunk buffers, per interrupt: an audit)."""
        self.thread.start()

    def put(self, name: str, tensor, offset: int, token, in_bytes: int, event=None) -> None:
        if self.guard is not None:
            self.guard.check()
        with self._idle:
            self._pending += 1
        self.q.put((name, tensor, offset, token, in_bytes, event))

    def wait_idle(self) -> None:
        """Blocks until every chunk handed over so far is written (or failed)."""
        with self._idle:
            while self._pending:
                self._idle.wait()
        self.check()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            name, tensor, offset, token, in_bytes, event = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()  # the device-to-host copy has landed
                    self.writer.write(name, tensor, offset)
                    if self.progress is not None:
                        self.progress.update(in_bytes)
            except BaseException as exc:  # noqa: BLE001  (reported on the main thread)
                self.error = exc
            finally:
                del tensor, item  # a whole-tensor buffer goes now, not when the next chunk arrives
                self.on_done(token)
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Waits for every queued chunk, stops the thread, re-raises its error."""
        self.q.put(None)
        self.thread.join()
        self.check()
        if self.guard is not None:  # every read is done: a cut inside a file's last page faulted nothing
            self.guard.check(sizes=True)

    def abandon(self) -> None:
        """After an error on the main thread: stop writing, let the thread finish quickly."""
        if self.error is None:
            self.error = RuntimeError("merge abandoned")
        self.q.put(None)
        try:
            self.thread.join(timeout=30)
        except RuntimeError:  # never started, or interrupted as it started: it ends on the None above
            pass


# ---- CPU -------------------------------------------------------------------------------------
FORCE_TORCH_ENV = "PYMERGE_FORCE_TORCH"


def torch_free(plan, device: str = "cpu") -> bool:
    """True when the CPU executor runs this plan without torch (see the module docstring)."""
    if device != "cpu" or os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0") or _native.cpu is None:
        return False  # (without the C++ extension: the torch ops' fallbacks; the raw path had none, a traceback)
    if not callable(getattr(plan.method, "weights_for", None)) or not plan.method.chunkable:
        return False
    return all(not tp.double_round and all(c is None for c in tp.casts) and tp.vocab is None for tp in plan.tensors)


def uses_torch(plan, device: str) -> bool:
    return not torch_free(plan, device)


def run_cpu(plan, writer, *, device: str = "cpu", chunk_bytes: int, num_threads: int = 0, seed: int = 0,
            progress=None) -> None:
    raw = torch_free(plan, device)
    chunk_bytes = min(chunk_bytes, _largest_need(plan, scratch_per_element))
    free: "queue.SimpleQueue" = queue.SimpleQueue()  # (see _Sink.q)
    for _ in range(N_SLOTS):  # pages appear only when first written
        free.put(_allocate(_raw_buffer if raw else _torch_buffer, chunk_bytes))

    def give_back(token):
        if token is not None:
            free.put(token)

    cks = _unique(plan.checkpoints)
    guard = MappingGuard(cks)
    sink = _Sink(writer, progress, give_back, guard)
    try:
        sink.start()
        guard.start()
        tensors = plan.tensors
        if tensors:
            _prefetch(cks, tensors[0].name)
        for i, tp in enumerate(tensors):
            if i + 1 < len(tensors):
                _prefetch(cks, tensors[i + 1].name)
            if tp.numel and tp.vocab is not None:  # a tokenizer merge's embedding: rows permuted
                from pymerge.tokenizer.rows import stream_vocab_tensor
                stream_vocab_tensor(plan, tp, sink, device="cpu", chunk_bytes=chunk_bytes, seed=seed,
                                    num_threads=num_threads)
            elif tp.numel and raw:
                _raw_tensor(plan, tp, sink, free, chunk_bytes, num_threads)
            elif tp.numel:
                _cpu_tensor(plan, tp, sink, free, chunk_bytes, seed, num_threads)
            for ck in cks:
                ck.release(tp.name)
        sink.close()
    except BaseException:
        sink.abandon()
        raise
    finally:
        guard.stop()


def _largest_need(plan, per_element) -> int:
    """Bytes of the biggest chunk the plan can use: a --chunk-size above it buys nothing."""
    return max([tp.numel * per_element(tp) + _slack(tp) for tp in plan.tensors] + [1 << 20])


def _allocate(make, nbytes: int):
    try:
        return make(nbytes)
    except (MemoryError, RuntimeError) as exc:  # numpy: MemoryError; torch: RuntimeError
        from pymerge.errors import InputError
        raise InputError(f"cannot allocate {N_SLOTS} chunk buffers of {nbytes} bytes "
                         f"({type(exc).__name__}); use a smaller --chunk-size") from None


def _torch_buffer(nbytes: int):
    import torch
    return torch.empty(nbytes, dtype=torch.uint8)


def _raw_buffer(nbytes: int) -> np.ndarray:
    """A numpy byte buffer starting on an _ALIGN boundary, as torch's allocations do."""
    buf = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    skip = -buf.__array_interface__["data"][0] % _ALIGN
    return buf[skip:skip + nbytes]


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _raw_tensor(plan, tp, sink, free, chunk_bytes, num_threads) -> None:
    """One tensor of a weighted-sum method, without torch: what the method's merge_tensor does
    through ops.weighted_sum (same sources, order, coefficients, form, kernel), on raw pointers."""
    task = TensorTask(inputs=[], base=None, model_params=tp.model_params, params=tp.params, name=tp.name)
    order, coef = plan.method.weights_for(task)  # source i: plan.checkpoints[i] (inputs..., then base)
    arrays = [plan.checkpoints[i].array(tp.name) for i in order]  # kept alive while the kernel reads
    sizes = [_size(tp.in_dtypes[i]) for i in order]
    codes = [_native.CODES_BY_NAME[tp.in_dtypes[i]] for i in order]
    ptrs = [_address(a) for a in arrays]
    out_size, out_code = _size(tp.out_dtype), _native.CODES_BY_NAME[tp.out_dtype]
    in_per_el = _in_bytes_per_element(tp)
    kernel = _native.require_cpu().weighted_sum_many
    for off, n in chunks(tp, chunk_bytes, scratch_per_element(tp)):
        buf = free.get()
        sink.check()
        out = buf[:n * out_size]
        kernel([p + off * s for p, s in zip(ptrs, sizes)], codes, n, coef, [_address(out)], [out_code],
               num_threads, getattr(plan.method, "delta", False))
        sink.put(tp.name, out, off, buf, n * in_per_el)


def _cpu_tensor(plan, tp, sink, free, chunk_bytes, seed, num_threads) -> None:
    views = [ck.tensor(tp.name) for ck in plan.checkpoints]
    per_el = scratch_per_element(tp)
    in_per_el = _in_bytes_per_element(tp)
    if not plan.method.chunkable and tp.numel * per_el + _slack(tp) > chunk_bytes:
        # Whole-tensor method, tensor bigger than a slot: wait for the writer, then one buffer of
        # the tensor's own size (memory bounded by the largest tensor, not the model).
        sink.wait_idle()
        buf = _torch_buffer(tp.numel * per_el + _slack(tp))
        scratch = Scratch(buf)
        out = scratch.take(tp.out_dtype, tp.numel).view(tp.shape)
        compute_chunk(plan, tp, views, out, scratch, offset=0, seed=seed, num_threads=num_threads)
        sink.put(tp.name, out, 0, None, tp.numel * in_per_el)
        return
    whole = not plan.method.chunkable
    flat = views if whole else [v.reshape(-1) for v in views]
    for off, n in ([(0, tp.numel)] if whole else chunks(tp, chunk_bytes, per_el)):
        buf = free.get()
        sink.check()
        scratch = Scratch(buf)
        out = scratch.take(tp.out_dtype, n)
        srcs = flat if whole else [v[off:off + n] for v in flat]
        if whole:
            out = out.view(tp.shape)
        compute_chunk(plan, tp, srcs, out, scratch, offset=off, seed=seed, num_threads=num_threads)
        sink.put(tp.name, out, off, buf, n * in_per_el)


def _prefetch(cks, name: str) -> None:
    for ck in cks:
        ck.prefetch(name)


# ---- GPU -------------------------------------------------------------------------------------
class _Slot:
    """One chunk in flight on the GPU path: pinned staging, device buffers and their events."""

    def __init__(self, pinned_bytes: int, device_bytes: int, device):
        import torch
        self.pinned = torch.empty(pinned_bytes, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty(device_bytes, dtype=torch.uint8, device=device)
        self.h2d_done = torch.cuda.Event()
        self.d2h_done = torch.cuda.Event()


def gpu_budget(tp) -> Tuple[int, int]:
    """(pinned, device) bytes per element of a chunk."""
    in_b = _in_bytes_per_element(tp)
    pinned = in_b + _size(tp.out_dtype)
    dev = in_b + scratch_per_element(tp)
    return pinned, dev


def run_gpu(plan, writer, *, device: str = "cuda", chunk_bytes: int, num_threads: int = 0, seed: int = 0,
            progress=None, readers: int = 8) -> None:
    import torch
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    # Launches, events and allocations on `dev`; the caller's current device is as it was afterwards.
    with torch.cuda.device(dev):
        _run_gpu(plan, writer, dev, chunk_bytes, num_threads, seed, progress, readers)


def _run_gpu(plan, writer, dev, chunk_bytes, num_threads, seed, progress, readers) -> None:
    import torch
    chunk_bytes = min(chunk_bytes, _largest_need(plan, lambda tp: max(gpu_budget(tp))))
    # Device buffers may be larger than the pinned ones (casts, narrow results) by a small factor.
    dev_bytes = 2 * chunk_bytes
    free: "queue.SimpleQueue" = queue.SimpleQueue()  # (see _Sink.q)
    for _ in range(N_SLOTS):
        free.put(_allocate(lambda n: _Slot(n, dev_bytes, dev), chunk_bytes))
    h2d, compute, d2h = torch.cuda.Stream(dev), torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    for s in (h2d, compute, d2h):  # the slots' device memory may be a block the caller's queued kernels still use:
        s.wait_stream(torch.cuda.current_stream(dev))  # the allocator hands it out in that stream's order only
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="pymerge-reader")

    def give_back(token):
        if token is not None:
            free.put(token)

    guard = MappingGuard(_unique(plan.checkpoints))
    sink = _Sink(writer, progress, give_back, guard)
    try:
        sink.start()
        guard.start()
        work = _gpu_work(plan, chunk_bytes, dev_bytes)
        pending = None  # (item, slot, futures) read into pinned memory, not yet sent to the GPU
        for item in work:
            tp, off, n, views = item
            if tp.vocab is not None or (not plan.method.chunkable and not _fits(tp, chunk_bytes, dev_bytes)):
                if pending is not None:
                    _gpu_chunk(plan, *pending, h2d, compute, d2h, sink, seed, num_threads)
                    pending = None
                if tp.vocab is not None:  # a tokenizer merge's embedding: rows permuted on the host
                    from pymerge.tokenizer.rows import stream_vocab_tensor
                    with torch.cuda.stream(compute):
                        stream_vocab_tensor(plan, tp, sink, device=dev, chunk_bytes=chunk_bytes, seed=seed,
                                            num_threads=num_threads)
                else:
                    _gpu_whole(plan, tp, views, dev, sink, free, seed, num_threads, compute)
                for ck in _unique(plan.checkpoints):  # copied to the device: its pages leave, as _gpu_chunk's do
                    ck.release(tp.name)  # (they stayed mapped in the process: a review)
                continue
            slot = free.get()
            sink.check()
            futures = _read_into(pool, slot, tp, views, off, n)
            if pending is not None:  # the GPU works on the previous chunk while this one is read
                _gpu_chunk(plan, *pending, h2d, compute, d2h, sink, seed, num_threads)
            pending = (item, slot, futures)
        if pending is not None:
            _gpu_chunk(plan, *pending, h2d, compute, d2h, sink, seed, num_threads)
        sink.close()
        torch.cuda.synchronize(dev)
    except BaseException:
        sink.abandon()
        # Copies and kernels may still be using the slots' device and pinned memory: let them
        # finish before that memory goes back to the allocator.
        torch.cuda.synchronize(dev)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        guard.stop()


def _gpu_room(tp, pinned_bytes, dev_bytes) -> int:
    """Elements per chunk that fit both the pinned and the device buffer of a slot."""
    p, d = gpu_budget(tp)
    return min((pinned_bytes - _slack(tp)) // p, (dev_bytes - _slack(tp)) // d)


def _fits(tp, pinned_bytes, dev_bytes) -> bool:
    return tp.numel <= _gpu_room(tp, pinned_bytes, dev_bytes)


def _gpu_work(plan, pinned_bytes, dev_bytes):
    """Chunks to process, in order, prefetching the next tensor's pages as each tensor starts."""
    cks = _unique(plan.checkpoints)
    tensors = [tp for tp in plan.tensors if tp.numel]
    for i, tp in enumerate(tensors):
        if i + 1 < len(tensors):
            _prefetch(cks, tensors[i + 1].name)
        views = [ck.tensor(tp.name) for ck in plan.checkpoints]
        if not plan.method.chunkable or tp.vocab is not None:
            yield tp, 0, tp.numel, views
            continue
        flat = [v.reshape(-1) for v in views]
        for off, n in chunks_of(tp, _gpu_room(tp, pinned_bytes, dev_bytes)):
            yield tp, off, n, flat


def _read_into(pool, slot, tp, views, off, n):
    """Reader threads memcpy the chunk of every source into the slot's pinned buffer (ctypes
    releases the GIL, so the copies run in parallel)."""
    scratch = Scratch(slot.pinned)
    futures, slot.regions = [], []
    for v in views:
        src = v.reshape(-1)[off:off + n]
        region = scratch.take(v.dtype, n)
        slot.regions.append(region)
        nbytes = n * v.element_size()
        src_ptr, dst_ptr = src.data_ptr(), region.data_ptr()
        for p in range(0, nbytes, _COPY_PIECE):
            size = min(_COPY_PIECE, nbytes - p)
            futures.append(pool.submit(ctypes.memmove, dst_ptr + p, src_ptr + p, size))
    slot.out_pinned = scratch.take(tp.out_dtype, n)
    return futures  # the caller keeps the mapped views alive until the copies are done


def _gpu_chunk(plan, item, slot, futures, h2d, compute, d2h, sink, seed, num_threads) -> None:
    import torch
    tp, off, n, _views = item
    for f in futures:
        f.result()
    if off + n == tp.numel:  # the tensor is staged: its mapped pages can leave this process
        for ck in _unique(plan.checkpoints):
            ck.release(tp.name)
    dscratch = Scratch(slot.dev)
    with torch.cuda.stream(h2d):
        # Waiting for the slot's previous compute is implied: the writer handed the slot back only
        # after its device-to-host copy, which followed that compute.
        dev_in = []
        for region in slot.regions:
            d = dscratch.take(region.dtype, n)
            d.copy_(region, non_blocking=True)
            dev_in.append(d)
        slot.h2d_done.record(h2d)
    shaped = not plan.method.chunkable
    if shaped:
        dev_in = [d.view(tp.shape) for d in dev_in]
    compute.wait_event(slot.h2d_done)
    with torch.cuda.stream(compute):
        out = dscratch.take(tp.out_dtype, n)
        if shaped:
            out = out.view(tp.shape)
        compute_chunk(plan, tp, dev_in, out, dscratch, offset=off, seed=seed, num_threads=num_threads)
        done = torch.cuda.Event()
        done.record(compute)
    d2h.wait_event(done)
    with torch.cuda.stream(d2h):
        slot.out_pinned.copy_(out.reshape(-1), non_blocking=True)
        slot.d2h_done.record(d2h)
    result = slot.out_pinned if not shaped else slot.out_pinned.view(tp.shape)
    sink.put(tp.name, result, off, slot, n * _in_bytes_per_element(tp), event=slot.d2h_done)


def _gpu_whole(plan, tp, views, dev, sink, free, seed, num_threads, compute) -> None:
    """A whole-tensor method on a tensor bigger than a slot: drain, then plain copies."""
    import torch
    sink.wait_idle()
    with torch.cuda.stream(compute):
        srcs = [v.to(dev) for v in views]
        per = scratch_per_element(tp)
        dscratch = Scratch(torch.empty(tp.numel * per + _slack(tp), dtype=torch.uint8,
                                       device=dev))
        out = dscratch.take(tp.out_dtype, tp.numel).view(tp.shape)
        compute_chunk(plan, tp, srcs, out, dscratch, offset=0, seed=seed, num_threads=num_threads)
        host = out.cpu()
    sink.put(tp.name, host, 0, None, tp.numel * _in_bytes_per_element(tp))
