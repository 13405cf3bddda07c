"""The full-schedule summary of benchmarks/results_table.py: gaps, targets and the guide are computed from the cells."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "results_table.py"


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _cell(metric_key: str, value: float, total_bytes: int, step_s: float) -> dict:
    memory = {"parameters": total_bytes, "gradients": 0, "optimizer_state": 0, "activations": 0, "buffers": 0,
              "peak_process": 0}  # fmt: skip
    return {"metrics": {metric_key: value}, "memory_bytes": memory, "median_step_cpu_seconds": step_s, "steps": 10}


def _at_rate(metric_key: str, value: float, learning_rate: float) -> dict:
    """A seed or sweep cell of a non-AdamW row that ran at ``learning_rate``."""
    return {**_cell(metric_key, value, 40, 1.0), "learning_rate": learning_rate}


def _glue(rows: dict[str, float], tasks=("rte", "mrpc", "cola", "stsb", "sst2")) -> dict:
    key = {"cola": "matthews_correlation", "stsb": "pearson"}
    return {t: {row: _cell(key.get(t, "accuracy"), v, 100 if row == "adamw" else 40, 1.0) for row, v in rows.items()}
            for t in tasks}  # fmt: skip


def test_glue_gap_is_row_average_minus_adamw_average_in_points(rt):
    _, summary = rt.glue_summary(_glue({"adamw": 0.80, "galore": 0.795, "loqt": 0.78}))
    assert summary["galore"]["gap"] == pytest.approx(-0.5)
    assert summary["galore"]["verdict"] == "met"
    assert summary["loqt"]["gap"] == pytest.approx(-2.0)
    assert summary["loqt"]["verdict"] == "**missed**"  # LoQT's target is 1.5 points


def test_seeds_are_averaged_before_the_gap(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.78})
    cells["rte"]["adamw@seed1"] = _cell("accuracy", 0.70, 100, 1.0)  # AdamW's RTE mean becomes 75.0
    _, summary = rt.glue_summary(cells)
    assert summary["adamw"]["per_task"]["rte"] == pytest.approx(75.0)
    assert summary["galore"]["gap"] == pytest.approx((78.0 * 5 - (75.0 + 80.0 * 4)) / 5)


def test_a_row_missing_tasks_is_incomplete_not_met(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.80})
    for task in ("cola", "stsb", "sst2"):
        del cells[task]["galore"]
    _, summary = rt.glue_summary(cells)
    assert summary["galore"]["tasks"] == ["rte", "mrpc"]
    assert summary["galore"]["verdict"].startswith("incomplete (2 of 5 tasks)")


def test_guide_names_the_least_memory_row_within_one_point(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.795, "blockllm": 0.70})
    for task in cells:
        cells[task]["blockllm"]["memory_bytes"]["parameters"] = 10  # least memory, but loses 10 points
    _, summary = rt.glue_summary(cells)
    guide = rt.which_method_when(cells, summary)
    assert "within 1 point of AdamW: **galore** (0.40x AdamW, -0.5 points)." in guide
    assert "Lose more than 1 point at these schedules: blockllm" in guide
    for task in ("cola", "stsb", "sst2"):  # fewer tasks: the pick says it is provisional
        del cells[task]
    guide = rt.which_method_when(cells, rt.glue_summary(cells)[1])
    assert "Least tensor memory within 1 point on the tasks run so far: **galore** (0.40x AdamW, -0.5 points; " \
           "2 of 5 tasks)." in guide


def test_guide_prefers_a_row_that_ran_every_task_over_a_lower_memory_row_that_ran_two(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.795})
    for task in ("rte", "mrpc"):  # a diagnostic row, only on two tasks, with less memory
        cells[task]["adamw_frozen_embeddings"] = _cell("accuracy", 0.80, 20, 1.0)
    guide = rt.which_method_when(cells, rt.glue_summary(cells)[1])
    assert "within 1 point of AdamW: **galore** (0.40x AdamW, -0.5 points)." in guide
    assert "Less tensor memory within 1 point on the tasks run so far: **adamw_frozen_embeddings** (0.20x AdamW, +0.0 points; " \
           "2 of 5 tasks)." in guide
    for task in ("rte", "mrpc"):  # with more memory than the complete pick, the partial row is not named
        cells[task]["adamw_frozen_embeddings"]["memory_bytes"]["parameters"] = 60
    assert "run so far" not in rt.which_method_when(cells, rt.glue_summary(cells)[1])


def test_guide_medians_over_an_even_number_of_tasks_average_the_middle_two(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.80}, tasks=("rte", "mrpc"))
    cells["rte"]["galore"]["memory_bytes"]["parameters"] = 30  # 0.30x and 0.50x AdamW's 100: the median is 0.40x
    cells["mrpc"]["galore"]["memory_bytes"]["parameters"] = 50
    cells["mrpc"]["galore"]["median_step_cpu_seconds"] = 2.0  # 1.0x and 2.0x: the median is 1.5x
    guide = rt.which_method_when(cells, rt.glue_summary(cells)[1])
    assert "tensor memory 0.40x, CPU time per update 1.50x*" in guide


def test_sweep_cells_are_named_by_learning_rate_and_seed(rt):
    assert rt.cell_name("galore") == "galore"
    assert rt.cell_name("galore", lr="2e-4") == "galore@lr2e-4"
    assert rt.cell_name("galore", seed=1, lr="2e-4") == "galore@seed1@lr2e-4"


def test_sweep_cells_are_not_averaged_as_seeds(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.78})
    cells["mrpc"]["galore"]["learning_rate"] = 1e-4
    cells["mrpc"]["galore@lr2e-4"] = _at_rate("accuracy", 0.60, 2e-4)
    assert rt._seed_values("mrpc", cells["mrpc"], "galore") == [pytest.approx(78.0)]


def test_sweep_table_puts_the_recipe_cell_among_the_swept_rates_and_bolds_the_best(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.78}, tasks=("mrpc",))["mrpc"]
    cells["galore"]["learning_rate"] = 1e-4
    cells["galore@lr2e-4"] = _at_rate("accuracy", 0.81, 2e-4)
    cells["galore@lr5e-5"] = _at_rate("accuracy", 0.70, 5e-5)
    assert rt.lr_sweep("mrpc", cells) == {"galore": {1e-4: pytest.approx(78.0), 2e-4: pytest.approx(81.0),
                                                     5e-5: pytest.approx(70.0)}}  # fmt: skip
    table = rt.lr_sweep_table("mrpc", cells)
    assert "| galore | 70.0 | 78.0 (recipe) | **81.0** |" in table
    assert "adamw" not in table  # no sweep cells, no line


def test_seeds_at_a_swept_rate_are_averaged_there_and_the_summary_takes_the_mean(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.77}, tasks=("mrpc",))["mrpc"]
    cells["galore"]["learning_rate"] = 1e-4
    cells["galore@lr2e-4"] = _at_rate("accuracy", 0.81, 2e-4)
    cells["galore@seed1@lr2e-4"] = _at_rate("accuracy", 0.77, 2e-4)
    cells["galore@seed2@lr2e-4"] = _at_rate("accuracy", 0.76, 2e-4)
    # seed 0 alone at 2e-4 (81.0) would beat the recipe's 77.0; the three seeds there (78.0) still do, by less
    assert rt.row_sweep("mrpc", cells, "galore") == {1e-4: pytest.approx(77.0), 2e-4: pytest.approx(78.0)}
    assert rt.best_over_learning_rates("mrpc", cells, "galore") == (pytest.approx(78.0), 2e-4)
    assert rt.rates_run("mrpc", cells, "galore") == 2
    assert rt._seed_values("mrpc", cells, "galore") == [pytest.approx(77.0)]  # the recipe's rate only
    # a seed run through --lrs at the recipe's own rate is one of the recipe's seeds: its mean, its table line
    cells["galore@seed1@lr1e-4"] = _at_rate("accuracy", 0.81, 1e-4)
    assert rt._seed_values("mrpc", cells, "galore") == [pytest.approx(77.0), pytest.approx(81.0)]
    assert rt.best_over_learning_rates("mrpc", cells, "galore") == (pytest.approx(79.0), 1e-4)
    assert "| galore | 79.0 ± 2.0 (2 seeds) |" in rt.full_task_table("mrpc", cells)


class _Interrupted(Exception):
    pass


def test_an_interrupted_full_schedule_cell_continues_from_its_checkpoint_to_the_same_result(rt, tmp_path, monkeypatch):
    import json

    import transformers

    monkeypatch.setattr(rt, "SAVE_EVERY", 2)
    monkeypatch.setitem(rt.FULL_SCHEDULES, "llama-20m", [
        "training.max_steps=4", "training.warmup_steps=1", "training.logging_steps=1", "data.seq_len=32",
        "data.eval_blocks=2", "training.per_device_train_batch_size=2", "training.eval_strategy=no"])  # fmt: skip
    rt.run_cell("llama-20m", "galore", tmp_path / "whole", schedule_name="full")

    save = transformers.Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise _Interrupted

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        rt.run_cell("llama-20m", "galore", tmp_path / "cut", schedule_name="full")
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save)
    rt.run_cell("llama-20m", "galore", tmp_path / "cut", schedule_name="full")

    whole, cut = (json.loads((tmp_path / d / "llama-20m" / "galore.json").read_text()) for d in ("whole", "cut"))
    assert whole["resumed_from"] is None and cut["resumed_from"].endswith("checkpoint-2")
    assert cut["losses"] == whole["losses"] and len(whole["losses"]) == 4
    assert cut["metrics"] == whole["metrics"]
    assert not list((tmp_path / "cut").rglob("checkpoint-*"))  # removed once the cell's JSON is written


def _fake_cells(rt, monkeypatch, tmp_path, returncode: int) -> list[list[str]]:
    """``run_all`` with each cell's process replaced by one that exits with ``returncode``; returns the commands."""
    import subprocess

    commands = []

    def fake_run(command, stdout, **kwargs):
        commands.append(command)
        stdout.write("last line of the cell's log\n")
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "full", (rt.FULL_SCHEDULES, tmp_path))
    monkeypatch.setitem(rt.RECORDS, "full", tmp_path / "record.json")  # none unless a test writes one
    monkeypatch.setattr(rt.subprocess, "run", fake_run)
    return commands


def test_a_fresh_clone_restores_the_recorded_cells_and_trains_only_the_missing_ones(rt, tmp_path, monkeypatch):
    import json

    commands = _fake_cells(rt, monkeypatch, tmp_path, returncode=0)
    recorded = {"rte": {"adamw": {"metrics": {"accuracy": 0.55}}, "galore": {"metrics": {"accuracy": 0.56}}}}
    (tmp_path / "record.json").write_text(json.dumps(recorded))
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "galore.json").write_text(json.dumps({"metrics": {"accuracy": 0.6}}))  # newer than the record
    rt.run_all(["rte"], ["adamw", "galore", "velora"], force=False, smoke=False, schedule_name="full")
    assert [command[4] for command in commands] == ["velora"]
    assert rt.load_cells(tmp_path)["rte"]["adamw"] == recorded["rte"]["adamw"]
    assert rt.load_cells(tmp_path)["rte"]["galore"] == {"metrics": {"accuracy": 0.6}}  # out/ wins over the record


def test_a_cell_killed_by_a_signal_leaves_no_failure_record_and_stops_the_run(rt, tmp_path, monkeypatch):
    commands = _fake_cells(rt, monkeypatch, tmp_path, returncode=-15)
    with pytest.raises(SystemExit, match="interrupted by signal 15"):
        rt.run_all(["rte"], ["adamw", "galore"], force=False, smoke=False, schedule_name="full")
    assert len(commands) == 1  # the run stops at the killed cell
    assert not (tmp_path / "rte" / "adamw.json").exists()  # so the next run continues it


def test_a_failed_cell_is_recorded_and_tried_again_by_the_next_run(rt, tmp_path, monkeypatch):
    import json

    commands = _fake_cells(rt, monkeypatch, tmp_path, returncode=1)
    rt.run_all(["rte"], ["adamw"], force=False, smoke=False, schedule_name="full")
    record = json.loads((tmp_path / "rte" / "adamw.json").read_text())
    assert record == {"row": "adamw", "failed": "last line of the cell's log"}
    rt.run_all(["rte"], ["adamw"], force=False, smoke=False, schedule_name="full")
    assert len(commands) == 2
    (tmp_path / "rte" / "adamw.json").write_text(json.dumps({"metrics": {}}))  # a finished cell is not run again
    rt.run_all(["rte"], ["adamw"], force=False, smoke=False, schedule_name="full")
    assert len(commands) == 2


def _main_refuses(rt, monkeypatch, argv: list[str], match: str) -> None:
    """The command line ``results_table.py ARGV`` stops with a message matching ``match``."""
    monkeypatch.setattr(sys, "argv", ["results_table.py", *argv])
    with pytest.raises(SystemExit, match=match):
        rt.main()


def test_the_gpu_schedule_is_the_full_glue_schedule_in_bf16_and_refuses_a_machine_without_cuda(rt, monkeypatch):
    assert rt.GPU_SCHEDULES["glue"] == [*rt.FULL_SCHEDULES["glue"], "training.bf16=true"]
    assert rt.SCHEDULE_TASKS["gpu"] == rt.GLUE_TASKS
    monkeypatch.setattr(rt, "_cuda", lambda: False)
    _main_refuses(rt, monkeypatch, ["run", "--schedule", "gpu", "--tasks", "rte"],
                  "--schedule gpu runs the GLUE cells in bf16 on a CUDA device")
    _main_refuses(rt, monkeypatch, ["cell", "llama-20m", "adamw", "--schedule", "gpu"],
                  "task 'llama-20m' is not in --schedule gpu")


def test_a_smoke_gpu_cell_trains_in_bf16_on_the_cpu(rt, tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "gpu", (rt.GPU_SCHEDULES, tmp_path / "gpu"))
    monkeypatch.setattr(rt, "_cuda", lambda: False)
    monkeypatch.setattr(sys, "argv", ["results_table.py", "cell", "rte", "adamw", "--schedule", "gpu", "--smoke"])
    rt.main()
    cell = json.loads((tmp_path / "gpu_smoke" / "rte" / "adamw.json").read_text())
    assert cell["steps"] == 3 and 0.0 <= cell["metrics"]["accuracy"] <= 1.0
    assert cell["command"].endswith("--schedule gpu --seed 0")


def test_gpu_section_shows_device_peak_and_wall_time_per_update(rt, tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "gpu", (rt.GPU_SCHEDULES, tmp_path))
    monkeypatch.setitem(rt.RECORDS, "gpu", tmp_path / "record.json")
    assert "Not run yet: no lent GPU has had time for these cells" in rt.render_gpu()
    for row, accuracy, peak, seconds in (("adamw", 0.60, 900, 0.020), ("galore", 0.61, 450, 0.030)):
        cell = _cell("accuracy", accuracy, 100, step_s=9.0)
        cell["memory_bytes"]["peak_process"] = peak * 2**20
        cell["median_step_seconds"] = seconds
        (tmp_path / "rte").mkdir(exist_ok=True)
        (tmp_path / "rte" / f"{row}.json").write_text(json.dumps(cell))
    section = rt.render_gpu()
    assert json.loads((tmp_path / "record.json").read_text())["rte"]["galore"]["median_step_seconds"] == 0.030
    assert section.startswith(rt.GPU_START) and section.endswith(rt.GPU_END)
    assert "device peak MB | s / update | time vs AdamW |" in section
    galore = next(line for line in section.splitlines() if line.startswith("| galore | 61.0 | +1.0 |"))
    assert galore.endswith("| 450.0 | 0.03 | 1.50x |")  # wall seconds, not the 9.0 CPU seconds


def test_pretraining_summary_gives_perplexity_change_against_adamw_and_the_five_percent_target(rt):
    cells = {t: {"adamw": _cell("perplexity", 100.0, 100, 1.0), "galore": _cell("perplexity", 104.0, 40, 1.0),
                 "loqt": _cell("perplexity", 110.0, 40, 1.0)} for t in ("llama-20m", "llama-60m")}  # fmt: skip
    for cell in (c for task in cells.values() for c in task.values()):
        cell["metrics"] = {"perplexity": cell["metrics"]["perplexity"] / 100}  # _metric scales only GLUE metrics
    table = rt.lm_summary(cells)
    assert "| galore | 1.0 (+4.0%) | 1.0 (+4.0%) | <= +5% | met |" in table
    assert "| loqt | 1.1 (+10.0%) | 1.1 (+10.0%) | <= +5% | **missed** |" in table
    del cells["llama-60m"]
    assert "incomplete (1 of 2): within so far" in rt.lm_summary(cells)


def test_guide_gives_pretraining_and_instruct_changes_with_memory_and_time_per_task(rt):
    cells = {t: {"adamw": _cell("perplexity", 1.00, 100, 2.0), "galore": _cell("perplexity", 1.04, 40, 1.0)}
             for t in ("llama-20m", "instruct")}  # fmt: skip
    cells["instruct"] = {row: {**c, "metrics": {"loss": c["metrics"]["perplexity"]}} for row, c in cells["instruct"].items()}
    guide = rt.full_summary(cells)
    assert ("- **galore**, pretraining held-out perplexity vs AdamW: llama-20m +4.0% (tensor memory 0.40x, CPU time "
            "per update 0.50x*).") in guide  # * : two cells' times, not side by side
    assert "- **galore**, instruction held-out loss vs AdamW: instruct +4.0% (tensor memory 0.40x" in guide
    assert "**adamw**," not in guide
    guide = rt.full_summary(cells, timing={"llama-20m": {"galore": (1.25, 3)}})
    assert "llama-20m +4.0% (tensor memory 0.40x, CPU time per update 1.25x)." in guide
    assert "instruct +4.0% (tensor memory 0.40x, CPU time per update 0.50x*)." in guide
    assert "Ratios marked * are not from it" in guide


def _timing_cell(step_s: float) -> dict:
    return {"median_step_cpu_seconds": step_s}


def test_side_by_side_time_is_the_median_of_ratios_to_adamw_in_the_same_round(rt):
    timing = {"mrpc": {
        "adamw@round1": _timing_cell(2.0), "galore@round1": _timing_cell(2.2),
        "adamw@round2": _timing_cell(3.0), "galore@round2": _timing_cell(3.0),  # a slow spell slows both sides
        "adamw@round3": _timing_cell(1.0), "galore@round3": _timing_cell(1.2),
        "velora@round1": _timing_cell(2.4),  # one round only
        "blockllm@round4": _timing_cell(1.0),  # no AdamW in its round: no ratio
    }}  # fmt: skip
    ratios = rt.side_by_side_time_ratios(timing)["mrpc"]
    assert ratios["galore"] == (pytest.approx(1.1), 3)  # median of 1.1, 1.0, 1.2
    assert ratios["velora"] == (pytest.approx(1.2), 1)
    assert set(ratios) == {"galore", "velora"}


def test_glue_tables_and_guide_take_time_side_by_side_where_measured_and_star_the_rest(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.795, "velora": 0.80})
    for task in cells:
        cells[task]["velora"]["median_step_cpu_seconds"] = 0.5  # across runs: VeLoRA looks twice as fast
    timing = {"mrpc": {"velora": (1.1, 3)}}
    table = rt.full_task_table("mrpc", cells["mrpc"], side=timing["mrpc"])
    assert next(line for line in table.splitlines() if line.startswith("| velora |")).endswith("| 0.50 | 1.10x |")
    assert next(line for line in table.splitlines() if line.startswith("| galore |")).endswith("| 1.00 | 1.00x* |")
    assert next(line for line in table.splitlines() if line.startswith("| adamw |")).endswith("| 1.00 | 1.00x |")
    guide = rt.which_method_when(cells, rt.glue_summary(cells)[1], timing)
    assert "**velora**: GLUE average +0.0 points vs AdamW over 5 task(s); tensor memory 0.40x, CPU time per update " \
           "1.10x (medians" in guide  # the side-by-side figure wins over the four tasks' cell ratios
    assert "CPU time per update 1.00x* (medians" in guide  # galore: no side-by-side figure
    short = rt.task_table("mrpc", cells["mrpc"], timing["mrpc"])  # the short-schedule tables too
    assert next(line for line in short.splitlines() if line.startswith("| velora |")).endswith("| 0.50 | 1.10x | - |")
    assert next(line for line in short.splitlines() if line.startswith("| galore |")).endswith("| 1.00 | 1.00x* | - |")


def test_timing_runs_every_row_in_turn_round_after_round_and_needs_adamw(rt, tmp_path, monkeypatch):
    commands = _fake_cells(rt, monkeypatch, tmp_path, returncode=0)
    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "timing", (rt.TIMING_SCHEDULES, tmp_path))
    monkeypatch.setitem(rt.RECORDS, "timing", tmp_path / "record.json")
    rt.run_all(["mrpc"], ["adamw", "galore"], force=False, smoke=False, schedule_name="timing", rounds=2)
    assert [(c[4], c[c.index("--round") + 1]) for c in commands] == [
        ("adamw", "1"), ("galore", "1"), ("adamw", "2"), ("galore", "2")]
    assert rt.cell_name("galore", timing_round=2) == "galore@round2"
    _main_refuses(rt, monkeypatch, ["run", "--schedule", "timing", "--rows", "galore"], "--rows must include adamw")
    _main_refuses(rt, monkeypatch, ["run", "--schedule", "full", "--rounds", "2"],
                  "--rounds belongs to --schedule timing")


def test_instruct_summary_uses_held_out_loss_and_the_two_percent_target(rt):
    cells = {"instruct": {"adamw": _cell("loss", 1.000, 100, 1.0), "galore": _cell("loss", 1.015, 40, 1.0),
                          "loqt": _cell("loss", 1.030, 40, 1.0)}}  # fmt: skip
    table = rt.lm_summary(cells, rt.INSTRUCT_TASKS, rt.INSTRUCT_LOSS_TARGET)
    assert "| galore | 1.015 (+1.5%) | <= +2% | met |" in table
    assert "| loqt | 1.030 (+3.0%) | <= +2% | **missed** |" in table


def test_a_variant_row_is_held_to_its_methods_instruct_and_pretraining_targets(rt):
    instruct = {"instruct": {"adamw": _cell("loss", 1.000, 100, 1.0), "loqt_int8": _cell("loss", 1.046, 40, 1.0)}}
    assert "| loqt_int8 | 1.046 (+4.6%) | <= +2% | **missed** |" in rt.lm_summary(
        instruct, rt.INSTRUCT_TASKS, rt.INSTRUCT_LOSS_TARGET)
    pretrain = {"llama-20m": {"adamw": _cell("perplexity", 100.0, 100, 1.0),
                              "velora_mlp": _cell("perplexity", 110.0, 40, 1.0)}}
    assert "| velora_mlp | 110.0 (+10.0%) | <= +5% | incomplete (1 of 2): misses so far |" in rt.lm_summary(pretrain)


def test_sample_answers_show_each_rows_answer_beside_the_reference(rt):
    sample = {"instruction": "Add 1 and 2.", "reference": "3", "answer": "three"}
    cells = {"adamw": {"samples": [sample]}, "galore": {"samples": [{**sample, "answer": "3"}]}, "loqt": {}}
    text = rt.sample_answers(cells)
    assert "**Instruction 1.** Add 1 and 2." in text
    assert "Reference:\n\n    3\n" in text and "adamw:\n\n    three\n" in text and "galore:\n\n    3\n" in text
    assert "loqt" not in text


def test_guide_says_when_a_row_ran_more_updates_than_adamw(rt):
    cells = _glue({"adamw": 0.80, "zo": 0.70})
    for task in cells:
        cells[task]["zo"]["steps"] = 100  # AdamW's cells ran 10
    _, summary = rt.glue_summary(cells)
    assert "- **zo**: GLUE average -10.0 points vs AdamW over 5 task(s), with 10x AdamW's updates;" in (
        rt.which_method_when(cells, summary))


def test_a_row_run_only_at_a_swept_rate_shows_that_cells_metric_memory_and_updates(rt):
    # zo's GLUE column runs at 1e-4 through --lrs, with no cell at its recipe's 1e-6
    cells = _glue({"adamw": 0.80}, tasks=("rte",))
    cells["rte"]["zo@lr1e-4"] = {**_cell("accuracy", 0.50, 5, 0.5), "learning_rate": 1e-4, "steps": 100}
    line = next(ln for ln in rt.full_task_table("rte", cells["rte"]).splitlines() if ln.startswith("| zo"))
    assert line.startswith("| zo (lr 0.0001) | 50.0 | -30.0 | 100 |")
    assert "| 0.05x | 0.50 | 0.50x* |" in line
    _, summary = rt.glue_summary(cells)
    assert "- **zo**: GLUE average -30.0 points vs AdamW over 1 task(s), with 10x AdamW's updates; tensor memory " \
           "0.05x, CPU time per update 0.50x*" in rt.which_method_when(cells, summary)


def test_a_row_whose_only_cell_on_a_task_failed_is_shown_failed_not_left_out(rt):
    # zo diverged on STS-B at 1e-4 (a NaN loss after 1,228 updates): its failure record is its only cell there
    cells = _glue({"adamw": 0.80}, tasks=("rte", "stsb"))
    cells["rte"]["zo@lr1e-4"] = {**_cell("accuracy", 0.50, 5, 0.5), "learning_rate": 1e-4, "steps": 100}
    cells["stsb"]["zo@lr1e-4"] = {"row": "zo", "failed": "NonFiniteError: ZO: non-finite loss at update 1228"}
    line = next(ln for ln in rt.full_task_table("stsb", cells["stsb"]).splitlines() if ln.startswith("| zo"))
    assert line.startswith("| zo (lr 0.0001) | failed: NonFiniteError: ZO: non-finite loss at update 1228 |")
    table, summary = rt.glue_summary(cells)
    assert next(ln for ln in table.splitlines() if ln.startswith("| zo |")).startswith(
        "| zo | 50.0 (lr 0.0001) | failed | 50.0 | -30.0 |")
    assert summary["zo"]["tasks"] == ["rte"]
    assert "| zo | failed |" in rt.lr_sweep_table("stsb", cells["stsb"])
    cells["stsb"]["zo@lr1e-5"] = {**_cell("pearson", 0.20, 5, 0.5), "learning_rate": 1e-5, "steps": 100}
    assert "| zo | **20.0** | failed |" in rt.lr_sweep_table("stsb", cells["stsb"])


def test_zo_runs_ten_times_each_recipes_glue_updates_at_full_schedules(rt, tmp_path, monkeypatch):
    import hf_memopt.tools.recipes.run as run_module

    class Started(Exception):
        pass

    epochs = []

    def start(recipe, **_):
        epochs.append(recipe.training["num_train_epochs"])
        raise Started

    monkeypatch.setattr(run_module, "run_recipe", start)
    for task in ("sst2", "rte"):  # one epoch over SST-2's bundled 20k, three over RTE
        with pytest.raises(Started):
            rt.run_cell(task, "zo", tmp_path, schedule_name="full")
    assert epochs == [10, 30]


def test_summary_takes_each_row_at_its_best_swept_learning_rate(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.76}, tasks=("mrpc",))
    mrpc = cells["mrpc"]
    mrpc["adamw"]["learning_rate"] = mrpc["galore"]["learning_rate"] = 1e-4
    mrpc["galore@lr2e-4"] = _at_rate("accuracy", 0.80, 2e-4)
    mrpc["adamw@lr2e-4"] = {**_cell("accuracy", 0.78, 100, 1.0), "learning_rate": 2e-4}
    table, summary = rt.glue_summary(cells)
    assert summary["galore"]["per_task"]["mrpc"] == pytest.approx(80.0)
    assert summary["galore"]["learning_rates"]["mrpc"] == 2e-4
    assert summary["adamw"]["per_task"]["mrpc"] == pytest.approx(80.0)  # AdamW's own 1e-4 beats its 2e-4
    assert summary["galore"]["gap"] == pytest.approx(0.0)
    assert "| galore | 80.0 (lr 0.0002) |" in table


def test_a_glue_verdict_waits_for_the_sweeps_it_rests_on(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.78, "blockllm": 0.77})
    for task in cells:
        for row in ("adamw", "galore", "blockllm"):
            cells[task][row]["learning_rate"] = 1e-4
    cells["mrpc"]["adamw@lr2e-4"] = {**_cell("accuracy", 0.75, 100, 1.0), "learning_rate": 2e-4}
    cells["rte"]["galore@lr2e-4"] = _at_rate("accuracy", 0.75, 2e-4)
    _, summary = rt.glue_summary(cells)
    # GaLore was swept on RTE, AdamW not; BlockLLM misses against an AdamW swept on MRPC at its recipe rate alone
    assert summary["galore"]["verdict"] == ("misses so far (AdamW's learning-rate sweep on rte: 1 of 3 rates run; "
                                            "galore's learning-rate sweep on mrpc: 1 of 3 rates run)")
    assert summary["blockllm"]["verdict"] == "misses so far (blockllm's learning-rate sweep on mrpc: 1 of 3 rates run)"
    for lr in (5e-5, 2e-4):  # AdamW runs its three rates on RTE and MRPC, and so then must both rows where they miss
        for task in ("rte", "mrpc"):
            for row in ("adamw", "galore", "blockllm"):
                cells[task][f"{row}@lr{lr:g}"] = {**_cell("accuracy", 0.70, 40, 1.0), "learning_rate": lr}
    _, summary = rt.glue_summary(cells)
    assert summary["galore"]["verdict"] == summary["blockllm"]["verdict"] == "**missed**"
    assert summary["galore"]["gap"] == pytest.approx(-2.0)  # each at its best rate: the sweeps did not change it


def test_the_recipe_learning_rate_keeps_its_seed_mean_against_a_sweep(rt):
    cells = _glue({"adamw": 0.80, "galore": 0.80}, tasks=("rte",))["rte"]
    cells["galore"]["learning_rate"] = 1e-4
    cells["galore@seed1"] = _at_rate("accuracy", 0.70, 1e-4)  # mean at 1e-4: 75.0
    cells["galore@lr2e-4"] = _at_rate("accuracy", 0.77, 2e-4)
    assert rt.best_over_learning_rates("rte", cells, "galore") == (pytest.approx(77.0), 2e-4)


def test_a_missing_peer_library_is_named_with_the_extra_that_installs_it(rt):
    with pytest.raises(ModuleNotFoundError, match=r"the apollo-torch row needs apollo-torch: pip install -e '\.\[bench\]'"):
        rt._peer("apollo_torch_is_not_installed", "apollo-torch")
    assert rt._peer("json", "json").dumps([]) == "[]"


def test_a_sweep_cell_trains_at_the_swept_rate_even_where_the_recipe_sets_the_methods_own(rt, tmp_path, monkeypatch):
    import json

    # recipes/glue/rte.yaml gives LoQT its own rate (method_training.loqt.learning_rate 5e-4) over training's
    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "short", (rt.SCHEDULES, tmp_path / "short"))
    monkeypatch.setattr(sys, "argv", ["results_table.py", "cell", "rte", "loqt", "--smoke", "--lr", "1e-4"])
    rt.main()
    (cell_file,) = (tmp_path / "short_smoke" / "rte").glob("loqt@lr*.json")
    assert json.loads(cell_file.read_text())["learning_rate"] == 1e-4


@pytest.mark.parametrize(("task", "updates"), [("rte", 234), ("mrpc", 345), ("cola", 804), ("stsb", 540), ("sst2", 625)])
def test_an_epoch_schedule_counts_the_updates_its_full_cells_ran(rt, task, updates):
    from transformers import TrainingArguments

    from hf_memopt.tools.recipes.recipe import load_recipe

    # the full GLUE schedules set epochs, not max_steps (-1): BAdam's switch interval must come from the real count
    recipe = load_recipe(rt.recipe_path(task), ["training.logging_steps=10"], "adamw")
    args = TrainingArguments(output_dir="unused", report_to=[], **{
        k: v for k, v in recipe.training.items() if k in ("per_device_train_batch_size", "num_train_epochs")})
    assert args.max_steps == -1
    assert rt.planned_updates(args, recipe) == updates  # what the AdamW cell of results_full.json ran
    assert rt.planned_updates(TrainingArguments(output_dir="unused", report_to=[], max_steps=12), recipe) == 12


def test_instruct_is_timed_side_by_side_at_its_full_batch_shape(rt, tmp_path, monkeypatch):
    commands = _fake_cells(rt, monkeypatch, tmp_path, returncode=0)
    monkeypatch.setitem(rt.SCHEDULE_PROFILES, "timing", (rt.TIMING_SCHEDULES, tmp_path))
    monkeypatch.setitem(rt.RECORDS, "timing", tmp_path / "record.json")
    rt.run_all(["instruct"], ["adamw", "galore"], force=False, smoke=False, schedule_name="timing", rounds=1)
    assert [c[3:5] for c in commands] == [["instruct", "adamw"], ["instruct", "galore"]]
    # fewer updates, never a smaller batch: the recipe's 4 x 4 sequences of up to 512 tokens stay as they are
    assert not any("batch_size" in s or "accumulation" in s or "max_length" in s for s in rt.TIMING_SCHEDULES["instruct"])
    timing_cells = {"instruct": {"adamw@round1": {"median_step_cpu_seconds": 20.0},
                                 "galore@round1": {"median_step_cpu_seconds": 21.0}}}  # fmt: skip
    table = rt.timing_table(timing_cells, rt.side_by_side_time_ratios(timing_cells))
    assert "| row | instruct (vs AdamW) |" in table and "| galore | 1.05x (1 rounds) |" in table


def test_instruct_summary_takes_each_row_at_its_lowest_held_out_loss_over_the_swept_rates(rt):
    def cell(loss: float, lr: float) -> dict:
        return {**_cell("loss", loss, 100, 1.0), "learning_rate": lr}

    cells = {"instruct": {"adamw": cell(0.566, 2e-5), "adamw@lr4e-5": cell(0.560, 4e-5),
                          "galore": cell(0.584, 2e-5), "galore@lr4e-5": cell(0.570, 4e-5),
                          "velora": cell(0.574, 2e-5)}}  # fmt: skip
    table = rt.lm_summary(cells, rt.INSTRUCT_TASKS, rt.INSTRUCT_LOSS_TARGET)
    assert "| adamw | 0.560 (lr 4e-05) | - | - |" in table  # AdamW at its best rate too: the sweep is for both
    # AdamW has run two of its three rates: GaLore's verdict waits for the third
    assert ("| galore | 0.570 (+1.8%) (lr 4e-05) | <= +2% | within so far (AdamW's learning-rate sweep on instruct: "
            "2 of 3 rates run) |") in table
    cells["instruct"]["adamw@lr1e-5"] = cell(0.580, 1e-5)
    assert "| galore | 0.570 (+1.8%) (lr 4e-05) | <= +2% | met |" in rt.lm_summary(
        cells, rt.INSTRUCT_TASKS, rt.INSTRUCT_LOSS_TARGET)
    # it misses against AdamW's best of several rates at its own recipe rate alone: not missed until swept alike
    assert ("| velora | 0.574 (+2.5%) | <= +2% | misses so far (velora's learning-rate sweep on instruct: "
            "1 of 3 rates run) |") in table
    for lr, loss in ((4e-5, 0.575), (1e-5, 0.590)):
        cells["instruct"][f"velora@lr{lr:g}"] = cell(loss, lr)
    assert "| velora | 0.574 (+2.5%) (lr 2e-05) | <= +2% | **missed** |" in rt.lm_summary(
        cells, rt.INSTRUCT_TASKS, rt.INSTRUCT_LOSS_TARGET)
    sweep = rt.lr_sweep_table("instruct", cells["instruct"])
    assert "| galore | - | 0.584 (recipe) | **0.570** |" in sweep  # lower held-out loss is better
    guide = rt.lm_guide(cells, rt.INSTRUCT_TASKS, "instruction held-out loss")
    assert any(line.startswith("- **galore**, instruction held-out loss vs AdamW: instruct +1.8%") for line in guide)


def test_loss_curves_draw_a_swept_only_row_from_its_best_cell_in_a_panel_of_its_own(rt, tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    monkeypatch.setattr(rt, "FIGURES", tmp_path)
    cells = _glue({"adamw": 0.80, "galore": 0.79}, tasks=("rte",))["rte"]
    for name, rate, value in (("zo@lr1e-4", 1e-4, 0.50), ("zo@lr1e-5", 1e-5, 0.48)):
        cells[name] = {**_at_rate("accuracy", value, rate), "losses": [0.70, 0.69], "loss_steps": [10, 20]}
    for name in ("adamw", "galore"):
        cells[name] |= {"losses": [0.70, 0.60], "loss_steps": [1, 2]}
    rt.plot_curves("rte", cells)
    labels = [ax.get_legend_handles_labels()[1] for ax in figures[0].axes]
    assert labels == [["adamw", "galore"], ["adamw", "zo (lr 0.0001)"]]
