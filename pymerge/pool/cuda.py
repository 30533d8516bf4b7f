"""The pool's GPU paths: launches that need no host sync, and chunked streaming from host memory.

- Device tier: the weights go to a device table with one non_blocking copy from a pinned slot per
  call; every launch then reads weights and (cached) address tables already on the device. The
  table is a new tensor per call from the caching allocator, on the stream whose kernels read it:
  a later call (on any stream, before those kernels ran) never overwrites it, and the allocator
  hands its memory out again only in that stream's order.
  Nothing is allocated and nothing waits on the host, so the
  whole materialize can be captured in a CUDA graph (pass the weights as a CUDA tensor to change
  them between replays without any copy: see `run_linear`).
- Pinned / mmap tiers: tensors are cut in chunks copied on a side stream into two staging sets on
  the device (double buffering: the copy of chunk j+1 overlaps the kernel on chunk j); events order
  the streams, the host never waits on the GPU (the mmap tier's pageable reads excepted).

Launches go through sum_into with the weights as a float32 [K, N] device tensor: the
GPU backends read them from memory and cache their address tables per input set (the staging
buffers keep fixed addresses, so every chunk hits that cache).
On the CPU (tests, TRITON_INTERPRET=1) the same code runs with streams and pinning left out.
"""
import contextlib
import threading
from typing import Dict, List

import numpy as np
import torch

from pymerge.errors import InputError
from pymerge.forks import renew_after_fork
from pymerge.ops.weighted_sum import sum_into

ALIGN = 4096  # elements; chunk sizes are multiples of it


class CudaRunner:
    def __init__(self, inputs: Dict[str, List[torch.Tensor]], device: torch.device, residency: str,
                 n: int, chunk_bytes: int = 64 << 20):
        self.inputs, self.device, self.residency, self.n = inputs, device, residency, n
        self.on_gpu = device.type == "cuda"
        self.streamed = residency in ("pinned", "mmap")
        self._w_host: List[torch.Tensor] = []  # pinned ring the weights are staged through
        self._w_events: List = []
        self._w_slot = 0
        # one call at a time on the host (pools are used from several threads): two calls shared the staging sets,
        # their events and the pinned ring slot (a review: 12 of 24 tensors wrong in a simulation of two threads)
        self._lock = threading.RLock()
        renew_after_fork(self)
        if self.streamed:
            self._setup_streaming(chunk_bytes)

    def _after_fork(self) -> None:
        """In a forked child: a lock of its own (another thread may have held the parent's)."""
        self._lock = threading.RLock()

    # ---- weights -----------------------------------------------------------------------------------
    def weights(self, tables: List[np.ndarray]) -> torch.Tensor:
        """[G, K, N] float32 weights on the device; a CUDA tensor given by the caller is used as is."""
        with self._lock:
            return self._weights(tables)

    def _weights(self, tables: List[np.ndarray]) -> torch.Tensor:
        g = max(t.shape[0] for t in tables)
        if isinstance(tables[0], torch.Tensor):  # the caller's CUDA weights: views, no copy for one candidate
            if len(tables) == 1:
                return tables[0].unsqueeze(1)
            return torch.stack([t.expand(g, self.n) for t in tables], dim=1)
        w = np.empty((g, len(tables), self.n), dtype=np.float32)
        for k, t in enumerate(tables):
            w[:, k, :] = t if t.shape[0] == g else t[0]
        if not self.on_gpu:
            return torch.from_numpy(w)
        if torch.cuda.is_current_stream_capturing():
            # The graph would keep reading the ring slot and device table this call fills, which later
            # eager calls overwrite (or reallocate): its replays would merge with other weights.
            raise InputError("materialize inside a CUDA graph capture needs the weights as a CUDA tensor on the "
                             "pool's device (update it in place between replays)")
        if not self._w_host or tuple(self._w_host[0].shape) != w.shape:
            self._w_host = [torch.empty(w.shape, dtype=torch.float32).pin_memory() for _ in range(4)]
            self._w_events = [None] * 4
        slot = self._w_slot = (self._w_slot + 1) % len(self._w_host)
        ev = self._w_events[slot]
        if ev is not None:
            ev.synchronize()  # the copy from this slot four calls ago; long done unless the host runs far ahead
        self._w_host[slot].copy_(torch.from_numpy(w))
        w_dev = torch.empty(w.shape, dtype=torch.float32, device=self.device)  # this call's own (see the module doc)
        w_dev.copy_(self._w_host[slot], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._w_events[slot] = ev
        return w_dev

    # ---- launches ----------------------------------------------------------------------------------
    def run_linear(self, plans, tables: List[np.ndarray], backend: str) -> None:
        # Events, streams and launches belong to the pool's GPU, whichever device is current.
        with self._lock, torch.cuda.device(self.device) if self.on_gpu else contextlib.nullcontext():
            w = self._weights(tables)
            if backend == "torch":  # the eager fallback takes Python floats (a host sync; it is slow anyway)
                w = w.cpu().double().numpy()
            if self.streamed:
                return self._run_streamed(plans, w, backend)
            from pymerge.methods.base import WritePass
            with WritePass(sum(len(p.outs) for p in plans)) as writes:
                for p in plans:
                    w_kn = w[p.group if w.shape[0] > 1 else 0]
                    sum_into(self.inputs[p.name], w_kn.tolist() if backend == "torch" else w_kn, p.outs,
                             backend=backend)
                    writes.written += len(p.outs)

    # ---- streaming from host memory ----------------------------------------------------------------
    def _setup_streaming(self, chunk_bytes: int) -> None:
        biggest = max((t.element_size() for ts in self.inputs.values() for t in ts), default=1)
        largest = max((t.numel() for ts in self.inputs.values() for t in ts), default=0)
        # elements per chunk; never more than the largest tensor needs (a huge chunk_bytes staged nothing more)
        self.chunk = max(ALIGN, min(chunk_bytes // biggest, -(-largest // ALIGN) * ALIGN) // ALIGN * ALIGN)
        dev = self.device if self.on_gpu else "cpu"
        self.stage = [[torch.empty(self.chunk * biggest, dtype=torch.uint8, device=dev) for _ in range(self.n)]
                      for _ in range(2)]
        if self.on_gpu:
            self.copy_stream = torch.cuda.Stream(self.device)
            # the staging memory may be a block the allocation stream's queued kernels still use: the side
            # stream starts after them (the allocator orders a reused block on that stream only)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.done = [torch.cuda.Event(), torch.cuda.Event()]
            for buf in (b for stage in self.stage for b in stage):
                # Copies on the side stream write these: when the pool lets them go, the allocator
                # waits for that stream's queued copies before handing the memory to anyone else.
                buf.record_stream(self.copy_stream)

    def _run_streamed(self, plans, w: torch.Tensor, backend: str) -> None:
        compute = torch.cuda.current_stream(self.device) if self.on_gpu else None
        if self.on_gpu:
            self.copy_stream.wait_stream(compute)  # weights and earlier work on the compute stream first
            # The kernels below read the staging buffers on `compute`, which need not be the stream they were
            # allocated on (a materialize under `with torch.cuda.stream(s)`): recorded there too, a pool dropped
            # before `s` drains does not let the allocator hand their memory out while those kernels read it.
            # (A no-op for the allocation stream itself; not testable without a GPU.)
            for buf in (b for stage in self.stage for b in stage):
                buf.record_stream(compute)
        from pymerge.methods.base import WritePass
        j = 0
        with WritePass(sum(len(p.outs) for p in plans)) as writes:  # (a tensor counts once its first chunk is)
            for p in plans:
                ins = self.inputs[p.name]
                numel = ins[0].numel()
                w_kn = w[p.group if w.shape[0] > 1 else 0]
                flat_outs = [o.view(-1) for o in p.outs]
                for start in range(0, numel, self.chunk):
                    n = min(self.chunk, numel - start)
                    b = j % 2
                    staged = self._copy_chunk(ins, b, start, n)
                    if self.on_gpu:
                        compute.wait_event(self.ready[b])
                    sum_into(staged, w_kn, [o[start:start + n] for o in flat_outs], backend=backend)
                    if self.on_gpu:
                        self.done[b].record(compute)
                    writes.written += len(p.outs) if start == 0 else 0
                    j += 1

    def _copy_chunk(self, ins, b: int, start: int, n: int) -> List[torch.Tensor]:
        """Chunk [start, start + n) of every input into staging set b (on the copy stream); returns the views."""
        staged = [self.stage[b][i][:n * t.element_size()].view(t.dtype) for i, t in enumerate(ins)]
        if not self.on_gpu:
            for dst, t in zip(staged, ins):
                dst.copy_(t.view(-1)[start:start + n])
            return staged
        self.copy_stream.wait_event(self.done[b])  # the kernel that last read set b has finished
        with torch.cuda.stream(self.copy_stream):
            for dst, t in zip(staged, ins):
                dst.copy_(t.view(-1)[start:start + n], non_blocking=True)
            self.ready[b].record(self.copy_stream)
        return staged
