"""The main job after `pip install`: a wheel built from this tree, installed into a fresh venv outside
the checkout with no extras, prints its version and backends and runs `pymerge demo --quick`; an
optional feature whose extra is missing fails in one line naming the extra. The sdist (what PyPI serves
where no wheel fits) carries every native source and header the build compiles, and what the README's
commands use."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, cwd, timeout=300, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_sdist_carries_the_native_sources_and_the_readme_commands(tmp_path):
    """The sdist held only the .cpp/.cu files named in Extension(sources=...): no header under csrc/, so
    `pip install` from it failed on the first C++ file. Listing the tarball is cheap; compiling it is not."""
    # From a copy without build leftovers: setuptools adds the files a stale *.egg-info/SOURCES.txt lists.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "*.so.build", "*.o", "raw",
        "demo_out"))
    # As a build frontend runs the backend: the source folder is its cwd but not on sys.path (with it there, the
    # tree's kernels/ shadowed Hugging Face's kernels package, whose setuptools plugin egg_info then failed to load).
    build = run([sys.executable, "-c", "import sys; sys.path[:] = [p for p in sys.path if p]; "
                 "from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                cwd=src, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    (sdist,) = tmp_path.glob("pymerge-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    native = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
              for f in files if f.endswith((".h", ".cuh", ".cpp", ".cu"))}
    assert any(n.endswith(".h") for n in native) and any(n.endswith(".cuh") for n in native)
    assert sorted(native - names) == []
    needed = {"setup.py", "pyproject.toml", "README.md", "Makefile", "requirements-dev.txt",
              "docs/mergekit-compat.md", "tests/conftest.py", "benchmarks/bench_weighted_sum.py", "kernels/__init__.py"}
    assert sorted(needed - names) == []
    assert not any(n.endswith((".so", ".so.build", ".o", ".pyc")) for n in names)
    # the GPU checks' logs the README points to (they were left out: an audit)
    logs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", "*.log"))}
    assert sorted(logs - names) == []


def _first_build_line(env: dict, where) -> str:
    """What `setup.py build_ext` (a wheel's build, out of tree) does with the CPU extension, read from its first
    lines: it is stopped there (a compile takes minutes)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    full_env.update(env, PYMERGE_NO_CUDA="1")
    p = subprocess.Popen([sys.executable, "setup.py", "build_ext", "-b", str(where / "b"), "-t", str(where / "t")],
                         cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if "reusing the in-place build" in line or "building 'pymerge._cpu'" in line:
                return line.strip()
        return ""
    finally:
        p.kill()
        p.wait(timeout=60)


def test_a_wheel_reuses_the_in_place_library_only_if_built_alike(tmp_path):
    """A wheel built from a checkout built in place takes its CPU library (two minutes less), but only where the
    same compiler, flags and pybind11 made it: it took a library built with CXXFLAGS="-O0 -fsanitize=address"
    into a plain build, and a plain one into a build the packager gave flags of their own (a review)."""
    import glob
    if not glob.glob(os.path.join(ROOT, "pymerge", "_cpu*.so.build")):
        pytest.skip("no in-place build of this checkout (make install writes one)")
    assert "reusing the in-place build" in _first_build_line({}, tmp_path / "plain")
    for var, value in (("CXXFLAGS", "-O1"), ("CC", "gcc -g")):  # (each in a build folder of its own)
        assert "building 'pymerge._cpu'" in _first_build_line({var: value}, tmp_path / var), var


def test_a_build_skipped_as_up_to_date_keeps_the_stamp_of_the_flags_that_made_it(tmp_path):
    """The stamp was written after every in-place build, one distutils skipped as up to date included: a library
    built with CXXFLAGS of its own got a plain build's stamp and went into a plain wheel (a review). A scratch
    tree with this setup.py and a one-line extension that reports the -DMARK it was compiled with."""
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "x.cpp").write_text(
        "#include <pybind11/pybind11.h>\n#ifndef MARK\n#define MARK 0\n#endif\n"
        "PYBIND11_MODULE(_cpu, m) { m.attr(\"mark\") = MARK; }\n")
    for pkg in ("pymerge", "kernels"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    env = {"PYMERGE_NO_CUDA": "1"}
    build = [sys.executable, "setup.py", "build_ext"]
    assert run(build + ["--inplace"], tmp_path, env=dict(env, CXXFLAGS="-DMARK=1")).returncode == 0
    (stamp,) = (tmp_path / "pymerge").glob("_cpu*.so.build")
    marked = stamp.read_text()
    assert "-DMARK=1" in marked
    again = run(build + ["--inplace"], tmp_path, env=env)  # up to date: not compiled, its stamp kept
    assert again.returncode == 0 and "building 'pymerge._cpu'" not in again.stdout + again.stderr
    assert stamp.read_text() == marked
    wheel = run(build + ["-b", "out/b", "-t", "out/t"], tmp_path, env=env)
    assert wheel.returncode == 0 and "building 'pymerge._cpu'" in wheel.stdout + wheel.stderr
    (lib,) = (tmp_path / "out" / "b" / "pymerge").glob("_cpu*.so")
    mark = run([sys.executable, "-c", "import _cpu; print(_cpu.mark)"], lib.parent)
    assert mark.stdout.strip() == "0", mark.stderr
    reuse = run(build + ["-b", "out2/b", "-t", "out2/t"], tmp_path, env=dict(env, CXXFLAGS="-DMARK=1"))
    assert "reusing the in-place build" in reuse.stdout + reuse.stderr  # the same flags: taken as it is
    # with its stamp: an in-place build from that folder, skipped as up to date, copies the stamp back
    (taken,) = (tmp_path / "out2" / "b" / "pymerge").glob("_cpu*.so.build")
    assert taken.read_text() == marked
    # a build into the shared build/ folder with other flags, then an in-place build that copies it as up to
    # date: the copy's stamp comes with it (the in-place one described the library it replaced; a review)
    assert run(build + ["--force"], tmp_path, env=dict(env, CXXFLAGS="-DMARK=2")).returncode == 0
    assert run(build + ["--inplace"], tmp_path, env=env).returncode == 0
    mark = run([sys.executable, "-c", "import _cpu; print(_cpu.mark)"], tmp_path / "pymerge")
    assert mark.stdout.strip() == "2" and "-DMARK=2" in stamp.read_text(), mark.stderr
    wheel = run(build + ["-b", "out3/b", "-t", "out3/t"], tmp_path, env=env)
    assert "building 'pymerge._cpu'" in wheel.stdout + wheel.stderr


def test_a_header_change_rebuilds_the_library(tmp_path):
    """setuptools rebuilds a library only where an input is newer, and the headers were no input: a wheel built
    beside an earlier build after a header-only change shipped the old library (an audit). A scratch tree with
    this setup.py and a one-line extension whose value comes from a header."""
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "mark.h").write_text("#define MARK 1\n")
    (tmp_path / "csrc" / "cpu" / "x.cpp").write_text(
        '#include <pybind11/pybind11.h>\n#include "cpu/mark.h"\nPYBIND11_MODULE(_cpu, m) { m.attr("mark") = MARK; }\n')
    for pkg in ("pymerge", "kernels"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    build = [sys.executable, "setup.py", "build_ext", "-b", "out/b", "-t", "out/t"]
    env = {"PYMERGE_NO_CUDA": "1"}
    assert run(build, tmp_path, env=env).returncode == 0
    again = run(build, tmp_path, env=env)
    assert again.returncode == 0 and "building 'pymerge._cpu'" not in again.stdout + again.stderr  # up to date
    header = tmp_path / "csrc" / "cpu" / "mark.h"
    header.write_text("#define MARK 2\n")
    later = os.path.getmtime(next((tmp_path / "out" / "b" / "pymerge").glob("_cpu*.so"))) + 5
    os.utime(header, (later, later))  # newer than the library, whatever the file system's time resolution
    rebuilt = run(build, tmp_path, env=env)
    assert rebuilt.returncode == 0 and "building 'pymerge._cpu'" in rebuilt.stdout + rebuilt.stderr
    (lib,) = (tmp_path / "out" / "b" / "pymerge").glob("_cpu*.so")
    mark = run([sys.executable, "-c", "import _cpu; print(_cpu.mark)"], lib.parent)
    assert mark.stdout.strip() == "2", mark.stderr


@pytest.mark.parametrize("fails", ["compile", "link"])
def test_an_nvcc_that_fails_leaves_the_cpu_build(tmp_path, fails):
    """An nvcc that cannot build the CUDA extension (a toolkit too old for compute_90, a host gcc it refuses), or
    a toolkit whose objects do not link (no static runtime), stopped the whole install with a traceback, the CPU
    extension with it (a bug hunt, then its review): it is skipped with a warning; PYMERGE_REQUIRE_CUDA=1 keeps
    the error. A scratch tree with this setup.py and an nvcc that fails, or writes an object that is none."""
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    for sub, name, text in (("cpu", "x.cpp", "#include <pybind11/pybind11.h>\nPYBIND11_MODULE(_cpu, m) {}\n"),
                            ("cuda", "y.cu", "__global__ void k() {}\n")):
        (tmp_path / "csrc" / sub).mkdir(parents=True)
        (tmp_path / "csrc" / sub / name).write_text(text)
    for pkg in ("pymerge", "kernels"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    fail = ("echo \"nvcc fatal   : Unsupported gpu architecture 'compute_90'\" >&2\nexit 1\n" if fails == "compile"
            else 'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\necho "not an object" > "$out"\n')
    nvcc.write_text("#!/bin/sh\ncase \"$*\" in *--dryrun*) exit 0;; esac\n" + fail)
    nvcc.chmod(0o755)
    env = {"CUDA_HOME": str(tmp_path / "cuda")}
    build = [sys.executable, "setup.py", "build_ext", "-b", "out/b", "-t", "out/t"]
    done = run(build, tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    said = "nvcc exited with 1" if fails == "compile" else "LinkError"
    assert f"pymerge: warning: the CUDA extension is not built ({said}" in done.stderr, done.stderr[-3000:]
    assert [p.name.split(".")[0] for p in (tmp_path / "out" / "b" / "pymerge").glob("*.so")] == ["_cpu"]
    required = run(build[:-4] + ["-b", "out2/b", "-t", "out2/t"], tmp_path, env=dict(env, PYMERGE_REQUIRE_CUDA="1"))
    assert required.returncode != 0 and "warning: the CUDA" not in required.stderr, required.stderr[-3000:]
    # in place (an editable install): the CPU library is copied into the tree, nothing for the CUDA one
    inplace = run(build[:-4] + ["--inplace"], tmp_path, env=env)
    assert inplace.returncode == 0, inplace.stderr[-3000:]
    assert [p.name.split(".")[0] for p in (tmp_path / "pymerge").glob("*.so")] == ["_cpu"]


@pytest.mark.slow
def test_wheel_runs_the_demo_in_a_fresh_venv(tmp_path, quick_demo_checkpoints):
    wheels = tmp_path / "wheels"
    build = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
                 ROOT], cwd=tmp_path, timeout=600, env={"PYMERGE_NO_CUDA": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("pymerge-*.whl")
    import zipfile
    with zipfile.ZipFile(wheel) as zf:  # the build stamps beside the libraries are no part of the package
        names = zf.namelist()
    assert any(n.startswith("pymerge/_cpu") and n.endswith(".so") for n in names), names
    assert not [n for n in names if n.endswith(".so.build") or n.startswith("tests/")], names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    install = run([py, "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)], cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"  # outside the checkout: nothing can import from the source tree
    work.mkdir()
    pymerge = str(env_dir / "bin" / "pymerge")

    version = run([pymerge, "--version"], cwd=work)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("pymerge ") and "backends: cpu (" in version.stdout, version.stdout

    where = run([py, "-c", "import pymerge, os; print(os.path.dirname(pymerge.__file__))"], cwd=work)
    assert str(env_dir) in where.stdout, where.stdout  # the installed copy, not the checkout

    # the checkpoints the session trained: the installed demo reuses them (same settings and code), so its
    # cache key does not depend on where pymerge is installed
    shutil.copytree(quick_demo_checkpoints, work / "demo_out" / "checkpoints")
    demo = run([pymerge, "demo", "--quick"], cwd=work, timeout=300)
    assert demo.returncode == 0, (demo.stdout[-2000:], demo.stderr[-3000:])
    import torch
    theirs = run([py, "-c", "import torch; print(torch.__version__)"], cwd=work).stdout.strip()
    if theirs == torch.__version__:  # (torch's version is part of the cache key: another build trains again)
        assert "reusing the checkpoints" in demo.stdout, demo.stdout[-2000:]

    bench = run([pymerge, "bench", "--elements", "65536", "--rounds", "1"], cwd=work)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "pymerge / copy" in bench.stdout

    # an optional feature without its extra (the fresh venv has no triton): one line naming the extra
    missing = run([py, "-c", "import torch, pymerge; pymerge.weighted_sum([torch.ones(3)], [1.0], backend='triton')"],
                  cwd=work)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "MissingExtraError" in last and "pip install triton (pymerge's [triton] extra)" in last, missing.stderr[-2000:]
