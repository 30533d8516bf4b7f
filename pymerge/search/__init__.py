"""Merge-weight search: CMA-ES over a pool's weights (optimize), its report (Pareto front, history)
and the `pymerge search CONFIG.yml` command (cli)."""
from pymerge.search.optimize import SearchResult, optimize
from pymerge.search.report import macro_average, pareto_front


def cli_main(argv=None) -> int:
    """`pymerge search CONFIG.yml`: see pymerge/search/cli.py for the config's keys."""
    from pymerge.search.cli import main
    return main(argv)


__all__ = ["optimize", "SearchResult", "macro_average", "pareto_front", "cli_main"]
