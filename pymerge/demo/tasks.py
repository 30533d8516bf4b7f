"""The demo's generative tasks: a character vocabulary, seeded example generators, exact-match scoring.

Each task turns a seeded random draw into a prompt and its one right answer; a model reads
BOS + prompt and must generate answer + EOS. Training draws fresh examples from its own seed;
validation and test sets are fixed sets of examples drawn with separate seeds, and the search
only ever sees validation.

    add      "A47+85="     -> "132"      (1-2 digit operands)
    sub      "D85-47="     -> "38"       (1-2 digit operands, never negative)
    reverse  "Rkdbqe>"     -> "eqbdk"    (4-8 letters)
    sort     "S83159>"     -> "13589"    (4-8 digits)

Addition and subtraction share the digits and compete for the same few weights; reversal and
sorting both rearrange the prompt, by position and by value.
"""
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

PAD, BOS, EOS = 0, 1, 2
CHARS = string.digits + string.ascii_lowercase + "ADRS+-=>"
VOCAB = ["<pad>", "<s>", "</s>"] + list(CHARS)
TOKEN_ID = {c: i for i, c in enumerate(VOCAB)}

Example = Tuple[str, str]  # (prompt, answer)


def _add(rng: np.random.RandomState) -> Example:
    a, b = (int(rng.randint(0, 10 ** int(rng.randint(1, 3)))) for _ in range(2))
    return f"A{a}+{b}=", str(a + b)


def _reverse(rng: np.random.RandomState) -> Example:
    s = "".join(rng.choice(list(string.ascii_lowercase), size=rng.randint(4, 9)))
    return f"R{s}>", s[::-1]


def _sort(rng: np.random.RandomState) -> Example:
    s = "".join(rng.choice(list(string.digits), size=rng.randint(4, 9)))
    return f"S{s}>", "".join(sorted(s))


def _sub(rng: np.random.RandomState) -> Example:
    a, b = sorted((int(rng.randint(0, 10 ** int(rng.randint(1, 3)))) for _ in range(2)), reverse=True)
    return f"D{a}-{b}=", str(a - b)


TASKS: Dict[str, Callable[[np.random.RandomState], Example]] = {
    "add": _add, "sub": _sub, "reverse": _reverse, "sort": _sort}


def sample(task: str, n: int, rng: np.random.RandomState) -> List[Example]:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return [TASKS[task](rng) for _ in range(n)]


def generate(task: str, n: int, seed: int) -> List[Example]:
    """n examples of one task from its own seeded stream (the same seed gives the same examples)."""
    return sample(task, n, np.random.RandomState(seed))


def split_seed(seed: int, split: str, task: str) -> int:
    """A stream for every (seed, split, task), distinct across splits and tasks of one seed. The training runs of
    a demo seed s draw from seeds s * 1000 + k, whose streams can meet s's own validation or test streams
    (modulo 2**31): train.training_stream steps around those."""
    return (seed * 1_000_003 + {"train": 1, "val": 2, "test": 3}[split] * 7919
            + list(TASKS).index(task) * 104_729) % 2**31


def held_out_streams(seed: int) -> frozenset:
    """The validation and test streams of a demo seed: no training run may draw from them."""
    return frozenset(split_seed(seed, split, t) for split in ("val", "test") for t in TASKS)


def encode(text: str) -> List[int]:
    try:
        return [TOKEN_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the demo's vocabulary") from None


def decode(ids: Sequence[int]) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


@dataclass
class Batch:
    """BOS + prompt + answer + EOS, right-padded. `target` marks the answer and EOS tokens (what is
    scored and, for the answer-only objective, trained); `seen` marks every real token after BOS."""
    ids: torch.Tensor      # [B, T] int64
    target: torch.Tensor   # [B, T] bool
    seen: torch.Tensor     # [B, T] bool

    def __len__(self) -> int:
        return self.ids.shape[0]


def make_batch(examples: Sequence[Example]) -> Batch:
    rows = [([BOS] + encode(p), encode(a) + [EOS]) for p, a in examples]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    seen = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (p, a) in enumerate(rows):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        target[r, len(p):len(p) + len(a)] = True
        seen[r, 1:len(p) + len(a)] = True
    return Batch(ids, target, seen)


@torch.no_grad()
def exact_match(model: torch.nn.Module, batch: Batch, chunk: int = 1024) -> torch.Tensor:
    """Per example: does greedy decoding reproduce the answer and then stop? [B] bool.

    Computed in one teacher-forced pass, which is exactly greedy decoding's exact match: greedy
    decoding emits the answer and EOS if and only if, along that path, every next-token argmax is
    the right token (tests/test_demo.py checks this against greedy_decode).
    """
    out = []
    for s in range(0, len(batch), chunk):
        ids, target = batch.ids[s:s + chunk], batch.target[s:s + chunk]
        pred = model(ids[:, :-1]).argmax(-1)
        ok = (pred == ids[:, 1:]) | ~target[:, 1:]
        out.append(ok.all(dim=1))
    return torch.cat(out)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompts: Sequence[str], max_new: int = 12) -> List[str]:
    """Batched greedy decoding (right-padded prompts of any lengths; stops at EOS or max_new tokens)."""
    rows = [[BOS] + encode(p) for p in prompts]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max()) + max_new), PAD, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    start, done = lengths.clone(), torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new):
        logits = model(ids[:, :int(lengths.max())])
        nxt = logits[torch.arange(len(rows)), lengths - 1].argmax(-1)
        live = ~done
        ids[live, lengths[live]] = nxt[live]
        done |= nxt == EOS
        lengths[live] += 1
        if done.all():
            break
    return [decode(ids[r, start[r]:lengths[r]].tolist()) for r in range(len(rows))]


def hits(model: torch.nn.Module, sets: Dict[str, Batch]) -> Dict[str, torch.Tensor]:
    """Per task, exact match per example ([B] bool), in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return {task: exact_match(model, b) for task, b in sets.items()}
    finally:
        model.train(was_training)


def score(model: torch.nn.Module, sets: Dict[str, Batch]) -> Dict[str, float]:
    """Exact-match accuracy per task."""
    return {task: float(h.float().mean()) for task, h in hits(model, sets).items()}


def standard_error(scores: Dict[str, float], sizes: Dict[str, int]) -> float:
    """Standard error of the macro-average of per-task accuracies (independent binomial tasks)."""
    var = sum(p * (1 - p) / sizes[t] for t, p in scores.items())
    return float(np.sqrt(var) / len(scores))


def paired_standard_error(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """Standard error of the difference of two models' macro-averages scored on the same examples (per task,
    per-example exact matches a[t], b[t]): per task the variance of the per-example differences over the
    task's size (population variance, as standard_error's p(1-p)/n). Two merges that disagree on few examples
    have a paired error far below the sqrt(se_a^2 + se_b^2) of two independent test draws."""
    var = 0.0
    for t, x in a.items():
        if not x.numel():
            raise ValueError(f"paired_standard_error: task {t!r} has no examples")
        d = x.double() - b[t].double()
        var += float(d.var(unbiased=False)) / d.numel()
    return float(np.sqrt(var) / len(a))
