"""Recipe files: every shipped YAML validates for every method; merging, overrides and typed parsing; data sources."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_memopt  # noqa: F401  (registers every method)
from hf_memopt.core.registry import METHODS
from hf_memopt.tools.recipes.recipe import BASELINE, RecipeError, coerce, load_recipe, method_configs

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.name != "defaults.yaml")
ALL_METHODS = [BASELINE, *sorted(METHODS)]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipe_folders_ship_the_issue_recipes():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    expected = {f"glue/{t}" for t in ("rte", "mrpc", "cola", "stsb", "sst2")}
    expected |= {"instruct/alpaca", "instruct/code_alpaca_2k", "pretrain/llama_20m", "pretrain/llama_60m",
                 "pretrain/llama_130m"}  # fmt: skip
    assert expected <= names
    for folder in ("glue", "instruct", "pretrain"):
        assert (ROOT / "recipes" / folder / "README.md").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_validates_with_every_method(path):
    for name in ALL_METHODS:
        recipe = load_recipe(path, method=name)
        configs = method_configs(recipe)
        assert [type(c) for c in configs] == ([] if name == BASELINE else [METHODS[name].config_cls])
        assert recipe.run_dir.endswith(name)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_checkpoints_by_default_for_resume(path):
    training = load_recipe(path).training
    assert training["save_strategy"] == "steps" and 0 < training["save_steps"] <= 100
    assert training["save_total_limit"] >= 2  # a kill while writing the newest leaves the one before complete


def test_report_to_a_logger_that_is_not_installed_is_refused_at_load(tmp_path, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    path = write(tmp_path, "r.yaml", "task: glue\n")
    with pytest.raises(RecipeError, match=r"^training\.report_to: 'wandb' is not installed; pip install wandb"):
        load_recipe(path, ["training.report_to=[tensorboard,wandb]"])
    assert load_recipe(path, ["training.report_to=tensorboard"]).training["report_to"] == "tensorboard"


def test_yaml_number_strings_are_typed_by_their_field(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the field type makes it a float.
    path = write(tmp_path, "r.yaml", "task: glue\ntraining: {learning_rate: 1e-4}\nmethod: {name: zo, eps: 1e-3}\n")
    recipe = load_recipe(path, ["method.n_samples=2"])
    assert recipe.training["learning_rate"] == 1e-4
    assert (method_configs(recipe)[0].eps, method_configs(recipe)[0].n_samples) == (1e-3, 2)
    assert coerce("1e-4", float) == 1e-4
    assert coerce("64", int) == 64
    assert coerce("null", int | None) is None
    assert coerce("true", bool) is True
    assert coerce("a,b", list[str]) == ["a", "b"]
    assert coerce(["a"], list[str] | str) == ["a"]
    assert coerce("abc", int) == "abc"  # left for validation to reject
    assert load_recipe(path, ["training.save_strategy=no"]).training["save_strategy"] == "no"  # YAML: no -> False
    assert coerce(False, bool) is False and coerce(False, str | None) == "no"


def test_defaults_merge_and_per_method_settings(tmp_path):
    write(
        tmp_path,
        "base.yaml",
        """
task: pretrain
model: llama-20m
training: {learning_rate: 1e-3, max_steps: 100}
method: {name: galore, rank: 16}
methods:
  galore: {rank: 8, update_proj_gap: 10}
  blockllm: {sparsity: 0.9}
method_training:
  blockllm: {learning_rate: 5e-4}
""",
    )
    child = write(tmp_path, "child.yaml", "defaults: base.yaml\ntraining: {max_steps: 7}\n")
    recipe = load_recipe(child)
    assert recipe.training["learning_rate"] == 1e-3 and recipe.training["max_steps"] == 7
    (galore,) = method_configs(recipe)
    assert (galore.rank, galore.update_proj_gap) == (16, 10)  # method: section over the methods: table
    assert recipe.output_dir.endswith("child")

    blockllm = load_recipe(child, method="blockllm")  # another method: the galore fields are dropped
    assert method_configs(blockllm)[0].sparsity == 0.9
    assert blockllm.training["learning_rate"] == 5e-4  # method_training applies to the method that runs
    # the command line has the last word: a set training rate is not overridden by the method's own
    pinned = load_recipe(child, ["training.learning_rate=2e-4"], method="blockllm")
    assert pinned.training["learning_rate"] == 2e-4
    # and stays so where the resolved recipe is written out and read again (each run of `compare`)
    assert load_recipe(None, raw=pinned.raw, method="blockllm").training["learning_rate"] == 2e-4
    # a whole training section set on the command line pins every field it names the same way
    section = load_recipe(child, ["training={learning_rate: 3e-4, max_steps: 5}"], method="blockllm")
    assert section.training["learning_rate"] == 3e-4 and section.training["max_steps"] == 5
    # and a field set, then dropped by a later whole-section set, is simply gone (the method_training value applies)
    dropped = load_recipe(child, ["training.learning_rate=2e-4", "training={max_steps: 5}"], method="blockllm")
    assert dropped.training["learning_rate"] == 5e-4 and dropped.training["max_steps"] == 5

    overridden = load_recipe(child, ["method.sparsity=0.5", "training.max_steps=3"], method="blockllm")
    assert method_configs(overridden)[0].sparsity == 0.5 and overridden.training["max_steps"] == 3

    # a child's method_training adds to its defaults' per method (code_alpaca_2k.yaml sets two of defaults.yaml's four)
    tuned = write(tmp_path, "tuned.yaml", "defaults: base.yaml\nmethod_training: {galore: {learning_rate: 2e-4}}\n")
    assert load_recipe(tuned, method="galore").training["learning_rate"] == 2e-4
    assert load_recipe(tuned, method="blockllm").training["learning_rate"] == 5e-4


def test_composite_method_takes_settings_from_the_table(tmp_path):
    path = write(tmp_path, "r.yaml", "task: pretrain\nmethods: {velora: {num_groups: 8}, galore: {rank: 4}}\n")
    configs = method_configs(load_recipe(path, method="velora+galore"))
    assert [c.num_groups if hasattr(c, "num_groups") else c.rank for c in configs] == [8, 4]
    with pytest.raises(RecipeError, match="both supply the optimizer"):
        load_recipe(path, method="galore+blockllm")


@pytest.mark.parametrize(
    ("text", "sets", "method", "match"),
    [
        ("task: glue\n", ["method.rank=abc"], "galore", r"^method\.rank: expected int; got 'abc'"),
        ("task: glue\n", ["method.rank=0"], "galore", r"^method: rank must be an integer >= 1; got 0"),
        ("task: glue\n", ["method.rnk=4"], "galore", r"^method\.rnk: GaLoreConfig has no field 'rnk'"),
        ("task: glue\n", [], "nope", r"^unknown method 'nope'; known methods: adamw, blockllm"),
        ("task: glue\n", ["training.learning_rte=1"], None, r"^training\.learning_rte: not a TrainingArguments field"),
        ("task: glue\n", ["training.lr_scheduler_type=sideways"], None, r"^training: .*sideways"),
        ("task: glue\n", ["data.name=qqp"], None, r"^data: name must be one of"),
        ("task: glue\n", ["rank=4"], None, r"^--set rank: unknown recipe key 'rank'"),
        ("task: glue\n", ["method.rank"], None, r"^--set expects key=value"),
        ("task: translate\n", [], None, r"^task must be one of glue, instruct, pretrain"),
        ("task: glue\nfoo: 1\n", [], None, r"unknown key 'foo'"),
        ("task: glue\ntraining: [1, 2]\n", [], None, r"^training: expected a mapping"),
        ("task: pretrain\nmodel: llama-7b\n", [], None, r"^model: pretraining builds a LLaMA"),
        (
            "task: glue\nmethod: {name: adamw, rank: 4}\n",
            [],
            None,
            r"^method\.rank: the adamw baseline has no settings",
        ),
        ("task: glue\nmethods: {galore: {rank: -1}}\n", [], None, r"^methods\.galore: rank must be"),
        (
            "task: glue\nmethod_training: {zo: {learning_rate: x}}\n",
            [],
            None,
            r"^method_training\.zo\.learning_rate: expected float",
        ),
        ("task: glue\n  bad: [\n", [], None, r"not valid YAML"),
        (
            "task: glue\n",
            ["training.resume_from_checkpoint=out/x/checkpoint-4"],
            None,
            r"^training\.resume_from_checkpoint: the Trainer does not read it; resume with `hf-memopt train RECIPE --resume",
        ),
        ("task: glue\n", ["training.do_eval=true"], None, r"^training\.do_eval: the Trainer does not read it"),
        (
            "task: glue\n",
            ["training.optim=adafactor"],
            "galore",
            r"^training\.optim: galore supplies the optimizer, so the Trainer never reads it",
        ),
        (
            "task: glue\n",
            ["training.optim_args=rank=4"],
            "velora+blockllm",
            r"^training\.optim_args: blockllm supplies the optimizer",
        ),
        (
            "task: glue\nmethod_training: {galore: {do_predict: true}}\n",
            [],
            None,
            r"^method_training\.galore\.do_predict: the Trainer does not read it",
        ),
        ("task: instruct\n", ["training.max_length=64"], None, r"^training\.max_length: set data\.max_length"),
        (
            "task: glue\n",
            ["training.hub_model_id=me/model"],
            None,
            r"^training\.hub_model_id: used only to push to the Hub; set training\.push_to_hub: true too",
        ),
        ("task: glue\n", ["training.report_to=[nope]"], None, r"^training\.report_to: unknown logger 'nope'"),
    ],
)
def test_bad_recipes_raise_one_line_naming_the_key(tmp_path, text, sets, method, match):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path, sets, method=method)
    assert "\n" not in str(info.value)


def test_defaults_loop_and_missing_file_are_reported(tmp_path):
    write(tmp_path, "a.yaml", "defaults: b.yaml\ntask: glue\n")
    write(tmp_path, "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_glue_source_selects_bundled_or_hub(monkeypatch):
    import datasets

    from hf_memopt.tools.recipes.data import load_glue

    bundled = load_glue("rte", "dev", limit=3, source="bundled")
    assert bundled.column_names == ["text_a", "label", "text_b"] and len(bundled) == 3
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}] * 5)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_glue("rte", "dev", limit=2, source="hub")
    assert calls == [("nyu-mll/glue", "rte", "validation")]
    assert sorted(hub.column_names) == ["label", "text_a", "text_b"] and len(hub) == 2


def test_c4_source_streams_until_the_token_budget(monkeypatch):
    import datasets
    from transformers import AutoTokenizer

    from hf_memopt.tools.recipes.models import minilm_path
    from hf_memopt.tools.recipes.pretrain import lm_blocks

    served = []

    def fake_stream(name, config, split, streaming):
        assert (name, config, split, streaming) == ("allenai/c4", "en", "train", True)

        def rows():
            for i in range(10_000):
                served.append(i)
                yield {"text": f"document number {i} says hello to the world again and again."}

        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_stream)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    blocks = lm_blocks(tokenizer, 16, ("c4",), max_tokens=160)
    assert len(blocks) == 10 and blocks.blocks.shape == (10, 16)
    assert len(served) < 50  # stopped at the budget, not the end of the stream


def test_alpaca_records_become_prompt_completion_pairs(tmp_path):
    from hf_memopt.tools.recipes.data import load_alpaca
    from hf_memopt.tools.recipes.instruct import alpaca_to_prompt_completion

    record = {"instruction": "Add.", "input": "2 + 2", "output": "4"}
    assert alpaca_to_prompt_completion(record) == {
        "prompt": [{"role": "user", "content": "Add.\n\n2 + 2"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    assert len(load_alpaca(limit=5)) == 5
    bad = write(tmp_path, "bad.jsonl", '{"question": "x"}\n')
    with pytest.raises(ValueError, match="not Alpaca-format"):
        load_alpaca(bad)


def test_pretraining_blocks_tokenize_long_text_without_a_length_warning(tmp_path):
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from hf_memopt.tools.recipes.data import load_text
    from hf_memopt.tools.recipes.models import minilm_path
    from hf_memopt.tools.recipes.pretrain import lm_blocks

    class Record(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    text = write(tmp_path, "long.txt", load_text("wikitext2_valid")[:8_000])  # ~2,000 tokens: over MiniLM's 512
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    record = Record()
    root = transformers_logging.get_logger()
    root.addHandler(record)
    try:
        blocks = lm_blocks(tokenizer, 32, (str(text),))
        during_blocks = list(record.messages)
        tokenizer(load_text("wikitext2_valid")[:8_000])  # the same text straight through: the (once) warning is on
    finally:
        root.removeHandler(record)
    assert len(blocks) > 512 // 32
    assert not any("Token indices sequence length" in m for m in during_blocks)
    assert any("Token indices sequence length" in m for m in record.messages)


def test_bundled_instruction_sets_load_by_name():
    from hf_memopt.tools.recipes.data import load_alpaca

    assert len(load_alpaca()) == len(load_alpaca("alpaca_en_demo")) == 999
    code = load_alpaca("code_alpaca_2k")
    assert len(code) == 2017 and {"instruction", "input", "output"} <= set(code[0])


def test_bundled_pretraining_text_loads_by_name_and_the_recipes_train_on_all_of_it():
    from hf_memopt.tools.recipes.data import BUNDLED_TEXT, load_text

    sizes = {name: len(load_text(name)) for name in BUNDLED_TEXT}
    assert sizes == {"wikitext2_valid": 1_120_192, "wikitext2_test": 1_255_018, "wiki_demo": 1_026_454,
                     "c4_demo": 737_759}  # characters  # fmt: skip
    with pytest.raises(ValueError, match="wikitext2_valid, wikitext2_test, wiki_demo, c4_demo"):
        load_text("wikitext103")
    recipe = load_recipe(ROOT / "recipes" / "pretrain" / "llama_20m.yaml")
    assert recipe.data.sources == list(BUNDLED_TEXT) and recipe.data.sources[-1] == "c4_demo"  # held out: C4's tail


def test_sample_answers_cannot_exceed_the_held_out_records():
    from hf_memopt.tools.recipes.recipe import InstructData

    with pytest.raises(ValueError, match=r"sample_answers must be an integer in \[0, 4\]"):
        InstructData(eval_limit=4, sample_answers=5)


def test_glue_runs_a_16_bit_checkpoint_with_fp32_weights(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_memopt.tools.recipes.glue import run_glue
    from hf_memopt.tools.recipes.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size)  # fmt: skip
    BertForSequenceClassification(config).to(torch.float16).save_pretrained(tmp_path / "fp16")
    tokenizer.save_pretrained(tmp_path / "fp16")

    class Loaded(Exception):
        pass

    def stop(model):
        raise Loaded(model.dtype)

    with pytest.raises(Loaded) as loaded:
        run_glue("rte", None, model=str(tmp_path / "fp16"), output_dir=str(tmp_path / "run"), prepare_model=stop)
    assert loaded.value.args == (torch.float32,)
