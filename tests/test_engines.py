"""The FSDP and DeepSpeed ZeRO-2 configs of ``configs/accelerate`` on 2 CPU processes (gloo), against DDP.

DeepSpeed runs through the whole path a user takes (``accelerate launch --config_file
deepspeed_zero2.yaml``, the HF Trainer, the adapter it saves). accelerate runs FSDP only on GPUs
(on a CPU it silently falls back to DDP), so the FSDP test shards the model with torch's FSDP2 as
accelerate does, with the settings the launcher reads from ``fsdp.yaml``, and saves the adapter
from the gathered state dict as the Trainer does (see docs/distributed.md).
"""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
ADAPTER = "adapter_model.safetensors"

TRAINER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    import conftest
    from accelerate.state import PartialState
    from test_train import _examples
    from dynmole import MoLEConfig
    from dynmole.adapters import adapt_model
    from dynmole.training.config import TrainConfig
    from dynmole.training.trainer import train

    output_dir, method, precision = sys.argv[1], sys.argv[2], sys.argv[3]
    model = conftest.tiny_llama.__wrapped__()(seed=0)
    tokenizer = conftest.tiny_tokenizer.__wrapped__()
    model = adapt_model(model, method, MoLEConfig(r=4, alpha=8, dropout=0.0, lambda_hidden=8))
    config = TrainConfig(output_dir=output_dir, max_steps=4, batch_size=4, lr=1e-2, logging_steps=1,
                         report_to="none", seed=0, warmup_ratio=0.0, precision=precision)
    _, summary = train(model, tokenizer, _examples(8), config)  # a global batch of 8: the same examples every step
    if PartialState().is_main_process:
        losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
        dtypes = sorted({{str(p.dtype) for p in model.parameters()}})
        json.dump({{"engine": str(PartialState().distributed_type), "losses": losses, "dtypes": dtypes}},
                  open(output_dir + "/run.json", "w"))
    """
)

LOOP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    import conftest
    from torch.distributed.tensor import DTensor
    from test_train import _examples
    from dynmole import MoLEConfig, get_mole_model
    from dynmole.data.tokenize import AnswerCollator, encode_example

    output_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = get_mole_model(conftest.tiny_llama.__wrapped__()(seed=0), MoLEConfig(r=4, alpha=8, dropout=0.0)).train()
    tokenizer = conftest.tiny_tokenizer.__wrapped__()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP") == "true"
    if fsdp:  # what accelerate's fsdp2_prepare_model does, with the plugin the launcher built from fsdp.yaml
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.fsdp import fully_shard

        plugin = FullyShardedDataParallelPlugin()
        settings = {{"fsdp_version": plugin.fsdp_version, "state_dict_type": str(plugin.state_dict_type)}}
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        layers = [m for m in model.modules() if m is not model and policy(m)]
        for layer in layers:
            fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward)
        fully_shard(model, reshard_after_forward=plugin.reshard_after_forward)
        settings["wrapped"] = len(layers)
        runner = model
    else:
        settings = {{}}
        runner = torch.nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # each rank its half of a global batch of 8, the same every step
    batch = AnswerCollator(tokenizer.pad_token_id)([encode_example(tokenizer, e) for e in _examples(8)[rank::world]])
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = runner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = None
    if fsdp:  # accelerate's get_state_dict for FSDP2, then the Trainer's save of a PEFT model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        settings["sharded"] = all(isinstance(p, DTensor) for p in trainable)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                     cpu_offload=True))
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=state) if fsdp else model.save_pretrained(output_dir)
        json.dump({{"losses": losses, **settings}}, open(output_dir + "/run.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as probe:  # other test runs may share the machine
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(config: str, script: Path, output_dir: Path, *args: str, mixed_precision: str = "no") -> dict:
    """``accelerate launch --config_file configs/accelerate/<config>`` of ``script`` on 2 CPU processes,
    by default without mixed precision (bf16 in the configs is for GPUs); returns the ``run.json`` it wrote."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
         "--num_processes", "2", "--mixed_precision", mixed_precision, "--main_process_port", str(_free_port()),
         str(script), str(output_dir), *args],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "run.json").read_text())


def _fresh_adapter_shapes() -> dict[str, tuple[int, ...]]:
    """The shape of every adapter tensor of a single-process model, as ``save_pretrained`` writes it."""
    import tempfile

    import conftest
    from dynmole import MoLEConfig, get_mole_model

    model = get_mole_model(conftest.tiny_llama.__wrapped__()(seed=0), MoLEConfig(r=4, alpha=8, dropout=0.0))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return {key: tuple(value.shape) for key, value in load_file(str(Path(folder) / ADAPTER)).items()}


def _assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(str(a / ADAPTER)), load_file(str(b / ADAPTER))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp2_trains_like_ddp_and_saves_the_whole_adapter(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT.format(tests=str(Path(__file__).parent)))
    fsdp = _launch("fsdp.yaml", script, tmp_path / "fsdp")
    ddp = _launch("ddp.yaml", script, tmp_path / "ddp")
    # the config reached FSDP2: version 2, each decoder layer a unit of its own, the adapter sharded,
    # and the state dict type under which the Trainer's save_model writes the adapter at all
    assert fsdp["fsdp_version"] == 2 and fsdp["wrapped"] == 2 and fsdp["sharded"]
    assert "FULL_STATE_DICT" in fsdp["state_dict_type"]
    saved = {key: tuple(value.shape) for key, value in load_file(str(tmp_path / "fsdp" / ADAPTER)).items()}
    assert saved == _fresh_adapter_shapes()  # whole tensors, not one rank's shard
    _assert_same_adapter(tmp_path / "fsdp", tmp_path / "ddp")
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    assert ddp["losses"][-1] < ddp["losses"][0]


def test_deepspeed_zero2_trains_like_ddp(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT.format(tests=str(Path(__file__).parent)))
    deepspeed = _launch("deepspeed_zero2.yaml", script, tmp_path / "deepspeed", "dynmole", "fp32")
    ddp = _launch("ddp.yaml", script, tmp_path / "ddp", "dynmole", "fp32")
    assert deepspeed["engine"] == "DistributedType.DEEPSPEED"  # not a silent fall-back to DDP
    assert ddp["engine"] == "DistributedType.MULTI_CPU"
    assert deepspeed["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    _assert_same_adapter(tmp_path / "deepspeed" / "adapter", tmp_path / "ddp" / "adapter")


@pytest.mark.parametrize("method", ["ldmole", "dynmole"])
def test_deepspeed_zero2_trains_in_bf16(tmp_path, method):
    """The ZeRO-2 config as it is written, bf16 included: DeepSpeed casts the whole model to bf16
    (LD-MoLE's lambda MLP with it), and training runs, its loss finite and falling."""
    script = tmp_path / "train.py"
    script.write_text(TRAINER_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = _launch("deepspeed_zero2.yaml", script, tmp_path / "deepspeed", method, "bf16", mixed_precision="bf16")
    assert run["engine"] == "DistributedType.DEEPSPEED"
    assert run["dtypes"] == ["torch.bfloat16"]  # the model was cast, not run under autocast
    assert len(run["losses"]) == 4 and all(math.isfinite(loss) for loss in run["losses"])
    assert run["losses"][-1] < run["losses"][0]
