"""Two CPU processes (gloo, DDP through the HF Trainer) give the losses of one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    import conftest
    from test_train import _examples
    from dynmole import MoLEConfig
    from dynmole.adapters import adapt_model
    from dynmole.training.config import TrainConfig
    from dynmole.training.trainer import train

    output_dir, batch = sys.argv[1], int(sys.argv[2])
    model = conftest.tiny_llama.__wrapped__()(seed=0)
    tokenizer = conftest.tiny_tokenizer.__wrapped__()
    model = adapt_model(model, "dynmole", MoLEConfig(r=4, alpha=8, dropout=0.0))
    config = TrainConfig(output_dir=output_dir, max_steps=4, batch_size=batch, lr=1e-2, logging_steps=1,
                         report_to="none", seed=0, warmup_ratio=0.0)
    # 8 examples and a global batch of 8: every step sees the same examples, whatever the sharding
    _, summary = train(model, tokenizer, _examples(8), config)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    logs = [e for e in summary["log_history"] if "loss" in e]
    json.dump(logs, open(output_dir + "/losses.json", "w"))
    """
)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8"], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(script), str(tmp_path / "two"), "4"],
        capture_output=True, text=True, env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "losses.json").read_text())
    double = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(single) == len(double) == 4
    for a, b in zip(single, double):
        # CE is token-weighted across ranks by the Trainer; the load-balance statistics are
        # per rank (see docs), which moves the total by far less than this tolerance.
        assert abs(a["loss"] - b["loss"]) < 2e-3 * abs(a["loss"]), (a, b)
        assert abs(a["aux_entropy"] - b["aux_entropy"]) < 1e-4
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert single[-1]["loss"] < single[0]["loss"]


REMOLE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    import conftest
    from dynmole import MoLEConfig, get_mole_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = conftest.tiny_llama.__wrapped__()(seed=0)
    config = MoLEConfig(method="remole", r=2, dropout=0.0, relu_target_k=2.0, relu_l1_init=1e-3)
    model = get_mole_model(base, config).train()
    with torch.no_grad():
        for layer in model.mole_layers():
            if rank == 1:
                layer.router.zero_()  # relu(0): no expert open on this rank
            else:
                layer.router.normal_(std=1.0)  # about half of the 6 experts open
    torch.manual_seed(rank)
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    active = model.last_aux_losses["active_experts"].reshape(1)
    model.update_remole_coefficient()
    actives = [torch.zeros(1) for _ in range(2)]
    coefficients = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(actives, active)
    dist.all_gather(coefficients, model.relu_l1_coef.detach())
    if rank == 0:
        json.dump({{"active": [float(a) for a in actives], "coef": [float(c) for c in coefficients]}},
                  open(sys.argv[1], "w"))
    dist.barrier()  # both ranks done before either tears gloo down (else: 'terminate called', seen under load)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_remole_coefficient_is_updated_identically_on_every_rank(tmp_path):
    script = tmp_path / "remole.py"
    script.write_text(REMOLE_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: other test runs may share the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), str(tmp_path / "out.json")],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    active = out["active"]
    assert active[0] > 2.0 and active[1] == 0.0  # alone, rank 0 would raise its coefficient
    mean = sum(active) / 2
    expected = 1e-3 * 1.2 ** ((mean > 2.0) - (mean < 2.0))
    assert out["coef"][0] == out["coef"][1] == pytest.approx(expected, rel=1e-6)
