"""The emulated CUDA kernels give the same bits whatever the emulator's schedule: the threads of a
block run in order, reversed or in a seeded random order between their waits, warps released
eagerly or at the end of a pass, on 1, 3 or 132 SMs (the resident grid's striding and the
multi-block reductions) and 1 or 3 OS workers; and the bits of the C++ CPU backend where the two
share every rounding (the PAC noise's transcendentals are each backend's own)."""
import pytest

from fsam_kernels import _extension
from conftest import SIM_ORDERS
from workload import differences, run_all

pytestmark = pytest.mark.skipif(not _extension.SIM_LOADED, reason="the emulated build (fsam_kernels._sim) is absent")

SETTINGS = ["FSAM_SIM_ORDER", "FSAM_SIM_RELEASE", "FSAM_SIM_SMS", "FSAM_SIM_WORKERS", "FSAM_SIM_SEED",
            "FSAM_SIM_MUTATE", "FSAM_SIM_RACECHECK"]


@pytest.fixture(scope="module")
def baseline():
    with pytest.MonkeyPatch.context() as mp:
        for name in SETTINGS:
            mp.delenv(name, raising=False)
        return run_all("cuda-sim")


@pytest.mark.parametrize("schedule", SIM_ORDERS, ids=lambda s: "-".join(s.values()))
def test_every_schedule_gives_the_same_bits(schedule, baseline, monkeypatch):
    for name, value in {**schedule, "FSAM_SIM_SEED": "11"}.items():
        monkeypatch.setenv(name, value)
    assert differences(run_all("cuda-sim"), baseline) == []


@pytest.mark.parametrize("sms,workers", [("1", "1"), ("3", "3"), ("132", "2")])
def test_every_grid_gives_the_same_bits(sms, workers, baseline, monkeypatch):
    monkeypatch.setenv("FSAM_SIM_SMS", sms)
    monkeypatch.setenv("FSAM_SIM_WORKERS", workers)
    assert differences(run_all("cuda-sim"), baseline) == []


def test_the_cpu_backend_gives_the_same_bits(baseline):
    if not _extension.LOADED:
        pytest.skip("the cpu backend is not built")
    noise = {"pac_perturbed_fp32[0]", "pac_perturbed_bf16[0]", "pac_mask_fp32[0]", "pac_mask_bf16[0]",
             "pac_sums[0]", "pac_grads[0]", "pac_log_std_grads[0]"}
    assert set(differences(run_all("cpu"), baseline)) <= noise
