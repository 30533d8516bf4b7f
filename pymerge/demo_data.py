"""The demo's world: two tasks on scikit-learn's bundled digits, a small MLP, and eight training runs.

Task "upright" classifies the 8x8 digits as they are; task "rotated" classifies the same kind of
digits turned 90 degrees. One network, one 10-way head: a run's data mixture decides which task it
is good at, as data mixtures decide capabilities in the recycling paper's checkpoint pool.
Every run starts from one shared "pretrained" checkpoint (a short run on a balanced mix) and then
differs as real runs do: mixture, learning rate, weight decay, label smoothing, length, and stage
(one run continues another on different data). Splits are fixed by seed; the test split is touched
only for the final report.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

TASKS = ("upright", "rotated")


@dataclass
class Split:
    x: Dict[str, torch.Tensor]   # task -> [n, 64] float32 inputs
    y: torch.Tensor              # [n] labels (the same digits for both tasks)


def load_splits(seed: int = 0) -> Dict[str, Split]:
    """train / val / test (50 / 20 / 30 %), stratified by digit, from sklearn's bundled copy (no download)."""
    from sklearn.datasets import load_digits
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
        out[name] = Split(x={"upright": torch.from_numpy(up.copy()), "rotated": torch.from_numpy(rot.copy())},
                          y=torch.from_numpy(d.target[ids].astype(np.int64)))
    return out


class MLP(torch.nn.Module):
    """64 -> hidden -> hidden -> 10; blocks under `layers.i` so per-layer merge weights have groups."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, hidden)])
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


@torch.no_grad()
def accuracy(model: MLP, split: Split) -> Dict[str, float]:
    model.eval()
    return {t: float((model(split.x[t]).argmax(1) == split.y).float().mean()) for t in TASKS}


@dataclass
class Run:
    """One training run: share of task "upright" in its batches (the rest is "rotated"), and its settings."""
    name: str
    upright_share: float
    steps: int
    lr: float = 0.05
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    batch: int = 32
    parent: Optional[str] = None   # continue this run's checkpoint (a later training stage)


def runs(scale: float = 1.0) -> List[Run]:
    """The pool: eight runs that trade the two tasks off against each other."""
    s = lambda n: max(20, int(n * scale))  # noqa: E731
    return [
        Run("upright-only", 1.0, s(600)),
        Run("mix-90/10", 0.9, s(600)),
        Run("mix-75/25-lr0.1", 0.75, s(500), lr=0.1),
        Run("mix-50/50-wd", 0.5, s(400), lr=0.03, weight_decay=5e-3),
        Run("mix-25/75-ls", 0.25, s(600), label_smoothing=0.1),
        Run("mix-10/90", 0.1, s(600), lr=0.08),
        Run("rotated-only", 0.0, s(500)),
        Run("stage2:upright-only+rotated", 0.0, s(250), lr=0.02, parent="upright-only"),
    ]


def train(model: MLP, run: Run, data: Split, seed: int) -> MLP:
    """SGD with momentum; each example of a batch is drawn from "upright" with probability upright_share."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    n = len(data.y)
    model.train()
    for _ in range(run.steps):
        idx = torch.randint(0, n, (run.batch,), generator=g)
        upright = torch.rand(run.batch, generator=g) < run.upright_share
        x = torch.where(upright[:, None], data.x["upright"][idx], data.x["rotated"][idx])
        opt.zero_grad()
        loss_fn(model(x), data.y[idx]).backward()
        opt.step()
    return model


def train_pool(splits: Dict[str, Split], scale: float = 1.0, seed: int = 0) -> Tuple[MLP, Dict[str, MLP]]:
    """The shared pretrained checkpoint, then every run from it (or from its parent run)."""
    torch.manual_seed(seed)
    base = MLP()
    pretrain = Run("pretrain", 0.5, max(20, int(150 * scale)), lr=0.05)
    train(base, pretrain, splits["train"], seed=seed)
    done: Dict[str, MLP] = {}
    for i, run in enumerate(runs(scale)):
        start = done[run.parent] if run.parent else base
        model = MLP()
        model.load_state_dict(start.state_dict())
        done[run.name] = train(model, run, splits["train"], seed=seed + 1 + i)
    return base, done
