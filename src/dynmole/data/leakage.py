"""The leak check: per task, how many evaluation items the training side already shows.

An evaluation item leaks when the training side holds a near-duplicate of it (the same option
set and prompt token-set Jaccard >= ``NEAR_DUPLICATE_JACCARD``, :func:`~dynmole.data.overlap.
near_duplicate_pairs`) or a prompt that contains its gold answer (an answer of at least
``CONTAINED_ANSWER_WORDS`` words, :func:`~dynmole.data.overlap.contained_answer_pairs`). Under
``LEAK_FREE_SPLIT`` both counts are 0 for every packaged task; :func:`leaked_eval_ids` lists the
items that leak under ``LEGACY_SPLIT``, the split of the committed ``cpu`` grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .example import Example
from .overlap import contained_answer_pairs, near_duplicate_pairs
from .split import LEAK_FREE_SPLIT, LEGACY_SPLIT, packaged_split
from .tasks import TASKS


@dataclass(frozen=True)
class TaskLeak:
    """One task's leak check: side sizes and the evaluation ids that leak, by relation."""

    task: str
    train: int
    eval: int
    near_duplicates: tuple[str, ...]
    """Evaluation ids with a near-duplicate on the training side."""
    contained_answers: tuple[str, ...]
    """Evaluation ids whose gold answer occurs in a training prompt."""

    @property
    def leaked(self) -> tuple[str, ...]:
        """Evaluation ids that leak by either relation, sorted."""
        return tuple(sorted(set(self.near_duplicates) | set(self.contained_answers)))


def eval_leaks(task: str, train: Sequence[Example], evaluation: Sequence[Example]) -> TaskLeak:
    """The leak check of one task's two sides (any source)."""
    both = list(train) + list(evaluation)
    n = len(train)
    near = {both[j].id for i, j in near_duplicate_pairs(both) if i < n <= j}
    contained = {evaluation[i].id for i, _ in contained_answer_pairs(evaluation, train)}
    return TaskLeak(task, len(train), len(evaluation), tuple(sorted(near)), tuple(sorted(contained)))


def leak_report(tasks: Iterable[str] = tuple(TASKS), eval_fraction: float = 0.5,
                version: int = LEAK_FREE_SPLIT) -> dict[str, TaskLeak]:
    """The leak check of each packaged task's sides under split ``version``."""
    return {task: eval_leaks(task, packaged_split(task, "train", eval_fraction, version),
                             packaged_split(task, "eval", eval_fraction, version))
            for task in tasks}


def leaked_eval_ids(task: str, eval_fraction: float = 0.5, version: int = LEGACY_SPLIT) -> tuple[str, ...]:
    """The evaluation ids of a packaged task that leak under split ``version`` (by default the
    committed grid's): drop these from its predictions to re-analyse it without the leak."""
    return leak_report((task,), eval_fraction, version)[task].leaked


def leak_table(report: dict[str, TaskLeak]) -> str:
    """The report as a markdown table: sides, and evaluation items that leak by each relation."""
    lines = ["| task | train | eval | eval with a near-duplicate in train | eval answer in a train prompt |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.task} | {r.train} | {r.eval} | {len(r.near_duplicates)} | {len(r.contained_answers)} |"
              for r in report.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dynmole.data.leakage [--split-version 1|2]``: print the leak table of every packaged
    task; exit 1 when any evaluation item leaks."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dynmole.data.leakage", description=main.__doc__)
    parser.add_argument("--split-version", type=int, choices=(LEGACY_SPLIT, LEAK_FREE_SPLIT), default=LEAK_FREE_SPLIT,
                        help="the split's grouping (default: %(default)s, the leak-free one)")
    parser.add_argument("--eval-fraction", type=float, default=0.5, help="share held out (default: %(default)s)")
    args = parser.parse_args(argv)
    report = leak_report(eval_fraction=args.eval_fraction, version=args.split_version)
    print(leak_table(report))
    leaked = sum(len(task.leaked) for task in report.values())
    print(f"split version {args.split_version}: {leaked} evaluation item(s) leak")
    return 1 if leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
