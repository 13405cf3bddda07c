"""Configuration of LoQT."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_memopt.shared.targeting import validate_target_modules
from hf_memopt.shared.validation import check_bool, check_choice, check_float, check_int

__all__ = ["INIT_WEIGHTS", "LOQT_PROJ_TYPES", "LOQT_QUANT_TYPES", "MERGE_SCHEDULES", "MOMENT_POLICIES", "SVD_METHODS", "LoQTConfig"]

LOQT_QUANT_TYPES = ("nf4", "fp4", "int8", None)
INIT_WEIGHTS = ("full_precision", "quantized")
MERGE_SCHEDULES = ("exponential", "static", "geometric")
LOQT_PROJ_TYPES = ("std", "reverse_std", "left", "right")
MOMENT_POLICIES = ("reset", "keep")
SVD_METHODS = ("subspace", "exact")
_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class LoQTConfig:
    """LoQT: Low-Rank Adapters for Quantized Pretraining (https://arxiv.org/abs/2405.16528).

    Each targeted ``nn.Linear`` weight becomes W_q + scale * P B (Sec. 3): W_q is quantized and frozen, P (frozen)
    holds the top-``rank`` singular vectors of the weight's gradient, and B, initialised to zero, is the only trained
    factor of the layer. Every so often (a growing interval, Sec. 3.2) the product is merged into the weight:
    W <- Q(W_q + scale * P B), a new gradient is taken for the next P, and B restarts (at zero, or at the
    quantization error compensation of Sec. 3.3).

    Defaults follow the official pretraining scripts (github.com/sebulo/LoQT, ``scripts/bechmark_pretraining/60m.sh``,
    ``350m.sh``, ``1b.sh`` and ``scripts/13b_loqt8bit_per_layer.sh``): NF4 weights (``--quantize_w 4bit``), P
    quantized too (``--quantize_projection_matrix 4bit``), 5 error-compensation iterations
    (``--compensate_quant_error_iterations 5``; 10 in ``1b.sh``), the exponential merge schedule with gap 100 and
    increment 1.2 (``--proj_gap_progression exponential --increment_size 1.2 --update_proj_gap 100``), scale 0.5
    (``--lora_alpha``, 0.4 in ``60m.sh``, 0.25 in ``1b.sh``). ``torchrun_main.py``'s own argparse defaults (no
    quantized P, no compensation, static schedule) are overridden by every one of those scripts.

    Args:
        rank: rank r of P and B; 1 <= rank <= min(m, n) of every targeted weight (checked at ``attach``).
        quant: ``"nf4"`` (paper default), ``"fp4"``, ``"int8"`` (bitsandbytes block-wise 8-bit), or ``None`` for the
            unquantized variant LoQT-nq.
        quantize_projection: also store P quantized with ``quant`` (the paper's LoQT and the official scripts quantize
            P as well); needs a ``quant`` (set it False for LoQT-nq, ``quant=None``).
        quant_block_size: block size of the absmax scaling of the quantized tensors (64 as QLoRA / the paper).
        merge_every: optimizer updates between the initialisation and the first merge (T in the paper), >= 1.
        merge_growth: growth of the merge interval, >= 1 (see ``merge_schedule``).
        merge_schedule: ``exponential`` (default, the official code's ``get_proj_update_steps`` in
            ``loqt/utils.py``): merges at update 0, then after intervals T + int(growth^k) for k = 1, 2, ... (T = 100,
            growth 1.2: updates 0, 100, 201, 302, 403, 505, ...; 40 merges in 10,000 updates); ``static``: every T
            updates (``merge_growth`` unused); ``geometric``: intervals round(T * growth^k), k = 0, 1, ...
            (T, 1.2 T, 1.44 T, ...: 17 merges in 10,000 updates for T = 100, growth 1.2).
        max_merge_interval: optional cap on an interval, in optimizer updates (None: no cap).
        error_compensation_steps: iterations of the joint solve of Sec. 3.3 after re-quantizing (B is set so that
            W_q + scale * P B is closest to the full-precision weight); 0 re-quantizes and sets B = 0. Default 5, as
            the official scripts.
        scale: the scale s of the adapter product (the official code's ``lora_alpha``, 0.5 there), > 0.
        proj_type: side of the gradient projection, as GaLore: ``std`` puts P on the smaller side of the weight,
            ``reverse_std`` on the larger, ``left`` (P is m x r, B is r x n) or ``right`` (B is m x r, P is r x n).
        target_modules: names, a regex, or ``"all-linear"`` (every Linear except the output embedding
            and the task head, as peft; see ``hf_memopt.shared.targeting``).
        svd_method: how P is found from the gradient: ``exact`` (``torch.linalg.svd``, as the paper) or
            ``subspace`` (randomized subspace iteration, O(m n r); shared with GaLore).
        svd_iterations: subspace iterations for ``svd_method="subspace"``, >= 1.
        optimizer_state_on_merge: what happens to B's optimizer state when P changes at a merge: ``reset`` (the
            state is dropped and rebuilt at B's next update: old moments are coordinates in the old basis) or
            ``keep`` (the official code's behaviour: the moments carry over unchanged).
        seed: seed of the random start of the ``subspace`` SVD (per layer and merge, so resumes are exact).
        max_consecutive_skips: an optimizer update with a non-finite (NaN/Inf) gradient is skipped whole (B, the
            other trained parameters and their optimizer state keep their values; a merge due at it waits for the
            next finite update, so W_q and P never see a non-finite value) and logged; after this many skipped in a
            row the next one stops training with a clear error, >= 0 (0: stop at the first). See ``hf_memopt.shared.faults``.
        init_weight: the weight update 0 computes with, whose gradient gives the first P, and which the
            initialising merge quantizes against. ``full_precision`` (default, paper Sec. 3.1): the original W, kept
            beside its quantized copy until update 0 ends (a non-persistent buffer: counted by memory reports, never
            saved), so Q(W) + s P B starts from the error compensation against W. ``quantized`` (the official code,
            which quantizes the model when wrapping it): W is dropped at ``attach`` and update 0 computes with Q(W),
            so no update holds more than the steady state; for minimum-memory runs. Needs a ``quant``.
        layerwise: per-layer gradient updates (the paper's 13B-on-24GB setting): every trainable parameter (B, and
            embeddings, norms, head, biases when they train) is updated by the Trainer's optimizer inside backward
            as soon as its gradient is complete, and the gradient is freed at once (``hf_memopt.shared.layerwise``).
            Needs ``max_grad_norm=0`` (the global norm is not known before the first update) and no fp16; under
            DDP the model is kept out of DDP and the hooks average each gradient across ranks.
        train_only_factors: fine-tuning as the official GLUE scripts do it (``run_glue.py`` freezes the model before
            wrapping it and trains the adapters and the classifier): only the B factors and the task head
            (``classifier``, ``score``, ... of a sequence-classification model; none for a causal LM) train, every
            other parameter (embeddings, norms, biases, layers not targeted) is frozen. False (default): they train as
            the model has them (the paper's pretraining, where embeddings, norms and the LM head are full-rank).
        dequantize_chunk_mib: the frozen weight is dequantized (or cast to the compute dtype) this many MiB of
            float32 at a time, whole rows, in forward and in backward, so no whole dequantized weight exists (a 4096
            x 11008 weight is 172 MiB in float32); None (default): a whole weight at once, the fastest. Same results
            either way. For minimum-memory runs, where the dequantized weight is part of the peak.
    """

    rank: int = field(default=128, metadata={"help": "Rank of P and B (>= 1, <= min(m, n))."})
    quant: str | None = field(
        default="nf4", metadata={"help": f"Weight quantization: one of {LOQT_QUANT_TYPES} (None: LoQT-nq)."}
    )
    quantize_projection: bool = field(default=True, metadata={"help": "Also quantize P with `quant`."})
    quant_block_size: int = field(default=64, metadata={"help": f"Quantization block size, one of {_BLOCK_SIZES}."})
    merge_every: int = field(default=100, metadata={"help": "Optimizer updates before the first merge (T)."})
    merge_growth: float = field(default=1.2, metadata={"help": "Growth factor of the merge interval (>= 1)."})
    merge_schedule: str = field(
        default="exponential", metadata={"help": f"Merge interval rule: one of {MERGE_SCHEDULES}."}
    )
    max_merge_interval: int | None = field(default=None, metadata={"help": "Cap on the merge interval (updates)."})
    error_compensation_steps: int = field(
        default=5, metadata={"help": "Iterations of quantization error compensation at each merge (>= 0)."}
    )
    scale: float = field(default=0.5, metadata={"help": "Scale s of the adapter product s * P B (> 0)."})
    proj_type: str = field(default="std", metadata={"help": f"Projection side: one of {LOQT_PROJ_TYPES}."})
    target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Module names, a regex, or 'all-linear'."}
    )
    svd_method: str = field(default="exact", metadata={"help": f"SVD of the gradient: one of {SVD_METHODS}."})
    svd_iterations: int = field(default=2, metadata={"help": "Subspace iterations (svd_method='subspace')."})
    optimizer_state_on_merge: str = field(
        default="reset", metadata={"help": f"B's optimizer state at a merge: one of {MOMENT_POLICIES}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD start."})
    max_consecutive_skips: int = field(
        default=5, metadata={"help": "Non-finite updates skipped in a row before training stops (>= 0)."}
    )
    layerwise: bool = field(
        default=False, metadata={"help": "Update each parameter inside backward and free its gradient at once."}
    )
    init_weight: str = field(
        default="full_precision",
        metadata={"help": f"Weight update 0 (the initialisation) computes with: one of {INIT_WEIGHTS}."},
    )
    train_only_factors: bool = field(
        default=False, metadata={"help": "Train only B and the task head; freeze everything else (fine-tuning)."}
    )
    dequantize_chunk_mib: float | None = field(
        default=None, metadata={"help": "MiB (float32) of the frozen weight dequantized at a time (> 0; None: all)."}
    )

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_choice("quant", self.quant, LOQT_QUANT_TYPES)
        check_bool("quantize_projection", self.quantize_projection)
        if self.quantize_projection and self.quant is None:
            raise ValueError(
                "quantize_projection=True needs a quant type; got quant=None (LoQT-nq: set quantize_projection=False)"
            )
        check_int("quant_block_size", self.quant_block_size)
        check_choice("quant_block_size", self.quant_block_size, _BLOCK_SIZES)
        check_int("merge_every", self.merge_every, 1)
        self.merge_growth = check_float("merge_growth", self.merge_growth, 1.0)
        check_choice("merge_schedule", self.merge_schedule, MERGE_SCHEDULES)
        if self.max_merge_interval is not None:
            check_int("max_merge_interval", self.max_merge_interval, 1)
        check_int("error_compensation_steps", self.error_compensation_steps, 0)
        self.scale = check_float("scale", self.scale, 0.0, low_inclusive=False)
        check_choice("proj_type", self.proj_type, LOQT_PROJ_TYPES)
        check_choice("svd_method", self.svd_method, SVD_METHODS)
        check_int("svd_iterations", self.svd_iterations, 1)
        check_choice("optimizer_state_on_merge", self.optimizer_state_on_merge, MOMENT_POLICIES)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_int("max_consecutive_skips", self.max_consecutive_skips, 0)
        check_bool("layerwise", self.layerwise)
        check_choice("init_weight", self.init_weight, INIT_WEIGHTS)
        if self.init_weight == "quantized" and self.quant is None:
            raise ValueError("init_weight='quantized' needs a quant type; got quant=None (LoQT-nq keeps W unquantized)")
        check_bool("train_only_factors", self.train_only_factors)
        if self.dequantize_chunk_mib is not None:
            self.dequantize_chunk_mib = check_float("dequantize_chunk_mib", self.dequantize_chunk_mib, 0.0,
                                                    low_inclusive=False)  # fmt: skip
        self.target_modules = validate_target_modules(self.target_modules)

    def merge_steps(self, until: int) -> list[int]:
        """Optimizer-update indices (0-based) that collect a gradient and merge, below ``until``.

        Index 0 initialises P; the intervals after it follow ``merge_schedule`` (see the class docstring), each capped
        by ``max_merge_interval``.
        """
        steps, at = [], 0
        while at < until:
            steps.append(at)
            k = len(steps) - 1  # the interval after the k-th merge (k = 0: the initialisation)
            if self.merge_schedule == "exponential":  # official: T, then T + int(growth^k) for k = 1, 2, ...
                interval = self.merge_every + (int(self.merge_growth**k) if k else 0)
            elif self.merge_schedule == "static":
                interval = self.merge_every
            else:
                interval = max(1, round(self.merge_every * self.merge_growth**k))
            if self.max_merge_interval is not None:
                interval = min(interval, self.max_merge_interval)
            at += interval
        return steps

    def is_merge_step(self, update: int) -> bool:
        """Whether optimizer update number ``update`` (0-based) collects a gradient and merges."""
        return update in self.merge_steps(update + 1)
