"""Configuration of BlockLLM."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_memopt.shared.validation import check_bool, check_choice, check_float, check_int

__all__ = ["BLOCKLLM_OPTIMIZERS", "BLOCK_GRANULARITIES", "SELECTION_SOURCES", "BlockLLMConfig"]

BLOCKLLM_OPTIMIZERS = ("adamw", "adamw_8bit")
BLOCK_GRANULARITIES = ("parameter", "layer")
SELECTION_SOURCES = ("full_backward", "stored_norms")


@dataclass
class BlockLLMConfig:
    """BlockLLM: Memory-Efficient Adaptation of LLMs by Selecting and Optimizing the Right Coordinate Blocks
    (https://arxiv.org/abs/2406.17296).

    Block coordinate descent over parameter blocks (Sec. 3): only a selected set of blocks, holding at most
    ``1 - sparsity`` of the selectable parameters, gets gradients and optimizer state. Blocks are ranked by their
    gradient norm discounted by how often they were selected before; the set is re-chosen when the loss stalls (the
    mean of the last ``patience`` losses is not below the mean since the last selection).

    Args:
        sparsity: fraction of the selectable parameters that is *not* updated, in [0, 1). The selection budget is
            ``floor((1 - sparsity) * selectable)``, selectable = the parameters of the blocks a selection can pick
            (the trainable ones minus embeddings and head unless ``train_embeddings``), as in the official code
            (``blockllm_torch/blockllm.py``: ``total_params`` counts the optimizer's non-embedding groups). The
            Trainer logs the selection as a fraction of both the selectable and all trainable parameters.
        patience: m in the paper, >= 1: the loss window compared with the running mean since the last selection.
        optimizer: the base update of the selected blocks: ``adamw`` (torch AdamW math) or ``adamw_8bit``
            (bitsandbytes block-wise 8-bit moments).
        block_granularity: ``parameter`` (each parameter tensor is a block) or ``layer`` (all parameters of one
            numbered layer, ``...layers.3.`` / ``...layer.3.``, form one block; others stay per-parameter).
        train_embeddings: let the input embeddings, position / token-type embeddings and the LM head be selected.
            Off by default, as in the paper: they stay frozen.
        mask_fraction: within-block top-k masking: the fraction of each selected block's coordinates that is
            updated, chosen by gradient magnitude from the block's first gradient after it is (re-)selected.
            1.0 disables masking.
        visit_penalty: lambda in the discount: score = ||G_b|| * exp(-lambda * f_b), f_b = fraction of the past
            selections that chose block b. 0 ranks by gradient norm alone.
        min_8bit_size: ``adamw_8bit`` only: blocks with fewer elements keep float32 moments (as bitsandbytes does).
        selection: where a (re-)selection reads the blocks' gradient norms.
            ``full_backward`` (Alg. 1): the step after the stall is a scoring step whose backward computes every
            block's gradient (each is read and, outside the selection, dropped at once), so the ranking uses current
            norms; that step saves the activations of every layer and computes every weight gradient.
            ``stored_norms`` (the official code's selection): every step keeps the gradient norm of the selected
            blocks and of ``explore_blocks`` unselected ones, and a re-selection ranks the norms kept so far, at
            once, without an extra backward; the first selection, with no norm known yet, is random (the Trainer's
            seed), as the official code's initial shuffle.
        explore_blocks: ``stored_norms`` only, >= 0: unselected blocks whose gradient is computed (never applied)
            each step to refresh their stored norm, the ones measured longest ago first, never one larger than the
            budget (the official code's ``num_bottom_to_sample``). 0 ranks unselected blocks by the norm they had
            when last selected.
        stall_check_interval: evaluate the stall test only on optimizer steps that are multiples of this, >= 1
            (the official code's ``update_freq``, 1000 there); 1 tests every step, as Alg. 1. Losses are recorded on
            every step either way.
        max_consecutive_skips: an optimizer update with a non-finite (NaN/Inf) gradient is skipped whole (nothing
            changes) and logged; after this many skipped in a row the next one stops training with a clear error,
            >= 0 (0: stop at the first). See ``hf_memopt.shared.faults``.
    """

    sparsity: float = field(
        default=0.95, metadata={"help": "Fraction of the selectable (non-embedding) parameters not updated, [0, 1)."}
    )
    patience: int = field(default=100, metadata={"help": "Loss window m for the stall test (>= 1)."})
    optimizer: str = field(default="adamw", metadata={"help": f"Base optimizer: one of {BLOCKLLM_OPTIMIZERS}."})
    block_granularity: str = field(
        default="parameter", metadata={"help": f"What a block is: one of {BLOCK_GRANULARITIES}."}
    )
    train_embeddings: bool = field(
        default=False, metadata={"help": "Allow embeddings and the LM head to be selected (frozen by default)."}
    )
    mask_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of a selected block's coordinates updated (top-|g|), (0, 1]."}
    )
    visit_penalty: float = field(
        default=1.0, metadata={"help": "Discount of the score by visit frequency: exp(-penalty * f), >= 0."}
    )
    min_8bit_size: int = field(default=4096, metadata={"help": "adamw_8bit: smaller blocks keep float32 moments."})
    selection: str = field(
        default="full_backward",
        metadata={"help": f"Source of the gradient norms a selection ranks: one of {SELECTION_SOURCES}."},
    )
    explore_blocks: int = field(
        default=1, metadata={"help": "stored_norms: unselected blocks whose gradient norm is measured per step (>= 0)."}
    )
    stall_check_interval: int = field(
        default=1, metadata={"help": "Test for a stall only every this many steps (official update_freq), >= 1."}
    )
    max_consecutive_skips: int = field(
        default=5, metadata={"help": "Non-finite updates skipped in a row before training stops (>= 0)."}
    )

    def __post_init__(self) -> None:
        self.sparsity = check_float("sparsity", self.sparsity, 0.0, 1.0, high_inclusive=False)
        check_int("patience", self.patience, 1)
        check_choice("optimizer", self.optimizer, BLOCKLLM_OPTIMIZERS)
        check_choice("block_granularity", self.block_granularity, BLOCK_GRANULARITIES)
        check_bool("train_embeddings", self.train_embeddings)
        self.mask_fraction = check_float("mask_fraction", self.mask_fraction, 0.0, 1.0, low_inclusive=False)
        self.visit_penalty = check_float("visit_penalty", self.visit_penalty, 0.0)
        check_int("min_8bit_size", self.min_8bit_size, 1)
        check_choice("selection", self.selection, SELECTION_SOURCES)
        check_int("explore_blocks", self.explore_blocks, 0)
        check_int("stall_check_interval", self.stall_check_interval, 1)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 0)
