"""``dynmole bench``: speed and memory of MoLE layers and models against PEFT LoRA of equal total rank.

Run as ``dynmole bench`` or ``python -m dynmole.bench [--quick | --full] [--json PATH]
[--dtype fp32|bf16] [--device cpu|cuda] [--sections layer,model,train]``.

Everything is measured in one process, interleaved (:mod:`dynmole.bench.timing`): every
repetition runs each variant of a scenario once, in an order rotated by one each repetition, so
slow drift (other processes, thermal state) hits all variants alike. After warm-up, each row
reports the median time and its ratio to the PEFT LoRA row of the same scenario, taken as the
median over repetitions of the per-repetition ratio (paired, so drift cancels), with its
quartiles; the table ends with the targets, each beside the row it is checked on
(:mod:`dynmole.bench.report`).

Sections:

* ``layer`` (:mod:`dynmole.bench.layer`): one adapted linear layer, forward+backward and
  forward-only: the frozen base ``nn.Linear``, PEFT LoRA of rank ``N*r``,
  :class:`~dynmole.layers.MoLELinear` under every routing rule, the dynmole layer under
  ``torch.compile(fullgraph=True)``, and two peers written by us (:mod:`dynmole.bench.peers`):
  the per-expert loop of the DynMoLE reference code / MoE-PEFT and a MoLA/MixLoRA gather +
  ``index_add_`` top-k dispatch.
* ``model`` (:mod:`dynmole.bench.model`): a causal LM (SmolLM2-135M by default, a tiny random
  Llama with ``--quick``) with PEFT LoRA vs DynMoLE on gate/up/down_proj: training-step time and
  tokens/s, peak training memory, generation tokens/s with KV cache, and routing statistics on
  vs off.
* ``train`` (:mod:`dynmole.bench.train`, not in the default ``--sections``): the training
  options on the packaged data, train tokens/s of the full-logits path (reference),
  answer-logits-only, bf16 autocast and length-grouped batches, and evaluation examples/s with
  and without the shared context.
"""

from .command import build_parser, main, parse_points, preset

__all__ = ["build_parser", "main", "parse_points", "preset"]
