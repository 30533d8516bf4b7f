"""Spawns a gloo process group on this machine and runs one worker function on every rank.

Workers return a picklable result (per-check outcomes); run() collects them per rank. Every
collective has the group's timeout; workers end with destroy_process_group and os._exit.
"""
import os
import pickle
import re
import socket
import time
import traceback
from datetime import timedelta

TIMEOUT = timedelta(seconds=60)
WALL_S = 600.0  # a whole spawned run, every check of a module included


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir, timeout=TIMEOUT):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def run(fn, world: int, out_dir: str, *args, timeout: timedelta = TIMEOUT, wall_s: float = WALL_S):
    """fn(rank, world, *args) on `world` spawned ranks (collectives time out after `timeout`);
    returns the list of their results. Ranks still running after wall_s seconds are killed and the
    test fails: a collective on a group made without the timeout (a mesh's subgroups) once hung CI."""
    import torch.multiprocessing as mp
    ctx = mp.spawn(_entry, args=(world, free_port(), fn, args, out_dir, timeout), nprocs=world, join=False)
    deadline = time.monotonic() + wall_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            raise AssertionError(f"{fn.__name__}: ranks still running after {wall_s:.0f} s (a hang); killed")
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as fh:
            results.append(pickle.load(fh))
    for r, res in enumerate(results):
        if isinstance(res, dict) and "crash" in res:
            raise AssertionError(f"rank {r} crashed:\n{res['crash']}")
    return results


def agreed_errors(results) -> dict:
    """Each error each rank recorded under results[r]["errors"][key]: one line on every rank. The user's input
    (InputError, CheckpointError, MergeConfigError) is the same error on every rank; anything else is raised
    as it was where it happened and as a DistributedError naming it on the others ("DistributedError: rank R:
    MESSAGE (KIND there)"), which is what this returns for it; else rank 0's."""
    errors = [res["errors"] for res in results]
    agreed = {}
    for key in errors[0]:
        msgs = [e[key] for e in errors]
        assert all(m is not None and "\n" not in m for m in msgs), (key, msgs)
        if len(set(msgs)) == 1:
            agreed[key] = msgs[0]
            continue
        peers = {m for m in msgs if m.startswith("DistributedError: ")}
        assert len(peers) == 1, f"{key}: ranks disagree: {set(msgs)}"
        peer = peers.pop()
        m = re.fullmatch(r"DistributedError: (?:rank \d+: )?(.*) \((\w+) there\)", peer)
        assert m and all(own == f"{m.group(2)}: {m.group(1)}" for own in set(msgs) - {peer}), f"{key}: {set(msgs)}"
        agreed[key] = peer
    return agreed
