"""Shared benchmark plumbing: one subprocess per run (clean peak RSS), load recording, JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    import bitsandbytes
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
    }


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_for_idle(max_load: float = 1.5, max_wait_s: float = 30.0) -> float:
    """Wait (bounded) until the 1-minute load average drops below ``max_load``; return the load seen."""
    deadline = time.time() + max_wait_s
    while load_average() > max_load and time.time() < deadline:
        time.sleep(5)
    return load_average()


def run_isolated(script: str, name: str, extra_args: list[str]) -> dict[str, object]:
    """Run ``script --one name ...`` in a fresh interpreter and return the JSON it writes."""
    out = RESULTS / f".one-{os.getpid()}-{name}.json"
    load_before = wait_for_idle()
    cmd = [sys.executable, script, "--one", name, "--one-output", str(out), *extra_args]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    result = json.loads(out.read_text())
    out.unlink()
    result["load_before"] = load_before
    result["load_after"] = load_average()
    return result


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def allocator_peak_above_start(prof: torch.profiler.profile) -> int:
    """Peak of the CPU allocator's allocated bytes during a ``torch.profiler`` run (``profile_memory=True``), above
    what was allocated when it began: ``torch.cuda.max_memory_allocated`` minus the bytes at the start, on the CPU.

    Read from the trace's ``[memory]`` events, one per allocation and free, each carrying the allocator's total, so
    temporaries made and freed inside one operator count too.
    """
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = [e for e in json.loads(Path(f.name).read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    totals = [e["args"]["Total Allocated"] for e in events]
    start = totals[0] - events[0]["args"]["Bytes"]
    return max(0, max(totals) - start)
