"""benchmarks/common.py: the CPU allocator's peak read from profiler memory events (the CPU's max_memory_allocated)."""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCHMARKS))
    import common

    yield common
    sys.path.remove(str(BENCHMARKS))


def _profiled(work):
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        work()
    return prof


def test_allocator_peak_counts_temporaries_freed_before_the_region_ends(common):
    held = torch.ones(1 << 20)  # 4 MiB allocated before the region: not counted

    def work():
        a = torch.ones(4 << 20)  # 16 MiB
        b = a * 2  # 16 MiB more while a lives
        del a, b
        torch.ones(1 << 20)  # 4 MiB, freed at once

    peak = common.allocator_peak_above_start(_profiled(work))
    assert 32 * 2**20 <= peak < 33 * 2**20
    assert held.numel() == 1 << 20


def test_allocator_peak_of_a_region_that_allocates_nothing_is_zero(common):
    x = torch.ones(16)
    assert common.allocator_peak_above_start(_profiled(lambda: x.add_(x))) == 0
