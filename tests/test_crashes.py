"""Crashes a user could cause (issue 8): many outputs, exceptions in the thread pool, an input
truncated while a merge reads it. Each must be an error, never a dead process."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama_factory as lf
from pymerge import _native
from pymerge.ops.weighted_sum import weighted_sum_many
from test_cli import ROOT, SLOW_DIMS, write_cfg

needs_cpu_ext = pytest.mark.skipif(_native.cpu is None, reason="the C++ extension is not built")


@needs_cpu_ext
def test_weighted_sum_many_with_more_than_65536_outputs():
    backend = "cpu"
    """Was a segmentation fault on the CPU: accumulators capped at 65536 outputs, the loop not."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, generator=g).to(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    k = 65536 + 67
    rows = torch.randn(k, 3, generator=g)
    outs = weighted_sum_many(xs, rows, out_dtype=torch.float32, backend=backend)
    ref = rows.double() @ torch.stack([x.double() for x in xs])
    got = torch.stack(outs).double()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[-1], weighted_sum_many(xs, rows[-1:], out_dtype=torch.float32, backend=backend)[0])


@needs_cpu_ext
@pytest.mark.parametrize("outputs", [1, 63, 64, 65, 129])
def test_output_groups_agree_with_single_outputs(outputs):
    """Outputs go kOutputsPerPass (64) at a time: each must equal its own one-output call, bit for bit."""
    g = torch.Generator().manual_seed(outputs)
    xs = [torch.randn(4099, generator=g).bfloat16() for _ in range(3)]
    rows = torch.randn(outputs, 3, generator=g)
    outs = weighted_sum_many(xs, rows, backend="cpu")
    for r, o in zip(rows, outs):
        assert torch.equal(o, weighted_sum_many(xs, r[None], backend="cpu")[0])


@needs_cpu_ext
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("fail_at", [0, 12_345, 99_999])
def test_thread_pool_rethrows_a_workers_exception_in_the_caller(threads, fail_at):
    """Was std::terminate (a worker's exception) or a use-after-return (the caller's)."""
    ext = _native.require_cpu()
    for _ in range(3):  # and the pool still works afterwards
        with pytest.raises(ValueError, match="chunk failed as asked"):
            ext._parallel_for_check(100_000, 100, threads, fail_at)
        assert ext._parallel_for_check(100_000, 100, threads, -1) == 100_000


_FORK_CHILD = r"""
import os, sys, threading, time
from pymerge import _native
ext = _native.require_cpu()
assert ext._parallel_for_check(10_000, 10, 2, -1) == 10_000  # the pool has a worker now
busy = threading.Thread(target=ext._parallel_for_check, args=(100_000, 1, 2, -1), daemon=True)
if sys.argv[1] == "busy":  # another thread inside a kernel at the fork: it holds the pool's locks
    busy.start()
    time.sleep(0.3)
pid = os.fork()
if pid == 0:
    ok = ext._parallel_for_check(10_000, 10, 2, -1) == 10_000
    sys.exit(0 if ok else 3)  # a normal exit, which runs static destructors
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        os._exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)  # hung: leave no stray process behind
os._exit(4)
"""


@needs_cpu_ext
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_a_forked_child_uses_the_thread_pool_and_exits(when):
    """Was a hang: the child's exit waited forever in the static pool's destructor, and a child forked
    while another thread ran a kernel blocked on the pool's lock, copied held, at its first call."""
    proc = subprocess.run([sys.executable, "-c", _FORK_CHILD, when], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


_TRUNCATE_DURING_MERGE = r"""
import os, sys
from pymerge.merge import run_merge
from pymerge.errors import InputError
cfg, out, victim = sys.argv[1:4]

class TruncateAfterFirstChunk:  # the writer thread calls update() once a chunk is on disk
    done = False
    def update(self, n):
        if not self.done:
            self.done = True
            os.truncate(victim, 4096)

try:
    run_merge(cfg, out, quiet=True, chunk_bytes=1 << 20, progress=TruncateAfterFirstChunk(), threads=1)
except InputError as e:
    print("pymerge: error:", e, file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    return lf.make_family(tmp_path_factory.mktemp("big"), n_finetunes=2, dims=SLOW_DIMS)


@needs_cpu_ext
@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "ties"])  # the torch-free executor and the torch one
def test_input_truncated_during_the_merge_is_an_error(tmp_path, big_family, method):
    """Was SIGBUS: the process died and left its temporary folder. Deterministic: the file is cut
    after the first chunk is written, and the merge has only 3 chunks in flight of many."""
    base, fts = big_family
    fts = [Path(shutil.copytree(m, tmp_path / m.name)) for m in fts]
    models = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]
    if method == "linear":
        models = [{"model": m["model"], "parameters": {"weight": 1.0}} for m in models]
    cfg = write_cfg(tmp_path / "c.yml", {"merge_method": method, "models": models,
                                         **({"base_model": str(base)} if method == "ties" else {})})
    out, victim = tmp_path / "out", fts[1] / "model.safetensors"
    p = subprocess.run([sys.executable, "-c", _TRUNCATE_DURING_MERGE, str(cfg), str(out), str(victim)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "shrank while being merged" in p.stderr and str(victim) in p.stderr
    assert not out.exists() and [q.name for q in tmp_path.iterdir() if q.name.startswith(".out")] == []


def _as_bin(folder: Path) -> Path:
    """Rewrites an HF folder's weights as pytorch_model.bin (torch.save), as old checkpoints ship."""
    from safetensors.torch import load_file
    st = folder / "model.safetensors"
    torch.save(load_file(str(st)), folder / "pytorch_model.bin")
    st.unlink()
    return folder / "pytorch_model.bin"


@needs_cpu_ext
@pytest.mark.slow
def test_bin_input_truncated_during_the_merge_is_an_error(tmp_path, big_family):
    """Was SIGBUS: torch maps a .bin file too, but the guard knew only safetensors maps."""
    base, fts = big_family
    fts = [Path(shutil.copytree(m, tmp_path / m.name)) for m in fts]
    victim = _as_bin(fts[1])
    cfg = write_cfg(tmp_path / "c.yml", {"merge_method": "linear",
                                         "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fts]})
    _merge_while_truncating(tmp_path, cfg, victim)


def _merge_while_truncating(tmp_path: Path, cfg: Path, victim: Path) -> None:
    """Runs the merge in a child, truncating victim mid-merge: a one-line error naming it, exit 2, no output."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", _TRUNCATE_DURING_MERGE, str(cfg), str(out), str(victim)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "shrank while being merged" in p.stderr and str(victim) in p.stderr
    assert not out.exists() and [q.name for q in tmp_path.iterdir() if q.name.startswith(".out")] == []


def _lora_adapter(folder: Path, layers: int, hidden: int, fmt: str) -> Path:
    """A plain LoRA adapter on q_proj and v_proj, saved as safetensors or .bin; returns its weights file."""
    import json
    from safetensors.torch import save_file
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}."
            t[p + "lora_A.weight"] = torch.randn(16, hidden, generator=g)
            t[p + "lora_B.weight"] = torch.randn(hidden, 16, generator=g)
    if fmt == "safetensors":
        save_file(t, str(folder / "adapter_model.safetensors"))
        return folder / "adapter_model.safetensors"
    torch.save(t, folder / "adapter_model.bin")
    return folder / "adapter_model.bin"


@needs_cpu_ext
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_lora_adapter_truncated_during_the_merge_is_an_error(tmp_path, big_family, fmt):
    """Was SIGBUS: the adapter's file is mapped and read while merging, but only the model's were guarded."""
    base, fts = big_family
    victim = _lora_adapter(tmp_path / "adapter", SLOW_DIMS.layers, SLOW_DIMS.hidden, fmt)
    cfg = write_cfg(tmp_path / "c.yml", {"merge_method": "linear", "models": [
        {"model": f"{fts[0]}+{victim.parent}", "parameters": {"weight": 0.5}},
        {"model": str(fts[1]), "parameters": {"weight": 0.5}}]})
    _merge_while_truncating(tmp_path, cfg, victim)

_FAULT_OUTSIDE_THE_GUARD = r"""
import mmap, os, sys
from pymerge.io import Checkpoint
from pymerge.io.sigbus import MappingGuard
guarded, other = sys.argv[1:3]
with MappingGuard([Checkpoint(guarded)]):
    with open(other, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(other, 0)
    print(mm[100])  # not a merge input: the usual SIGBUS
"""


@needs_cpu_ext
def test_the_guard_leaves_other_faults_alone(tmp_path):
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=1)
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 65536)
    p = subprocess.run([sys.executable, "-c", _FAULT_OUTSIDE_THE_GUARD, str(fts[0]), str(other)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == -7, (p.returncode, p.stderr[-2000:])  # SIGBUS


_TRUNCATE_UNDER_A_POOL = r"""
import os, sys, torch
from pymerge import CheckpointPool
from pymerge.errors import CheckpointError
a, b, c = sys.argv[1:4]
victim = next(os.path.join(a, f) for f in os.listdir(a) if f.endswith((".safetensors", ".bin")))
pool = CheckpointPool([a, b], residency="mmap")
before = CheckpointPool([b, c], residency="mmap")
model = {n: torch.zeros(s) for n, s in pool.shapes.items()}
pool.materialize([0.5, 0.5], into=model)
os.truncate(victim, 4096)
for attempt in range(2):  # the second must not merge the zeros the first left mapped
    try:
        pool.materialize([0.5, 0.5], into=model)
        sys.exit(f"materialize {attempt} read the truncated file without an error")
    except CheckpointError as e:
        print(f"error {attempt}:", e)
after = CheckpointPool([b, c], residency="mmap")
for other in (before, after):  # pools over untouched files: no error, the right values
    got = other.materialize([0.25, 0.75], into={n: torch.zeros(s) for n, s in other.shapes.items()})
    for n in other.names:
        torch.testing.assert_close(got[n], 0.25 * other.tensor(0, n) + 0.75 * other.tensor(1, n))
print("others ok")
"""


def _pool_script(tmp_path, script: str, n_finetunes: int, bin_victim: bool = False):
    """Runs `script` in a fresh process (a SIGBUS there cannot kill pytest) with argv: a copy of the first
    fine-tune (the victim; its weights as pytorch_model.bin with bin_victim), the other fine-tunes, the
    base. Returns (victim, stdout); the process must exit normally."""
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=n_finetunes)
    victim = Path(shutil.copytree(fts[0], tmp_path / "victim"))
    if bin_victim:
        _as_bin(victim)
    p = subprocess.run([sys.executable, "-c", script, str(victim)] + [str(f) for f in fts[1:]] + [str(base)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return victim, p.stdout


@needs_cpu_ext
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_checkpoint_truncated_under_an_mmap_pool_is_an_error(tmp_path, weights):
    """Was SIGBUS: the mmap tier's every materialize reads the checkpoints' memory maps (torch's map of a
    .bin file too)."""
    victim, out = _pool_script(tmp_path, _TRUNCATE_UNDER_A_POOL, n_finetunes=2, bin_victim=weights.endswith(".bin"))
    shrank = f"{victim / weights}: the file shrank while the pool was reading it"
    assert f"error 0: {shrank}" in out and f"error 1: {shrank}" in out
    assert "others ok" in out


_CUT_AFTER_ANOTHER_HANDLER = r"""
import faulthandler, os, signal, sys, torch
from torch.utils.data import DataLoader, Dataset
from pymerge import CheckpointPool
from pymerge.errors import CheckpointError
a, b = sys.argv[1:3]
how = os.environ["HOW"]
victim = os.path.join(a, "model.safetensors")
pool = CheckpointPool([a, b], residency="mmap")
model = {n: torch.zeros(s) for n, s in pool.shapes.items()}
def cut_then_name(name, done=[]):  # after the pool's size checks, before its kernel reads the maps
    if not done:
        done.append(os.truncate(victim, 0))
    return name
def merge(*_):
    try:
        pool.materialize([0.5, 0.5], into=model, names=cut_then_name)
        return "merged without an error"
    except CheckpointError as e:
        return f"error: {e}"
class Cut(Dataset):
    __len__, __getitem__ = lambda self: 1, merge
if how == "faulthandler":
    faulthandler.enable()
    print(merge())
elif how == "signal":
    signal.signal(signal.SIGBUS, lambda *_: os._exit(3))
    print(merge())
else:  # a DataLoader worker installs a SIGBUS handler of its own, which ends the worker
    print(list(DataLoader(Cut(), batch_size=None, num_workers=1, timeout=120))[0])
"""


@needs_cpu_ext
@pytest.mark.parametrize("how", ["faulthandler", "signal", "dataloader"])
def test_a_cut_under_an_mmap_pool_is_an_error_after_another_sigbus_handler(tmp_path, how, monkeypatch):
    """A pool's guard lives as long as the pool; a SIGBUS handler installed since (faulthandler.enable(), a
    DataLoader worker's at start-up) took the signal first and the cut file killed the process or the worker
    (an audit). Each materialize puts the guard's handler back in front."""
    monkeypatch.setenv("HOW", how)
    victim, out = _pool_script(tmp_path, _CUT_AFTER_ANOTHER_HANDLER, n_finetunes=1)
    assert f"error: {victim / 'model.safetensors'}: the file shrank while the pool was reading it" in out, out


_FAULT_AFTER_FAULTHANDLER_DISABLED = r"""
import faulthandler, mmap, os, sys, torch
from pymerge import CheckpointPool
a, b = sys.argv[1:3]
pool = CheckpointPool([a, b], residency="mmap")  # our handler in front
faulthandler.enable()                            # faulthandler's in front, ours its previous
pool.materialize([0.5, 0.5], into={n: torch.zeros(s) for n, s in pool.shapes.items()})  # ours in front again
faulthandler.disable()                           # ours stays; faulthandler's, our previous, now returns at once
path = os.path.join(os.path.dirname(a), "other.bin")
with open(path, "wb") as fh:
    fh.write(b"x" * 8192)
fh = open(path, "rb")
m = mmap.mmap(fh.fileno(), 8192, prot=mmap.PROT_READ)
os.truncate(path, 0)
print("reading", flush=True)
m[4096]  # a fault outside the pool's files
print("survived", flush=True)
"""


@needs_cpu_ext
def test_a_fault_forwarded_to_a_handler_that_returns_ends_as_a_bus_error(tmp_path):
    """A previous handler that returns without curing the fault (faulthandler, disabled after the guard put itself
    back in front of it) was handed the same fault forever: the process spun at 100 % CPU (a review). It dies of
    its SIGBUS, as without the guard."""
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=1)
    p = subprocess.run([sys.executable, "-c", _FAULT_AFTER_FAULTHANDLER_DISABLED, str(fts[0]), str(base)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == -7 and "reading" in p.stdout and "survived" not in p.stdout, (p.returncode, p.stderr[-2000:])


_TRUNCATE_WHILE_BUILDING = r"""
import os, sys
from pymerge import CheckpointPool
from pymerge.errors import CheckpointError
a, b = sys.argv[1:3]
victim = os.path.join(a, "model.safetensors")
choose = CheckpointPool._choose
def truncate_then_choose(self, *args):  # after the headers are read, before any tensor is copied
    os.truncate(victim, 4096)
    return choose(self, *args)
CheckpointPool._choose = truncate_then_choose
try:
    CheckpointPool([a, b], residency="host")
except CheckpointError as e:
    print("error:", e)
"""


@needs_cpu_ext
def test_checkpoint_truncated_while_a_pool_copies_it_is_an_error(tmp_path):
    """Was SIGBUS: every tier copies its tensors from the memory maps at construction."""
    victim, out = _pool_script(tmp_path, _TRUNCATE_WHILE_BUILDING, n_finetunes=1)
    assert f"error: {victim / 'model.safetensors'}: the file shrank while the pool was reading it" in out
    assert "no pool was built" in out


_MANY_POOLS = r"""
import os, sys, torch
from pymerge import CheckpointPool, _native
from pymerge.errors import CheckpointError
a, b = sys.argv[1:3]
ext, taken = _native.cpu, []
try:
    while True:
        taken.append(ext.sigbus_guard_add(4096, 4096))
except RuntimeError:  # full: a pool still works, unguarded
    pool = CheckpointPool([a, b], residency="mmap")
    got = pool.materialize([0.5, 0.5], into={n: torch.zeros(s) for n, s in pool.shapes.items()})
    for n in pool.names:
        torch.testing.assert_close(got[n], 0.5 * pool.tensor(0, n) + 0.5 * pool.tensor(1, n))
    del pool, got
for slot in taken[:2]:  # room for one pool's two files: each pool must give them back when it dies
    ext.sigbus_guard_remove(slot)
for _ in range(50):
    CheckpointPool([a, b], residency="mmap")
pool = CheckpointPool([a, b], residency="mmap")  # guarded only if none of the 50 kept its slots
os.truncate(os.path.join(a, "model.safetensors"), 4096)
try:
    pool.materialize([0.5, 0.5], into={n: torch.zeros(s) for n, s in pool.shapes.items()})
except CheckpointError as e:
    print("error:", e)
"""


@needs_cpu_ext
def test_pools_give_their_guard_slots_back(tmp_path):
    _, out = _pool_script(tmp_path, _MANY_POOLS, n_finetunes=1)
    assert "the file shrank while the pool was reading it" in out


_TRUNCATE_WHILE_LOADING = r"""
import os, sys
from pymerge import CheckpointPool
from pymerge.errors import CheckpointError
from pymerge.io.safetensors_file import SafetensorsFile
path = sys.argv[1]
tensor = SafetensorsFile.tensor
def truncate_then_read(self, name):  # after the header is validated, before the tensors are copied
    if os.path.getsize(path) > 4096:
        os.truncate(path, 4096)
    return tensor(self, name)
SafetensorsFile.tensor = truncate_then_read
try:
    CheckpointPool.load(path)
except CheckpointError as e:
    print("error:", e)
"""


@needs_cpu_ext
def test_saved_compressed_pool_truncated_while_loading_is_an_error(tmp_path):
    """Was SIGBUS: CheckpointPool.load copies the codes out of the file's memory map."""
    from pymerge import CheckpointPool
    base = {"w": torch.randn(64, 257), "b": torch.randn(300)}
    cks = [{k: v + 0.01 * torch.randn(v.shape) for k, v in base.items()} for _ in range(2)]
    path = tmp_path / "pool.safetensors"
    CheckpointPool(cks, base=base, compress="int8").save(path)
    p = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_LOADING, str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert f"error: {path}: the file shrank while being loaded" in p.stdout and "no pool was loaded" in p.stdout


@needs_cpu_ext
def test_a_cut_inside_the_last_page_is_seen_too(tmp_path):
    """A file cut by a few bytes keeps its last page mapped: reads past the new end see zeros and nothing
    faults, so merges and pools used the zeros, exit 0 (found by a review). The sizes are checked now:
    after a merge's reads, while a pool is built, and around every materialize on the mmap tier."""
    import os
    from pymerge import CheckpointPool
    from pymerge.errors import CheckpointError
    from pymerge.merge import run_merge
    base, fts = lf.make_family(tmp_path / "fam", n_finetunes=2, dims=lf.TINY)
    victim = fts[1] / "model.safetensors"
    size = os.path.getsize(victim)
    cfg = write_cfg(tmp_path / "c.yml", {"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in fts]})

    class CutOnce:  # the writer thread calls update() once a chunk is on disk
        done = False

        def update(self, n):
            if not self.done:
                self.done = True
                os.truncate(victim, size - 4)
    with pytest.raises(CheckpointError, match="shrank while being merged"):
        run_merge(cfg, tmp_path / "out", quiet=True, progress=CutOnce(), threads=1)
    assert not (tmp_path / "out").exists()
    os.truncate(victim, size)  # zeros back at the end: a valid file again (its last 4 bytes were data)
    pool = CheckpointPool([str(m) for m in fts], residency="mmap")
    target = {n: torch.empty(s) for n, s in pool.shapes.items()}
    pool.materialize([0.5, 0.5], into=target)
    os.truncate(victim, size - 4)
    with pytest.raises(CheckpointError, match="shrank while the pool was reading it"):
        pool.materialize([0.5, 0.5], into=target)
    choose = CheckpointPool._choose

    def cut_then_choose(self, *args):  # after the headers are read, before any tensor is copied
        os.truncate(victim, size - 8)
        return choose(self, *args)
    os.truncate(victim, size)
    CheckpointPool._choose = cut_then_choose
    try:
        with pytest.raises(CheckpointError, match="no pool was built"):
            CheckpointPool([str(m) for m in fts], residency="host")
    finally:
        CheckpointPool._choose = choose


@needs_cpu_ext
def test_a_checkpoint_rewritten_in_place_under_an_mmap_pool_is_refused(tmp_path):
    """Same size, new bytes: the mmap tier read them silently, mixed with the TIES thresholds it had cached
    from the old ones (found by a review). The file's modification time says it changed, before the merge
    writes anything (it was noticed only after the model had been overwritten)."""
    import os
    from safetensors.torch import save_file
    from pymerge import CheckpointPool
    from pymerge.errors import CheckpointError
    g = torch.Generator().manual_seed(8)
    files = [str(tmp_path / f"c{i}.safetensors") for i in range(2)]
    for f in files:
        save_file({"w": torch.randn(4096, generator=g)}, f)
    save_file({"w": torch.zeros(4096)}, str(tmp_path / "base.safetensors"))
    pool = CheckpointPool(files, base=str(tmp_path / "base.safetensors"), residency="mmap")
    target = {"w": torch.empty(4096)}
    pool.materialize([0.5, 0.5], into=target, method="ties", density=0.5)
    before = os.stat(files[1]).st_mtime_ns
    with open(files[1], "r+b") as fh:  # new values in place, same size
        fh.seek(-16, os.SEEK_END)
        fh.write(b"\x00" * 16)
    if os.stat(files[1]).st_mtime_ns == before:  # a coarse clock: make the change visible
        os.utime(files[1], ns=(before + 10**9, before + 10**9))
    merged = target["w"].clone()
    with pytest.raises(CheckpointError, match="the file changed while the pool was reading it .another program "
                       "rewrote it in place: its modification time moved.*nothing was merged"):
        pool.materialize([0.5, 0.5], into=target, method="ties", density=0.5)
    assert torch.equal(target["w"], merged)
    fresh = CheckpointPool(files, base=str(tmp_path / "base.safetensors"), residency="mmap")  # a new pool is fine
    fresh.materialize([0.5, 0.5], into=target, method="ties", density=0.5)
    # a rewrite that sets the modification time back (touch -d, cp -p) went unnoticed: its ctime moves
    st = os.stat(files[0])
    deadline = time.monotonic() + 5
    while os.stat(files[0]).st_ctime_ns == st.st_ctime_ns:  # a coarse clock: rewrite until the change shows
        assert time.monotonic() < deadline
        with open(files[0], "r+b") as fh:
            fh.seek(-16, os.SEEK_END)
            fh.write(b"\x01" * 16)
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(0.01)
    assert os.stat(files[0]).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(CheckpointError, match="the file changed while the pool was reading it .its status changed: "
                       "a chmod, chown or hard link to it, or a rewrite that set its modification time back"):
        fresh.materialize([0.5, 0.5], into=target, method="ties", density=0.5)


_KILL_BUS = r"""
import gc, os, signal, sys, time, torch
from pymerge import CheckpointPool
a, b, action, when = sys.argv[1:5]
if action == "ignored":
    signal.signal(signal.SIGBUS, signal.SIG_IGN)
pool = CheckpointPool([a, b], residency="mmap")  # the guard's handler in front while the pool lives
pool.materialize([0.5, 0.5], into={n: torch.zeros(s) for n, s in pool.shapes.items()})
if when == "after":
    del pool
    gc.collect()
for i in range(2):
    os.kill(os.getpid(), signal.SIGBUS)
    time.sleep(0.2)
    print("alive", i, flush=True)
"""


@needs_cpu_ext
@pytest.mark.parametrize("when", ["while a pool lives", "after"])
@pytest.mark.parametrize("action", ["ignored", "default"])
def test_a_kill_bus_keeps_the_processs_own_action(tmp_path, action, when):
    """The guard's handler stayed for good once a merge or a pool had run, and took a `kill -BUS` (a signal, no
    fault) for one it may drop: one the process ignored was swallowed once and then killed it, one at the default
    action was lost (an audit). The handler goes with the last guarded file, and forwards a sent signal as the
    process's own action would take it."""
    base, fts = lf.make_family(tmp_path / "m", n_finetunes=1)
    p = subprocess.run([sys.executable, "-c", _KILL_BUS, str(fts[0]), str(base), action, when.split()[0]],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    if action == "ignored":
        assert p.returncode == 0 and p.stdout.split("\n")[:2] == ["alive 0", "alive 1"], (p.returncode, p.stderr[-2000:])
    else:
        assert p.returncode == -7 and "alive" not in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])


_UNGUARDED_FAULT = """
import faulthandler, mmap, os, sys
import numpy as np
from pymerge import _native
cpu = _native.require_cpu()
path, n = sys.argv[1], 1 << 20
with open(path, "wb") as f:
    f.write(np.ones(n, dtype=np.float32).tobytes())
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, n * 4, prot=mmap.PROT_READ)
base = np.frombuffer(mm, dtype=np.float32).ctypes.data
cpu.sigbus_guard_add(base + 4096 * 8, 4096)   # our handler, first (its previous: the default action)
faulthandler.enable()                          # faulthandler's, keeping ours as its previous
cpu.sigbus_guard_add(base + 4096 * 16, 4096)   # ours again in front, faulthandler's as our previous
os.ftruncate(fd, 4096)
out = np.empty(n, dtype=np.float32)
print("reading", flush=True)
cpu.weighted_sum_many([base], [0], n, [1.0], [out.ctypes.data], [0], 1)  # past the end, outside the guards
print("survived", flush=True)
"""


@pytest.mark.skipif(_native.cpu is None, reason="no C++ extension")
def test_a_fault_outside_the_guards_under_faulthandler_ends_as_a_bus_error(tmp_path):
    """With faulthandler enabled between two guard registrations (pytest and `python -X faulthandler` enable it),
    each handler forwarded to the other: a fault outside every guarded range looped to a stack overflow, a
    SIGSEGV with the traceback printed five times (an audit). It dies of its SIGBUS, one traceback printed."""
    r = subprocess.run([sys.executable, "-c", _UNGUARDED_FAULT, str(tmp_path / "m.bin")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -7 and "survived" not in r.stdout, (r.returncode, r.stderr[-2000:])  # SIGBUS
    assert r.stderr.count("Fatal Python error: Bus error") == 1, r.stderr[-2000:]
