"""mergekit-yaml's entry point in a subprocess, for the parity tests."""
import subprocess
import sys
import tempfile

# Outside the checkout: `python -c` puts the working folder first on sys.path, and the checkout's kernels/
# (installed as pymerge.kernels) then shadows Hugging Face's `kernels` package, which transformers >= 5.25
# requires and imports (`cannot import name 'CUDAProperties' from 'kernels'`).
# An empty folder of its own, not the temp folder itself, whose strays (a kernels/ of someone's) would shadow.


def run_mergekit_driver(driver: str, args, *, env=None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs `python -c driver args...` (a driver calling mergekit.scripts.run_yaml.main) outside the checkout."""
    with tempfile.TemporaryDirectory(prefix="mergekit-cwd-") as outside:
        return subprocess.run([sys.executable, "-c", driver, *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=outside)
