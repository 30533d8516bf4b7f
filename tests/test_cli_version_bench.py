"""`pymerge --version` (version and backends) and `pymerge bench` (installed, no checkout needed)."""
import json

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
    assert cli.main(["bench", "--elements", "4099", "--rounds", "1", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["device"] == "cpu" and [r["N"] for r in last["rows"]] == [2, 8, 16]
    assert all(r["pymerge GB/s"] > 0 and r["copy GB/s"] > 0 for r in last["rows"])
