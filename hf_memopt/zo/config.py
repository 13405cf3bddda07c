"""Configuration of zeroth-order fine-tuning (MeZO, with ZO2-style block offloading)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_memopt.shared.validation import check_bool, check_choice, check_float, check_int

__all__ = ["OFFLOAD_CHOICES", "OFFLOAD_DTYPES", "ZOConfig"]

OFFLOAD_CHOICES = ("none", "cpu")
OFFLOAD_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclass
class ZOConfig:
    """MeZO: Fine-Tuning Language Models with Just Forward Passes (https://arxiv.org/abs/2305.17333), with the block
    offloading of ZO2 (https://arxiv.org/abs/2503.12668).

    Each optimizer step draws a seed; every trainable parameter is perturbed in place by +eps z, -2 eps z, +eps z
    with z ~ N(0, I) regenerated from the seed one tensor at a time (never stored, Algorithm 1). The projected
    gradient g = (L(theta + eps z) - L(theta - eps z)) / (2 eps) gives the update theta -= lr (g z + wd theta), z
    regenerated once more. The learning rate and its schedule come from ``TrainingArguments``.

    Args:
        eps: perturbation scale (the paper's epsilon, 1e-3 in its experiments), in (0, 1].
        n_samples: SPSA samples per step (the paper's n); the update averages the n estimates, >= 1.
        weight_decay: weight decay of the ZO-SGD update; ``None`` takes ``TrainingArguments.weight_decay``. Biases and
            normalisation weights never decay.
        seed: base of the per-step seeds; ``None`` takes ``TrainingArguments.seed``. Step t, sample k perturbs
            with a seed derived from (seed, t, k), so a resumed run draws the same perturbations.
        offload: ``"none"``: plain MeZO on the device holding the model. ``"cpu"``: ZO2, the transformer blocks
            live in (pinned) CPU memory and are uploaded one at a time; both perturbed forwards run on each block
            during one upload and the previous step's update is applied at upload. Without CUDA the blocks are
            simply run on the CPU.
        offload_dtype: storage dtype of the offloaded blocks (``None`` keeps the model's dtype). ``"bfloat16"`` or
            ``"float16"`` halve the transfer and the host memory (ZO2's AMP mode); computation stays in the
            model's dtype, and updates smaller than the storage precision are rounded away.
        blocks_attr: dotted path of the ``nn.ModuleList`` of transformer blocks (``"model.layers"``); ``None``
            finds the largest list of repeated blocks.
        overlap: with CUDA, upload the next block on a side stream while the current one computes.
        max_consecutive_skips: an optimizer update with a non-finite (NaN/Inf) perturbed loss is skipped whole (nothing
            changes) and logged; after this many skipped in a row the next one stops training with a clear error,
            >= 0 (0: stop at the first). See ``hf_memopt.shared.faults``.
    """

    eps: float = field(default=1e-3, metadata={"help": "Perturbation scale epsilon, in (0, 1]."})
    n_samples: int = field(default=1, metadata={"help": "SPSA samples per step (>= 1), averaged."})
    weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay of the ZO update (>= 0); None: TrainingArguments.weight_decay."}
    )
    seed: int | None = field(default=None, metadata={"help": "Base seed of the perturbations; None: args.seed."})
    offload: str = field(default="none", metadata={"help": f"Block offloading (ZO2): one of {OFFLOAD_CHOICES}."})
    offload_dtype: str | None = field(
        default=None, metadata={"help": f"Storage dtype of offloaded blocks: one of {OFFLOAD_DTYPES}."}
    )
    blocks_attr: str | None = field(
        default=None, metadata={"help": "Dotted path of the ModuleList of transformer blocks; None: found."}
    )
    overlap: bool = field(default=True, metadata={"help": "With CUDA, prefetch the next block on a side stream."})
    max_consecutive_skips: int = field(
        default=5, metadata={"help": "Non-finite updates skipped in a row before training stops (>= 0)."}
    )

    def __post_init__(self) -> None:
        self.eps = check_float("eps", self.eps, 0.0, 1.0, low_inclusive=False)
        check_int("n_samples", self.n_samples, 1)
        if self.weight_decay is not None:
            self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        check_choice("offload", self.offload, OFFLOAD_CHOICES)
        check_choice("offload_dtype", self.offload_dtype, OFFLOAD_DTYPES)
        if self.offload_dtype not in (None, "float32") and self.offload == "none":
            raise ValueError(f"offload_dtype={self.offload_dtype!r} needs offload='cpu'")
        if self.blocks_attr is not None and (not isinstance(self.blocks_attr, str) or not self.blocks_attr):
            raise ValueError(f"blocks_attr must be a non-empty dotted attribute path or None; got {self.blocks_attr!r}")
        check_bool("overlap", self.overlap)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 0)
