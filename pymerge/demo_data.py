"""The demo's world: two tasks on scikit-learn's bundled digits, a small MLP, and eight training runs.

Task "upright" classifies the 8x8 digits as they are; task "rotated" classifies the same kind of
digits turned 90 degrees. One small network with one 10-way head, so the two tasks compete for the
same few hidden units, and a run's data decides which task it is good at, as data mixtures decide
capabilities in the recycling paper's checkpoint pool.

As in that pool, no run sees everything. The training split is cut, once and by seed, into a
"pretraining" part and disjoint shards. Every run starts from one shared pretrained checkpoint (a
short run on a balanced mix of the pretraining part), then trains briefly (so that the runs stay in
one basin, where weight averaging works) on its own limited shard with its own task mixture and
settings: learning rate, weight decay, label smoothing, length, and stage (one run continues
another on a further shard). Each run thus ends clearly better at one task than at the other, and
each has learnt from data the others never saw; a weighted average can combine what they learnt.
Splits are fixed by seed; the test split is touched only for the final report.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

TASKS = ("upright", "rotated")
HIDDEN = 32
PRETRAIN_SHARE = 0.2    # of the training split, for the shared pretraining stage
PRETRAIN_STEPS = 200
NUM_SHARDS = 8          # the rest, cut into this many disjoint shards


@dataclass
class Split:
    x: Dict[str, torch.Tensor]   # task -> [n, 64] float32 inputs
    y: Dict[str, torch.Tensor]   # task -> [n] labels (the same digits for both tasks here)

    def subset(self, ids) -> "Split":
        ids = torch.as_tensor(ids, dtype=torch.long)
        return Split(x={t: v[ids] for t, v in self.x.items()}, y={t: v[ids] for t, v in self.y.items()})


def load_splits(seed: int = 0) -> Dict[str, Split]:
    """train / val / test (50 / 20 / 30 %), stratified by digit, from sklearn's bundled copy (no download)."""
    from pymerge.extras import require
    load_digits = require("sklearn.datasets", "the digits demo").load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = d.images.astype(np.float32) / 16.0
    idx = np.arange(len(images))
    train, rest = train_test_split(idx, test_size=0.5, stratify=d.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.6, stratify=d.target[rest], random_state=seed)
    out = {}
    for name, ids in (("train", train), ("val", val), ("test", test)):
        up = images[ids].reshape(len(ids), 64)
        rot = np.rot90(images[ids], k=1, axes=(1, 2)).reshape(len(ids), 64)
        y = torch.from_numpy(d.target[ids].astype(np.int64))
        out[name] = Split(x={"upright": torch.from_numpy(up.copy()), "rotated": torch.from_numpy(rot.copy())},
                          y={"upright": y, "rotated": y})
    return out


class MLP(torch.nn.Module):
    """64 -> hidden -> hidden -> 10; blocks under `layers.i` so per-layer merge weights have groups."""

    def __init__(self, hidden: int = None):
        super().__init__()
        hidden = hidden or HIDDEN
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, hidden)])
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


@torch.no_grad()
def accuracy(model: MLP, split: Split) -> Dict[str, float]:
    model.eval()
    return {t: float((model(split.x[t]).argmax(1) == split.y[t]).float().mean()) for t in TASKS}


@dataclass
class Run:
    """One training run: its shard of the training data, share of task "upright" in its batches (the
    rest is "rotated"), and its settings."""
    name: str
    shard: int
    upright_share: float
    steps: int
    lr: float = 0.05
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    batch: int = 32
    parent: Optional[str] = None   # continue this run's checkpoint (a later training stage)


def runs(scale: float = 1.0) -> List[Run]:
    """The pool: eight runs, each on limited data of its own, that trade the two tasks off."""
    s = lambda n: max(20, int(n * scale))  # noqa: E731
    return [  # four runs lean to "upright", four to "rotated"; no two share a shard
        Run("upright-only", 0, 1.0, s(300)),
        Run("mix-90/10-lr0.1", 1, 0.9, s(250), lr=0.1),
        Run("mix-80/20-ls", 2, 0.8, s(300), label_smoothing=0.1),
        Run("mix-85/15-wd", 3, 0.85, s(300), weight_decay=5e-3),
        Run("mix-15/85", 4, 0.15, s(300), lr=0.08),
        Run("rotated-only", 5, 0.0, s(250)),
        Run("stage2:upright-only>10/90", 6, 0.1, s(150), lr=0.03, parent="upright-only"),
        Run("stage2:mix-90/10>20/80-b64", 7, 0.2, s(150), lr=0.03, batch=64, parent="mix-90/10-lr0.1"),
    ]


def train(model: MLP, run: Run, data: Split, seed: int) -> MLP:
    """SGD with momentum; each example of a batch is drawn from "upright" with probability upright_share."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    n = len(data.y["upright"])
    model.train()
    for _ in range(run.steps):
        idx = torch.randint(0, n, (run.batch,), generator=g)
        upright = torch.rand(run.batch, generator=g) < run.upright_share
        x = torch.where(upright[:, None], data.x["upright"][idx], data.x["rotated"][idx])
        y = torch.where(upright, data.y["upright"][idx], data.y["rotated"][idx])
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model


def shards(train_split: Split, seed: int = 0) -> Tuple[Split, List[Split]]:
    """The pretraining part and NUM_SHARDS disjoint shards of the training split (a fixed, seeded cut)."""
    perm = np.random.RandomState(seed + 12345).permutation(len(train_split.y["upright"]))
    n_pre = int(round(PRETRAIN_SHARE * len(perm)))
    return train_split.subset(perm[:n_pre]), [train_split.subset(p) for p in np.array_split(perm[n_pre:], NUM_SHARDS)]


def train_pool(splits: Dict[str, Split], scale: float = 1.0, seed: int = 0) -> Tuple[MLP, Dict[str, MLP]]:
    """The shared pretrained checkpoint, then every run from it (or from its parent run) on its own shard."""
    torch.manual_seed(seed)
    pre_data, parts = shards(splits["train"], seed)
    base = MLP()
    pretrain = Run("pretrain", -1, 0.5, max(20, int(PRETRAIN_STEPS * scale)), lr=0.05)
    train(base, pretrain, pre_data, seed=seed)
    done: Dict[str, MLP] = {}
    for i, run in enumerate(runs(scale)):
        start = done[run.parent] if run.parent else base
        model = MLP()
        model.load_state_dict(start.state_dict())
        done[run.name] = train(model, run, parts[run.shard], seed=seed + 1 + i)
    return base, done
