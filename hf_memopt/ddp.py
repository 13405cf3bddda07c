"""Data-parallel training for methods that do (some of) their own gradient communication.

DDP all-reduces full gradients in buckets after backward and keeps a bucket copy of every gradient. Layer-wise GaLore
updates each weight inside backward (before DDP's all-reduce) and only needs the small projected gradient averaged;
ZO has no gradients at all and only needs its projected-gradient scalars averaged. Both keep the model out of DDP
(:func:`keep_model_out_of_ddp`, which also starts every rank from rank 0's weights) and average
what they need themselves (:func:`all_reduce_mean_`). BlockLLM does the same: DDP fixes its buckets from
``requires_grad`` at wrap time, which every re-selection changes; its optimizer averages the selected blocks' gradients
(every block's on a scoring step) and the loss of its stall test. LoQT stays under DDP and uses
:func:`all_reduce_mean_` for the weight gradient its merges collect, which DDP never sees.

DDP cannot simply be told to ignore the parameters the first two update
(``_set_params_and_buffers_to_ignore_for_model``): when every trainable parameter is ignored its constructor raises
"DistributedDataParallel is not needed when a module doesn't have any parameter that requires a gradient" (torch 2.13,
``DistributedDataParallel.__init__``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import Trainer

__all__ = ["all_reduce_mean_", "broadcast_from_rank0_", "is_distributed", "keep_model_out_of_ddp"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensor: torch.Tensor) -> int:
    """Average ``tensor`` over all ranks in place; returns the bytes this rank contributed to the all-reduce."""
    torch.distributed.all_reduce(tensor)
    tensor.div_(torch.distributed.get_world_size())
    return tensor.numel() * tensor.element_size()


@torch.no_grad()
def broadcast_from_rank0_(tensors: Iterable[torch.Tensor | None]) -> None:
    """Copy rank 0's values of ``tensors`` to every rank, in place (``None`` entries are skipped)."""
    for tensor in tensors:
        if tensor is not None:
            torch.distributed.broadcast(tensor.data, src=0)


def keep_model_out_of_ddp(trainer: Trainer) -> None:
    """Make ``trainer`` prepare its model without wrapping it in DDP (mixed precision and compilation still apply),
    and start every rank from rank 0's parameters and buffers there, as DDP's wrap would.

    # NOTE: the Trainer offers no switch for this; accelerate's ``prepare_model(evaluation_mode=True)`` is the path
    # transformers itself takes for models that own their gradient reduction (``is_distributed_loading_by_transformers``
    # in ``Trainer._prepare_for_training``). The accelerator's ``prepare_model`` is replaced on this instance only.
    """
    accelerator = trainer.accelerator
    if getattr(accelerator.prepare_model, "hf_memopt_keeps_out_of_ddp", False):
        return
    prepare_model = accelerator.prepare_model

    def prepare_without_ddp(model, device_placement=None, evaluation_mode=False):
        model = prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        if is_distributed():
            broadcast_from_rank0_([*model.parameters(), *model.buffers()])
        return model

    prepare_without_ddp.hf_memopt_keeps_out_of_ddp = True
    accelerator.prepare_model = prepare_without_ddp
