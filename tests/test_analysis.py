import json

import matplotlib.image
import pytest

from dynmole.analysis import (
    RunRecord,
    by_layer,
    comparison_table,
    group_by_variant,
    layer_index,
    load_by_layer,
    mean_experts,
    mean_std,
    mean_std_cell,
    plot_ablation,
    plot_by_layer,
    plot_curves,
    plot_load_heatmaps,
    routing_plots,
)


def _assert_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def _routing(experts=(2.0, 3.0), soft=0.0):
    return {
        f"model.layers.{layer}.mlp.{proj}": {
            "tokens": 10, "mean_experts": n, "entropy": 0.5, "soft_fraction": soft,
            "load": [0.5, 0.25, 0.25] if proj == "up_proj" else [0.25, 0.25, 0.5], "experts_histogram": [0, 0, 10, 0],
        }
        for layer, n in enumerate(experts)
        for proj in ("gate_proj", "up_proj")
    }


def _record(tmp_path, variant, seed, acc, routing=None, log=None, adapter=None):
    directory = tmp_path / variant / f"seed{seed}"
    directory.mkdir(parents=True)
    result = {
        "variant": variant, "seed": seed, "trainable_params": 1_234_567, "routing": routing or {},
        "adapter": adapter or {},
        "eval": {"tasks": {"piqa": {"acc": acc, "acc_norm": acc, "n": 4},
                           "arc_e": {"acc": acc, "acc_norm": acc, "n": 4},
                           "toy": {"acc": acc, "acc_norm": acc, "n": 4}},
                 "average": {"acc": acc, "acc_norm": acc}},
    }
    (directory / "result.json").write_text(json.dumps(result))
    if log:
        (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return RunRecord.read(directory)


def test_plot_functions_write_pngs(tmp_path):
    curves = {"LoRA": [[(1, 4.0), (2, 3.5), (3, 3.0)], [(1, 4.2), (2, 3.6), (3, 3.1)]],
              "DynMoLE": [[(1, 4.1), (2, 3.0)]]}
    _assert_png(plot_curves(curves, tmp_path / "loss.png", "loss", "Training loss"))
    panels = {"gate_proj": {"MoLA": [{0: 2.0, 1: 2.0}, {0: 2.0, 1: 2.0}],
                            "DynMoLE": [{0: 3.1, 1: 2.4}, {0: 2.9, 1: 2.6}]},
              "up_proj": {"MoLA": [{0: 2.0, 1: 2.0}], "DynMoLE": [{0: 3.0, 1: 2.5}]}}
    _assert_png(plot_by_layer(panels, tmp_path / "layers.png", "experts per token", "Experts by layer"))
    loads = {"MoLA (2-4-6-8)": {0: [0.5, 0.5], 1: [0.1, 0.2, 0.3, 0.4]}, "DynMoLE": {0: [0.25] * 4, 1: [0.25] * 4}}
    _assert_png(plot_load_heatmaps(loads, tmp_path / "load.png"))
    _assert_png(plot_ablation({1e-4: [40.0, 42.0], 1e-3: [43.0, 44.0], 1e-2: [45.0]}, tmp_path / "ablation.png",
                              "beta", "average acc (%)", "Ablation", log_x=True))


def test_routing_by_layer_and_summaries():
    routing = _routing()
    assert layer_index("model.layers.3.mlp.up_proj") == 3 and layer_index("lm_head") is None
    assert layer_index("base_model.model.model.layers.12.self_attn.q_proj") == 12
    assert by_layer(routing, "mean_experts") == {"gate_proj": {0: 2.0, 1: 3.0}, "up_proj": {0: 2.0, 1: 3.0}}
    assert load_by_layer(routing)[0] == pytest.approx([0.375, 0.25, 0.375])
    assert mean_experts(routing) == pytest.approx(2.5) and mean_experts({}) is None
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5)) and mean_std([5.0]) == (5.0, 0.0)
    assert mean_std_cell([0.5, 0.7], 100) == "60.0 ± 14.1" and mean_std_cell([0.5], 100) == "50.0"
    assert mean_std_cell([]) == "-"


def test_comparison_table_and_logs(tmp_path):
    log = [{"step": 1, "loss": 4.0, "aux_entropy": 0.009}, {"step": 2, "loss": 3.0, "aux_entropy": 0.008},
           {"step": 2, "train_loss": 3.5}]
    records = [
        _record(tmp_path, "LoRA", 0, 0.5), _record(tmp_path, "LoRA", 1, 0.7),
        _record(tmp_path, "DynMoLE", 0, 0.6, _routing(), log, {"method": "dynmole"}),
    ]
    groups = group_by_variant(records)
    table = comparison_table(groups, "acc").splitlines()
    assert table[0] == "| method | arc_e | piqa | toy | average | trainable params | experts / token | seeds |"
    assert table[2] == "| LoRA | 60.0 ± 14.1 | 60.0 ± 14.1 | 60.0 ± 14.1 | 60.0 ± 14.1 | 1.2M | - | 2 |"
    assert table[3] == "| DynMoLE | 60.0 | 60.0 | 60.0 | 60.0 | 1.2M | 2.50 | 1 |"
    dynmole = groups["DynMoLE"][0]
    assert dynmole.log("loss") == [(1, 4.0), (2, 3.0)]
    steps, entropy = zip(*dynmole.entropy_curve())
    assert steps == (1, 2) and entropy == pytest.approx((0.9, 0.8))  # divided by dynmole's default 1e-2
    assert groups["LoRA"][0].entropy_curve() == [] and groups["LoRA"][0].log("loss") == []
    written = routing_plots(groups, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["busiest_share_by_layer.png", "entropy_by_layer.png", "entropy_training.png", "expert_load.png",
                     "experts_by_layer.png", "load_entropy_by_layer.png",
                     "training_loss.png"]  # no variant routed soft: no soft-share figure; no input dependence recorded
    for path in written:
        _assert_png(path)


def test_routing_probe_curves_are_plotted_over_training(tmp_path):
    dynmole = _record(tmp_path, "DynMoLE", 0, 0.6, _routing(soft=0.5), None, {"method": "dynmole"})
    mola = _record(tmp_path, "MoLA", 0, 0.6, _routing(), None, {"method": "mola"})
    probes = [{"step": 50, "probe_entropy": 0.6, "probe_experts": 3.5, "probe_soft_fraction": 0.3},
              {"step": 0, "probe_entropy": 0.99, "probe_experts": 5.9, "probe_soft_fraction": 0.97}]
    (dynmole.directory / "routing_probe.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    assert dynmole.probe_curve("probe_entropy") == [(0, 0.99), (50, 0.6)]  # in step order
    assert mola.probes() == [] and mola.probe_curve("probe_entropy") == []
    names = sorted(p.name for p in routing_plots(group_by_variant([dynmole, mola]), tmp_path / "plots"))
    assert {"probe_entropy.png", "probe_experts.png", "probe_soft_fraction.png"} <= set(names)
    for name in ("probe_entropy.png", "probe_soft_fraction.png"):
        _assert_png(tmp_path / "plots" / name)


def test_time_table_reports_minutes_training_share_and_total(tmp_path):
    from dynmole.analysis.tables import time_table

    records = [_record(tmp_path, "LoRA", s, 0.5) for s in (0, 1)] + [_record(tmp_path, "Base", 0, 0.4)]
    assert time_table(group_by_variant(records)) == ""  # nothing recorded its wall time
    for record, wall, train in zip(records, (600.0, 720.0, 360.0), (450.0, 540.0, None)):
        record.result.update(wall_time_s=wall, machine="x86_64 Linux, CPU x2 threads")
        if train is not None:
            record.result["train_summary"] = {"runtime_s": train}
    lines = time_table(group_by_variant(records)).splitlines()
    assert lines[2] == "| LoRA | 2 | 11.0 (10.0-12.0) | 75 % |"  # (450 + 540) / (600 + 720)
    assert lines[3] == "| Base | 1 | 6.0 | - |"
    assert lines[-1] == "In all 0.5 h of wall time, on: x86_64 Linux, CPU x2 threads."


def test_routing_measures_by_layer_come_from_the_load_and_input_dependence_where_recorded(tmp_path):
    """Runs of every version record each module's load: busiest share and load entropy are drawn from
    it; input dependence only where the runs recorded it (RoutingStats since 2026-12-06)."""
    from dynmole.analysis.report import _by_layer_panels

    old = _record(tmp_path, "MoLA", 0, 0.6, _routing(), None, {"method": "mola"})
    panels = _by_layer_panels(group_by_variant([old]), "busiest_share")
    assert panels["up_proj"]["MoLA"] == [{0: 0.5, 1: 0.5}] and panels["gate_proj"]["MoLA"] == [{0: 0.5, 1: 0.5}]
    names = {p.name for p in routing_plots(group_by_variant([old]), tmp_path / "old")}
    assert "load_entropy_by_layer.png" in names and "input_dependence_by_layer.png" not in names
    recorded = {module: {**stats, "input_dependence": 0.3} for module, stats in _routing().items()}
    new = _record(tmp_path / "new", "DynMoLE", 0, 0.6, recorded, None, {"method": "dynmole"})
    written = routing_plots(group_by_variant([new]), tmp_path / "new-plots")
    assert "input_dependence_by_layer.png" in {p.name for p in written}
    _assert_png(tmp_path / "new-plots" / "input_dependence_by_layer.png")
