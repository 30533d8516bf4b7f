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
from pymerge.tokenizer.vocab import KEEP, MEAN, ROW, Rows


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
        srcs = [_rows(rows.src[i][r0:r1], views[i], dtype, row_shape, defaults, None if means is None else means[i])
                for i in range(k)]
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


def _rows(src: np.ndarray, view, dtype, row_shape, defaults, mean):
    """One source's output rows for a block: src[j] >= 0 its own row, -1 the default row, -2 the mean."""
    import torch
    pad = np.nonzero(src == -2)[0]
    out = (torch.empty if mean is not None or not len(pad) else torch.zeros)((len(src), *row_shape), dtype=dtype)
    have = np.nonzero(src >= 0)[0]
    if len(have):
        out[torch.from_numpy(have)] = view.index_select(0, torch.from_numpy(src[have])).to(dtype)
    lack = np.nonzero(src == -1)[0]
    if len(lack):
        ids, rows = defaults
        out[torch.from_numpy(lack)] = rows[torch.from_numpy(np.searchsorted(ids, lack))]
    if len(pad) and mean is not None:
        out[torch.from_numpy(pad)] = mean
    return out


def _defaults(rows: Rows, views, dtype, row_shape, r0: int, r1: int):
    """The default rows of the tokens of [r0, r1) that need one: (their ids less r0, sorted; rows)."""
    import torch
    kind = rows.default_kind[r0:max(r0, r1)]
    need = np.nonzero(kind != KEEP)[0]
    out = torch.zeros((len(need), *row_shape), dtype=dtype)  # ZERO rows stay so
    if not len(need):
        return need, out
    ids = r0 + need
    picked = np.nonzero(kind[need] == ROW)[0]
    for i, view in enumerate(views):  # rows named by a source (per token), one gather per source
        mine = picked[rows.default_source[ids[picked]] == i]
        if len(mine):
            out[torch.from_numpy(mine)] = view.index_select(0, torch.from_numpy(rows.default_row[ids[mine]])).to(dtype)
    mean = np.nonzero(kind[need] == MEAN)[0]
    if len(mean):
        acc = torch.zeros((len(mean), *row_shape), dtype=dtype)
        count = torch.zeros(len(mean), dtype=dtype)
        for i, view in enumerate(views):  # mergekit: embed = embed + row, model by model, then /= count
            src = rows.src[i][ids[mean]]  # MEAN tokens are never forced: -1 means the source lacks it
            has = np.nonzero(src >= 0)[0]
            if len(has):
                sel = torch.from_numpy(has)
                acc[sel] = acc[sel] + view.index_select(0, torch.from_numpy(src[has])).to(dtype)
                count[sel] += 1
        out[torch.from_numpy(mean)] = acc / count.view(-1, *([1] * len(row_shape)))
    return need, out


def _pad_means(rows: Rows, views, dtype, row_shape, step: int):
    """Each source's mean over its output rows 0 .. n_tokens-1 (the padding rows), in float64, summed
    row after row in order (a running sum scanned through each block): the same bits for any block
    size (a block's own sum added to the running one made the rows depend on --chunk-size)."""
    import torch
    sums = [torch.zeros(row_shape, dtype=torch.float64) for _ in views]
    for r0 in range(0, rows.n_tokens, step):
        r1 = min(rows.n_tokens, r0 + step)
        defaults = _defaults(rows, views, dtype, row_shape, r0, r1)
        for i, view in enumerate(views):
            block = _rows(rows.src[i][r0:r1], view, dtype, row_shape, defaults, None).to(torch.float64, copy=True)
            block[0] += sums[i]  # the running sum enters first: ((sum + r0) + r1) + ..., in place
            sums[i] = block.cumsum_(0)[-1].clone()
    return [(s / rows.n_tokens).to(dtype) for s in sums]
