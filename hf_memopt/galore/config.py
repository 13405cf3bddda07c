"""Configuration of GaLore."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_memopt.shared.targeting import validate_target_modules
from hf_memopt.shared.validation import check_bool, check_choice, check_float, check_int

__all__ = ["GALORE_OPTIMIZERS", "PROJ_TYPES", "SVD_METHODS", "GaLoreConfig"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
GALORE_OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
SVD_METHODS = ("subspace", "exact")


@dataclass
class GaLoreConfig:
    """GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (https://arxiv.org/abs/2403.03507).

    Each targeted weight's gradient G (m x n) is projected to a rank-r subspace, R = P^T G (Sec. 3, Eq. 5); the base
    optimizer's states live on R, and the update scale * P N(R) is projected back. P is re-found from the current
    gradient every ``update_proj_gap`` optimizer updates.

    Args:
        rank: rank r of the projection, >= 1; a weight whose smaller side is below it is projected at that side's
            size, as galore-torch does (logged once, naming the weights).
        update_proj_gap: optimizer updates between projector refreshes (T in the paper), >= 1.
        scale: the paper's alpha; multiplies the projected-back update, > 0.
        proj_type: ``std`` projects the smaller side (right when m >= n), ``reverse_std`` the larger one, ``left``,
            ``right``, or ``full`` (both sides, R = P^T G Q).
        target_modules: names, a regex, or ``"all-linear"`` (every Linear and Conv1D except the output embedding
            and the task head, as peft; see ``hf_memopt.shared.targeting``). Linear, Embedding and GPT-2 Conv1D weights can
            be targeted; other trainable parameters get the base optimizer without projection.
        optimizer: the base optimizer: ``adamw``, ``adamw_8bit`` (bitsandbytes block-wise 8-bit states) or
            ``adafactor``.
        adafactor_beta1: ``optimizer="adafactor"`` only: None (default) keeps no first moment (the Trainer's
            Adafactor); a value in [0, 1) adds one, an exponential average of the lr-scaled, clipped updates in the
            projected space (transformers' and galore-torch's ``Adafactor(beta1=...)``). The paper considers Adafactor
            with first-order statistics when it applies GaLore to memory-efficient optimizers (Sec. 5, "GaLore with
            memory-efficient optimizers"; the official ``torchrun_main.py`` takes ``--beta1``). Costs one more r x n
            tensor per weight.
        layerwise: update each parameter inside backward, as soon as its gradient is complete, and free the gradient
            at once (Sec. 4.3). Supports gradient accumulation (the projected gradient is accumulated).
        svd_method: ``subspace`` (default): a few subspace iterations warm-started from the previous projector
            (randomized range finder at the first refresh), O(m n r); ``exact``: ``torch.linalg.svd`` as in the
            reference implementation.
        svd_iterations: subspace iterations per refresh for ``svd_method="subspace"``, >= 1.
        seed: seed of the random start of the first refresh (``subspace`` only), so runs are reproducible.
        max_consecutive_skips: an optimizer update with a non-finite (NaN/Inf) gradient is skipped whole (nothing
            changes) and logged; after this many skipped in a row the next one stops training with a clear error,
            >= 0 (0: stop at the first). See ``hf_memopt.shared.faults``.
    """

    rank: int = field(
        default=128, metadata={"help": "Rank of the gradient projection (>= 1; capped at min(m, n) per weight)."}
    )
    update_proj_gap: int = field(default=200, metadata={"help": "Optimizer updates between projector refreshes."})
    scale: float = field(default=0.25, metadata={"help": "Scale of the projected-back update (alpha)."})
    proj_type: str = field(default="std", metadata={"help": f"Projection side: one of {PROJ_TYPES}."})
    target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Module names, a regex, or 'all-linear'."}
    )
    optimizer: str = field(default="adamw", metadata={"help": f"Base optimizer: one of {GALORE_OPTIMIZERS}."})
    adafactor_beta1: float | None = field(
        default=None,
        metadata={
            "help": "Adafactor's first-moment decay in [0, 1), or None for no first moment (optimizer='adafactor' "
            "only; the GaLore paper runs Adafactor with first-order statistics, e.g. 0.9)."
        },
    )
    layerwise: bool = field(default=False, metadata={"help": "Update inside backward and free each gradient."})
    svd_method: str = field(default="subspace", metadata={"help": f"Projector refresh: one of {SVD_METHODS}."})
    svd_iterations: int = field(default=2, metadata={"help": "Subspace iterations per refresh (>= 1)."})
    seed: int = field(default=0, metadata={"help": "Seed of the randomized first refresh."})
    max_consecutive_skips: int = field(
        default=5, metadata={"help": "Non-finite updates skipped in a row before training stops (>= 0)."}
    )

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_int("update_proj_gap", self.update_proj_gap, 1)
        self.scale = check_float("scale", self.scale, 0.0, low_inclusive=False)
        check_choice("proj_type", self.proj_type, PROJ_TYPES)
        check_choice("optimizer", self.optimizer, GALORE_OPTIMIZERS)
        if self.adafactor_beta1 is not None:
            self.adafactor_beta1 = check_float("adafactor_beta1", self.adafactor_beta1, 0.0, 1.0, high_inclusive=False)
            if self.optimizer != "adafactor":
                raise ValueError(
                    f"adafactor_beta1 applies to optimizer='adafactor' only; got optimizer={self.optimizer!r} with "
                    f"adafactor_beta1={self.adafactor_beta1} (leave it None)"
                )
        check_bool("layerwise", self.layerwise)
        check_choice("svd_method", self.svd_method, SVD_METHODS)
        check_int("svd_iterations", self.svd_iterations, 1)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 0)
        self.target_modules = validate_target_modules(self.target_modules)
