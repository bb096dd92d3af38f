"""The knobs of the routing-regime study: router learning rate, held-out routing probe, run resume."""

import json

import pytest
import torch

from dynmole import MoLEConfig
from dynmole.adapters import adapt_model
from dynmole.data import Example
from dynmole.training.config import TrainConfig
from dynmole.training.probe import probe_set, summarize_probe
from dynmole.training.runs import PROBE_LOG_NAME, trim_logs
from dynmole.training.trainer import router_parameters, scale_parameter_groups, train


def _examples(n=16, task="toy"):
    facts = [("the sky is", " blue"), ("fire is", " hot"), ("ice is", " cold"), ("water is", " wet")]
    return [Example(f"{task}/{i}", task, f"question : {facts[i % 4][0]} ? answer :", (facts[i % 4][1], " red"), 0)
            for i in range(n)]


def _one_step_change(tiny_llama, tiny_tokenizer, tmp_path, scale):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(output_dir=str(tmp_path / f"s{scale}"), max_steps=1, batch_size=8, lr=1e-3,
                         warmup_ratio=0.0, report_to="none", router_lr_scale=scale)
    train(model, tiny_tokenizer, _examples(), config)
    change = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
    router = max(v for n, v in change.items() if n.endswith(".router"))
    experts = max(v for n, v in change.items() if n.endswith(".lora_B"))  # A gets no gradient while B = 0
    return router, experts


def test_router_lr_scale_moves_only_the_routers_faster(tiny_llama, tiny_tokenizer, tmp_path):
    # Adam's first step moves every weight by about lr (m / sqrt(v) = sign of the gradient).
    router, experts = _one_step_change(tiny_llama, tiny_tokenizer, tmp_path, 10.0)
    assert abs(router - 1e-2) < 1e-4 and abs(experts - 1e-3) < 1e-5
    router, experts = _one_step_change(tiny_llama, tiny_tokenizer, tmp_path, 1.0)
    assert abs(router - 1e-3) < 1e-5 and abs(experts - 1e-3) < 1e-5


def test_scale_parameter_groups_keeps_group_settings(tiny_llama):
    model = adapt_model(tiny_llama(), "mola", MoLEConfig(r=2, alpha=4))
    routers = router_parameters(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not r for r in routers)]
    optimizer = torch.optim.AdamW([{"params": others + routers, "weight_decay": 0.1}], lr=2e-4)
    scale_parameter_groups(optimizer, {id(p) for p in routers}, 30.0)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(others), len(routers)]
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 2e-4 * 30.0]
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)


def test_routing_probe_logs_held_out_routing(tiny_llama, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = adapt_model(tiny_llama(), "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.0, num_experts=4))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, lr=1e-2, logging_steps=2,
                         report_to="none", routing_probe_steps=2, routing_probe_size=6)
    train(model, tiny_tokenizer, _examples(), config, probe_examples=_examples(8, "held"))
    probes = [json.loads(line) for line in (tmp_path / PROBE_LOG_NAME).read_text().splitlines()]
    assert [p["step"] for p in probes] == [0, 2, 4]
    assert len(probes[0]["modules"]) == 2 * 3  # 2 layers x gate/up/down
    assert all(0.0 <= p["probe_entropy"] <= 1.0 and 1.0 <= p["probe_experts"] <= 4.0 for p in probes)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "probe_entropy" in r] == [2, 4]
    assert model.training  # the probe restores the training mode


def test_summarize_probe_counts_modules_below_threshold():
    modules = {
        "a": {"entropy": 0.95, "mean_experts": 6.0, "soft_fraction": 0.9, "high_entropy_fraction": 0.9,
              "load": [0.5, 0.5]},
        "b": {"entropy": 0.5, "mean_experts": 2.0, "soft_fraction": 0.1, "high_entropy_fraction": 0.1,
              "load": [0.9, 0.1]},
    }
    summary = summarize_probe(modules)
    assert summary["probe_layers_below"] == 0.5 and abs(summary["probe_max_load"] - 0.7) < 1e-12
    assert abs(summary["probe_entropy"] - 0.725) < 1e-12 and summary["probe_experts"] == 4.0


def test_probe_set_takes_every_task_round_robin():
    pools = {"a": _examples(5, "a"), "b": _examples(1, "b"), "c": _examples(3, "c")}
    chosen = probe_set(pools, 6)
    assert [e.id for e in chosen] == ["a/0", "b/0", "c/0", "a/1", "c/1", "a/2"]
    assert len(probe_set(pools, 100)) == 9


def test_trim_logs_drops_steps_after_the_checkpoint(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)))
    (tmp_path / PROBE_LOG_NAME).write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 10, 20)))
    trim_logs(tmp_path, 10)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [5, 10]
    assert [json.loads(x)["step"] for x in (tmp_path / PROBE_LOG_NAME).read_text().splitlines()] == [0, 10]


def _fake_run(root, name, scale, below):
    from dynmole.io import write_json

    directory = root / name / "seed0"
    directory.mkdir(parents=True)
    write_json(directory / "result.json", {
        "variant": "DynMoLE", "method": "dynmole", "seed": 0, "eval": {"average": {"acc": 0.5, "acc_norm": 0.6}},
        "train": {"lr": 1e-3, "router_lr_scale": scale}, "adapter": {"entropy_coef": None, "router_init_std": 0.02},
        "routing": {"m.layers.0.mlp.up_proj": {"load": [0.5, 0.25, 0.25]},
                    "m.layers.1.mlp.up_proj": {"load": [0.3, 0.7]}},
    })
    (directory / "log.jsonl").write_text(json.dumps({"step": 20, "loss": 2.5}) + "\n")
    modules = {f"model.layers.{i}.mlp.up_proj": {"entropy": 0.9, "mean_experts": 5.0, "soft_fraction": 0.5,
                                                  "high_entropy_fraction": 0.5} for i in range(2)}
    probes = [{"step": step, "probe_entropy": 1.0 - step / 100, "probe_experts": 6.0, "probe_soft_fraction": 0.5,
               "probe_high_entropy_fraction": 0.5, "probe_layers_below": value, "modules": modules}
              for step, value in zip((0, 10, 20), below)]
    (directory / PROBE_LOG_NAME).write_text("".join(json.dumps(p) + "\n" for p in probes))


def test_regime_study_table_and_plots(tmp_path, capsys):
    from dynmole.analysis import regime

    _fake_run(tmp_path, "fast", 10.0, (0.0, 0.6, 0.9))
    _fake_run(tmp_path, "slow", 1.0, (0.0, 0.1, 0.2))
    runs = regime.load_study(tmp_path)
    assert [r.label for r in runs] == ["dynmole, lr 0.001, router x1", "dynmole, lr 0.001, router x10"]
    assert [r.first_step_most_below() for r in runs] == [None, 10]
    assert regime.main([str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "regime.md").read_text()
    assert ("| dynmole, lr 0.001, router x10 | 20 | 1.00 / 0.90 / 0.80 | 0.90 | 6.00 | 0.60 | 10 | 2.50 | 60.0 |"
            in table)
    assert "| never |" in table
    assert (tmp_path / "out" / "plots" / "regime_entropy.png").stat().st_size > 0
    assert regime.main([str(tmp_path / "out" / "plots")]) == 2
    assert "error: no finished run" in capsys.readouterr().err


def test_summarize_probe_counts_collapsed_and_specialised_modules():
    """A collapsed module (busiest share >= 0.9) is not counted as specialised however input-dependent;
    the measures average over the modules that have them."""
    base = {"entropy": 0.5, "mean_experts": 2.0, "soft_fraction": 0.0, "high_entropy_fraction": 0.0,
            "load": [0.5, 0.5]}
    modules = {
        "collapsed": {**base, "busiest_share": 0.95, "load_entropy": 0.2, "input_dependence": 0.3},
        "specialised": {**base, "busiest_share": 0.4, "load_entropy": 0.9, "input_dependence": 0.5},
        "uniform": {**base, "busiest_share": 0.5, "load_entropy": 1.0, "input_dependence": 0.1},
    }
    summary = summarize_probe(modules)
    assert summary["probe_collapsed"] == pytest.approx(1 / 3) and summary["probe_specialised"] == pytest.approx(1 / 3)
    assert summary["probe_input_dependence"] == pytest.approx(0.3)
    assert summary["probe_load_entropy"] == pytest.approx(0.7)
