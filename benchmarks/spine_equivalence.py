"""Evidence that a refactor moved no figure: the same training runs on two commits, compared bit for bit.

    python benchmarks/spine_equivalence.py --before 4a3e574            # writes benchmarks/results/spine_equivalence.json

Each case trains a tiny LLaMA (tests/conftest.py: 2 layers, width 32, float32 CPU, batch 4, seed 0) for 6 updates with
one method or combination attached through ``attach()``, and records the Trainer's whole ``log_history`` (loss,
grad_norm, learning rate, skipped updates, method figures; run times left out) and the float64 sum of every
floating-point tensor of the final ``state_dict``. ``--before`` is checked out into a temporary git worktree and run
with the same interpreter; a case is "identical" when both records are equal exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "spine_equivalence.json"
TIMES = ("train_runtime", "train_samples_per_second", "train_steps_per_second")

CASES = {
    "galore": ("[GaLoreConfig(rank=4, update_proj_gap=2)]", {}),
    "galore_layerwise": ("[GaLoreConfig(rank=4, update_proj_gap=2, layerwise=True)]", {"max_grad_norm": 0.0}),
    "blockllm": ("[BlockLLMConfig(sparsity=0.5, patience=2)]", {}),
    "loqt": ("[LoQTConfig(rank=4, merge_every=2)]", {}),
    "loqt_layerwise": ("[LoQTConfig(rank=4, merge_every=2, layerwise=True)]", {"max_grad_norm": 0.0}),
    "velora+galore": ("[VeLoRAConfig(num_groups=4), GaLoreConfig(rank=4)]", {}),
    "velora+loqt": (
        "[VeLoRAConfig(num_groups=4, target_modules=['q_proj']), "
        "LoQTConfig(rank=4, merge_every=2, target_modules=['up_proj'])]",
        {},
    ),
    "zo": ("[ZOConfig()]", {}),
    "zo_offload": ("[ZOConfig(offload='cpu')]", {}),
}


def run_cases(output_dir: str) -> dict:
    """Train every case in this process (the tree on ``sys.path`` decides which hf_memopt runs)."""
    from conftest import TokenDataset, tiny_llama, training_args
    from transformers import Trainer

    from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig, attach

    names = {"BlockLLMConfig": BlockLLMConfig, "GaLoreConfig": GaLoreConfig, "LoQTConfig": LoQTConfig,
             "VeLoRAConfig": VeLoRAConfig, "ZOConfig": ZOConfig}  # fmt: skip
    records = {}
    for name, (configs, overrides) in CASES.items():
        trainer = Trainer(model=tiny_llama(), args=training_args(f"{output_dir}/{name}", max_steps=6, **overrides),
                          train_dataset=TokenDataset())  # fmt: skip
        for config in eval(configs, names):  # the case table above, nothing read from outside
            attach(trainer, config)
        trainer.train()
        state = trainer.model.state_dict().values()
        records[name] = {
            "log_history": [{k: v for k, v in h.items() if k not in TIMES} for h in trainer.state.log_history],
            "weight_sum": float(sum(t.double().sum() for t in state if t.is_floating_point())),
        }
    return records


def run_tree(tree: Path) -> dict:
    """:func:`run_cases` in a fresh interpreter that imports hf_memopt (and the test helpers) from ``tree``."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, __file__, "cases", out], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="git ref of the tree before the change")
    parser.add_argument("cases", nargs="*", help=argparse.SUPPRESS)  # internal: `cases OUT_DIR` runs run_cases
    a = parser.parse_args()
    if a.cases:
        print(json.dumps(run_cases(a.cases[1])))
        return
    if a.before is None:
        parser.error("--before is required")
    before_sha = subprocess.check_output(["git", "rev-parse", a.before], cwd=ROOT, text=True).strip()
    after_sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), before_sha], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            before = run_tree(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    after = run_tree(ROOT)
    result = {"before": before_sha, "after": after_sha,
              "cases": {name: {"identical": before[name] == after[name], "before": before[name], "after": after[name]}
                        for name in CASES}}  # fmt: skip
    OUT.write_text(json.dumps(result, indent=1))
    for name, case in result["cases"].items():
        print(f"{name:18s} {'identical' if case['identical'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
