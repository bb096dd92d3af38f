"""``python -m dynmole.analysis DIR``: print the paired tests of a finished ``dynmole reproduce``
grid from its committed files (``DIR/runs/**/result.json`` and ``predictions.json``), the same
markdown as the "Paired tests" section of ``DIR/results.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..training.runs import RESULT_NAME
from .report import paired_tests_markdown
from .runs import RunRecord, group_by_variant


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynmole.analysis", description=__doc__)
    parser.add_argument("directory", type=Path, help="the grid's output folder (the one holding runs/)")
    args = parser.parse_args(argv)
    paths = sorted((args.directory / "runs").glob(f"**/{RESULT_NAME}"))
    if not paths:
        parser.error(f"no {RESULT_NAME} under {args.directory / 'runs'}")
    markdown = paired_tests_markdown(group_by_variant(RunRecord.read(p.parent) for p in paths))
    print(markdown or "no claim has both variants with predictions.json: nothing to test")
    return 0 if markdown else 1


if __name__ == "__main__":
    sys.exit(main())
