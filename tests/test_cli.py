import json
import subprocess
import sys

import pytest
import torch

import dynmole
from dynmole import cli
from dynmole.adapters import is_peft_adapter
from dynmole.errors import DynmoleError
from dynmole.experiments import commands
from dynmole.model import find_mole, get_mole_model


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
        (["train", "--precision", "fp8"], "precision must be auto, fp32, bf16 or fp16, got 'fp8'"),
        (["train", "--alpha", "0"], r"alpha must be > 0"),
        (["train", "--epochs", "0"], r"epochs must be > 0 \(or set max_steps\), got 0"),
        (["train", "--max-steps", "0"], r"max_steps must be >= 1, or -1"),
        (["train", "--router-lr-scale", "0"], r"router_lr_scale must be > 0"),
        (["train", "--routing-probe-steps", "-1"], r"routing_probe_steps must be >= 0"),
        (["run", "--eval-limit", "0"], r"eval_limit must be >= 1"),
        (["run", "--eval-source", "packaged"], r"eval_source must be a local .json or .jsonl file"),
    ],
)
def test_bad_values(argv, message):
    with pytest.raises(DynmoleError, match=message):
        cli.job_configs(argv)


def test_config_file_equals_command_line(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: mola\ntop_k: 2\nnum_experts: 2-4-6-8\ntasks: [arc_e, boolq]\nlr: 0.001\n")
    from_file = cli.job_configs(["train", "--config", str(yaml_file)])
    from_flags = cli.job_configs(
        ["train", "--method", "mola", "--top-k", "2", "--num-experts", "2-4-6-8", "--tasks", "arc_e,boolq",
         "--lr", "0.001"]
    )
    assert from_file == from_flags
    job, train, mole = from_file
    assert mole.method == "mola" and mole.num_experts == "2-4-6-8" and job.tasks == ["arc_e", "boolq"]
    # the command line overrides the file
    _, train2, _ = cli.job_configs(["train", "--config", str(yaml_file), "--lr", "0.5"])
    assert train2.lr == 0.5
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(DynmoleError, match="unknown option"):
        cli.job_configs(["train", "--config", str(json_file)])


def _from_file(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return cli.job_configs(["train", "--config", str(path)])


def test_config_file_values_follow_the_command_line_rules(tmp_path):
    job, train, mole = _from_file(tmp_path, "lr: 1e-3\nnum_experts: 4\nsoft_routing: false\ntrain_limit: null\n")
    assert train.lr == 1e-3 and mole.num_experts == 4 and mole.soft_routing is False  # PyYAML reads 1e-3 as a str
    assert job.train_limit is None
    for text, message in [
        ('{"trust_remote_code": "false"}', r"trust_remote_code must be true or false .*got 'false'"),
        ('{"soft_routing": "false"}', r"soft_routing must be true or false"),
        ('{"lr": "fast"}', r"run.json: lr must be a number, got 'fast'"),
        ('{"max_steps": 2.5}', r"max_steps must be an integer, got 2.5"),
        ('{"r": null}', r"r must be an integer, got None"),
        ('{"tasks": [1, 2]}', r"tasks must be a list of names"),
    ]:
        with pytest.raises(DynmoleError, match=message):
            _from_file(tmp_path, text, "run.json")


def test_peft_method_keeps_mole_defaults():
    job, _, mole = cli.job_configs(["train", "--method", "lora", "--r", "80"])
    assert job.method == "lora" and mole.r == 80


def test_demo_defaults_are_bounded():
    job, train, _ = cli.job_configs(["demo"])
    assert train.max_steps > 0 and job.train_limit and job.eval_limit
    # where the routers learn in 60 steps, probed before and after, on the leak-free split (issue 28)
    assert train.router_lr_scale == 10 and train.routing_probe_steps == train.max_steps and job.split_version == 2


@pytest.fixture
def toy_model_and_data(tiny_llama, tiny_tokenizer, tmp_path):
    """A saved tiny model folder and a 4-row local data file of task `toy`."""
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    facts = [("the sky is", " blue"), ("fire is", " hot"), ("ice is", " cold"), ("water is", " wet")]
    rows = [{"id": f"q{i}", "prompt": f"question : {prompt} ? answer :", "choices": [answer, " red"], "label": 0,
             "task": "toy"} for i, (prompt, answer) in enumerate(facts)]  # distinct rows: split q0, q3 | q1, q2
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


def test_local_source_is_split_unless_eval_source_is_given(toy_model_and_data, tmp_path, capsys):
    folder, data = toy_model_and_data
    out = tmp_path / "eval.json"
    base = ["eval", "--model", str(folder), "--source", str(data), "--tasks", "toy", "--output", str(out)]
    cli.main(base)
    assert "toy.jsonl is split by sha256(id): 0.5 of it held out for evaluation" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert "sha256(id) bucket < 0.5" in saved["metadata"]["splits"][0]
    (result,) = saved["results"].values()
    job = cli.job_configs(["train", "--source", str(data), "--tasks", "toy"])[0]
    trained = {e.id for e in job.train_examples(seed=0)}
    held_out = {e.id for e in job.eval_examples(None)["toy"]}
    assert result["tasks"]["toy"]["n"] == len(held_out) < 4  # not the 4 rows trained on
    assert trained and held_out and not trained & held_out and len(trained | held_out) == 4
    cli.main([*base, "--eval-source", str(data)])
    assert f"evaluating on all of {data} (eval_source)" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"].values()
    assert result["tasks"]["toy"]["n"] == 4


def test_adapter_kind_comes_from_the_parsed_config(tiny_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "peft_type_model"  # a base-model path holding the text "peft_type"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, _ = commands.load_for_inference(str(folder), None, False)
    adapter = tmp_path / "adapter"
    get_mole_model(model, dynmole.MoLEConfig(r=2, num_experts=2)).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "peft_type" in config["base_model_name_or_path"]
    assert find_mole(commands.load_for_inference(str(folder), str(adapter), False)[0]) is not None
    assert not is_peft_adapter(adapter)  # ours, whatever PEFT fields it carries
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = tmp_path / "lora"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(lora)
    assert is_peft_adapter(lora)
    loaded = commands.load_for_inference(str(folder), str(lora), False)[0]
    assert isinstance(loaded, PeftModel) and find_mole(loaded) is None


# Third-party lines that said nothing to a user (dynmole._console and the fixes its docstring names).
NOISE = ("Setting accelerator to CPU", "is_gradient_checkpointing", "FutureWarning", "Loading weights",
         "`pretrained` model kwarg", "Passed an already-initialized model")


def test_console_shows_no_third_party_noise(toy_model_and_data, tmp_path):
    from dynmole.data import load_examples
    from dynmole.evaluation.harness import write_harness_task

    folder, data = toy_model_and_data
    task = write_harness_task(load_examples("toy", "eval", source=str(data)), tmp_path, "toy_task")
    adapter = tmp_path / "run" / "adapter"
    commands = {  # a training (model load, adapter, HF Trainer) and a harness eval of its adapter (lm-eval)
        "trained 1 steps": ["train", "--model", str(folder), "--source", str(data), "--tasks", "toy", "--r", "2",
                            "--num-experts", "2", "--max-steps", "1", "--batch-size", "2", "--report-to", "none",
                            "--output-dir", str(tmp_path / "run")],
        "| toy_task |": ["eval", "--model", str(folder), "--adapter", str(adapter), "--harness", str(task),
                         "--eval-batch-size", "4"],
    }
    for own_line, argv in commands.items():
        result = subprocess.run([sys.executable, "-m", "dynmole", *argv], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert own_line in result.stdout
        console = result.stdout + result.stderr  # DeepSpeed's logger writes to stdout
        assert not [noise for noise in NOISE if noise in console], console


def test_deepspeed_accelerator_line_kept_when_deepspeed_is_asked_for(monkeypatch):
    import logging

    from dynmole._console import quiet_third_party

    logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(logger, "filters", [])
    record = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 0, "Setting accelerator to CPU. If ...",
                               None, None)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as `accelerate launch` with a DeepSpeed config
    quiet_third_party()
    assert logger.filter(record)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    quiet_third_party()
    quiet_third_party()  # again: one filter
    assert not logger.filter(record) and len(logger.filters) == 1
    assert logger.filter(logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 0, "ZeRO stage 2", None, None))
