"""The training LM loss with the LM head on the answer positions only.

Training features carry labels on the answer tokens only (``-100`` on the prompt and on the
padding), yet a causal LM's head computes ``batch x length x vocabulary`` logits, and the loss
their log-softmax, at every position. For SmolLM2-135M (vocabulary 49152, width 576) the head is
about a fifth of the forward's matmul FLOPs, and its logits the largest activation.

:class:`AnswerSpanCollator` adds to every batch an :class:`AnswerPositions`, computed on the host
before the batch reaches the device: the positions whose next token has a label, and how many
last positions hold them all. :func:`answer_lm_loss` calls the model with ``logits_to_keep`` set
to :func:`logits_to_keep`'s choice of the two and :func:`answer_cross_entropy` computes the
cross-entropy with the semantics of transformers' ``ForCausalLMLoss``, the loss the Trainer uses:
logits upcast to fp32, the sum over answer tokens divided by ``num_items_in_batch`` when the
Trainer passes it (gradient accumulation, token averaging across processes), else the mean. Every
position left out has the label ``-100``, so the loss and every gradient are the full path's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import unwrap
from ..data.tokenize import IGNORE_INDEX
from ..pretrained import accepts_logits_to_keep

ANSWER_SPAN_KEY = "answer_positions"
"""The batch key :class:`AnswerSpanCollator` adds (removed again before the model is called)."""


@dataclass(frozen=True)
class AnswerPositions:
    """Where a batch's answers are, on the host (not a tensor, so the Trainer leaves it there).

    ``mask[b, p]`` is True where position ``p`` of row ``b`` predicts an answer token
    (``labels[b, p + 1] != -100``); the last ``count`` positions of every row hold all of them
    (at least 1).
    """

    mask: torch.Tensor
    count: int


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The next token's label at every position (``-100`` at the last), as ``ForCausalLMLoss``."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def answer_positions(labels: torch.Tensor) -> AnswerPositions:
    """:class:`AnswerPositions` of a batch's ``labels`` (a host tensor: this reads one number)."""
    mask = shift_labels(labels).ne(IGNORE_INDEX)
    needed = mask.any(dim=0)
    first = int(needed.to(torch.int8).argmax())  # the first True; 0 when there is none
    count = labels.shape[-1] - first if bool(needed.any()) else 1
    return AnswerPositions(mask, count)


def takes_position_masks(model: nn.Module) -> bool:
    """Whether ``model`` (or the HF model a MoLE or PEFT wrapper holds) slices its hidden states
    with transformers' ``slice_logits_to_keep``, which takes a boolean ``(batch, length)`` mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None


def logits_to_keep(positions: AnswerPositions, device: torch.device, masks: bool) -> torch.Tensor | int:
    """What to pass as ``logits_to_keep``: on the CPU, where indexing by a mask costs no device
    sync, the exact answer positions (when the model takes ``masks``); elsewhere the count of
    last positions, which needs nothing from the device."""
    return positions.mask if masks and device.type == "cpu" else positions.count


def answer_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor | int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of the logits a model returned for ``logits_to_keep=keep``.

    ``logits`` are ``(positions, vocab)`` for a mask ``keep`` and ``(batch, keep, vocab)`` for an
    int; ``labels`` are the batch's full (unshifted) labels. As transformers' ``ForCausalLMLoss``:
    fp32 logits; ``sum / num_items_in_batch`` when it is given, else the mean over the tokens
    whose label is not ``-100``.
    """
    shifted = shift_labels(labels)
    targets = shifted[keep.to(shifted.device)] if torch.is_tensor(keep) else shifted[..., shifted.shape[-1] - keep :]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


@dataclass
class AnswerSpanCollator:
    """Wraps a collator whose batches hold ``labels``; adds their :class:`AnswerPositions`."""

    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(self.collate(features))
        batch[ANSWER_SPAN_KEY] = answer_positions(batch["labels"])
        return batch


def can_use_answer_logits(trainer: Any, model: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether this ``compute_loss`` call may take the answer-logits path.

    It needs a training forward with labels, the Trainer's default loss (no label smoothing, no
    ``compute_loss_func``), no DeepSpeed sequence parallelism (which computes its own loss) and a
    model (unwrapped from DDP) that takes ``logits_to_keep``. Evaluation keeps full logits: a
    metric may read them.
    """
    parallel = getattr(trainer.accelerator, "parallelism_config", None)
    if parallel is not None and getattr(parallel, "sp_enabled", False):
        return False
    return (
        model.training
        and "labels" in inputs
        and trainer.label_smoother is None
        and trainer.compute_loss_func is None
        and accepts_logits_to_keep(unwrap(model))
    )


def token_average_scale(trainer: Any, num_items_in_batch: torch.Tensor | int | None) -> int:
    """The factor ``Trainer.compute_loss`` multiplies the LM loss by (transformers 5.x).

    With ``average_tokens_across_devices`` the Trainer divides by the token count of all
    processes, and DDP averages the gradients, so each process's loss is scaled back up by the
    number of data-parallel processes (``n_gpu`` under ``DataParallel``).
    """
    args = trainer.args
    counted = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    if not (args.average_tokens_across_devices and counted):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return trainer.accelerator.num_processes // tp_size


def answer_lm_loss(
    trainer: Any,
    model: nn.Module,
    inputs: dict[str, Any],
    positions: AnswerPositions,
    return_outputs: bool = False,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """What ``Trainer.compute_loss`` returns, with logits on the answer positions only.

    The model is called without labels and with ``logits_to_keep`` (:func:`logits_to_keep`); the
    loss is :func:`answer_cross_entropy`, normalised by ``num_items_in_batch`` exactly when the
    Trainer would pass it to the model (``model_accepts_loss_kwargs``), and rescaled as the
    Trainer does (:func:`token_average_scale`).
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = logits_to_keep(positions, labels.device, takes_position_masks(unwrap(model)))
    outputs = model(**inputs, logits_to_keep=keep)
    if torch.is_tensor(keep) and outputs.logits.dim() != 2:
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(outputs.logits.shape)} for a boolean "
            "logits_to_keep; expected (positions, vocab). Set answer_logits_only=False for this model."
        )
    items = num_items_in_batch if trainer.model_accepts_loss_kwargs else None
    loss = answer_cross_entropy(outputs.logits, labels, keep, items)
    scale = token_average_scale(trainer, num_items_in_batch)
    if scale != 1:
        loss = loss * scale
    return (loss, outputs) if return_outputs else loss
