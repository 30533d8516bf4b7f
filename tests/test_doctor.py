"""No silent fallbacks (issue 8, item 10): an extension that fails to load warns with its error,
and `pymerge doctor` says which backends work and why the others do not."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pymerge import _native
from pymerge.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctor_lists_every_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("cpu extension", "cuda extension", "triton", "torch", "backend auto"):
        assert row in out
    assert f"SIMD {_native.cpu.simd_level()}" in out
    assert ("CUDA devices" in out) or ("cuda:0" in out)


def _python(code: str, block: str = "", exc: str = "", root: str = ROOT):
    """Runs code in a fresh interpreter where importing `block` raises `exc` (a broken or absent build), pymerge
    imported from `root`."""
    hook = textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == {block!r}:
                    raise {exc}
        sys.meta_path.insert(0, _Block())
    """) if block else ""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", hook + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=root)  # -c puts the working folder first on the path


BROKEN = 'ImportError("libfoo.so.3: cannot open shared object file")'


def test_a_cpu_extension_that_does_not_load_warns_and_doctor_says_why():
    r = _python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pymerge._native as n
        assert n.cpu is None
        assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], caught
        print([str(w.message) for w in caught][0])
        import torch, pymerge
        out = pymerge.weighted_sum([torch.ones(5), torch.ones(5)], [0.5, 2.0])  # eager torch still works
        assert torch.equal(out, torch.full((5,), 2.5))
        from pymerge.cli import main
        main(["doctor"])
    """, "pymerge._cpu", BROKEN)
    assert r.returncode == 0, r.stderr
    assert "C++ extension did not load (libfoo.so.3: cannot open shared object file)" in r.stdout
    assert "cpu extension    no   did not load: libfoo.so.3" in r.stdout
    assert "backend auto     yes  cpu -> torch" in r.stdout


@pytest.mark.parametrize("where", ["installed", "checkout"])
def test_a_cpu_extension_never_built_says_so(tmp_path, where):
    """Installed without a C++ compiler (setup.py goes on without the extension): "did not load: No module named
    'pymerge._cpu'" read as a broken install; the warning and doctor say it was not built, and what to do. Imported
    from the source checkout (`python -m pymerge` run there after `pip install .`), they say that instead: a
    reinstall, which they advised, changed nothing (an audit)."""
    root = ROOT
    if where == "installed":  # the package alone, as site-packages holds it (no setup.py or csrc/ beside it)
        root = str(tmp_path)
        shutil.copytree(os.path.join(ROOT, "pymerge"), tmp_path / "pymerge", ignore=shutil.ignore_patterns("*.so"))
    r = _python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pymerge._native as n
        assert n.cpu is None
        print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)][0])
        from pymerge.cli import main
        main(["doctor"])
    """, "pymerge._cpu", 'ModuleNotFoundError("no", name="pymerge._cpu")', root=root)
    assert r.returncode == 0, r.stderr
    if where == "installed":
        assert "C++ extension was not built (no C++17 compiler at install time?)" in r.stdout
        assert "cpu extension    no   not built (no C++17 compiler at install time?): ops use eager torch, slower; " \
               "install g++" in r.stdout
    else:
        why = f"not built in this source checkout ({ROOT}): run from outside it to use an installed pymerge"
        assert f"C++ extension was {why}" in r.stdout
        assert f"cpu extension    no   {why}" in r.stdout and "install g++" not in r.stdout


@pytest.mark.parametrize("exc, warns", [(BROKEN, True), ('ModuleNotFoundError("no", name="pymerge._cuda")', False)])
def test_cuda_extension_warns_only_when_built_but_broken(exc, warns):
    r = _python("""
        import pymerge._native as n
        assert n.cuda is None
        from pymerge.cli import main
        main(["doctor"])
    """, "pymerge._cuda", exc)
    assert r.returncode == 0, r.stderr
    assert ("CUDA extension did not load" in r.stderr) == warns, r.stderr
    assert ("did not load: libfoo.so.3" if warns else "not built (nvcc was not found or failed") in r.stdout


@pytest.mark.parametrize("value, warns", [("AVX2", True), ("sse", True), ("avx2", False), ("scalar", False),
                                          ("", False)])
def test_an_unknown_pymerge_simd_value_warns_in_one_line(value, warns):
    """PYMERGE_SIMD=AVX2 (or any typo) was ignored without a word and the default path ran (a docs bug hunt)."""
    r = subprocess.run([sys.executable, "-c", "import pymerge._native"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYMERGE_SIMD": value}, timeout=120)
    assert r.returncode == 0, r.stderr
    if not warns:
        assert "PYMERGE_SIMD" not in r.stderr, r.stderr
        return
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"PYMERGE_SIMD={value!r} is ignored" in lines[0], r.stderr
    assert "avx2 or scalar" in lines[0]


@pytest.mark.skipif(_native.cpu is None, reason="the C++ CPU extension is not built here")
@pytest.mark.parametrize("value", ["1", "3", "100000"])
def test_doctor_reports_the_thread_count_the_kernels_use(value):
    """OMP_NUM_THREADS above 4 per core: the kernels cap it there, doctor printed it uncapped ("up to 20 threads"
    on 2 cores, which ran 8: a docs audit)."""
    code = "from pymerge.cli import main; main(['doctor'])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": value}, timeout=120)
    assert r.returncode == 0, r.stderr
    expect = min(int(value), 4 * os.cpu_count())
    assert f"up to {expect} threads" in r.stdout, r.stdout
