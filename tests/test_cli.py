import json
import subprocess
import sys

import pytest
import torch

from dynmole import cli


@pytest.mark.parametrize("command", ["demo", "run", "train", "eval", "generate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: dynmole {command}" in out
    if command in ("demo", "run", "train"):
        for option in ("--method", "--num-experts", "--threshold", "--keep-top-k", "--lr", "--resume"):
            assert option in out


def test_console_entry_point_and_module():
    out = subprocess.run([sys.executable, "-m", "dynmole", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "bench" in out.stdout


def test_bad_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--no-such-option", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "moe"], "unknown method 'moe'; choose one of lora, dora"),
        (["train", "--tasks", "arc_x"], "unknown task 'arc_x'"),
        (["train", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["train", "--keep-top-k", "9"], "keep_top_k must be in"),
        (["train", "--precision", "fp8"], None),
    ],
)
def test_bad_values(argv, message):
    if message is None:  # precision is checked when training starts, not when parsing
        cli.job_configs(argv)
        return
    with pytest.raises(SystemExit, match=message):
        cli.job_configs(argv)


def test_config_file_equals_command_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: mola\ntop_k: 2\nnum_experts: 2-4-6-8\ntasks: [arc_e, boolq]\nlr: 0.001\n")
    from_file = cli.job_configs(["train", "--config", str(yaml_file)])
    from_flags = cli.job_configs(
        ["train", "--method", "mola", "--top-k", "2", "--num-experts", "2-4-6-8", "--tasks", "arc_e,boolq", "--lr", "0.001"]
    )
    assert from_file == from_flags
    job, train, mole = from_file
    assert mole.method == "mola" and mole.num_experts == "2-4-6-8" and job.tasks == ["arc_e", "boolq"]
    # the command line overrides the file
    _, train2, _ = cli.job_configs(["train", "--config", str(yaml_file), "--lr", "0.5"])
    assert train2.lr == 0.5
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(SystemExit, match="unknown option"):
        cli.job_configs(["train", "--config", str(json_file)])


def test_peft_method_keeps_mole_defaults():
    job, _, mole = cli.job_configs(["train", "--method", "lora", "--r", "80"])
    assert job.method == "lora" and mole.r == 80


def test_demo_defaults_are_bounded():
    job, train, _ = cli.job_configs(["demo"])
    assert train.max_steps > 0 and job.train_limit and job.eval_limit


@pytest.fixture
def toy_model_and_data(tiny_llama, tiny_tokenizer, tmp_path):
    """A saved tiny model folder and a 4-row local data file of task `toy`."""
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    rows = [{"id": f"q{i}", "prompt": "question : the sky is ? answer :", "choices": [" blue", " red"], "label": 0,
             "task": "toy"} for i in range(4)]
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder, data


def test_train_seed_fixes_the_adapter_initialisation(toy_model_and_data, tmp_path):
    from safetensors.torch import load_file

    folder, data = toy_model_and_data
    adapters = []
    for run in ("a", "b"):  # in one process: the first run leaves the global RNG elsewhere
        out = tmp_path / run
        cli.main(["train", "--model", str(folder), "--source", str(data), "--tasks", "toy", "--method", "dynmole",
                  "--r", "2", "--num-experts", "2", "--max-steps", "1", "--batch-size", "2", "--lr", "0",
                  "--warmup-ratio", "0", "--seed", "1", "--report-to", "none", "--output-dir", str(out)])
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][key]), key


def test_train_routing_probe_reads_held_out_examples(toy_model_and_data, tmp_path):
    folder, data = toy_model_and_data
    out = tmp_path / "run"
    cli.main(["train", "--model", str(folder), "--source", str(data), "--tasks", "toy", "--method", "mola",
              "--r", "2", "--num-experts", "2", "--top-k", "1", "--max-steps", "2", "--batch-size", "2",
              "--routing-probe-steps", "1", "--routing-probe-size", "3", "--router-lr-scale", "10",
              "--report-to", "none", "--output-dir", str(out)])
    probes = [json.loads(line) for line in (out / "routing_probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [0, 1, 2]
    assert all(p["probe_experts"] == 1.0 for p in probes)  # top-1
