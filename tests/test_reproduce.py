import json
import re

import pytest
import torch

from dynmole.data import Example
from dynmole.experiments import grid, reproduce
from dynmole.experiments.profiles import PROFILES, VARIANTS

FACTS = [("the sky is", " blue", " red"), ("fire is", " hot", " cold"), ("ice is", " cold", " hot"),
         ("water is", " wet", " dry")]


def _examples(task, n):
    out = []
    for i in range(n):
        prompt, right, wrong = FACTS[i % len(FACTS)]
        label = i % 2
        choices = (right, wrong) if label == 0 else (wrong, right)
        out.append(Example(f"{task}/{i}", task, f"question : {prompt} ? answer :", choices, label))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads can
    make each step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_inputs(tiny_llama, tiny_tokenizer):
    train = _examples("arc_e", 8) + _examples("boolq", 8)
    return reproduce.Inputs(
        load_model=lambda: (tiny_llama(seed=0, layers=4), tiny_tokenizer),  # 4 layers: mola-2468 has 4 groups
        train_examples=lambda seed: train[seed % 2:] + train[: seed % 2],
        eval_examples={"arc_e": _examples("arc_e", 6), "boolq": _examples("boolq", 6)},
        description="tiny random Llama, toy examples",
    )


def _table(markdown, heading):
    """Rows of the first markdown table under ``heading`` as {first cell: cells}, plus the header."""
    block = next(b for b in markdown.split(heading, 1)[1].split("\n\n") if b.startswith("|"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if line.startswith("|")]
    return rows[0], {row[0]: row[1:] for row in rows[2:]}


def test_grid_writes_runs_table_plots_and_resumes(tmp_path, toy_inputs, capsys):
    argv = ["--profile", "tiny", "--methods", "lora,dynmole,mola-2468", "--seeds", "0,1",
            "--output-dir", str(tmp_path)]
    assert reproduce.main(argv, inputs=toy_inputs) == 0

    results = sorted(tmp_path.glob("runs/*/seed*/result.json"))
    assert [p.relative_to(tmp_path / "runs").as_posix() for p in results] == [
        f"{key}/seed{seed}/result.json" for key in ("dynmole", "lora", "mola-2468") for seed in (0, 1)]
    assert (tmp_path / "runs/base/result.json").is_file()
    dynmole = json.loads((tmp_path / "runs/dynmole/seed1/result.json").read_text())
    assert dynmole["seed"] == 1 and dynmole["adapter"]["method"] == "dynmole"
    assert set(dynmole["eval"]["tasks"]) == {"arc_e", "boolq"} and dynmole["routing"]
    assert not (tmp_path / "runs/dynmole/seed1/adapter").exists()  # deleted unless --keep-adapters
    assert (tmp_path / "runs/dynmole/seed1/log.jsonl").is_file()

    markdown = (tmp_path / "results.md").read_text()
    for metric in ("acc_norm", "acc"):
        header, rows = _table(markdown, f"## {metric} (%, cloze: ")
        assert header == ["method", "arc_e", "boolq", "average", "trainable params", "experts / token", "seeds"]
        assert list(rows) == ["Base (zero-shot)", "LoRA", "DynMoLE", "MoLA (2-4-6-8)"]
        for name, cells in rows.items():
            seeded = name != "Base (zero-shot)"
            for cell in cells[:3]:
                assert re.fullmatch(r"\d+\.\d ± \d+\.\d" if seeded else r"\d+\.\d", cell), (name, cell)
            assert re.fullmatch(r"[\d.]+[KM]?", cells[3])
            assert cells[-1] == ("2" if seeded else "1")
        assert rows["LoRA"][4] == "-" and re.fullmatch(r"\d\.\d\d ± \d\.\d\d", rows["DynMoLE"][4])
    for name in ("training_loss", "experts_by_layer", "soft_fraction_by_layer", "entropy_by_layer", "expert_load",
                 "entropy_training"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # Resume: finished runs are skipped, a run without result.json runs again.
    finished = {p: p.stat().st_mtime_ns for p in results}
    (tmp_path / "runs/lora/seed1/result.json").unlink()
    capsys.readouterr()
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 6 and "LoRA, seed 1: running" in out
    assert "WARNING" not in out
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime or path.parent.name == "seed1" and "lora" in str(path)

    # A finished run planned with other settings is kept, with a warning naming them.
    capsys.readouterr()
    assert reproduce.main([*argv, "--methods", "dynmole", "--set", "lr=0.5"], inputs=toy_inputs) == 0
    assert "it ran with other train.lr" in capsys.readouterr().out


def test_grid_keeps_predictions_and_tests_the_claims(tmp_path, toy_inputs, capsys):
    from dynmole.analysis.__main__ import main as analysis_main

    argv = ["--profile", "tiny", "--methods", "lora,dynmole", "--seeds", "0,1", "--output-dir", str(tmp_path)]
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    out = capsys.readouterr().out

    correct = {}  # (variant key, seed) -> task -> 0/1 per example, from predictions.json
    trained = [tmp_path / f"runs/{k}/seed{s}" for k in ("lora", "dynmole") for s in (0, 1)]
    for folder in [tmp_path / "runs/base"] + trained:
        predictions = json.loads((folder / "predictions.json").read_text())
        result = json.loads((folder / "result.json").read_text())
        assert "predictions" not in result["eval"] and list(predictions) == ["arc_e", "boolq"]
        for task, lists in predictions.items():
            examples = toy_inputs.eval_examples[task]
            assert list(lists) == ["id", "label", "acc", "acc_norm"]
            assert lists["id"] == [e.id for e in examples] and lists["label"] == [e.label for e in examples]
            for metric in ("acc", "acc_norm"):
                hits = [int(p == y) for p, y in zip(lists[metric], lists["label"])]
                assert sum(hits) / len(hits) == pytest.approx(result["eval"]["tasks"][task][metric])
                correct[folder.parent.name, folder.name, task, metric] = hits

    markdown = (tmp_path / "results.md").read_text()
    header, rows = _table(markdown, "### 95 % intervals: acc_norm")
    assert header == ["method", "arc_e", "boolq", "average", "seeds", "examples"]
    assert list(rows) == ["Base (zero-shot)", "LoRA", "DynMoLE"]
    for cells in rows.values():
        for cell in cells[:3]:
            mid, low, high = (float(x) for x in re.fullmatch(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]", cell).groups())
            assert low <= mid <= high
    assert rows["LoRA"][3:] == ["2", "12"]

    section, verdicts = markdown.split("## Paired tests", 1)[1].split("### Verdict per claim")
    claims = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
              if line.startswith("| DynMoLE beats LoRA")]
    assert [row[3] for row in claims] == ["acc_norm", "acc"]
    assert len([line for line in verdicts.splitlines()
                if line.startswith("| DynMoLE beats LoRA | DynMoLE | LoRA |")]) == 1
    for row in claims:
        metric = row[3]
        assert row[1:3] == ["DynMoLE", "LoRA"] and row[4:6] == ["2 / 2", "12"]
        # Difference of the task-averaged accuracy, each example's correctness averaged over the two seeds.
        expected = sum(
            sum(correct["dynmole", s, task, metric][i] - correct["lora", s, task, metric][i]
                for s in ("seed0", "seed1") for i in range(6)) / 12 for task in ("arc_e", "boolq")) / 2
        assert float(row[6]) == pytest.approx(100 * expected, abs=0.051)
        low, high = (float(x) for x in re.fullmatch(r"\[([+-]\d+\.\d), ([+-]\d+\.\d)\]", row[7]).groups())
        assert low <= float(row[6]) <= high
        p = 0.0 if row[8] == "< 0.001" else float(row[8])
        assert row[12] == ("no difference detected at 5 %" if p >= 0.05 else
                           "DynMoLE > LoRA" if expected > 0 else "LoRA > DynMoLE")
    assert "| DynMoLE vs LoRA | acc_norm |" in verdicts  # the per-task table, after the verdicts
    paired = "## Paired tests" + section.split("## Figures", 1)[0].rstrip("\n") + "\n"
    assert paired in out  # printed at the end of the run, the same markdown

    assert analysis_main([str(tmp_path)]) == 0  # recomputed from the committed files alone
    assert paired in capsys.readouterr().out


def test_ablation_sweep_writes_line_plot(tmp_path, toy_inputs):
    argv = ["--profile", "tiny", "--ablation", "keep_top_k", "--values", "1,2", "--seeds", "0,1",
            "--output-dir", str(tmp_path)]
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    assert len(list(tmp_path.glob("runs/ablation-keep_top_k/keep_top_k=*/seed*/result.json"))) == 4
    assert not (tmp_path / "runs/base").exists()
    _, rows = _table((tmp_path / "ablation-keep_top_k.md").read_text(), "## acc_norm (%, cloze: ")
    assert list(rows) == ["DynMoLE (keep_top_k=1)", "DynMoLE (keep_top_k=2)"]
    assert (tmp_path / "plots/ablation-keep_top_k.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_prints_plan_without_running(tmp_path, toy_inputs, capsys):
    argv = ["--profile", "tiny", "--methods", "lora,dynmole", "--dry-run", "--output-dir", str(tmp_path)]
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    out = capsys.readouterr().out
    assert "DynMoLE, seed 1" in out and "5 of 5 runs to do" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_settings_precedence_and_errors(tmp_path):
    overrides = reproduce.parse_assignments(["r=3", "peft.r=9", "entropy_coef=0.5",
                                             "target_modules=up_proj,down_proj"])
    assert overrides == {"r": 3, "peft.r": 9, "entropy_coef": 0.5, "target_modules": ["up_proj", "down_proj"]}
    variants = [VARIANTS[k] for k in ("lora", "dynmole-noent", "dynmole")]
    specs = reproduce.plan(PROFILES["tiny"], variants, [0], overrides, tmp_path, eval_base=False)
    lora, noent, dynmole = (s.mole for s in specs)
    assert (lora.r, noent.r, dynmole.r) == (9, 3, 3)  # peft.* only reaches LoRA/DoRA
    assert noent.entropy_coef == 0.0 and dynmole.entropy_coef == 0.5  # the variant's own fields win
    assert specs[0].train.output_dir == str(tmp_path / "runs/lora/seed0")
    with pytest.raises(ValueError, match="no_such_field"):
        reproduce.parse_assignments(["no_such_field=1"])
    with pytest.raises(ValueError, match="--seeds"):
        reproduce.parse_assignments(["seed=3"])
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "tiny", "--methods", "nope", "--dry-run"])


def test_bad_seeds_name_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--profile", "tiny", "--seeds", "0,x", "--dry-run"])
    assert exit_info.value.code == 2
    assert "--seeds takes comma-separated integers, got '0,x'" in capsys.readouterr().err


@pytest.mark.slow
def test_mini_dry_run_fits_two_hours(tmp_path, capsys):
    assert reproduce.main(["--profile", "mini", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = 1 + len(VARIANTS) * len(PROFILES["mini"].seeds)
    estimate = re.search(rf"{runs} of {runs} runs to do: about ([\d.]+) h", out)
    assert estimate and float(estimate.group(1)) <= 2.0, out


def _trainable_on_smollm2_shape(method, fields):
    """Trainable parameters of ``method`` on a SmolLM2-135M-shaped Llama, built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynmole import MoLEConfig
    from dynmole.adapters import adapt_model

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    adapter = {k: v for k, v in fields.items() if k in ("num_experts", "r", "alpha", "target_modules")}
    adapted = adapt_model(model, method, MoLEConfig(**adapter))
    return sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def test_paper_profile_matches_budgets_and_paper_literal_keeps_the_written_ranks():
    paper, literal = PROFILES["paper"], PROFILES["paper-literal"]
    mole = _trainable_on_smollm2_shape("dynmole", paper.settings)
    assert mole == 27_855_360  # 6 experts x r=24 on gate/up/down, routers included
    for method in ("lora", "dora"):
        peft = _trainable_on_smollm2_shape(method, {**paper.settings, **paper.peft})
        assert abs(peft / mole - 1) < 0.005, (method, peft, mole)
    assert literal.settings == paper.settings and (literal.peft["r"], literal.peft["alpha"]) == (80, 160.0)
    lora_80 = _trainable_on_smollm2_shape("lora", {**literal.settings, **literal.peft})
    assert lora_80 == 15_206_400 and mole / lora_80 > 1.8


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, toy_inputs, capsys, monkeypatch):
    argv = ["--profile", "tiny", "--methods", "dynmole", "--seeds", "0", "--output-dir", str(tmp_path),
            "--set", "save_steps=1", "--set", "eval_base=false"]
    failing = {"left": 1}
    evaluate = grid.evaluate_model

    def crash_once(*args, **kwargs):
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("killed after training")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(grid, "evaluate_model", crash_once)
    assert reproduce.main(argv, inputs=toy_inputs) == 1
    run = tmp_path / "runs/dynmole/seed0"
    assert (run / "checkpoint-3" / "trainer_state.json").is_file() and not (run / "result.json").exists()
    capsys.readouterr()
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    assert "resuming DynMoLE, seed 0 from step 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # each training step logged once
    assert (run / "result.json").is_file() and not list(run.glob("checkpoint-*"))


def test_report_only_runs_nothing_and_profile_seeds_per_variant(tmp_path, toy_inputs, capsys):
    assert reproduce.main(["--profile", "tiny", "--methods", "lora", "--seeds", "0", "--output-dir", str(tmp_path)],
                          inputs=toy_inputs) == 0
    capsys.readouterr()
    argv = ["--profile", "tiny", "--methods", "lora,dynmole", "--seeds", "0", "--output-dir", str(tmp_path),
            "--report-only"]
    assert reproduce.main(argv, inputs=toy_inputs) == 0
    out = capsys.readouterr().out
    assert "2 of 3 planned runs are finished" in out and "other finished run" not in out
    assert not (tmp_path / "runs/dynmole").exists()
    assert "LoRA" in (tmp_path / "results.md").read_text()
    # A report of part of the folder says which finished runs it leaves out.
    assert reproduce.main([*argv[:3], "dynmole", *argv[4:]], inputs=toy_inputs) == 0
    note = capsys.readouterr().out.split("note: ", 1)[1]
    assert note.startswith("1 other finished run(s) in") and "(lora/seed0)" in note
    assert "LoRA" not in (tmp_path / "results.md").read_text()
    cpu = PROFILES["cpu"]
    assert cpu.seeds_of("dynmole") == (0, 1, 2) and cpu.seeds_of("dora") == (0, 1)
    assert set(cpu.variants) == {"lora", "dora", "loramoe", "mola", "topp", "dynmole-topp", "dynmole-noent",
                                 "dynmole", "ldmole", "remole"}
