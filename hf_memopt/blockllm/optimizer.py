"""BlockLLM optimizers: AdamW (torch math) or 8-bit AdamW restricted to the selected blocks, plus the selection state.

One optimizer holds every selectable parameter, so the Trainer builds it once; only the selected blocks have
``requires_grad`` and optimizer state. Changing the selection adds and removes state inside this optimizer:

* a block that leaves the selection loses its moments at once (its memory is freed);
* a block that stays selected keeps its moments and step count (Adam's estimates for it remain valid: the block's
  loss landscape did not change because other blocks were swapped);
* a block that enters starts from zero moments (step 0, so bias correction applies afresh).

Where a selection reads the blocks' gradient norms (``selection``):

* ``"full_backward"`` (Alg. 1): the step after a stall is a scoring step: every block gets ``requires_grad``, a tensor
  hook reads each arriving gradient's norm and a post-accumulate hook drops it at once outside the current selection.
  Gradient memory stays at the selection plus one transient block, but that backward runs down to the first layer,
  saves the activations every weight gradient needs and computes all of them;
* ``"stored_norms"`` (the official code, ``blockllm_torch/blockllm.py`` of RAmruthaVignesh/blockllm: ``step`` keeps
  ``grad_norm_dict[name]`` for every parameter with ``requires_grad``, ``_adjust_parameters`` ranks that dict): each
  update records the norm of the selected blocks' gradients and of ``explore_blocks`` unselected blocks that get
  ``requires_grad`` for that step only (their gradient is measured before clipping, then dropped, never applied);
  a re-selection ranks the stored norms at once, with no extra backward. Never-measured blocks rank last (score 0).

The selection state (selected blocks, visit counts, number of selections, the loss history since the last selection,
whether the next step is a scoring step, the stored norms and which blocks explore) travels in
``state_dict()["blockllm"]`` as plain tensors, ints and bools, and the masks in each parameter's state, so
``optimizer.pt`` reloads with ``torch.load(weights_only=True)``.

Under data parallelism (``distributed``: by default, whether a multi-rank process group runs; the builder keeps the
model out of DDP, see ``hf_memopt/shared/parallel.py``) the optimizer averages what it uses across ranks itself, so every rank
takes the same decisions from the global batch's gradient:

* an update averages the selected blocks' gradients only (:meth:`average_gradients`: a few flat buckets, one
  all-reduce each), about ``1 - sparsity`` of what DDP would send; the top-k masks are drawn after it;
* a scoring pass averages every block's gradient in its hook before the norm is read (the norm of the mean is not
  the mean of the local norms), a full all-reduce on scoring steps only;
* the stall test reads the rank-average of the step's loss (:meth:`mean_over_ranks`).

Every rank must compute a gradient for the same parameters (true unless the graph depends on the data, as with
routed experts); a parameter whose gradient is missing on some ranks only counts as zero there in an update, as with
DDP's ``find_unused_parameters``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hf_memopt.blockllm.blocks import Block, select_blocks
from hf_memopt.blockllm.config import SELECTION_SOURCES
from hf_memopt.shared.adam8bit import adam_8bit_direction, init_8bit_moments
from hf_memopt.shared.faults import DEFAULT_MAX_CONSECUTIVE_SKIPS, all_finite, out_of_memory_advice
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.shared.optimizer_base import _MemoptOptimizer
from hf_memopt.shared.parallel import all_reduce_mean_, is_distributed
from hf_memopt.shared.validation import check_choice, check_int

__all__ = ["BlockLLMAdamW", "BlockLLMAdamW8bit"]

logger = logging.getLogger(__name__)

_STATE_KEY = "blockllm"
# elements per all-reduce bucket of the update's gradient averaging (64 MiB of float32), so the flat copy stays small
_BUCKET_NUMEL = 1 << 24


class _BlockLLMOptimizer(_MemoptOptimizer):
    """Selection, scoring and the masked AdamW step; subclasses supply the moments (see module docstring).
    Hyperparameter checks, the closure, the skip counter and state dtypes on load come from
    :class:`hf_memopt.shared.optimizer_base._MemoptOptimizer`.

    Args:
        params: parameters or groups; must contain every parameter of ``blocks``.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled decay, applied to selected coordinates).
        blocks: the selectable blocks (``hf_memopt.blockllm.blocks.build_blocks``).
        budget: most parameters one selection may hold.
        patience: m, the loss window of the stall test.
        mask_fraction: fraction of a selected block's coordinates updated (top-|g|); 1.0 disables masking.
        visit_penalty: lambda of the visit-frequency discount.
        selection: ``"full_backward"`` or ``"stored_norms"`` (module docstring).
        explore_blocks: ``stored_norms``: unselected blocks measured per update.
        stall_check_interval: the stall test runs on steps that are multiples of this (the official ``update_freq``).
        trainable_numel: parameters trainable before BlockLLM froze embeddings and head, for the reported fraction
            of all trainable parameters; ``None``: the selectable ones.
        max_consecutive_skips: an update with a non-finite gradient in a selected block is skipped whole; after this
            many in a row the next one raises (``hf_memopt.shared.faults``).
        distributed: average gradients and losses across ranks (module docstring); ``None``: whether a multi-rank
            process group runs.
    """

    fault_label = "BlockLLM"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        blocks: list[Block],
        budget: int,
        patience: int = 100,
        mask_fraction: float = 1.0,
        visit_penalty: float = 1.0,
        selection: str = "full_backward",
        explore_blocks: int = 1,
        stall_check_interval: int = 1,
        trainable_numel: int | None = None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        distributed: bool | None = None,
    ):
        if not blocks:
            raise ValueError("BlockLLM needs at least one selectable block; the model has no trainable parameter left")
        check_choice("selection", selection, SELECTION_SOURCES)
        check_int("explore_blocks", explore_blocks, 0)
        check_int("stall_check_interval", stall_check_interval, 1)
        super().__init__(
            params,
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
            max_consecutive_skips=max_consecutive_skips,
        )
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        self.blocks = blocks
        self._block_of: dict[int, int] = {}
        for i, block in enumerate(blocks):
            for name, p in zip(block.names, block.params):
                if id(p) not in in_groups:
                    raise ValueError(f"parameter {name} of block {block.name} is missing from the optimizer's params")
                self._block_of[id(p)] = i
        self.sizes = torch.tensor([b.numel for b in blocks], dtype=torch.int64)
        if budget < int(self.sizes.min()):
            raise ValueError(
                f"BlockLLM selection would be empty: the budget is {budget} parameters (1 - sparsity of the selectable "
                f"ones) and the smallest block has {int(self.sizes.min())}; lower sparsity or use "
                "block_granularity='parameter'"
            )
        self.budget = budget
        self.patience = patience
        self.mask_fraction = mask_fraction
        self.visit_penalty = visit_penalty
        self.selection = selection
        self.explore_blocks = explore_blocks
        self.stall_check_interval = stall_check_interval
        self.selectable_numel = int(self.sizes.sum())
        self.trainable_numel = self.selectable_numel if trainable_numel is None else trainable_numel
        self.selected = torch.zeros(len(blocks), dtype=torch.bool)
        self.visits = torch.zeros(len(blocks), dtype=torch.int64)
        self.num_selections = 0
        # the stall test needs mean(H) and mean(H[-m:]) of the losses H since the last selection: a running sum and
        # count plus the last m losses, so the state stays O(m) however long the loss keeps falling
        self.loss_sum = 0.0
        self.loss_count = 0
        self.recent_losses: deque[float] = deque(maxlen=patience)
        self.scoring = False
        self.step_count = 0  # optimizer steps ended (end_step), scoring steps included: the official update_step
        # stored_norms: each block's last measured gradient norm (NaN: never), the step it was measured at (-1: never),
        # and the unselected blocks that get a gradient on the next update to refresh theirs
        self.grad_norms = torch.full((len(blocks),), math.nan, dtype=torch.float64)
        self.norm_steps = torch.full((len(blocks),), -1, dtype=torch.int64)
        self.exploring = torch.zeros(len(blocks), dtype=torch.bool)
        self._norms_recorded = False  # this update's norms are stored already
        self._norms_sq = torch.zeros(len(blocks), dtype=torch.float64)
        self._hooks: list[Any] = []
        self.distributed = is_distributed() if distributed is None else distributed
        # bytes this rank sent to all-reduces, and what DDP would have sent (every selectable gradient, every update)
        self.communicated_bytes = 0
        self.ddp_equivalent_bytes = 0
        self._selectable_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.params)
        self._grads_averaged = False  # this update's gradients are already the rank-average

    # ---- the base rule: implemented by the public classes -------------------------------------------------------
    def _init_moments(self, state: dict[str, Any], p: torch.Tensor) -> None:
        raise NotImplementedError

    def _direction(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Update the moments with ``grad`` and return d with p <- p - lr * d (bias corrections included)."""
        raise NotImplementedError

    # ---- selection ----------------------------------------------------------------------------------------------
    def block_index(self, p: torch.Tensor) -> int:
        return self._block_of[id(p)]

    def is_selected(self, p: torch.Tensor) -> bool:
        return bool(self.selected[self._block_of[id(p)]])

    @property
    def selected_numel(self) -> int:
        return int(self.sizes[self.selected].sum())

    @property
    def selected_fraction(self) -> float:
        """The selection's share of the selectable parameters (at most ``1 - sparsity``)."""
        return self.selected_numel / self.selectable_numel

    @property
    def selected_fraction_of_trainable(self) -> float:
        """The selection's share of every parameter trainable before BlockLLM froze embeddings and head."""
        return self.selected_numel / self.trainable_numel

    def apply_selection(self, *, scoring: bool | None = None) -> None:
        """``requires_grad`` on for the selected and exploring blocks (on for all during a scoring step), off for the
        rest.

        ``scoring=False`` applies the selection alone (exploring blocks off too) and removes the scoring hooks while
        keeping a pending scoring step pending (used when training ends, so the model is left with only the selected
        blocks trainable).
        """
        selection_only = scoring is False
        scoring = self.scoring if scoring is None else scoring
        for i, block in enumerate(self.blocks):
            on = scoring or bool(self.selected[i]) or (bool(self.exploring[i]) and not selection_only)
            for p in block.params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
        self._remove_hooks()
        if scoring:
            self._register_scoring_hooks()

    def begin_scoring(self) -> None:
        """Make the next forward/backward a scoring pass: every block gets a gradient, whose norm is read and which,
        for blocks outside the current selection, is dropped at once (Sec. 3: gradient norms of all blocks without
        keeping the full gradient). The selected blocks keep theirs for this step's update."""
        self.scoring = True
        self._norms_sq.zero_()
        self.apply_selection()

    def _register_scoring_hooks(self) -> None:
        for i, block in enumerate(self.blocks):
            for p in block.params:
                self._hooks.append(p.register_hook(self._norm_hook(i)))
                if not self.selected[i]:
                    self._hooks.append(p.register_post_accumulate_grad_hook(_drop_grad))

    def _norm_hook(self, index: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            # one micro-batch's gradient; with accumulation the score is the root of the summed squares
            if self.distributed:  # score the global batch's gradient, and keep it for this step's update
                grad = grad.detach().clone()
                self.communicated_bytes += all_reduce_mean_(grad)
                self._grads_averaged = True
            self._norms_sq[index] += grad.detach().double().pow(2).sum().item()
            return grad if self.distributed else None

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def finish_scoring(self) -> torch.Tensor:
        """Choose the new selection from the norms gathered in the scoring pass and apply it; returns the mask."""
        if not self.scoring:
            raise RuntimeError("finish_scoring() without begin_scoring()")
        if not all_finite([self._norms_sq]):
            # a NaN/Inf norm would rank its block first or last at random: score again on the next step instead
            logger.warning("BlockLLM: non-finite gradient norm in the scoring pass; the next step scores again")
            self._norms_sq.zero_()
            return self.selected
        return self._select(self._norms_sq.sqrt())

    def select_from_stored_norms(self) -> torch.Tensor:
        """``selection="stored_norms"``: choose the new selection from the norms kept so far (the official
        ``_adjust_parameters``: rank ``grad_norm_dict``, no extra backward) and apply it; returns the mask. A block
        never measured scores 0, so it is taken only when the budget has room after every measured block."""
        return self._select(self.grad_norms)

    def select_at_random(self, seed: int) -> torch.Tensor:
        """``selection="stored_norms"``, first selection: no gradient norm is known yet, so blocks are taken in a
        random order (``torch.randperm`` seeded with ``seed``: the same on every rank) while they fit the budget, as
        the official code's initial shuffle (``_choose_top_k_params_by_mag`` shuffles, then takes a number of
        tensors); returns the mask."""
        n = len(self.blocks)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        ties = torch.zeros(n, dtype=torch.float64)  # all scores equal: select_blocks keeps the given order
        in_order = select_blocks(ties, torch.zeros(n, dtype=torch.int64), 0, self.sizes[order], self.budget, 0.0)
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order] = in_order
        return self._adopt(chosen)

    def _select(self, norms: torch.Tensor) -> torch.Tensor:
        try:
            chosen = select_blocks(norms, self.visits, self.num_selections, self.sizes, self.budget, self.visit_penalty)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"BlockLLM: out of memory while choosing the blocks of selection {self.num_selections + 1}; nothing "
                f"was changed (selection, visit counts and optimizer state are those before it). {out_of_memory_advice()}"
            ) from err
        return self._adopt(chosen)

    def _adopt(self, chosen: torch.Tensor) -> torch.Tensor:
        """Make ``chosen`` the selection: leaving blocks free their moments, staying ones re-draw their masks."""
        for i, block in enumerate(self.blocks):
            for p in block.params:
                if not chosen[i]:
                    self.state.pop(p, None)  # leaving blocks free their moments
                else:
                    self.state.get(p, {}).pop("mask", None)  # masks are re-drawn from the next gradient
        self.visits += chosen.long()
        self.num_selections += 1
        self.selected = chosen
        self._reset_loss_window()
        self.scoring = False
        self._choose_exploring()
        self.apply_selection()
        return chosen

    def _choose_exploring(self) -> None:
        """``stored_norms``: the ``explore_blocks`` unselected blocks measured longest ago (never first; ties in model
        order) get a gradient on the next update; blocks larger than the budget, which no selection can hold, are
        never explored. The official code draws them at random every ``param_update_interval`` steps and keeps them
        for that many; rotating every step by age measures every unselected block within
        ``ceil(unselected / explore_blocks)`` steps at the same memory."""
        self.exploring = torch.zeros(len(self.blocks), dtype=torch.bool)
        if self.selection != "stored_norms" or self.explore_blocks == 0:
            return
        candidates = torch.nonzero(~self.selected & (self.sizes <= self.budget)).flatten()
        age_order = torch.sort(self.norm_steps[candidates], stable=True).indices
        self.exploring[candidates[age_order[: self.explore_blocks]]] = True

    @torch.no_grad()
    def record_gradient_norms(self) -> None:
        """``stored_norms``: store the norm of this update's gradient of every selected and exploring block, then
        drop the exploring blocks' gradients (they are measured, never applied). Once per update: the Trainer
        integration calls it after the last micro-batch's backward, before clipping (so stored norms from different
        steps are comparable and the exploring gradients take no part in the clip); ``step()`` calls it otherwise.
        A non-finite norm is not stored."""
        if self.selection != "stored_norms" or self._norms_recorded or self.scoring:
            return
        self._norms_recorded = True
        measured, squares = [], []
        for i, block in enumerate(self.blocks):
            if not (self.selected[i] or self.exploring[i]):
                continue
            grads = [p.grad for p in block.params if p.grad is not None]
            if grads:
                measured.append(i)
                squares.append(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads))
            if self.exploring[i]:
                for p in block.params:
                    p.grad = None
        if not measured:
            return
        norms = torch.stack(squares).cpu().sqrt()
        index = torch.tensor(measured)
        finite = torch.isfinite(norms)
        self.grad_norms[index[finite]] = norms[finite]
        self.norm_steps[index[finite]] = self.step_count

    def end_step(self, loss: torch.Tensor | float | None) -> bool:
        """End one optimizer step (the Trainer integration calls it at ``on_step_end``); True when it made a new
        selection.

        A scoring step ends with its selection. Otherwise ``loss`` (this rank's loss of the step, averaged over the
        ranks here; ``None``: not known) feeds the stall test, evaluated on steps that are multiples of
        ``stall_check_interval``; a stall makes the next step a scoring step (``full_backward``) or re-selects from
        the stored norms now (``stored_norms``). With ``stored_norms`` the exploring blocks then move on.
        """
        self.step_count += 1
        if self.scoring:
            before = self.num_selections
            self.finish_scoring()
            return self.num_selections != before
        changed = False
        if loss is not None:
            stalled = self.observe_loss(self.mean_over_ranks(torch.as_tensor(loss)))
            if stalled and self.step_count % self.stall_check_interval == 0:
                if self.selection == "stored_norms":
                    self.select_from_stored_norms()
                    changed = True
                else:
                    self.begin_scoring()
        if self.selection == "stored_norms" and not changed:
            self._choose_exploring()
            self.apply_selection()
        return changed

    def observe_loss(self, loss: float) -> bool:
        """Record one optimizer step's loss; True when the loss has stalled and a re-selection should start.

        Stall test (Alg. 1): with H the losses since the last selection, re-select when mean(H[-m:]) >= mean(H).
        It is evaluated once H holds more than m losses (with exactly m the two means coincide).
        """
        if not math.isfinite(loss):
            return False
        self.loss_sum += float(loss)
        self.loss_count += 1
        self.recent_losses.append(float(loss))
        m = self.patience
        if self.loss_count <= m:
            return False
        return sum(self.recent_losses) / m >= self.loss_sum / self.loss_count

    def _reset_loss_window(self) -> None:
        self.loss_sum, self.loss_count = 0.0, 0
        self.recent_losses.clear()

    # ---- data parallelism ------------------------------------------------------------------------------------------
    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """``value`` (a scalar, e.g. this rank's loss of the step) averaged over the ranks when distributed, so the
        stall test takes the same decision on every rank."""
        value = value.detach().reshape(1).double().clone()
        if self.distributed:
            self.communicated_bytes += all_reduce_mean_(value)
        return float(value)

    @torch.no_grad()
    def begin_update(self) -> None:
        """Start a new update: its gradients are not averaged (nor their norms stored) yet. ``step()`` ends every
        update it runs; the Trainer integration also calls this before each update's first micro-batch, so an update
        whose ``step()`` never ran (a GradScaler skips it on an fp16 overflow) cannot leave the next update's gradients
        un-averaged."""
        self._grads_averaged = False
        self._norms_recorded = False

    def average_gradients(self) -> None:
        """Replace the selected (and exploring) blocks' gradients by their mean over the ranks, once per update.

        ``step()`` calls it; call it earlier to clip the averaged gradient (the Trainer integration does so after
        the last micro-batch's backward). A no-op without ``distributed``, and after the scoring hooks (which
        averaged every gradient already) or an earlier call in the same update.
        """
        if not self.distributed or self._grads_averaged:
            return
        self._grads_averaged = True
        on = self.selected | self.exploring
        params = [p for i, block in enumerate(self.blocks) if on[i] for p in block.params]
        for bucket in _buckets(params):
            self.communicated_bytes += _average_bucket(bucket)

    # ---- the step ------------------------------------------------------------------------------------------------
    def _step(self) -> None:
        if self.distributed:
            self.ddp_equivalent_bytes += self._selectable_bytes
        try:
            self.average_gradients()
            self.record_gradient_norms()
        finally:
            self.begin_update()
        updated = [(p, group) for group in self.param_groups for p in group["params"] if self._updates(p)]
        # checked before any update, so a skipped step leaves moments, masks, step counters and parameters untouched
        if self._skip_if_nonfinite([p.grad for p, _ in updated]):
            return
        self._allocate_states([p for p, _ in updated])
        for p, group in updated:
            lr, wd = group["lr"], group["weight_decay"]
            state = self.state[p]
            grad = p.grad
            mask = state.get("mask")
            if self.mask_fraction < 1.0 and mask is None:
                mask = state["mask"] = _top_fraction_mask(grad, self.mask_fraction)
            if mask is not None:
                grad = grad * mask
            state["step"] += 1
            direction = self._direction(state, grad, group)
            if mask is not None:
                direction = direction * mask
            if wd > 0.0:
                if mask is None:
                    p.mul_(1.0 - lr * wd)
                else:
                    p.mul_(torch.where(mask, 1.0 - lr * wd, 1.0).to(p.dtype))
            p.add_(direction.to(p.dtype), alpha=-lr)

    def _updates(self, p: torch.Tensor) -> bool:
        """Whether this step updates ``p`` (a selected block with a gradient)."""
        if p.grad is None or not self.is_selected(p):
            return False
        self._refuse_sparse([p.grad])
        return True

    def _allocate_states(self, params: list[torch.Tensor]) -> None:
        """Create the moments of newly selected parameters before any update, all or none.

        After a re-selection this is where memory grows (the new blocks' moments); running out of memory half-way
        would leave some parameters updated and others not, so the new states are dropped again and the error names
        the step's blocks.
        """
        created = []
        try:
            for p in params:
                if not self.state.get(p):
                    created.append(p)
                    state = self.state[p]
                    state["step"] = 0
                    self._init_moments(state, p)
        except torch.OutOfMemoryError as err:
            for p in created:
                self.state.pop(p, None)
            blocks = sorted({self.blocks[self.block_index(p)].name for p in created})
            raise torch.OutOfMemoryError(
                f"BlockLLM: out of memory allocating optimizer state for {len(created)} parameters of the newly "
                f"selected blocks {blocks} (selection {self.num_selections}); no parameter or optimizer state was "
                f"changed by this step. {out_of_memory_advice()}"
            ) from err

    # ---- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "selected": self.selected.clone(),
            "visits": self.visits.clone(),
            "block_sizes": self.sizes.clone(),
            "num_selections": self.num_selections,
            "loss_sum": torch.tensor(self.loss_sum, dtype=torch.float64),
            "loss_count": self.loss_count,
            "recent_losses": torch.tensor(list(self.recent_losses), dtype=torch.float64),
            "scoring": self.scoring,
            "step_count": self.step_count,
            "grad_norms": self.grad_norms.clone(),
            "norm_steps": self.norm_steps.clone(),
            "exploring": self.exploring.clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        if not torch.equal(extra["block_sizes"].cpu(), self.sizes):
            raise ValueError("this BlockLLM checkpoint was saved for different blocks (model or config changed)")
        self.selected = extra["selected"].cpu().bool().clone()
        self.visits = extra["visits"].cpu().long().clone()
        self.num_selections = int(extra["num_selections"])
        if "loss_history" in extra:  # checkpoints written before 2026-11-25 kept every loss since the selection
            history = [float(x) for x in extra["loss_history"].tolist()]
            extra = {
                **extra,
                "loss_sum": sum(history),
                "loss_count": len(history),
                "recent_losses": torch.tensor(history[-self.patience :], dtype=torch.float64),
            }
        self.loss_sum, self.loss_count = float(extra["loss_sum"]), int(extra["loss_count"])
        self.recent_losses = deque((float(x) for x in extra["recent_losses"].tolist()), maxlen=self.patience)
        self.scoring = bool(extra["scoring"])
        n = len(self.blocks)
        self.step_count = int(extra.get("step_count", 0))  # absent from checkpoints written before 2026-12-04
        self.grad_norms = extra.get("grad_norms", torch.full((n,), math.nan)).cpu().double().clone()
        self.norm_steps = extra.get("norm_steps", torch.full((n,), -1)).cpu().long().clone()
        self.exploring = extra.get("exploring", torch.zeros(n)).cpu().bool().clone()
        self._norms_sq.zero_()
        self.apply_selection()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` in order, split by dtype and device and into runs of at most ``_BUCKET_NUMEL`` elements (a larger
    parameter gets a bucket of its own). Every rank holds the same selection, so every rank makes the same buckets."""
    buckets: list[list[torch.Tensor]] = []
    sizes: list[int] = []
    open_bucket: dict[tuple[torch.dtype, torch.device], int] = {}  # index of the bucket each kind still fills
    for p in params:
        key = (p.dtype, p.device)
        i = open_bucket.get(key)
        if i is None or sizes[i] + p.numel() > _BUCKET_NUMEL:
            i = open_bucket[key] = len(buckets)
            buckets.append([])
            sizes.append(0)
        buckets[i].append(p)
        sizes[i] += p.numel()
    return buckets


def _average_bucket(params: list[torch.Tensor]) -> int:
    """Average the ``.grad`` of ``params`` over the ranks with one all-reduce of a flat buffer; returns its bytes.

    The buffer starts with one presence flag per parameter, so a gradient missing on some ranks counts as zero there
    (and stays ``None`` where no rank has one) instead of shifting the other gradients' offsets.
    """
    first = params[0]
    flat = torch.zeros(len(params) + sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = len(params)
    for i, p in enumerate(params):
        if p.grad is not None:
            flat[i] = 1
            flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
        offset += p.numel()
    sent = all_reduce_mean_(flat)
    offset = len(params)
    for i, p in enumerate(params):
        mean = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if flat[i] == 0:
            continue
        if p.grad is None:
            p.grad = mean.clone()
        else:
            p.grad.copy_(mean)
    return sent


def _top_fraction_mask(grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ceil(fraction * n) coordinates with the largest |grad| (ties: lowest index first)."""
    flat = grad.detach().abs().flatten()
    k = max(1, math.ceil(fraction * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=grad.device)
    mask[torch.topk(flat.float(), k, sorted=False).indices] = True
    return mask.view_as(grad)


class BlockLLMAdamW(_BlockLLMOptimizer):
    """AdamW on the selected blocks with the math of ``torch.optim.AdamW`` (bias-corrected moments, eps added to
    sqrt(v_hat), decoupled weight decay). Moments are float32 (float64 for float64 parameters)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.0, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)

    def _init_moments(self, state, p):
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _direction(self, state, grad, group):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step = state["step"]
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return (exp_avg / denom).div_(bias_correction1)


class BlockLLMAdamW8bit(_BlockLLMOptimizer):
    """AdamW on the selected blocks with bitsandbytes block-wise 8-bit moments (Dettmers et al. 2022): blocks of at
    least ``min_8bit_size`` elements keep uint8 moments with one absmax per 256 values, updated by bitsandbytes'
    fused kernel (CPU and CUDA); smaller ones keep float32 moments and the AdamW math above."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay=0.0,
        *,
        min_8bit_size: int = 4096,
        **kwargs,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
        self.min_8bit_size = min_8bit_size

    def _init_moments(self, state, p):
        if p.numel() < self.min_8bit_size:
            BlockLLMAdamW._init_moments(self, state, p)
        else:
            init_8bit_moments(state, p)

    def _direction(self, state, grad, group):
        if "state1" not in state:
            return BlockLLMAdamW._direction(self, state, grad, group)
        return adam_8bit_direction(state, grad, group["betas"], group["eps"], state["step"])


def unwrap_blockllm_optimizer(optimizer: Any) -> _BlockLLMOptimizer | None:
    """The BlockLLM optimizer inside accelerate's (or another) wrapper, or None."""
    optimizer = unwrap_optimizer(optimizer)
    return optimizer if isinstance(optimizer, _BlockLLMOptimizer) else None


__all__ += ["unwrap_blockllm_optimizer"]
