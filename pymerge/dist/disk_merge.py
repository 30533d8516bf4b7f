"""`pymerge merge` across processes: under torchrun, or any launcher that sets RANK and WORLD_SIZE.

    torchrun --nproc-per-node=8 [--nnodes=...] -m pymerge merge config.yml OUT

Every rank plans the whole merge (config and headers: cheap, and the same on every rank), then the
tensors are cut into one contiguous part per rank of about equal bytes (read + written). Rank r
streams part r through the usual engine (pymerge/streaming.py) into shard files of its own, all
in the one temporary folder beside OUT that rank 0 makes (pymerge/io/writer.py). Only after every
rank's shards are on disk does rank 0 add the index and rename the folder into place, so OUT must
be on a filesystem every rank sees (a shared one across nodes). The tensors are those of a
single-process merge, bit for bit.

The ranks agree after each step: every rank's outcome is gathered, and any failure (bad input
seen by one rank, an exception, a rank that died) is raised on every rank with the first failing
rank's one-line message, before anything is installed. Once every part is on disk, rank 0's install
is the outcome: a rank lost after that leaves OUT installed and complete, rank 0 warns and succeeds,
and a rank that saw the loss says rank 0 may have installed OUT. The process group carries only these few
bytes (gloo; for --device cuda the group also has NCCL for the CUDA side) and its timeout
(PYMERGE_DIST_TIMEOUT seconds, default 30 minutes: it must cover the slowest rank's part) bounds
every wait; a rank that dies closes its connections, which fails the others' next collective.
"""
import contextlib
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pymerge import _native
from pymerge.errors import (CheckpointError, DistributedError, InputError, InterruptedAfterParts, MergeConfigError,
                            exception_line)
from pymerge.io import ShardedWriter
from pymerge.io.writer import working_folder_note, working_folder_within
from pymerge.sizes import MAX_BYTES
from pymerge.stop_signals import STOP_SIGNALS

TIMEOUT_ENV = "PYMERGE_DIST_TIMEOUT"
OFF_ENV = "PYMERGE_NO_DIST"  # =1: one process even where RANK and WORLD_SIZE are set (a job's own ranks)
DEFAULT_TIMEOUT_S = 1800.0
_SAME_ON_EVERY_RANK = {c.__name__: c for c in (InputError, CheckpointError, MergeConfigError)}


def launched() -> bool:
    """True under torchrun (or a launcher setting RANK and WORLD_SIZE) or in an initialized process
    group, unless PYMERGE_NO_DIST=1."""
    if os.environ.get(OFF_ENV, "") not in ("", "0"):
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    dist = sys.modules.get("torch.distributed")  # never imported just to ask
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except AttributeError:  # half-initialized: another thread is importing it, so no process group exists yet
        return False


def split_by_bytes(costs: Sequence[int], ranks: int) -> List[int]:
    """The rank of each item: contiguous runs of about equal total cost, an item going to the
    rank whose share holds its midpoint. Integers only: every rank computes the same split."""
    total = sum(costs)
    out, acc = [], 0
    for c in costs:
        out.append(min(ranks - 1, (2 * acc + c) * ranks // (2 * total)) if total else 0)
        acc += c
    return out


def _share(plan, keep: set):
    """This rank's share of a plan: the tensors whose ids are in keep (a `slices:` plan keeps its parts)."""
    if any(p is not plan for p in plan.parts):  # a `slices:` plan (pymerge/slices.py)
        return replace(plan, parts=[replace(p, tensors=[t for t in p.tensors if id(t) in keep],
                                            copies=[c for c in p.copies if id(c) in keep]) for p in plan.parts])
    return replace(plan, tensors=[t for t in plan.tensors if id(t) in keep],
                   copies=[c for c in plan.copies if id(c) in keep])


def run_ranks(arguments, out_dir, *, force: bool, quiet: bool, progress=None, copy_tokenizer: bool = True,
              model_card: bool = False):
    """run_merge's distributed twin: arguments() checks run_merge's other arguments (MergeArguments); returns
    this rank's MergeReport. A rank refusing its arguments (or PYMERGE_DIST_TIMEOUT) says so in the first
    agreement, after joining: refused before it, the others waited out the whole timeout in the rendezvous."""
    from pymerge.merge import (MergeReport, check_inputs_unchanged, check_out_spares_inputs, make_plan, op_threads,
                               stream_plan, write_side_files)

    t0 = time.perf_counter()
    timeout_s, refused = _timeout_or_default()
    try:
        args = arguments()
    except Exception as exc:  # noqa: BLE001  (raised in the first agreement)
        args, refused = None, refused or exc
    state = {}  # what the steps build: plan, parts, writer
    ours = not _group_exists()  # a group there after the join and not before is this merge's to leave (a
    try:                        # Ctrl-C as the join returned, before this try, left it joined; an audit)
        dist, group = _process_group("cpu" if args is None else args.device, timeout_s)
        rank, world = dist.get_rank(), dist.get_world_size()
        if args is not None:
            device, chunk_bytes, out_shard_size, random_seed = (args.device, args.chunk_bytes, args.out_shard_size,
                                                                args.random_seed)
            if device.startswith("cuda"):
                device = _local_cuda()
            threads = args.threads or op_threads(processes=_env_int("LOCAL_WORLD_SIZE", 1, 1))  # the host's

        def prepare():
            if refused is not None:
                raise refused
            plan = state["plan"] = make_plan(args.config)
            check_out_spares_inputs(out_dir, plan)  # --force would delete an input
            sizes = [t.in_bytes + t.numel * _native.itemsize(t.out_dtype) for t in plan.tensors]
            state["parts"] = split_by_bytes(sizes, world) + [world - 1] * len(plan.copies)  # copies: the last rank's
            tmp_dir, run = None, None
            if rank == 0:
                writer = state["writer"] = _writer(plan, state["parts"], out_dir, out_shard_size, force, part=0)
                write_side_files(plan, writer, copy_tokenizer=copy_tokenizer, model_card=model_card)
                tmp_dir, run = str(writer.tmp_dir), secrets.token_hex(8)  # this run's name in the store (see fill)
            return (tmp_dir, run), _fingerprint(plan, out_dir, out_shard_size, random_seed,
                                                flags=(bool(force), bool(copy_tokenizer), bool(model_card)))

        def fill(tmp_dir, run):
            plan, parts = state["plan"], state["parts"]
            mine = _share(plan, {id(t) for t, p in zip(plan.tensors + plan.copies, parts) if p == rank})
            total = None if quiet or rank != 0 or progress is not None else mine.input_bytes
            watch = state["watch"] = _PeerWatch(dist, f"pymerge-failed/{run}", rank, progress, total)
            try:
                if rank:
                    state["writer"] = _writer(plan, parts, out_dir, out_shard_size, force, part=rank, join=tmp_dir)
                stream_plan(mine, state["writer"], device=device, chunk_bytes=chunk_bytes, threads=threads,
                            seed=random_seed or 0, progress=watch, quiet=True)
                watch.close()
                # Every rank: one that opened a model before another merge replaced it fails here, so rank 0's side
                # files and every rank's tensors come from one version of each model, or nothing is installed.
                check_inputs_unchanged(plan, state["writer"].sources)  # rank 0's copies, the others' none
                if rank:
                    state["writer"].commit()  # durable before rank 0 may install
            except BaseException as exc:
                watch.failed(exc)  # the other ranks stop streaming their shares at their next chunk
                raise
            finally:
                watch.close()

        prepared = _agree(prepare, dist, group)
        tmp_dir, run = prepared[0][0]
        odd = next((r for r, (_, fp) in enumerate(prepared) if fp != prepared[0][1]), None)
        if odd is not None:  # every rank sees the same list, so every rank raises this
            raise InputError(f"rank {odd} plans a different merge than rank 0 (another config, OUT, checkpoint "
                             f"files, --out-shard-size, --random-seed, --force, --copy-tokenizer or "
                             f"--write-model-card: every rank must run the same command on the same files at the "
                             f"same paths)")
        try:
            _agree(lambda: fill(tmp_dir, run), dist, group)
        finally:
            if rank == 0 and "watch" in state:
                state["watch"].forget()  # the store outlives this merge (a process group of the caller's own)
        # Every rank's part is durable now, so rank 0's commit is the outcome and the others have nothing left
        # to do: a rank lost after it (OOM killer, preemption) leaves a complete OUT, installed. Rank 0 then
        # succeeds with a warning; it said "nothing was written" (exit 1), so users deleted a good model, and a
        # retry failed on the non-empty OUT. Installing nothing instead cannot be promised: any rank can die
        # right after whichever agreement comes last. The other ranks cannot know whether rank 0 installed.
        warnings = list(state["plan"].warnings) if rank == 0 else []
        inside = working_folder_within(out_dir) if rank == 0 else None  # (before rank 0 replaces OUT)
        shards = len(state["writer"].shard_names) if rank == 0 else 1
        if out_shard_size >= MAX_BYTES and shards > 1:  # (ignored silently, an audit found)
            warnings.append(f"one unsplit file (--out-shard-size 0) cannot hold under {world} ranks, each writing "
                            f"shards of its own: OUT has {shards}; merge in one process for a single model.safetensors")

        def install():
            if rank == 0:
                state["writer"].commit()
                state["installed"] = True
                if inside:
                    warnings.append(working_folder_note(inside))
                if state["writer"].not_removed:
                    warnings.append(state["writer"].not_removed)
        maybe = "every part was written, so rank 0 may have installed OUT (complete): check it before a retry"
        try:
            _agree(install, dist, group, lost=None if rank == 0 else maybe)
        except KeyboardInterrupt:  # (torchrun's SIGTERM too) while rank 0 installs: not "no output was written"
            if rank == 0:
                raise
            raise InterruptedAfterParts(maybe.replace("OUT", str(out_dir))) from None
        except DistributedError as exc:
            if not state.get("installed"):
                raise
            warnings.append(f"{exc}, after every rank's part was written: {out_dir} is installed and complete")
        plan, writer = state["plan"], state["writer"]
        return MergeReport(Path(out_dir), plan.method.name, len(plan.tensors) + len(plan.copies), plan.input_bytes,
                           plan.output_bytes, time.perf_counter() - t0, device, list(writer.shard_names),
                           warnings, rank=rank, world_size=world)
    finally:
        try:
            if "writer" in state:
                state["writer"].abort()  # after a commit: a no-op
        except OSError:
            pass  # raced by a lost rank still creating files: the next run clears the folder (its pid is gone)
        if "plan" in state:
            state["plan"].close()
        if ours and _group_exists():
            _leave()


class PeerFailed(Exception):
    """Another rank failed while this one streamed its share: it stops; the agreement names that rank's error."""


class _PeerWatch:
    """The progress hook of one rank's share: at most every half second, whether another rank has failed (a key
    in the process group's store, which the failing rank sets); then raises PeerFailed, and this rank stops its
    share at once. Every rank streamed its whole share before the agreement said that another had failed on its
    first tensor (an audit). Without the store's API (another torch), the ranks stop at the agreement as before."""

    def __init__(self, dist, key: str, rank: int, inner=None, total: Optional[int] = None):
        from pymerge.merge import _progress_bar
        self.key, self.rank, self.inner, self.last = key, rank, inner, time.monotonic()
        self.bar = _progress_bar(total, False) if total is not None else None  # rank 0's bar, as before
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001  (a private API: absent or changed)
            self.store = None

    def update(self, n: int) -> None:
        for bar in (self.inner, self.bar):
            if bar is not None:
                bar.update(n)
        now = time.monotonic()
        if self.store is None or now - self.last < 0.5:
            return
        self.last = now
        try:
            failed = self.store.check([self.key])
        except Exception:  # noqa: BLE001  (the store lost: the agreement will say so)
            return
        if failed:
            raise PeerFailed(f"rank {self.rank} stopped: another rank failed")

    def failed(self, exc: BaseException) -> None:
        if self.store is not None and not isinstance(exc, PeerFailed):
            try:
                self.store.set(self.key, str(self.rank))
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def forget(self) -> None:
        """Deletes the key (once every rank is past the agreement that follows fill)."""
        if self.store is not None:
            try:
                self.store.delete_key(self.key)
            except Exception:  # noqa: BLE001  (never set, or a store that cannot delete: a random name anyway)
                pass


def refuse(message: str) -> None:
    """For a rank that cannot start its merge (its command line refused, said already): joins the process group
    and fails the first agreement with message, so the other ranks fail at once with it (exit 2). Quiet where it
    cannot join (RANK and WORLD_SIZE without a rendezvous, a lost group): this rank fails anyway."""
    def step():
        raise InputError(f"rank {dist.get_rank()} refused its {message}")
    ours = not _group_exists()
    try:
        dist, group = _process_group("cpu", _timeout_or_default()[0])
        _agree(step, dist, group)
    except (InputError, DistributedError):
        pass  # this rank's own error, one that cannot join, or a group lost meanwhile: it exits with its usage error
    finally:
        if ours and _group_exists():
            _leave()


def _group_exists() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _leave() -> None:
    """Destroys the process group this module made."""
    import torch.distributed as dist
    try:
        dist.destroy_process_group()
    except Exception:  # a group with a lost rank: nothing left to tidy
        pass


def _fingerprint(plan, out_dir, out_shard_size, random_seed, flags=()) -> str:
    """What every rank must agree on: OUT, the shard size (each rank names its shard files from it), the
    seed (DARE's and DELLA's masks), the method, the checkpoints (a LoRA adapter applied to one included) and
    every field of every output tensor's plan (not the data: that would mean reading it all). Every field:
    ranks whose configs differed only in `dtype:` rounded their shares' results differently, silently. And what
    rank 0 alone uses (the side files: config.json's overrides, the chat template, the donor; the flags): ranks
    whose configs differed only in `chat_template:` wrote rank 0's, exit 0 (an audit). The config is compared as
    parsed, less the path it was read from (a copy of it on each node)."""
    import dataclasses
    import hashlib
    from dataclasses import fields
    tensors = [tuple(_rows_digest(t.vocab) if f.name == "vocab" else getattr(t, f.name) for f in fields(t))
               for t in plan.tensors]
    # each part's sources with their tensor maps: `slices:` differing in a layer_range read other layers
    # under the same output names (a bug hunt: a model mixed from two configs, exit 0)
    sources = [[_checkpoint_identity(c) for c in part.checkpoints] for part in plan.parts]
    # and a sample of each checkpoint's bytes: another file at the same path on one node (a stale copy) merged
    # that rank's share from it, exit 0 (an audit; the sharded pool compares such a sample too)
    samples = {os.path.abspath(c.path): _values_sample(c) for c in _files_of(plan)}
    text = repr((os.path.abspath(out_dir), int(out_shard_size), random_seed or 0, plan.method.name,
                 [_checkpoint_identity(c) for c in plan.checkpoints], sources, tensors,
                 [(c.name, c.dtype, c.shape) for c in plan.copies], sorted(samples.items()),
                 # (not the text as written, nor the file's mode: the merge it parses to is compared)
                 _canonical(dataclasses.replace(plan.config, source=None, warnings=[], text=None, text_mode=None)),
                 plan.chat_template,
                 sorted(plan.config_overrides.items()), os.path.abspath(plan.donor.path), tuple(flags)))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(config) -> str:
    """The parsed config as text that does not depend on the order its mappings were written in, nor on how its
    model paths are spelt (m1/ and m1 on two ranks were "a different merge": an audit; the checkpoints themselves
    are compared by identity)."""
    import dataclasses
    import json

    def spelt_once(x):
        if isinstance(x, dict):
            return {k: os.path.normpath(v) if k in ("path", "base_model") and isinstance(v, str) and v else
                    spelt_once(v) for k, v in x.items()}
        return [spelt_once(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(spelt_once(dataclasses.asdict(config)), sort_keys=True, default=repr)


def _files_of(plan) -> list:
    """The checkpoints as opened from their files (a slice's renaming view and a LoRA view unwrapped; an
    adapter's file with them), each once."""
    seen, out = set(), []
    for ck in list(plan.checkpoints) + [c for part in plan.parts for c in part.checkpoints]:
        for c in (_unwrapped(ck), getattr(getattr(ck, "adapter", None), "file", None)):
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
    return out


def _unwrapped(ck):
    while hasattr(ck, "ck"):  # RenamedCheckpoint, LoraCheckpoint: the checkpoint they read
        ck = ck.ck
    return ck


def _values_sample(ck) -> int:
    """values_sample (dist/sample.py) of a checkpoint's tensors: 64 bytes at the start, the middle and the end of
    each (read without readahead where the checkpoint can: Checkpoint.head). The first 64 alone missed a node's
    stale copy that differed in its last rows (an embedding's added tokens): that rank merged its share from it,
    exit 0 (an audit)."""
    from pymerge.dist.sample import values_sample
    from pymerge.io.checkpoint import head_bytes

    def sample(name: str) -> bytes:
        nbytes = ck.info(name).nbytes
        return b"".join(head_bytes(ck, name, 64, at) for at in (0, nbytes // 2 // 64 * 64, max(0, nbytes - 64)))
    return values_sample(ck.names(), sample)


def _checkpoint_identity(ck) -> tuple:
    """A checkpoint's path; for `model+lora`, also the adapter's file, what it applies to each weight and the
    dtype it is applied in (its path is the model's: ranks given two adapters on one model each wrote their
    share with their own); for a slice's view (pymerge.slices.RenamedCheckpoint), also which tensor each
    output name reads."""
    from pymerge.slices import RenamedCheckpoint
    if isinstance(ck, RenamedCheckpoint):
        return _checkpoint_identity(ck.ck) + (sorted(ck.map.items()),)
    adapter = getattr(ck, "adapter", None)
    if adapter is None:
        return (os.path.abspath(ck.path),)
    return (os.path.abspath(ck.path), os.path.abspath(adapter.file.path), sorted(adapter.targets.items()),
            ck.lora_dtype)


def _rows_digest(rows) -> Optional[str]:
    """A tokenizer merge's row map of one tensor (pymerge.tokenizer.vocab.Rows), by value: ranks whose
    tokenizers differ (another tokenizer source, another tokenizer.json) wrote embedding and head rows of
    two vocabularies into one model."""
    if rows is None:
        return None
    import hashlib
    h = hashlib.sha256(repr(rows.n_tokens).encode())
    for a in list(rows.src) + [rows.default_kind, rows.default_source, rows.default_row]:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _writer(plan, parts, out_dir, out_shard_size, force, *, part, join=None) -> ShardedWriter:
    entries = [(t.name, t.out_dtype, t.shape) for t in plan.tensors] + [(c.name, c.dtype, c.shape) for c in plan.copies]
    return ShardedWriter(out_dir, entries, max_shard_bytes=int(out_shard_size), force=force, metadata={"format": "pt"},
                         parts=parts, part=part, join=join)


def _agree(step, dist, group, lost: Optional[str] = "nothing was written") -> list:
    """Runs step() on this rank and returns every rank's result. If it failed on any rank, every
    rank raises the first failing rank's error: the same InputError (exit 2) where it was one,
    else a DistributedError naming the rank; the failing rank itself re-raises its own. `lost`:
    what a rank that lost the others says of the output."""
    result, error = None, None
    try:
        result = step()
    except BaseException as exc:  # Ctrl-C too: the other ranks must not wait for this one
        error = exc
    mine = ("ok", result) if error is None else ("error", type(error).__name__, exception_line(error))
    gathered = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, mine, group=group)
    except Exception as exc:  # a rank died, or did not answer within the timeout
        if error is not None:
            raise error
        raise DistributedError(f"rank {dist.get_rank()} lost the other ranks ({_collective_error(exc)})"
                               + (f"; {lost}" if lost else "")) from None
    # the first rank's own error: not one that only stopped because another failed (PeerFailed)
    failed = next(((r, g) for r, g in enumerate(gathered) if g[0] == "error" and g[1] != "PeerFailed"),
                  next(((r, g) for r, g in enumerate(gathered) if g[0] == "error"), None))
    if failed is None:
        return [g[1] for g in gathered]
    r, (_, kind, message) = failed
    if error is not None and (r == dist.get_rank() or isinstance(error, KeyboardInterrupt)):
        raise error  # an interrupted rank says so (exit 130), whichever rank failed first
    if kind in _SAME_ON_EVERY_RANK:
        raise _SAME_ON_EVERY_RANK[kind](message)
    if kind == "KeyboardInterrupt":  # ("rank 1 failed: KeyboardInterrupt: KeyboardInterrupt")
        raise DistributedError(f"rank {r} was interrupted (Ctrl-C, SIGTERM or SIGHUP)")
    raise DistributedError(f"rank {r} failed: {kind}: {message}")


def _process_group(device: str, timeout_s: float):
    """(torch.distributed, the group agreements use: None for the default one). Whether it joined is known by
    _group_exists, before and after (its callers leave a group that was not there before)."""
    import torch.distributed as dist
    timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized():  # the caller's group; agreements need a CPU (gloo) side
        cpu = "cpu" in [d.type for d in dist.group.WORLD._device_types] or dist.get_backend() == "gloo"
        return dist, (None if cpu else dist.new_group(backend="gloo", timeout=timeout))
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise InputError(f"a distributed merge needs {', '.join(missing)} set: launch it with torchrun, or set "
                         f"RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    # checked before joining: RANK=5 of WORLD_SIZE=1 waited the whole timeout (30 minutes) for a rank 0, and
    # LOCAL_WORLD_SIZE=abc was a ValueError's traceback after it (an audit)
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    if rank >= world:
        raise InputError(f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 to {world - 1})")
    _env_int("LOCAL_WORLD_SIZE", 1, 1)
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    try:
        with _sigterm_default():
            if rank != 0:  # (RANK=00 is rank 0, which waited the whole timeout for itself: a review)
                _wait_for_master(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], timeout_s)
            dist.init_process_group(backend, timeout=timeout)
    except Exception as exc:  # the rendezvous failed or timed out
        raise DistributedError(f"rank {rank} of {world} cannot join the process "
                               f"group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: "
                               f"{exception_line(exc)}") from None
    return dist, None


@contextlib.contextmanager
def _sigterm_default():
    """SIGTERM (and SIGHUP, SIGXCPU) at its default action while a rank joins: the rendezvous blocks in C++, where
    the CLI's Python handler never runs, so torchrun's SIGTERM (a peer died) was ignored until its SIGKILL 30 s later,
    and a SIGHUP for the whole timeout (a review); nothing exists yet that a handler would clean up."""
    main = threading.current_thread() is threading.main_thread()
    current = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    # only the CLI's own handler: a library caller's handler (or SIG_IGN) is theirs to keep
    ours = [sig for sig, h in current.items()
            if getattr(h, "__module__", None) == "pymerge.cli" and getattr(h, "__name__", None) == "_on_sigterm"]
    for sig in ours:
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig in ours:
            signal.signal(sig, current[sig])


def _wait_for_master(addr: str, port: str, timeout_s: float) -> None:
    """Until rank 0's store accepts connections, or timeout_s: torch's store client, given no listener, retried
    past the timeout (2-3x it) and logged ~40 lines of C++ backtraces before its error (an audit)."""
    try:
        where = (addr, int(port))
    except ValueError:
        return  # torch's own error names it
    end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(where, timeout=max(0.1, min(5.0, end - time.monotonic()))):
                return  # (the store takes a connection closed unused in silence)
        except OSError as exc:
            if time.monotonic() >= end:
                raise RuntimeError(f"no rank 0 listening there within {timeout_s:g} s ({exc.strerror or exc}); is "
                                   f"rank 0 running, and {TIMEOUT_ENV} long enough for it to start?") from None
            time.sleep(0.25)


def _local_cuda() -> str:
    import torch
    return f"cuda:{torch.cuda.current_device()}"


def _env_int(name: str, default: int, least: int) -> int:
    """A launcher's integer variable (absent or empty: default), at least `least`; one line naming it otherwise."""
    text = os.environ.get(name, "")
    try:
        value = int(text) if text.strip() else default
    except ValueError:
        value = None
    if value is None or value < least:
        raise InputError(f"{name}={text!r}: must be an integer of at least {least} (set by torchrun or the launcher)")
    return value


def _timeout_or_default() -> Tuple[float, Optional[InputError]]:
    """(PYMERGE_DIST_TIMEOUT's seconds, None), or (the default, its InputError): a rank joins the others before
    it reports a bad value, which left them waiting out their timeout where it refused to join."""
    try:
        return _timeout_s(), None
    except InputError as exc:
        return DEFAULT_TIMEOUT_S, exc


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value == math.inf:  # "no limit"
        return MAX_TIMEOUT_S
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:  # (nan too)
        raise InputError(f"{TIMEOUT_ENV}={text!r}: must be a number of seconds from {MIN_TIMEOUT_S:g} to "
                         f"{MAX_TIMEOUT_S:g} (inf: {MAX_TIMEOUT_S:g}, about 31 years)")
    return value


# Below a millisecond gloo's timeout is 0 ms (every wait failed at once, with a C++ backtrace); past about 9.2e9 s
# torch's milliseconds overflow, gloo refuses 1e13 and timedelta 1e15 (a traceback; an audit).
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1e-3, 1e9


def _collective_error(exc: BaseException) -> str:
    """gloo's first sentence, without its source location: 'Read error ...: Connection reset by peer'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", exception_line(exc))
    return text.split(". ")[0]

