"""The checks can fail: the emulator removes a barrier or shifts a shuffle's source lane at a call
site of csrc/cuda (FSAM_SIM_MUTATE, no source change), and the run of every op family must then be
refused by the shared-memory race check; with that check off, under at least one schedule it must
give other bits than the unmutated kernels, or be refused (a divergent barrier or warp op, or a
wrong count that a later op's checks refuse)."""
import os

import pytest

from fsam_kernels import _extension
from conftest import ROOT
from workload import differences, run_all

pytestmark = pytest.mark.skipif(not _extension.SIM_LOADED, reason="the emulated build (fsam_kernels._sim) is absent")


def call_site(source, function, call, nth=0):
    """FILE:LINE of the nth `call` after the definition of `function` ("name(") in csrc/cuda."""
    lines = open(os.path.join(ROOT, "csrc", "cuda", source)).read().splitlines()
    start = next(i for i, line in enumerate(lines) if function in line and line.rstrip().endswith("{"))
    hits = [i for i in range(start, len(lines)) if call in lines[i]]
    return f"{source}:{hits[nth] + 1}"


BARRIERS = {
    "block_scan's first barrier": ("multi_tensor.cuh", "block_scan(", 0),
    "block_scan's second barrier": ("multi_tensor.cuh", "block_scan(", 1),
    "block_sum's first barrier": ("multi_tensor.cuh", "block_sum(", 0),
    "block_sum's second barrier": ("multi_tensor.cuh", "block_sum(", 1),
    "flush_bins' barrier": ("topk.cu", "flush_bins(", 0),
}
SHUFFLES = {
    "block_sum's shuffle": ("multi_tensor.cuh", "block_sum(", "__shfl_down_sync"),
    "warp_exclusive_scan's shuffle": ("multi_tensor.cuh", "warp_exclusive_scan(", "__shfl_up_sync"),
    "select_kernel's shuffle": ("topk.cu", "select_kernel(", "__shfl_down_sync"),
}


@pytest.fixture(scope="module")
def baseline():
    return run_all("cuda-sim")


def test_the_call_sites_are_found():
    assert call_site("multi_tensor.cuh", "block_scan(", "__syncthreads()", 1) != \
        call_site("multi_tensor.cuh", "block_scan(", "__syncthreads()", 0)
    assert all(call_site(s, f, "__syncthreads()", n) for s, f, n in BARRIERS.values())


@pytest.mark.parametrize("name", list(BARRIERS))
def test_a_missing_barrier_is_a_race(name, monkeypatch):
    source, function, nth = BARRIERS[name]
    monkeypatch.setenv("FSAM_SIM_MUTATE", "barrier@" + call_site(source, function, "__syncthreads()", nth))
    with pytest.raises(RuntimeError, match="a data race on shared memory|that no thread of the block has written"):
        run_all("cuda-sim")


def outcome(baseline):
    """What one run of every op family gives against the unmutated bits: '' when the same."""
    try:
        changed = differences(run_all("cuda-sim"), baseline)
    except (RuntimeError, ValueError) as e:  # the emulator, or an op's check of a wrong count
        assert "data race" not in str(e), str(e)
        return "refused: " + str(e).split(": ", 2)[-1].splitlines()[0][:120]
    return f"changed {changed[:3]}" if changed else ""


@pytest.mark.parametrize("name", list(BARRIERS))
def test_a_missing_barrier_shows_under_some_schedule(name, baseline, monkeypatch):
    source, function, nth = BARRIERS[name]
    monkeypatch.setenv("FSAM_SIM_MUTATE", "barrier@" + call_site(source, function, "__syncthreads()", nth))
    monkeypatch.setenv("FSAM_SIM_RACECHECK", "0")
    seen = {}
    for order in ("in-order", "reversed", "random"):
        for release in ("eager", "pass"):
            monkeypatch.setenv("FSAM_SIM_ORDER", order)
            monkeypatch.setenv("FSAM_SIM_RELEASE", release)
            seen[order, release] = outcome(baseline)
    print(name, seen)
    assert any(seen.values())


@pytest.mark.parametrize("name", list(SHUFFLES))
def test_a_wrong_shuffle_shows(name, baseline, monkeypatch):
    source, function, call = SHUFFLES[name]
    monkeypatch.setenv("FSAM_SIM_MUTATE", "shuffle@" + call_site(source, function, call))
    seen = outcome(baseline)
    print(name, seen)
    assert seen
