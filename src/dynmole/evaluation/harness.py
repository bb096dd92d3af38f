"""lm-evaluation-harness on any adapter: the harness's own tasks, prompts and metrics.

lm-eval's ``HFLM`` takes an already-built model, so a :class:`dynmole.MoLEModel`, a PEFT
``PeftModel`` or a plain HF model is evaluated as it is (the documented route)::

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", "/path/to/my_task.yaml"])

:func:`evaluate_harness` does that and loads every task's data first, so a task whose data cannot
be read (offline, the harness's own tasks cannot download theirs) fails with one line naming it, at
once: with the hub unreachable the data is loaded in offline mode (the local cache only), as with
``HF_HUB_OFFLINE`` set, rather than after the hub client's five retries (23 s of waiting per task).
:func:`write_harness_task` writes dynmole examples as a harness task (a JSONL file and a task YAML)
that the harness scores exactly as ``dynmole eval`` does (cloze: same prompt, same continuations,
``acc_norm`` per character of the continuation with its leading space). Needs the ``harness``
extra: ``pip install 'dynmole[harness]'``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..data import Example
from ..errors import DynmoleError
from ..io import atomic_write

INSTALL_HINT = "pip install 'dynmole[harness]' (lm-eval)"
_METRICS = ("acc", "acc_norm")


class HarnessTaskError(DynmoleError):
    """A harness task that is unknown, or whose data could not be loaded."""


def _lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise DynmoleError(f"the lm-evaluation-harness is not installed: {INSTALL_HINT}") from None


def harness_lm(model: Any, tokenizer: Any, batch_size: int = 16) -> Any:
    """lm-eval's ``HFLM`` around an already-loaded causal LM (MoLE, PEFT or plain HF) and its tokenizer.

    The tokenizer's own special-token rule applies (Gemma's ``<bos>`` is added, as in ``dynmole eval``).
    """
    _lm_eval_version()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass
class HarnessTasks:
    """Loaded harness tasks: the task (or group) objects and the ``TaskManager`` that built them."""

    objects: list[Any]
    manager: Any


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether one request to the hub (``HF_ENDPOINT``) gets an answer within ``timeout`` seconds, through
    the hub client's own session (so its proxy settings apply) and without its retries."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - the HTTP client's connection errors come in many types; all mean the same
        return False
    return True


@contextlib.contextmanager
def _offline_unless_hub_reachable() -> Iterator[None]:
    """Offline mode (the local cache only) for the block when the hub cannot be reached.

    ``datasets`` would otherwise retry each request five times (1 + 2 + 4 + 8 + 8 s) before it falls
    back to the cache; offline mode goes to the cache at once, so data on this machine still loads
    and missing data fails at once. ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are read when the
    two libraries are imported, so the block sets the flags they read then, and restores them.
    """
    from datasets import config
    from huggingface_hub import constants

    if config.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    saved = config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _load_spec(manager: Any, spec: str) -> dict[str, Any]:
    """``manager.load(spec)``: its tasks, groups and group map, the data loaded; a failure as one line."""
    if _is_yaml(spec) and not Path(spec).is_file():
        raise HarnessTaskError(f"harness task file {spec} not found")
    try:
        return manager.load(str(Path(spec).resolve()) if _is_yaml(spec) else spec)
    except KeyError:
        raise HarnessTaskError(
            f"unknown harness task {spec!r}: not a task, group or tag of lm-eval {_lm_eval_version()}, "
            "nor a task YAML file (list them with `lm-eval ls tasks`)") from None
    except Exception as err:  # noqa: BLE001 - datasets/hub errors come in many types; all mean the same here
        raise HarnessTaskError(
            f"harness task {spec!r}: its data could not be loaded ({_first_line(err)}); offline, only tasks "
            "whose data is on this machine run, e.g. a task YAML pointing at a local file "
            "(docs/data.md#lm-evaluation-harness)") from None


def load_harness_tasks(specs: Sequence[str]) -> HarnessTasks:
    """The harness's tasks (or groups) for ``specs``, each a task, group or tag name of lm-eval, or
    the path of a task YAML file; their data is loaded here. The harness's own task index (a
    few thousand YAML files, seconds to build) is only read when a spec is a name.

    Raises:
        HarnessTaskError: one line naming the task that is unknown or whose data could not be loaded.
    """
    _lm_eval_version()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=not all(map(_is_yaml, specs)))
    with _offline_unless_hub_reachable():  # one look at the hub for all the tasks
        loaded_specs = [_load_spec(manager, spec) for spec in specs]
    objects: list[Any] = []
    for loaded in loaded_specs:
        children = {name for names in loaded["group_map"].values() for name in names}
        grouped = {task.task_name for group in loaded["groups"].values() for task in group.get_all_tasks()}
        objects += [group for name, group in loaded["groups"].items() if name not in children]
        objects += [task for name, task in loaded["tasks"].items() if name not in grouped]
    return HarnessTasks(objects, manager)


def evaluate_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | HarnessTasks,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` with ``lm_eval.simple_evaluate``: task names or task
    YAML paths, or what :func:`load_harness_tasks` returned for them (to fail on missing data before
    the model is loaded).

    ``limit`` keeps each task's first ``limit`` documents (the harness's own ``--limit``).
    Returns ``{"tasks": {task: {metric: value, ..., "n": documents}}, "lm_eval": version,
    "limit": limit}``: each task's metrics as the harness reports them (``acc``, ``acc_norm``,
    their ``_stderr``, ...), without the harness's filter suffix (``",none"``).
    """
    import lm_eval

    loaded = tasks if isinstance(tasks, HarnessTasks) else load_harness_tasks(tasks)
    output = lm_eval.simple_evaluate(model=harness_lm(model, tokenizer, batch_size), tasks=loaded.objects,
                                     task_manager=loaded.manager, limit=limit)
    results: dict[str, dict[str, Any]] = {}
    for task, values in output["results"].items():
        metrics = {key.split(",")[0]: value for key, value in values.items() if "," in key}
        count = output.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {**metrics, **({"n": count} if count is not None else {})}
    return {"tasks": results, "lm_eval": _lm_eval_version(), "limit": limit}


def harness_table(results: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_harness`'s ``acc`` and ``acc_norm`` in percent (``-``
    where a task has no such metric: e.g. the harness's WinoGrande and BoolQ report ``acc`` only)."""
    lines = ["| task | acc (%) | acc_norm (%) | n |", "|---|---:|---:|---:|"]
    for task, metrics in results["tasks"].items():
        cells = [f"{100 * metrics[m]:.1f}" if isinstance(metrics.get(m), float) else "-" for m in _METRICS]
        lines.append(f"| {task} | {' | '.join(cells)} | {metrics.get('n', '-')} |")
    return "\n".join(lines) + "\n"


def write_harness_task(examples: Sequence[Example], directory: str | Path, name: str) -> Path:
    """Write ``examples`` as the harness task ``name``: ``<name>.jsonl`` (rows in the schema of
    dynmole's local files, so ``--source`` reads it too) and ``<name>.yaml``; returns the YAML's path.

    The task scores what ``dynmole eval`` (cloze) scores: the prompt as context, each choice (with
    its leading space) as continuation (``target_delimiter: ""``), so the harness's ``acc_norm``
    (log-likelihood per character of the choice) divides by the same length as ours.
    """
    import yaml

    directory = Path(directory).resolve()
    data = directory / f"{name}.jsonl"
    rows = [json.dumps({"id": e.id, "task": e.task, "prompt": e.prompt, "choices": list(e.choices), "label": e.label,
                        **({"options": list(e.options)} if e.options else {})}) for e in examples]
    atomic_write(data, lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in _METRICS],
    }
    path = directory / f"{name}.yaml"
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))
    return path
