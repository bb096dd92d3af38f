"""``dynmole reproduce`` as documented earlier: ``python -m dynmole.reproduce`` and
``from dynmole import reproduce``. The command lives in :mod:`dynmole.experiments.reproduce`
(its grid in :mod:`dynmole.experiments.grid`); this module only re-exports it."""

import sys

from ._console import quiet_third_party
from .experiments.reproduce import Inputs, RunSpec, build_parser, main, plan, run_all, run_one

__all__ = ["Inputs", "RunSpec", "build_parser", "main", "plan", "run_all", "run_one"]

if __name__ == "__main__":
    quiet_third_party()
    sys.exit(main())
