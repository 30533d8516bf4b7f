"""`python -m pymerge ...`: the same as the `pymerge` command."""
import sys

from pymerge.cli import main

sys.exit(main())
