"""The checks can fail: the emulator removes a barrier or shifts a shuffle's source lane at a call
site of csrc/cuda, or sees a kernel's global accesses shifted or its atomics as plain stores
(FSAM_SIM_MUTATE, no source change).  With a barrier gone, the run of every op
family must be refused by the shared-memory race check; with that check off, under at least one
schedule it must give other bits than the unmutated kernels or be refused (a divergent barrier or
warp op, or a wrong count that a later op's checks refuse).  A wrong shuffle must show the same
way.  A mutant may write outside its buffers, so each runs in a process of its own."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fsam_kernels import _extension
from conftest import ROOT, SIM_ORDERS
from workload import run_all

pytestmark = pytest.mark.skipif(not _extension.SIM_LOADED, reason="the emulated build (fsam_kernels._sim) is absent")

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

# Runs workload.run_all under each setting of argv[1] (a JSON list of environments) and prints, per
# setting, "" (the unmutated bits), "changed ..." or "refused: ...".
MUTANT = textwrap.dedent("""
    import json, os, sys
    from workload import differences, run_all
    mutation = os.environ.pop("FSAM_SIM_MUTATE")
    baseline = run_all("cuda-sim")
    os.environ["FSAM_SIM_MUTATE"] = mutation
    seen = []
    for setting in json.loads(sys.argv[1]):
        os.environ.update(setting)
        try:
            changed = differences(run_all("cuda-sim"), baseline)
            seen.append(f"changed {changed[:3]}" if changed else "")
        except (RuntimeError, ValueError) as e:  # the emulator, or an op's check of a wrong count
            seen.append("refused: " + str(e).splitlines()[0][:300])
        print(json.dumps(seen[-1]), flush=True)
""")


def call_site(source, function, call, nth=0):
    """FILE:LINE of the nth `call` after the definition of `function` ("name(") in csrc/cuda."""
    lines = open(os.path.join(ROOT, "csrc", "cuda", source)).read().splitlines()
    start = next(i for i, line in enumerate(lines) if function in line and line.rstrip().endswith("{"))
    hits = [i for i in range(start, len(lines)) if call in lines[i]]
    return f"{source}:{hits[nth] + 1}"


def run_mutant(mutation, settings):
    """What each setting gives under the mutation; a process that died counts as refused."""
    env = {**os.environ, "FSAM_SIM_MUTATE": mutation}
    out = subprocess.run([sys.executable, "-c", MUTANT, json.dumps(settings)], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(__file__), timeout=600)
    seen = [json.loads(line) for line in out.stdout.splitlines()]
    if out.returncode != 0:
        seen.append(f"refused: the process died ({out.returncode}): {out.stderr[-300:]}")
    print(mutation, seen)
    return seen


def test_the_call_sites_are_found():
    sites = {call_site(s, f, "__syncthreads()", n) for s, f, n in BARRIERS.values()}
    sites |= {call_site(s, f, c) for s, f, c in SHUFFLES.values()}
    assert len(sites) == len(BARRIERS) + len(SHUFFLES)


@pytest.mark.parametrize("name", list(BARRIERS))
def test_a_missing_barrier_is_seen(name):
    source, function, nth = BARRIERS[name]
    race_check, *schedules = run_mutant("barrier@" + call_site(source, function, "__syncthreads()", nth),
                                        [{"FSAM_SIM_RACECHECK": "1"}] + [{"FSAM_SIM_RACECHECK": "0", **s}
                                                                         for s in SIM_ORDERS])
    assert "a data race on shared memory" in race_check or "that no thread of the block has written" in race_check
    assert any(schedules) and not any("data race" in s for s in schedules)


@pytest.mark.parametrize("name", list(SHUFFLES))
def test_a_wrong_shuffle_is_seen(name):
    source, function, call = SHUFFLES[name]
    assert all(run_mutant("shuffle@" + call_site(source, function, call), [{}]))


# Global memory: an index one element too far must be refused by the memcheck, and a flush of
# block-private counts made with plain stores instead of atomics by the race check between blocks.
# The check sees the mutated access before it runs, so a mutant touches nothing it should not.
MEMORY_MUTATIONS = {
    "perturb_kernel's index one fp32 element too far": (
        "shift@perturb_kernel:4", r"perturb_kernel<float, .*: an invalid global read of 4 bytes .* past (the|its) end"),
    "restore_kernel's index one bf16 element too far": (
        "shift@restore_kernel:2", r"restore_kernel<.*: an invalid global (read|write) of .* past (the|its) end"),
    "the top-k histogram flushed with plain stores": (
        "plain@histogram_kernel", r"histogram_kernel<.*: a data race on global memory: .* of hist, which block"),
    "fisher_accumulate's first histogram flushed with plain stores": (
        "plain@fisher_kernel", r"fisher_kernel<.*: a data race on global memory: .* of first_hist, which block"),
}


@pytest.mark.parametrize("name", list(MEMORY_MUTATIONS))
def test_a_global_memory_mutation_is_refused(name, monkeypatch):
    mutation, message = MEMORY_MUTATIONS[name]
    monkeypatch.setenv("FSAM_SIM_MUTATE", mutation)
    with pytest.raises(RuntimeError, match=message):
        run_all("cuda-sim")
