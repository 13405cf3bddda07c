"""Configuration of VeLoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_memopt.shared.targeting import validate_target_modules
from hf_memopt.shared.validation import check_choice, check_float, check_int

__all__ = ["AUTO", "COEFFICIENT_DTYPES", "INIT_TYPES", "VeLoRAConfig"]

AUTO = "auto"
INIT_TYPES = ("batch_average_once", "batch_average", "random", "svd")
COEFFICIENT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class VeLoRAConfig:
    """VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections (https://arxiv.org/abs/2405.17991).

    Each targeted ``nn.Linear`` computes its normal output, but instead of saving its input X (tokens x D) for the
    weight gradient it splits every token into ``num_groups`` sub-tokens of width d = D / num_groups and keeps one
    scalar per sub-token: its projection on a fixed unit vector v (Sec. 3.2, Eq. 3). Backward rebuilds
    X_hat = coefficient * v for grad_W (Eq. 4); grad_input uses the true weight, so gradients reaching earlier layers
    are exact. The saved input shrinks from D values per token to ``num_groups`` low-precision values per token.

    Args:
        target_modules: ``"auto"`` (the default; also ``None``) picks, per ``model_type``, a set of Linear layers
            whose inputs are saved by nothing else, so that compressing them really frees memory (see
            ``hf_memopt.velora.targets``). Otherwise names, a regex, or ``"all-linear"`` as everywhere in hf_memopt.
            Only plain ``nn.Linear`` layers can be targeted.
        num_groups: sub-tokens per token; must divide the input width of every targeted layer. The paper's ablation
            (Table 6) finds 32 best and 64 worst.
        init: how v is chosen: ``batch_average_once`` (mean sub-token of the first training batch, then fixed; the
            paper's default), ``batch_average`` (recomputed from every batch), ``random`` (seeded Gaussian), or
            ``svd`` (top right singular vector of the first batch's sub-tokens, then fixed).
        scale: multiplies the reconstructed input, hence grad_W (the official code's ``velora_scale``), > 0.
        coefficient_dtype: dtype of the saved per-sub-token coefficients: ``bfloat16`` (default; float32 range, so no
            overflow), ``float16`` (the official code's choice; more mantissa, overflows above 65504) or ``float32``.
        seed: seed of the ``random`` initialisation (layer i uses ``seed + i``).
    """

    target_modules: list[str] | str | None = field(
        default=AUTO,
        metadata={"help": "Module names, a regex, 'all-linear', or 'auto' (per-architecture set that frees memory)."},
    )
    num_groups: int = field(default=32, metadata={"help": "Sub-tokens per token (>= 1; must divide the layer width)."})
    init: str = field(default="batch_average_once", metadata={"help": f"How v is chosen: one of {INIT_TYPES}."})
    scale: float = field(default=1.0, metadata={"help": "Scale of the reconstructed input (> 0)."})
    coefficient_dtype: str = field(
        default="bfloat16", metadata={"help": f"dtype of the saved coefficients: one of {COEFFICIENT_DTYPES}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of init='random'."})

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = AUTO
        if self.target_modules != AUTO:
            self.target_modules = validate_target_modules(self.target_modules)
        check_int("num_groups", self.num_groups, 1)
        check_choice("init", self.init, INIT_TYPES)
        self.scale = check_float("scale", self.scale, 0.0, low_inclusive=False)
        check_choice("coefficient_dtype", self.coefficient_dtype, COEFFICIENT_DTYPES)
        check_int("seed", self.seed, 0, 2**32 - 1)
