"""The benchmark's tiny preset runs and writes well-formed output (no timing asserts), the
targets are checked on the rows they name, the bench package has no import cycle, and the MoLE
layer compiles as one graph with ``fullgraph=True``."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dynmole import bench
from dynmole.bench.layer import LayerPoint, build_mole_layer, flops_floor, mole_config
from dynmole.bench.peers import GatherTopKMoLE, PerExpertLoopMoLE
from dynmole.bench.report import Row, check_targets, format_table, format_targets
from dynmole.gating import build_gate_fn


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    assert bench.main(["--tiny", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # main restores the thread count
    return json.loads(path.read_text())


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_rows_well_formed(tiny_report):
    rows = tiny_report["rows"]
    assert tiny_report["problems"] == []
    variants = {(row["section"], row["variant"]) for row in rows}
    expected_layer = {"base_linear", "peft_lora", "peer_loop_dynmole", "peer_gather_mola_top2"}
    expected_layer |= {f"mole_{m}" for m in ("loramoe", "mola", "topp", "dynmole", "ldmole", "remole")}
    assert {("layer", v) for v in expected_layer} <= variants
    assert {("model", v) for v in ("peft_lora", "mole_dynmole", "mole_dynmole+stats", "base_model")} <= variants
    assert {("memory", v) for v in ("peft_lora", "mole_dynmole")} <= variants
    modes = {row["extra"].get("mode") for row in rows if row["section"] == "layer"}
    assert modes == {"fwd+bwd", "fwd"}
    for row in rows:
        assert _positive_finite(row["ratio"]), row
        if row["section"] in ("layer", "model"):
            assert _positive_finite(row["ms"]), row
            assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]
        else:
            assert _positive_finite(row["extra"]["value"]), row
        if row["variant"] == "peft_lora" and row["section"] != "memory":
            assert row["ratio"] == pytest.approx(1.0)
    scenarios = {row["scenario"] for row in rows if row["section"] == "memory"}
    assert any("saved for backward" in s for s in scenarios)
    assert any("peak" in s for s in scenarios)  # the worker processes answered
    stats = [row for row in rows if row["variant"] == "mole_dynmole+stats"]
    assert stats and all(_positive_finite(row["extra"]["overhead_vs_stats_off"]) for row in stats)


def test_tiny_report_metadata(tiny_report):
    assert tiny_report["preset"] == "tiny"
    assert tiny_report["machine"]["torch"] == torch.__version__
    check = tiny_report["compile_check"]["dynmole"]
    assert check == {"graphs": 1, "graph_breaks": 0, "break_reasons": []}
    assert tiny_report["model"]["lora_rank"] == tiny_report["model"]["num_experts"] * tiny_report["model"]["r"]


def test_table_format():
    row = Row("layer", "d=8 T=2 N=2 r=1 fp32 fwd", "peft_lora", "peft", ms=1.5, ratio=1.0, ratio_q1=1.0,
                    ratio_q3=1.0)
    table = format_table([row])
    assert "peft_lora" in table and "1.000" in table


def test_bad_arguments(capsys):
    assert bench.main(["--tiny", "--methods", "nope"]) == 2
    assert bench.main(["--tiny", "--points", "12x3"]) == 2
    assert bench.parse_points("64x8x2x4") == [LayerPoint(64, 8, 2, 4)]


def test_flops_floor():
    floor = flops_floor(LayerPoint(4096, 512, 6, 16), "fwd")
    assert floor["mole_extra_flops"] == 2 * 512 * (4096 * 96 * 2) + 2 * 512 * 4096 * 6
    assert 1.0 < floor["floor_mole_over_lora"] < floor["floor_mole_over_base"] < 1.1


def test_ldmole_flops_floor_counts_the_lambda_mlp():
    """At SmolLM2's width the lambda MLP (d -> 256 -> 1) costs more than the experts (rank 96): in units
    of 4 T d FLOPs, forward+backward, base 576, experts 288, router 9, lambda MLP 384 + 384 / 576, so
    LD-MoLE's floor over LoRA is 1.456 whatever the implementation."""
    point = LayerPoint(576, 512, 6, 16)
    plain, ldmole = flops_floor(point, "fwd+bwd"), flops_floor(point, "fwd+bwd", lambda_hidden=256)
    assert ldmole["mole_extra_flops"] - plain["mole_extra_flops"] == 3 * 2 * 512 * (576 * 256 + 256)
    assert ldmole["floor_mole_over_lora"] == pytest.approx((576 + 288 + 9 + 384 + 384 / 576) / (576 + 288))
    assert ldmole["floor_mole_over_lora"] == pytest.approx(1.456, abs=5e-4)


def test_targets_are_checked_on_the_rows_they_name(tiny_report):
    rows = [
        Row("layer", "d=576 T=512 N=6 r=16 fp32 fwd+bwd", "mole_ldmole", "ours", ms=1.0, ratio=1.4, ratio_q1=1.3,
            ratio_q3=1.5,
            extra={"d": 576, "T": 512, "N": 6, "r": 16, "mode": "fwd+bwd", "floor_mole_over_lora": 1.44}),
        Row("layer", "d=576 T=512 N=6 r=16 fp32 fwd", "mole_ldmole", "ours", ms=1.0, ratio=1.0,
            extra={"d": 576, "mode": "fwd"}),  # forward only: no target
        Row("model", "generate 32 tokens (prompt 16, KV cache) fp32", "mole_dynmole", "ours", ms=1.0, ratio=1.05),
        Row("model", "generate 32 tokens (prompt 16, KV cache) fp32", "peft_lora", "peft", ms=1.0, ratio=1.0),
    ]
    checks = check_targets(rows)
    assert [(c["variant"], c["limit"], c["met"]) for c in checks] == [("mole_ldmole", 1.15, False),
                                                                      ("mole_dynmole", 1.10, True)]
    text = format_targets(checks)
    assert "NOT met" in text and "FLOP floor 1.440" in text and "generate" in text
    reported = {c["target"] for c in tiny_report["targets"]}  # the tiny preset has model and memory rows
    assert any("decode" in t for t in reported) and any("what the step adds" in t for t in reported)


def test_bench_package_has_no_import_cycle():
    """The modules of dynmole.bench import each other in one direction only, and none imports the
    package itself (its __init__ imports them)."""
    folder = Path(bench.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__", "__main__"}
    graph = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module is not None, f"{name} imports the bench package itself"
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynmole.bench"):
                raise AssertionError(f"{name} imports {node.module} absolutely")
        graph[name] = imported & modules
    visiting, done = set(), set()

    def visit(name, path):
        assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
        if name not in done:
            visiting.add(name)
            for other in graph[name]:
                visit(other, path + [name])
            visiting.discard(name)
            done.add(name)

    for name in modules:
        visit(name, [])
    assert {"layer", "model", "peers", "report", "train"} <= modules


@pytest.mark.parametrize("peer", [PerExpertLoopMoLE, GatherTopKMoLE])
def test_peers_compute_the_same_function(peer):
    torch.manual_seed(0)
    method = "dynmole" if peer is PerExpertLoopMoLE else "mola"
    layer = build_mole_layer(nn.Linear(16, 12), method, 4, 3, 0.0)
    config = mole_config(method, 4, 3, 0.0)
    other = peer(layer.base_layer, 4, 3, config.alpha, 0.0, build_gate_fn(config, 4)).load_from(layer)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(other(x), layer(x))


def test_mole_layer_compiles_fullgraph_dynmole():
    """torch.compile(fullgraph=True) raises on any graph break, so a pass proves the dynmole layer
    (softmax, sort, cumsum, entropy, masks) has no host sync, in training and inference."""
    torch.manual_seed(0)
    layer = build_mole_layer(nn.Linear(16, 8), "dynmole", num_experts=4, r=2, dropout=0.0)  # B random
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    grad_compiled = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    x_eager = x.detach().clone().requires_grad_(True)
    expected = layer(x_eager)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_compiled, layer.lora_A.grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
