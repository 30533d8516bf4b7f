"""`pymerge --version` (version and backends) and `pymerge bench` (installed, no checkout needed)."""
import json

import pytest

import pymerge
from pymerge import cli


def test_version_names_the_version_and_backends(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"pymerge {pymerge.__version__} (torch ")
    assert "backends: cpu (" in out and ("cuda extension" in out) and ("triton" in out)


def test_bench_runs_from_the_package(capsys):
    """--json: stdout is the JSON alone, the table on stderr (`| jq .` failed on the table; a CLI audit)."""
    assert cli.main(["bench", "--elements", "4099", "--rounds", "1", "--json"]) == 0
    cap = capsys.readouterr()
    last = json.loads(cap.out)
    assert last["device"] == "cpu" and [r["N"] for r in last["rows"]] == [2, 8, 16]
    assert all(r["pymerge GB/s"] > 0 and r["copy GB/s"] > 0 for r in last["rows"])
    assert all(len(r["per round"]) == 2 and r["per round"][0] <= r["per round"][1] for r in last["rows"])
    assert "best of 1 round;" in cap.err and "pymerge / copy" in cap.err


def test_bench_quick_keeps_the_options_given(capsys, monkeypatch):
    """--quick set 1M elements and 3 rounds over --elements/--rounds given with it."""
    from pymerge import bench
    seen = []
    monkeypatch.setattr(bench, "run", lambda device, numel, rounds: seen.append((numel, rounds)) or [{"N": 2}])
    for args, want in ((["--quick"], (1 << 20, 3)), (["--quick", "--elements", "4099"], (4099, 3)),
                       (["--rounds", "2", "--quick"], (1 << 20, 2)), ([], (8 << 20, 5))):
        assert cli.main(["bench", "--device", "cpu", "--json", *args]) == 0
        assert seen.pop() == want, args


def test_bench_refuses_counts_it_cannot_run_in_one_line(capsys):
    """--elements 0 divided by zero, -5 was a torch traceback, inf an OverflowError past argparse (exit 1)."""
    import pytest
    for args in (["--elements", "0"], ["--elements", "-5"], ["--elements", "inf"], ["--elements", "x"],
                 ["--rounds", "0"], ["--rounds", "99999999999"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and err[-1].startswith("pymerge bench: error:") and "Traceback" not in "".join(err)


def test_bench_without_cuda_or_memory_is_one_line(capsys, monkeypatch):
    """--device cuda on a CPU-only torch was torch's AssertionError traceback, and inputs that do not fit a
    RuntimeError traceback (a bug hunt)."""
    import pytest
    import torch
    from pymerge import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda", "--quick"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err

    def no_memory(*a):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000 bytes")
    monkeypatch.setattr(bench, "run", no_memory)
    assert cli.main(["bench", "--elements", "1e9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pymerge bench: error: --elements 1000000000 does not fit in memory")


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["merge", "--help"], ["demo", "--help"],
                                  ["search", "--help"], ["bench", "--help"], ["doctor", "--help"]])
def test_version_or_help_to_a_full_disk_is_one_line(args):
    """`pymerge --version > /dev/full` printed a traceback and exited 1 (printed while parsing, outside the
    command's OSError handling; a hunt); --help exited 0 having printed nothing (argparse swallows the error)."""
    import os
    import subprocess
    import sys
    if not os.path.exists("/dev/full"):
        import pytest
        pytest.skip("no /dev/full on this system")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "pymerge", *args], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=300, cwd=root)
    assert (p.returncode, p.stderr) == (2, "pymerge: error: No space left on device\n")


def test_bench_counts_the_bytes_each_row_moves(monkeypatch):
    """The copy row counted (N + 1) x elements x 2 bytes, but its source holds (N + 1) x elements / 2 bf16
    elements, rounded down: for an odd product it moved fewer (1.5x off at 1 element)."""
    from pymerge import bench
    monkeypatch.setattr(bench, "_time", lambda fns, rounds, cuda: ({k: 1.0 for k in fns}, {k: [1.0] for k in fns}))
    for numel in (1, 3, 1001):
        row = bench.run("cpu", numel, 1)[0]
        assert row["N"] == 2
        assert row["copy GB/s"] * 1e9 == _approx(2 * 2 * ((3 * numel) // 2))
        assert row["pymerge GB/s"] * 1e9 == _approx(3 * numel * 2)


def _approx(x):
    import pytest
    return pytest.approx(x, rel=1e-12)


@pytest.mark.parametrize("args", [["merge", "c.yml", "out", "--chunk-size", "512KiB"],
                                  ["merge", "c.yml", "out", "--out-shard-size", "5XB"],
                                  ["merge", "c.yml", "out", "--random-seed", "x"], ["merge"], [],
                                  ["merge", "c.yml", "out", "--bogus"], ["merge", "c.yml", "out", "extra"],
                                  ["--bogus", "merge", "c.yml", "out"],
                                  ["bench", "--rounds", "x"], ["demo", "--budget", "x"], ["search"], ["doctor", "--x"]])
def test_a_usage_error_is_one_line_pointing_to_help(args, capsys):
    """A bad --chunk-size, --out-shard-size or --random-seed printed argparse's 19-line usage block before its
    error, where the README promises one line (a hunt of the docs)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "usage:" not in err, err
    prog = " ".join(["pymerge"] + args[:1 if args[:1] != ["--bogus"] else 0])
    assert err.startswith(f"{prog}: error: ") and err.endswith(f" (see {prog} --help)\n"), err


def test_bench_copies_written_memory_and_reports_each_rounds_ratio(monkeypatch, capsys):
    """The copy read a never-written source (the kernel's zero page: copy overstated by 15-25 %), and one best-of
    ratio hid that a loaded machine moved it from 0.1 to 19 (an audit): the ratio is given round by round, and a
    copy whose own times varied past 1.5x gets a note."""
    from pymerge import bench
    copied = []

    def fake(fns, rounds, cuda):
        copied.append(fns["copy"]())  # copy_ returns its destination: what the copy read
        copy = [1.0, 2.0] if len(copied) == 2 else [1.0, 1.0]  # N = 8: the copy took twice as long once
        return {k: 1.0 for k in fns}, {"copy": copy, "eager": [1.0, 1.0], "pymerge": [1.0, 0.5]}
    monkeypatch.setattr(bench, "_time", fake)
    assert cli.main(["bench", "--elements", "1000", "--rounds", "2", "--device", "cpu"]) == 0
    assert all(bool(c.ne(0).any()) for c in copied)
    out = capsys.readouterr().out
    assert "best of 2 rounds" in out and "per round" in out
    lines = out.splitlines()  # per round: copy's time over pymerge's (the same bytes): 1/1 and 1/0.5; N = 8: 2/0.5
    assert lines[2].startswith("2 |") and "| 1.00-2.00" in lines[2] and "| 1.00-4.00" in lines[3]
    assert "note: the copy's own time varied 2.00x between rounds" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--elements", "1.5"])
    assert "must be a whole number" in capsys.readouterr().err


def test_cli_audit_entry_points(capsys, monkeypatch, tmp_path):
    """A CLI audit: `pymerge --bogus` said only that COMMAND is required; --version called an extension that
    was built but failed to load "not built"; `python -m pymerge.doctor` did nothing, exit 0; help with stdout
    closed went to stderr; descriptors closed by the caller were reused by the next file opened (a demo's lock
    file became descriptor 2, where C code writes its messages)."""
    import os
    import subprocess
    import sys

    import pytest

    from pymerge import _native
    with pytest.raises(SystemExit) as exc:
        cli.main(["--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "pymerge: error: unrecognized arguments: --bogus (see pymerge --help)"
    monkeypatch.setattr(_native, "cpu", None)
    monkeypatch.setattr(_native, "CPU_IMPORT_ERROR", ImportError("undefined symbol: x"))
    assert "cpu extension built but does not load (see pymerge doctor)" in cli.version_text()
    monkeypatch.setattr(_native, "CPU_IMPORT_ERROR", ModuleNotFoundError("no", name="pymerge._cpu"))
    assert "cpu: NOT BUILT" in cli.version_text()
    run = subprocess.run([sys.executable, "-m", "pymerge.doctor"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("pymerge "), run
    run = subprocess.run(["sh", "-c", f"exec >&-; {sys.executable} -m pymerge --help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    script = ("import os, subprocess, sys\nos.close(1); os.close(2)\nfrom pymerge import cli\n"
              "cli._fill_closed_descriptors()\n"
              f"fd = os.open({str(tmp_path / 'f')!r}, os.O_CREAT | os.O_WRONLY)\n"
              "child = subprocess.run([sys.executable, '-c', 'import os; os.fstat(1); os.fstat(2)']).returncode\n"
              f"open({str(tmp_path / 'fd')!r}, 'w').write(f'{{fd}} {{child}}')\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 0
    fd, child = map(int, (tmp_path / "fd").read_text().split())
    assert fd > 2 and child == 0  # (a child inherited the filled descriptors: os.open's are not inheritable)
    run = subprocess.run([sys.executable, "-m", "pymerge", "--version", "--bogus"], capture_output=True, timeout=120)
    assert run.returncode == 0  # --version before anything else
    # no option is abbreviated, as in mergekit-yaml (an audit): --vers is named, not taken for --version
    run = subprocess.run([sys.executable, "-m", "pymerge", "--vers"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == "pymerge: error: unrecognized arguments: --vers (see pymerge --help)\n"


def test_without_the_cpp_extension_merges_run_on_torch(tmp_path, monkeypatch):
    """A pip install without a C++ compiler gives pymerge without pymerge._cpu: the streaming merge's raw path
    then raised a RuntimeError traceback (an install audit); it takes the torch ops' fallbacks. A compressed
    pool, whose encoder is C++ only, is refused in one line."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from pymerge import _native
    from pymerge.errors import InputError
    from pymerge.merge import run_merge
    from pymerge.pool import CheckpointPool
    g = torch.Generator().manual_seed(1)
    sds = [{"a": torch.randn(37, 5, generator=g).bfloat16(), "b": torch.randn(11, generator=g)} for _ in range(2)]
    for i, sd in enumerate(sds):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    monkeypatch.setattr(_native, "cpu", None)
    monkeypatch.setattr(_native, "CPU_IMPORT_ERROR", ModuleNotFoundError("no", name="pymerge._cpu"))
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / f"m{i}.safetensors"), "parameters": {"weight": w}} for i, w in enumerate((0.3, 0.7))]}
    run_merge(cfg, tmp_path / "out", device="cpu", quiet=True)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in sds[0]:
        ref = 0.3 * sds[0][k].double() + 0.7 * sds[1][k].double()
        assert got[k].dtype == torch.float32  # (dtype: float32)
        assert float((got[k].double() - ref).abs().max()) <= float(ref.abs().max()) * 2 ** -22, k
    with pytest.raises(InputError, match="compress='int8' needs pymerge's C.. extension, which is not built here"):
        CheckpointPool(sds[1:], base=sds[0], compress="int8")
