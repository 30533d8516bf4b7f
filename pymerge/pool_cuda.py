"""The pool's GPU paths: launches that need no host sync, and chunked streaming from host memory.

- Device tier: each tensor's input address/dtype tables are built on the device once; the weights
  go to a device table with one non_blocking copy from a pinned slot per call; every launch then
  reads tables already on the device. Nothing is allocated and nothing waits on the host, so the
  whole materialize can be captured in a CUDA graph (pass the weights as a CUDA tensor to change
  them between replays without any copy: see `run_linear`).
- Pinned / mmap tiers: tensors are cut in chunks copied on a side stream into two staging sets on
  the device (double buffering: the copy of chunk j+1 overlaps the kernel on chunk j); events order
  the streams, the host never waits on the GPU (the mmap tier's pageable reads excepted).

Launches go straight to the Triton kernel of pymerge.kernels.weighted_sum with prebuilt tables.
weighted_sum_into itself takes Python-float weights and builds its tables per call, which costs
three small host-to-device copies per tensor and cannot be captured. Without Triton the runner
falls back to weighted_sum_into (correct, not graph-safe).
On the CPU (tests, TRITON_INTERPRET=1) the same code runs with streams and pinning left out.
"""
from typing import Dict, List

import numpy as np
import torch

from pymerge._native import DTYPE_CODES
from pymerge.ops.weighted_sum import weighted_sum_into

BLOCK, NUM_WARPS = 4096, 8


def _kernel_module():
    try:
        from pymerge.kernels import weighted_sum as k
    except ImportError:
        return None
    return k if k.available() else None


class CudaRunner:
    def __init__(self, inputs: Dict[str, List[torch.Tensor]], device: torch.device, residency: str,
                 n: int, chunk_bytes: int = 64 << 20):
        self.inputs, self.device, self.residency, self.n = inputs, device, residency, n
        self.on_gpu = device.type == "cuda"
        self.kern = _kernel_module()
        self.streamed = residency in ("pinned", "mmap")
        self._w_dev = None           # [G, K, N] float32 on the device
        self._w_host: List[torch.Tensor] = []  # pinned ring the weights are staged through
        self._w_events: List = []
        self._w_slot = 0
        self._codes = {}             # dtype tuple -> (device code table, IN_DT)
        if not self.streamed:
            self._addr = {name: self._table([t.data_ptr() for t in ts], torch.int64) for name, ts in inputs.items()}
        else:
            self._setup_streaming(chunk_bytes)

    # ---- tables ------------------------------------------------------------------------------------
    def _table(self, values, dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        return host.to(self.device) if self.on_gpu else host

    def _code_table(self, tensors):
        key = tuple(t.dtype for t in tensors)
        if key not in self._codes:
            codes = [DTYPE_CODES[d] for d in key]
            in_dt = codes[0] if all(c == codes[0] for c in codes) else -1
            self._codes[key] = (self._table(codes, torch.int32), in_dt)
        return self._codes[key]

    def _weights(self, tables: List[np.ndarray]) -> torch.Tensor:
        """[G, K, N] float32 weights on the device; a CUDA tensor given by the caller is used as is."""
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
        if self._w_dev is None or tuple(self._w_dev.shape) != w.shape:
            self._w_dev = torch.empty(w.shape, dtype=torch.float32, device=self.device)
            self._w_host = [torch.empty(w.shape, dtype=torch.float32).pin_memory() for _ in range(4)]
            self._w_events = [None] * 4
        slot = self._w_slot = (self._w_slot + 1) % len(self._w_host)
        ev = self._w_events[slot]
        if ev is not None and not torch.cuda.is_current_stream_capturing():
            ev.synchronize()  # the copy from this slot four calls ago; long done unless the host runs far ahead
        self._w_host[slot].copy_(torch.from_numpy(w))
        self._w_dev.copy_(self._w_host[slot], non_blocking=True)
        if not torch.cuda.is_current_stream_capturing():
            ev = torch.cuda.Event()
            ev.record()
            self._w_events[slot] = ev
        return self._w_dev

    # ---- launches ----------------------------------------------------------------------------------
    def _launch(self, addr, codes, in_dt, w_kn: torch.Tensor, outs: List[torch.Tensor], numel: int) -> None:
        """outs[k] = sum_i w_kn[k, i] * input_i over numel elements, inputs given by the address table."""
        k_max = self.kern.MAX_OUTPUTS
        block, warps = (1024, 4) if not self.on_gpu else (BLOCK, NUM_WARPS)
        grid = ((numel + block - 1) // block,)
        for start in range(0, len(outs), k_max):
            group = outs[start:start + k_max]
            slots = group + [group[0]] * (k_max - len(group))
            self.kern._weighted_sum_kernel[grid](addr, codes, w_kn[start:start + k_max], *slots, numel, self.n,
                                                 IN_DT=in_dt, K=len(group), BLOCK=block, num_warps=warps)

    def run_linear(self, plans, tables: List[np.ndarray], backend: str) -> None:
        if self.kern is None or backend != "triton":
            return self._fallback(plans, tables, backend)
        w = self._weights(tables)
        if self.streamed:
            return self._run_streamed(plans, w)
        for p in plans:
            ins = self.inputs[p.name]
            codes, in_dt = self._code_table(ins)
            self._launch(self._addr[p.name], codes, in_dt, w[p.group if w.shape[0] > 1 else 0], p.outs, ins[0].numel())

    def _fallback(self, plans, tables, backend) -> None:
        """weighted_sum_into with float weights: per-call tables, streamed tiers copied whole."""
        g = max(t.shape[0] for t in tables)
        rows = [[t[i if t.shape[0] > 1 else 0].tolist() for t in tables] for i in range(g)]
        for p in plans:
            ins = self.inputs[p.name]
            if ins[0].device != p.outs[0].device:
                ins = [t.to(p.outs[0].device, non_blocking=True) for t in ins]
            weighted_sum_into(ins, rows[p.group], p.outs, backend=backend)

    # ---- streaming from host memory ----------------------------------------------------------------
    def _setup_streaming(self, chunk_bytes: int) -> None:
        biggest = max(t.element_size() for ts in self.inputs.values() for t in ts)
        self.chunk = max(BLOCK, chunk_bytes // biggest // BLOCK * BLOCK)  # elements per chunk
        dev = self.device if self.on_gpu else "cpu"
        self.stage = [[torch.empty(self.chunk * biggest, dtype=torch.uint8, device=dev) for _ in range(self.n)]
                      for _ in range(2)]
        self.stage_addr = [self._table([b.data_ptr() for b in bufs], torch.int64) for bufs in self.stage]
        if self.on_gpu:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.done = [torch.cuda.Event(), torch.cuda.Event()]

    def _run_streamed(self, plans, w: torch.Tensor) -> None:
        compute = torch.cuda.current_stream(self.device) if self.on_gpu else None
        if self.on_gpu:
            self.copy_stream.wait_stream(compute)  # weights and earlier work on the compute stream first
        j = 0
        for p in plans:
            ins = self.inputs[p.name]
            codes, in_dt = self._code_table(ins)
            numel = ins[0].numel()
            w_kn = w[p.group if w.shape[0] > 1 else 0]
            flat_outs = [o.view(-1) for o in p.outs]
            for start in range(0, numel, self.chunk):
                n = min(self.chunk, numel - start)
                b = j % 2
                self._copy_chunk(ins, b, start, n)
                if self.on_gpu:
                    compute.wait_event(self.ready[b])
                self._launch(self.stage_addr[b], codes, in_dt, w_kn, [o[start:start + n] for o in flat_outs], n)
                if self.on_gpu:
                    self.done[b].record(compute)
                j += 1

    def _copy_chunk(self, ins, b: int, start: int, n: int) -> None:
        """Chunk [start, start + n) of every input into staging set b, on the copy stream."""
        if not self.on_gpu:
            for i, t in enumerate(ins):
                self.stage[b][i][:n * t.element_size()].view(t.dtype).copy_(t.view(-1)[start:start + n])
            return
        self.copy_stream.wait_event(self.done[b])  # the kernel that last read set b has finished
        with torch.cuda.stream(self.copy_stream):
            for i, t in enumerate(ins):
                dst = self.stage[b][i][:n * t.element_size()].view(t.dtype)
                dst.copy_(t.view(-1)[start:start + n], non_blocking=True)
            self.ready[b].record(self.copy_stream)
