"""The demo's checkpoint pool: one shared pretraining run on a task mixture, then runs that differ as
the recycling paper's do (data mixtures, training stages, objectives, hyperparameters).

Every run starts from the shared pretrained checkpoint (or, for a later stage, from another run's
checkpoint) and trains briefly on fresh examples from its own seeded stream, so the runs stay in one
basin where weighted averages work, and each ends with strengths of its own: more of a task in its
mixture makes it better at that task and worse at the others; a too-high learning rate makes it worse
overall, yet it still learnt something the others did not. Two pools (POOLS): "stages" (the default: a
generalist and runs continued from it) and "mixtures" (runs of different mixtures from the pretrained model).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pymerge.demo.model import LlamaConfig, TinyLlama
from pymerge.demo.tasks import TASKS, TOKEN_ID, VOCAB, Batch, held_out_streams, make_batch, sample, split_seed

OBJECTIVES = ("answer", "sequence", "smoothed")


@dataclass(frozen=True)
class Run:
    """One training run. mixture: task -> share of the examples; objective: "answer" (loss on the
    answer and EOS, as in instruction tuning), "sequence" (every token, as in pretraining) or
    "smoothed" (answer loss with label smoothing 0.1); parent: continue that run (a later stage)."""
    name: str
    mixture: Dict[str, float]
    steps: int
    lr: float = 5e-4
    batch: int = 64
    objective: str = "answer"
    weight_decay: float = 0.0
    parent: Optional[str] = None


def _mix(**shares) -> Dict[str, float]:
    rest = (1.0 - sum(shares.values())) / (len(TASKS) - len(shares))
    return {t: shares.get(t, rest) for t in TASKS}


UNIFORM = _mix()


def pretraining(steps: int) -> Run:
    return Run("pretrain", UNIFORM, steps, lr=3e-3, batch=96, objective="sequence")


def stage_runs(steps: int) -> List[Run]:
    """The default pool (`--pool stages`): a generalist trained further on the mixture, then runs continued from
    it, each `steps` long: one specialist per task (its task alone, at a higher rate, so it gains on it and
    forgets the rest), two hotter and longer ones, a too-hot run, and a too-hot run from the pretrained model.
    The best merges are the generalist plus a small share of a specialist (WiSE-FT's interpolation, which a
    specialist's own full weight or an equal-weight soup cannot express: benchmarks/results/cpu/
    demo_diagnosis.md §11-§12)."""
    hot = steps * 5 // 3
    return [
        Run("generalist", UNIFORM, 4 * steps, lr=1e-3),
        *[Run(f"generalist>{t}", _mix(**{t: 1.0}), steps, lr=1e-3, parent="generalist") for t in TASKS],
        Run("generalist>add-lr2e-3", _mix(add=1.0), hot, lr=2e-3, parent="generalist"),   # hot: forgets more
        Run("generalist>sub-lr2e-3", _mix(sub=1.0), hot, lr=2e-3, parent="generalist"),
        Run("generalist>lr8e-3", UNIFORM, steps, lr=8e-3, parent="generalist"),          # too hot: worse overall
        Run("lr8e-3", UNIFORM, steps, lr=8e-3),
    ]


def mixture_runs(steps: int) -> List[Run]:
    """The earlier default (`--pool mixtures`): eleven runs from the pretrained model that differ in data
    mixture, objective and hyperparameters, two of them second stages, each `steps` long (a later stage: half
    that, on top of its parent). Its best merges are near an equal-weight subset: what the greedy soup finds
    (demo_diagnosis.md §1-§10)."""
    half = max(1, steps // 2)
    return [
        Run("add-heavy", _mix(add=0.55), steps),
        Run("reverse-heavy", _mix(reverse=0.55), steps),
        Run("sort-heavy", _mix(sort=0.55), steps),
        Run("sub-heavy", _mix(sub=0.55), steps),
        Run("balanced", UNIFORM, steps, lr=3e-4),
        Run("balanced-lr8e-3", UNIFORM, steps, lr=8e-3),                   # too hot: worse overall
        Run("balanced-sequence-loss", UNIFORM, steps, objective="sequence"),
        Run("add+sort-smoothed", _mix(add=0.4, sort=0.4), steps, objective="smoothed", weight_decay=0.1),
        Run("reverse+sub-b16", _mix(reverse=0.4, sub=0.4), steps, batch=16, lr=3e-3),
        Run("stage2:add-heavy>sub", _mix(sub=0.7), half, lr=3e-4, parent="add-heavy"),
        Run("stage2:sort-heavy>reverse", _mix(reverse=0.7), half, lr=3e-4, parent="sort-heavy"),
    ]


POOLS = {"stages": stage_runs, "mixtures": mixture_runs}


def pool_runs(steps: int, pool: str = "stages") -> List[Run]:
    """The runs of the pool named `pool` (POOLS), each about `steps` long."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return POOLS[pool](steps)


def default_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=len(VOCAB), bos_token_id=TOKEN_ID.get("<s>", 1), eos_token_id=2, pad_token_id=0)


def _loss(model: TinyLlama, batch: Batch, objective: str) -> torch.Tensor:
    logits = model(batch.ids[:, :-1])
    labels = batch.ids[:, 1:]
    mask = (batch.seen if objective == "sequence" else batch.target)[:, 1:]
    smoothing = 0.1 if objective == "smoothed" else 0.0
    return F.cross_entropy(logits[mask], labels[mask], label_smoothing=smoothing)


def _draw(run: Run, rng: np.random.RandomState) -> Batch:
    """A batch of fresh examples, each task's share drawn from the run's mixture."""
    tasks = list(run.mixture)
    counts = rng.multinomial(run.batch, [run.mixture[t] for t in tasks])
    return make_batch([ex for t, c in zip(tasks, counts) for ex in sample(t, int(c), rng)])


def training_stream(seed: int, held_out: frozenset = frozenset()) -> int:
    """The data stream of a run seeded seed: split_seed's training stream, or, where that is one of held_out
    (with --seed 56073721 pretraining drew the reversal test set's examples), one derived from the seed by
    numpy's SeedSequence that is not."""
    stream, k = split_seed(seed, "train", next(iter(TASKS))), 0
    while stream in held_out:
        k += 1
        stream = int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) % 2**31
    return stream


def train(model: TinyLlama, run: Run, seed: int, progress: Optional[Callable[[int], None]] = None,
          held_out: frozenset = frozenset()) -> TinyLlama:
    """AdamW with a short warmup and cosine decay, on fresh examples of the run's mixture (never from the
    streams in held_out: the demo seed's validation and test sets)."""
    if run.objective not in OBJECTIVES:
        raise ValueError(f"run {run.name}: objective must be one of {', '.join(OBJECTIVES)}, got {run.objective!r}")
    torch.manual_seed(seed)
    rng = np.random.RandomState(training_stream(seed, held_out))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.98))
    warmup = max(1, run.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, s / run.steps)))))
    model.train()
    for step in range(run.steps):
        loss = _loss(model, _draw(run, rng), run.objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress:
            progress(1)
    model.eval()
    return model


@dataclass
class Pool:
    """What training leaves: the pretrained model and every run's model, by name, in run order."""
    pretrained: TinyLlama
    models: Dict[str, TinyLlama] = field(default_factory=dict)
    runs: List[Run] = field(default_factory=list)


def train_pool(config: LlamaConfig, pretrain: Run, runs: List[Run], seed: int = 0,
               progress: Optional[Callable[[int], None]] = None) -> Pool:
    """The shared pretraining run, then every run from it (or from its parent run)."""
    torch.manual_seed(seed)
    held_out = held_out_streams(seed)
    base = train(TinyLlama(config), pretrain, seed=seed * 1000 + 1, progress=progress, held_out=held_out)
    pool = Pool(pretrained=base, runs=list(runs))
    for i, run in enumerate(runs):
        if run.parent is not None and run.parent not in pool.models:
            raise ValueError(f"run {run.name}: parent {run.parent!r} must be an earlier run")
        start = pool.models[run.parent] if run.parent else base
        model = TinyLlama(config)
        model.load_state_dict(start.state_dict())
        pool.models[run.name] = train(model, run, seed=seed * 1000 + 2 + i, progress=progress, held_out=held_out)
    return pool
