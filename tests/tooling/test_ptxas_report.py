"""The ptxas resource report of every CUDA C++ kernel (tools/ptxas_report.py), for sm_80 and sm_90,
without a GPU: no spills, no stack, and registers and shared memory that let at least 2 blocks
of the kernels' size stay resident on an SM."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ptxas_report  # noqa: E402

ARCHS = (80, 90)
pytestmark = pytest.mark.skipif(ptxas_report.nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def rows():
    return ptxas_report.report(ARCHS)


def test_every_kernel_is_reported_for_each_target(rows):
    names = ptxas_report.kernel_names()
    assert {"fisher_kernel", "histogram_kernel", "select_kernel", "mask_kernel", "perturb_kernel"} <= names
    for arch in ARCHS:
        reported = {r["kernel"].split("<")[0] for r in rows if r["arch"] == arch}
        assert reported == names, f"sm_{arch}: kernels without a report: {names - reported}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_two_blocks_per_sm(rows, arch, capsys):
    mine = [r for r in rows if r["arch"] == arch]
    with capsys.disabled():  # the per-kernel resources, in the test log
        print(f"\nsm_{arch}: {len(mine)} kernels\n{ptxas_report.table(mine)}")
    for r in mine:
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, f"{r['kernel']} spills: {r}"
        assert r["blocks_per_sm"] >= 2, f"{r['kernel']}: only {r['blocks_per_sm']} blocks per SM: {r}"


def test_occupancy_arithmetic():
    # 64 registers x 256 threads = 16384 registers a block: 4 fit the 65536 of an SM
    assert ptxas_report.blocks_per_sm(80, 64, 0, 256) == 4
    assert ptxas_report.blocks_per_sm(80, 65, 0, 256) == 3  # 72 a thread once rounded per warp
    assert ptxas_report.blocks_per_sm(90, 32, 100 * 1024, 256) == 2  # shared memory bounds it
    assert ptxas_report.blocks_per_sm(80, 16, 0, 256) == 8  # resident threads bound it
