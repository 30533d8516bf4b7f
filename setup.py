"""Build pymerge's native code with pybind11 alone (no libtorch, no torch at build time).

- pymerge._cpu  : every csrc/cpu/*.cpp, C++17 with its own thread pool; SIMD paths chosen at run time.
- pymerge._cuda : every csrc/cuda/*.cu compiled by nvcc (when found) and linked against the
                  static CUDA runtime, so it imports on machines without a GPU.
Set PYMERGE_NO_CUDA=1 to skip the CUDA extension, PYMERGE_CUDA_ARCHS="90;80" to pick archs. An nvcc that
fails skips it with a warning (PYMERGE_REQUIRE_CUDA=1: an error).
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.install_lib import install_lib
from setuptools.errors import CCompilerError

HERE = os.path.dirname(os.path.abspath(__file__))
ParallelCompile("PYMERGE_BUILD_JOBS", default=0).install()  # C++ files compile in parallel (all cores)


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def find_nvcc():
    if os.environ.get("PYMERGE_NO_CUDA") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home_of(nvcc):
    """The toolkit root, as nvcc itself reports it (nvcc may be a wrapper script on PATH)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    for line in out.splitlines():
        if "TOP=" in line:
            return os.path.normpath(line.split("TOP=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc, everything else with the usual compiler."""

    def copy_file(self, src, dst, *args, **kwargs):
        # Replace built libraries atomically: overwriting a loaded .so in place crashes the
        # processes that have it mapped (a test run beside a rebuild, say).
        if not str(dst).endswith((".so", ".pyd")):
            return super().copy_file(src, dst, *args, **kwargs)
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return dst, True

    def run(self):
        # setuptools clears inplace while it builds (then copies the libraries into the source tree): kept here
        self.in_place = self.inplace
        return super().run()

    def build_extensions(self):
        """The CPU extension, then the CUDA one, which may fail without failing the install: an nvcc or a toolkit
        that cannot build it (too old for compute_90, a host gcc it refuses, no static runtime to link) stopped
        the whole install, the CPU build with it. pymerge installs without it instead, with a warning
        (pip shows it with -v; PYMERGE_REQUIRE_CUDA=1 keeps the error)."""
        cuda = [e for e in self.extensions if any(s.endswith(".cu") for s in e.sources)]
        self.extensions = [e for e in self.extensions if e not in cuda]  # what the in-place copy and outputs list
        missing = self._missing_compiler()
        if missing is not None:
            # no C++ compiler: pip failed outright, where pymerge runs on torch alone (slower; compressed pools
            # need the extension). Only a missing compiler: a compile error in csrc/ stays an error (it would
            # leave an older in-place build to be tested).
            if os.environ.get("PYMERGE_REQUIRE_CPU") == "1":
                raise CCompilerError(f"pymerge: no C++ compiler ({missing} is not found) and PYMERGE_REQUIRE_CPU=1")
            print(f"pymerge: warning: the C++ extension is not built ({missing} is not found); pymerge installs "
                  "without it and its CPU ops run as eager torch, several times slower (compressed pools need it). "
                  "Install a C++17 compiler (g++ or clang++) and reinstall for it; PYMERGE_REQUIRE_CPU=1 makes this "
                  "an error", file=sys.stderr)
            self.extensions = []
            return  # (the CUDA extension links with the same compiler)
        super().build_extensions()
        for ext in cuda:
            try:
                self._compile_cuda(ext)
                self.build_extension(ext)
            except (subprocess.CalledProcessError, OSError, CCompilerError) as exc:
                if os.environ.get("PYMERGE_REQUIRE_CUDA") == "1":
                    raise
                why = f"nvcc exited with {exc.returncode}: its error is above" \
                    if isinstance(exc, subprocess.CalledProcessError) else f"{type(exc).__name__}: {exc}"
                print(f"pymerge: warning: the CUDA extension is not built ({why}); pymerge installs with its CPU "
                      "extension (and Triton on GPUs). Fix the CUDA toolkit and reinstall for it, PYMERGE_NO_CUDA=1 "
                      "skips it, PYMERGE_REQUIRE_CUDA=1 makes this an error", file=sys.stderr)
                continue
            self.extensions.append(ext)

    def _missing_compiler(self):
        """The first program of the C++ compile and link commands that is not on PATH, or None."""
        for cmd in (getattr(self.compiler, "compiler_so", None), getattr(self.compiler, "compiler_cxx", None),
                    getattr(self.compiler, "linker_so", None)):
            if cmd and shutil.which(cmd[0]) is None:
                return cmd[0]
        return None

    def build_extension(self, ext):
        if self._reuse_in_place_build(ext):
            return None
        lib = self.get_ext_fullpath(ext.name)
        before = os.path.getmtime(lib) if os.path.exists(lib) else None
        built = super().build_extension(ext)
        if ext.name == "pymerge._cpu" and os.path.exists(lib):
            self._stamp(ext, lib, compiled=os.path.getmtime(lib) != before)
        return built

    def _compile_cuda(self, ext) -> None:
        """nvcc compiles ext's .cu sources to objects, which the usual link (build_extension) then takes."""
        cu = [s for s in ext.sources if s.endswith(".cu")]
        nvcc = find_nvcc()
        cuda_home = cuda_home_of(nvcc)
        archs = os.environ.get("PYMERGE_CUDA_ARCHS", "90;80").split(";")
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        obj_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(obj_dir, exist_ok=True)
        objects = []
        for src in cu:
            obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "-Icsrc", *gencode]
            print(" ".join(cmd))
            subprocess.check_call(cmd, cwd=HERE)
            objects.append(obj)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = objects
        ext.depends = list(ext.depends) + objects  # relink when only a .cu file changed
        target = os.path.join("targets", f"{os.uname().machine}-linux")
        for incdir in ("include", os.path.join(target, "include")):
            if os.path.isdir(os.path.join(cuda_home, incdir)):
                ext.include_dirs.append(os.path.join(cuda_home, incdir))
        for libdir in ("lib64", "lib", os.path.join(target, "lib")):
            if os.path.isdir(os.path.join(cuda_home, libdir)):
                ext.library_dirs.append(os.path.join(cuda_home, libdir))
        ext.libraries += ["cudart_static", "rt", "pthread", "dl"]

    def _stamp(self, ext, lib: str, compiled: bool) -> None:
        """What made the library (see _reuse_in_place_build): written beside it where it was compiled now (a
        build skipped as up to date keeps the settings of its time), and beside the in-place copy with it."""
        if compiled:
            with open(lib + ".build", "w") as fh:
                fh.write(self._build_settings(ext))
        if self.in_place:  # the library setuptools copies in place next: its stamp, or none
            if os.path.exists(lib + ".build"):
                shutil.copyfile(lib + ".build", self._stamp_path(ext))
            elif os.path.exists(self._stamp_path(ext)):
                os.remove(self._stamp_path(ext))

    def _in_place_path(self, ext) -> str:
        return os.path.join(HERE, *ext.name.split(".")[:-1], os.path.basename(self.get_ext_filename(ext.name)))

    def _stamp_path(self, ext) -> str:
        return self._in_place_path(ext) + ".build"

    def _build_settings(self, ext) -> str:
        """What decides the library besides its sources: the compiler commands (CC, CFLAGS... folded in), the
        flag variables themselves, pybind11 and the interpreter."""
        import pybind11
        c = self.compiler
        env = {k: os.environ.get(k) for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED",
                                              "ARCHFLAGS")}
        return repr([getattr(c, "compiler_so", None), getattr(c, "compiler_cxx", None), getattr(c, "linker_so", None),
                     sorted(env.items()), ext.extra_compile_args, ext.extra_link_args, pybind11.__version__,
                     sys.version])

    def _reuse_in_place_build(self, ext) -> bool:
        """A wheel built from a checkout whose CPU extension is built in place (`make install`'s editable
        build) takes that library where it is newer than every native source, setup.py and pyproject.toml
        and was made with the same compiler, flags and pybind11 (the stamp the in-place build wrote beside
        it): compiling it again cost the wheel build two minutes. An sdist's build never has one;
        PYMERGE_REBUILD=1 compiles anyway."""
        if self.in_place or ext.name != "pymerge._cpu" or os.environ.get("PYMERGE_REBUILD") == "1":
            return False
        built, stamp = self._in_place_path(ext), self._stamp_path(ext)
        inputs = [os.path.join(HERE, p) for p in list(ext.sources) + list(ext.depends)]  # .cpp files and headers
        inputs += [os.path.join(HERE, "setup.py"), os.path.join(HERE, "pyproject.toml")]
        if not os.path.exists(built) or not os.path.exists(stamp) \
                or any(os.path.getmtime(p) >= os.path.getmtime(built) for p in inputs):
            return False
        with open(stamp) as fh:
            if fh.read() != self._build_settings(ext):
                return False
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.copy_file(built, dest)
        shutil.copyfile(stamp, dest + ".build")  # an in-place build skipped later as up to date copies it back
        print(f"reusing the in-place build {os.path.relpath(built, HERE)} (newer than its sources)")
        return True


class InstallLib(install_lib):
    """Installs (into a wheel too) what build_lib holds but the libraries' build stamps: they record the build's
    compiler commands for in-place rebuilds, and are no part of the package (they were in every wheel)."""

    def run(self):
        super().run()
        for stamp in glob.glob(os.path.join(self.install_dir, "pymerge", "*.so.build")):
            os.remove(stamp)

    def get_outputs(self):
        return [p for p in super().get_outputs() if not p.endswith(".so.build")]


# Headers as dependencies: setuptools rebuilds a library only where an input is newer, and a wheel built beside an
# earlier build shipped the old library after a header-only change (an audit).
HEADERS = _rel(glob.glob(os.path.join(HERE, "csrc", "**", "*.h"), recursive=True))
cpu_ext = Pybind11Extension(
    "pymerge._cpu",
    _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
    depends=HEADERS,
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-pthread", "-fno-math-errno", "-ffp-contract=off", "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread"],
)
ext_modules = [cpu_ext]
cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
if cuda_sources and find_nvcc() and sys.platform.startswith("linux"):
    ext_modules.append(Pybind11Extension(
        "pymerge._cuda",
        _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
             + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))),
        depends=HEADERS + _rel(glob.glob(os.path.join(HERE, "csrc", "**", "*.cuh"), recursive=True)),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    ))

setup(
    packages=find_packages(include=["pymerge", "pymerge.*"]) + ["pymerge.kernels"],  # every subpackage, and kernels/
    package_dir={"pymerge.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt, "install_lib": InstallLib},
    zip_safe=False,
)
