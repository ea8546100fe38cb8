"""The SIMT emulator of the cuda-sim backend on kernels written to break one rule of the CUDA
programming model each (csrc/sim/selftest.cpp): each must be refused with its own message, under
every schedule, and the kernels that keep the rules must run and give the hardware's results.
The global-memory rules (an access outside the storages given to the op, two blocks of a launch
racing on a word) are shown on the real kernels too, by mutation, in test_mutations.py."""
import pytest
import torch

import fsam_kernels
from fsam_kernels import _extension, backends
from conftest import SIM_ORDERS

pytestmark = pytest.mark.skipif(not _extension.SIM_LOADED, reason="the emulated build (fsam_kernels._sim) is absent")

BLOCK = 256
SCHEDULES = pytest.mark.parametrize("schedule", SIM_ORDERS, ids=lambda s: "-".join(s.values()))

BROKEN = {
    "divergent_shuffle": "a divergent warp op",
    "partial_mask": "with mask 0xffff, which does not name the calling lane",
    "returned_lane": "names lane 31, which has returned",
    "divergent_barrier": "a divergent barrier",
    "missing_barrier": "a data race on shared memory",
    "shuffle_is_no_fence": "a data race on shared memory",
    "uninitialised_read": "reads shared memory that no thread of the block has written",
    "misaligned_vector_load": "a 16-byte access at 0x[0-9a-f]+, not a multiple of 16",
    "off_by_one": r"block 2 thread 255: an invalid global write of 4 bytes \(code at _sim\+0x[0-9a-f]+\): 0 bytes "
                  r"past the end of out \(3072 bytes\), the nearest storage given to the op",
    "dropped_bound": r"block 2 thread 255: an invalid global read of 4 bytes .*: 0 bytes past the end of out",
    "plain_count": r"a data race on global memory: block \d thread 0 (reads|writes) byte 0 of out, which block \d "
                   r"(wrote|read) in the same launch, neither atomically",
}


def selftest(kernel, grid):
    return torch.ops.fsam_sim.sim_selftest(kernel, grid)


@SCHEDULES
@pytest.mark.parametrize("kernel", list(BROKEN))
def test_a_broken_rule_is_refused(kernel, schedule, monkeypatch):
    for name, value in schedule.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=f"cuda-sim: .*{kernel}: .*{BROKEN[kernel]}"):
        selftest(kernel, 3)


def expected_warp_ops(grid):
    lane = torch.arange(BLOCK) % 32
    down = torch.where(lane + 3 < 32, lane + 3, lane)
    up = torch.where(lane >= 5, lane - 5, lane)
    one_block = 1 + 2 * down + 100 * up + 10000 * (31 - lane) * 10
    return one_block.repeat(grid).int()


@SCHEDULES
@pytest.mark.parametrize("workers", ["1", "3"])
def test_kept_rules_run_with_the_hardwares_results(schedule, workers, monkeypatch):
    for name, value in {**schedule, "FSAM_SIM_WORKERS": workers}.items():
        monkeypatch.setenv(name, value)
    grid = 5
    assert torch.equal(selftest("shared_atomics", grid), (torch.arange(grid) + 1).repeat_interleave(BLOCK).int() * BLOCK)
    assert torch.equal(selftest("warp_ops", grid), expected_warp_ops(grid))
    counted = selftest("atomic_count", grid)  # every block adds one to out[0] (from -1), atomically
    expected = torch.arange(grid * BLOCK).div(BLOCK, rounding_mode="floor").int()
    expected[::BLOCK] = -1
    expected[0] = grid - 1
    assert torch.equal(counted, expected)


def test_the_global_race_check_follows_the_race_setting(monkeypatch):
    monkeypatch.setenv("FSAM_SIM_RACECHECK", "0")
    assert int(selftest("plain_count", 3)[0]) >= 0  # raced, unchecked: some count
    with pytest.raises(RuntimeError, match="an invalid global write"):  # the memcheck stays
        selftest("off_by_one", 3)


def test_an_empty_grid_is_refused_as_on_a_gpu():
    with pytest.raises(RuntimeError, match="warp_ops launched with 0 blocks"):
        selftest("warp_ops", 0)
    with pytest.raises(RuntimeError, match="no kernel named 'nothing'"):
        selftest("nothing", 1)


@pytest.mark.parametrize("name,value", [("FSAM_SIM_ORDER", "sideways"), ("FSAM_SIM_RELEASE", "late"),
                                        ("FSAM_SIM_SMS", "0"), ("FSAM_SIM_WORKERS", "x"),
                                        ("FSAM_SIM_RACECHECK", "2"), ("FSAM_SIM_MUTATE", "barrier@nowhere"),
                                        ("FSAM_SIM_MUTATE", "shuffle@topk.cu:x1"),
                                        ("FSAM_SIM_MUTATE", "shift@perturb_kernel:0"),
                                        ("FSAM_SIM_MUTATE", "shift@perturb_kernel"), ("FSAM_SIM_MUTATE", "plain@")])
def test_a_bad_setting_is_refused_by_name(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        selftest("warp_ops", 1)


def test_listed_and_accepted_but_never_chosen_by_auto():
    assert "cuda-sim" in fsam_kernels.available_backends()
    assert "cuda-sim" not in backends.native_backends("cpu")
    assert backends.resolve("auto", "cpu") != "cuda-sim"
    assert backends.resolve("cuda-sim", "cpu") == "cuda-sim"
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        backends.resolve("cuda-sim", "cuda")
