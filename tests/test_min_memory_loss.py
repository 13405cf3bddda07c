"""benchmarks/min_memory_loss.py: the composed recipe's held-out loss against AdamW after equal updates."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "min_memory_loss.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("min_memory_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(held_out: float, steps: int = 300, **memory_mib: float) -> dict:
    memory = {k: v * 2**20 for k, v in memory_mib.items()}
    memory["peak_process"] = 5000 * 2**20
    return {"metrics": {"loss": held_out, "perplexity": 2.0}, "steps": steps, "memory_bytes": memory,
            "median_step_seconds": 30.0, "median_step_cpu_seconds": 29.0, "final_loss": held_out + 0.1,
            "losses": [2.0, 1.8, held_out + 0.1], "loss_steps": [5, 10, steps]}  # fmt: skip


def test_gap_is_per_cent_of_the_adamw_held_out_loss_and_judged_against_3_percent(report):
    runs = {"composed": _results(1.545, parameters=100, activations=50), "adamw": _results(1.5, parameters=500)}
    summary = report.summarise(runs)
    assert summary["rows"]["composed"]["gap_percent"] == pytest.approx(3.0)
    assert summary["meets_target"] == {"composed": True}
    assert summary["rows"]["composed"]["tensor_total_bytes"] == 150 * 2**20
    runs["composed"]["metrics"]["loss"] = 1.5451
    assert report.summarise(runs)["meets_target"] == {"composed": False}


def test_runs_stopped_at_different_or_too_few_updates_are_refused(report):
    with pytest.raises(ValueError, match="same number of updates"):
        report.summarise({"composed": _results(1.5, steps=280), "adamw": _results(1.5)})
    with pytest.raises(ValueError, match="at least 300"):
        report.summarise({"composed": _results(1.5, steps=200), "adamw": _results(1.5, steps=200)})


def test_a_run_without_its_held_out_loss_is_refused(report):
    unfinished = _results(1.5)
    unfinished["metrics"] = {}
    with pytest.raises(ValueError, match="'composed' has no held-out loss"):
        report.summarise({"composed": unfinished, "adamw": _results(1.5)})


def test_main_writes_the_json_the_figure_and_prints_the_table(report, tmp_path, capsys):
    for name, loss in (("loqt", 1.55), ("adamw", 1.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(loss, parameters=10)))
    out, fig = tmp_path / "loss.json", tmp_path / "loss.png"
    report.main(["--composed", str(tmp_path / "loqt"), "--adamw", str(tmp_path / "adamw"),
                 "--output", str(out), "--figure", str(fig)])  # fmt: skip
    assert json.loads(out.read_text())["rows"]["composed"]["gap_percent"] == pytest.approx(100 * 0.05 / 1.5)
    assert fig.stat().st_size > 0
    assert "| composed | 1.5500 | +3.33% |" in capsys.readouterr().out


def test_a_missing_run_folder_names_the_option(report, tmp_path):
    with pytest.raises(SystemExit, match="--composed"):
        report.main(["--composed", str(tmp_path / "nothing"), "--adamw", str(tmp_path)])


def test_the_held_out_loss_before_training_is_recorded_beside_the_gap(report, tmp_path):
    for name, loss in (("loqt", 1.55), ("adamw", 1.5), ("loqt0", 1.85), ("adamw0", 1.64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(loss, parameters=10)))
    summary = report.main(["--composed", str(tmp_path / "loqt"), "--adamw", str(tmp_path / "adamw"),
                           "--composed-start", str(tmp_path / "loqt0"), "--adamw-start", str(tmp_path / "adamw0"),
                           "--output", str(tmp_path / "o.json"), "--figure", str(tmp_path / "o.png")])  # fmt: skip
    assert summary["rows"]["composed"]["held_out_loss_before_training"] == 1.85
    assert summary["rows"]["adamw"]["held_out_loss_before_training"] == 1.64
    with pytest.raises(SystemExit, match="--adamw-start"):
        report.main(["--composed", str(tmp_path / "loqt"), "--adamw", str(tmp_path / "adamw"),
                     "--adamw-start", str(tmp_path / "nothing")])  # fmt: skip
