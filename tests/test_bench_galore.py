"""benchmarks/bench_galore.py's report: repeated runs give a peak-RSS range, ratios need their reference rows."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_galore.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports benchmarks/common.py
    spec = importlib.util.spec_from_file_location("bench_galore", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


def _run(name: str, rss_mib: int, state_mib: int) -> dict:
    memory = {"optimizer_state": state_mib * 2**20, "gradients": 2**20, "peak_process": rss_mib * 2**20}
    return {"name": name, "memory_bytes": memory, "median_step_seconds": 1.0, "median_step_cpu_seconds": 2.0,
            "final_loss": 7.5}  # fmt: skip


def test_repeated_runs_report_the_peak_rss_range_beside_the_first_runs_figures(bench):
    row = bench.with_rss_range([_run("adafactor", 1400, 1), _run("adafactor", 1326, 1), _run("adafactor", 1354, 1)])
    assert row["peak_process_runs"] == [1400 * 2**20, 1326 * 2**20, 1354 * 2**20]
    assert row["memory_bytes"]["peak_process"] == 1400 * 2**20
    table = bench.markdown({"rows": [bench.with_rss_range([_run("adamw", 1700, 400)]), row]})
    assert "| 1700.0 |" in table and "| 1326.0-1400.0 |" in table


def test_without_a_peer_row_the_peer_ratios_are_dashes_not_nan(bench):
    table = bench.markdown({"rows": [_run("adamw", 1700, 400), _run("adafactor", 1400, 1)]})
    assert "nan" not in table
    assert table.splitlines()[-1].endswith("| 7.500 | - |")
