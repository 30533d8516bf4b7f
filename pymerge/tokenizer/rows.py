"""Streams a vocabulary tensor (embeddings, lm_head) of a tokenizer merge: each source's rows are
gathered from its mapped checkpoint in the output's token order (pymerge/tokenizer/vocab.py says
which), a block of rows at a time, and the merge method runs on the blocks.

Memory: a block of rows of every source, a few chunk sizes in all, for a method that works in
chunks; the whole permuted tensor of every source for one that needs whole tensors (as mergekit).
Default rows follow mergekit's arithmetic in the row dtype: the mean is a running sum from zero in
source order, then one division.
"""
import numpy as np

from pymerge import _native
from pymerge.tokenizer.vocab import MEAN, ROW, Rows


def stream_vocab_tensor(plan, tp, sink, *, device, chunk_bytes: int, seed: int, num_threads: int) -> None:
    import torch
    from pymerge.streaming import Scratch, _slack, compute_chunk, scratch_per_element
    rows: Rows = tp.vocab
    dtype = _native.torch_dtype(tp.in_dtypes[0])
    views = [ck.tensor(tp.name) for ck in plan.checkpoints]
    row_shape = tuple(tp.shape[1:])
    row_numel = int(np.prod(row_shape, dtype=np.int64)) if row_shape else 1
    total = tp.shape[0]
    k = len(views)
    step = rows_per_block(row_numel * (k * dtype.itemsize + scratch_per_element(tp)), chunk_bytes, total) \
        if plan.method.chunkable else total
    means = _pad_means(rows, views, dtype, row_shape, step) if rows.n_tokens < total else None
    for r0 in range(0, total, step):
        r1 = min(total, r0 + step)
        defaults = _defaults(rows, views, dtype, row_shape, r0, min(r1, rows.n_tokens))
        srcs = [_rows(rows.src[i][r0:r1], views[i], dtype, row_shape, defaults, r0,
                      None if means is None else means[i]) for i in range(k)]
        srcs = [s.to(device) for s in srcs]
        n = (r1 - r0) * row_numel
        scratch = Scratch(torch.empty(n * scratch_per_element(tp) + _slack(tp), dtype=torch.uint8, device=device))
        out = scratch.take(tp.out_dtype, n)
        if plan.method.chunkable:
            srcs = [s.reshape(-1) for s in srcs]
        else:
            out = out.view(tp.shape)
        compute_chunk(plan, tp, srcs, out, scratch, offset=r0 * row_numel, seed=seed, num_threads=num_threads)
        sink.wait_idle()  # one block in the writer at a time: memory stays at a few blocks
        sink.put(tp.name, out.reshape(-1).cpu(), r0 * row_numel, None, tp.in_bytes * (r1 - r0) // max(1, total))


def rows_per_block(row_bytes: int, chunk_bytes: int, total: int) -> int:
    """Rows per block: every source's rows and the output's within about one chunk."""
    return max(1, min(total, chunk_bytes // max(1, row_bytes)))


def _rows(src: np.ndarray, view, dtype, row_shape, defaults: dict, r0: int, mean):
    """One source's output rows [r0, r0 + len(src))."""
    import torch
    out = torch.zeros((len(src), *row_shape), dtype=dtype)
    have = np.nonzero(src >= 0)[0]
    if len(have):
        out[torch.from_numpy(have)] = view.index_select(0, torch.from_numpy(src[have])).to(dtype)
    for j in np.nonzero(src == -1)[0]:
        row = defaults.get(r0 + int(j))
        if row is not None:
            out[int(j)] = row
    if mean is not None:
        pad = np.nonzero(src == -2)[0]
        if len(pad):
            out[torch.from_numpy(pad)] = mean
    return out


def _defaults(rows: Rows, views, dtype, row_shape, r0: int, r1: int) -> dict:
    """Default rows of tokens [r0, r1) that need one: token id -> row (ZERO rows: absent, left zero)."""
    import torch
    out = {}
    if r1 <= r0:
        return out
    kind = rows.default_kind[r0:r1]
    for j in np.nonzero(kind == ROW)[0]:
        t = r0 + int(j)
        out[t] = views[int(rows.default_source[t])][int(rows.default_row[t])].to(dtype)
    mean = np.nonzero(kind == MEAN)[0]
    if len(mean):
        ids = r0 + mean
        acc = torch.zeros((len(ids), *row_shape), dtype=dtype)
        count = torch.zeros(len(ids), dtype=dtype)
        for i, view in enumerate(views):  # mergekit: embed = embed + row, model by model, then /= count
            src = rows.src[i][ids]
            # a forced token has src -1 everywhere; MEAN tokens are never forced, so -1 means absent
            has = np.nonzero(src >= 0)[0]
            if len(has):
                sel = torch.from_numpy(has)
                acc[sel] = acc[sel] + view.index_select(0, torch.from_numpy(src[has])).to(dtype)
                count[sel] += 1
        acc /= count.view(-1, *([1] * len(row_shape)))
        for j, t in enumerate(ids):
            out[int(t)] = acc[j]
    return out


def _pad_means(rows: Rows, views, dtype, row_shape, step: int):
    """Each source's mean over its output rows 0 .. n_tokens-1 (the padding rows), in float64."""
    import torch
    sums = [torch.zeros(row_shape, dtype=torch.float64) for _ in views]
    for r0 in range(0, rows.n_tokens, step):
        r1 = min(rows.n_tokens, r0 + step)
        defaults = _defaults(rows, views, dtype, row_shape, r0, r1)
        for i, view in enumerate(views):
            sums[i] += _rows(rows.src[i][r0:r1], view, dtype, row_shape, defaults, r0, None).double().sum(0)
    return [(s / rows.n_tokens).to(dtype) for s in sums]
