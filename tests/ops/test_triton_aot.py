"""Every Triton kernel specialisation the launchers can request compiles for sm_80 and sm_90
without a GPU (Triton's own compiler and ptxas), and none spills registers.

`python -m fsam_kernels.triton_kernels.aot` does the work in a process of its own: the test
process runs Triton under the interpreter, which replaces the compiler."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from conftest import ROOT  # noqa: E402

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cap: subprocess.Popen([sys.executable, "-m", "fsam_kernels.triton_kernels.aot", "--json", "--arch",
                                    str(cap)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for cap in ARCHS}  # one process per target: both cores
    out = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{cap}: compilation failed:\n{stderr[-6000:]}"
        out[cap] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("cap", ARCHS)
def test_every_kernel_compiles_without_spills(report, cap, capsys):
    from fsam_kernels.triton_kernels.aot import table
    data = report[cap]
    rows = data["rows"]
    with capsys.disabled():  # the per-kernel resources, in the test log
        print(f"\nTriton {data['triton']}, sm_{cap}: {len(rows)} specialisations\n{table(rows)}")
    assert {r["kernel"] for r in rows} == set(data["defined"]), "a kernel no launcher reached"
    assert all(r["arch"] == f"sm_{cap}" and r["registers"] > 0 and r["num_warps"] > 0 for r in rows)
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, f"register spills: {spilling}"
    # every dtype and every boolean constexpr reached both values where the kernel has one
    by_kernel = {}
    for r in rows:
        for k, v in r["constexprs"].items():
            by_kernel.setdefault((r["kernel"], k), set()).add(v)
    assert {v for (name, k), vs in by_kernel.items() if k in ("DT", "G_DT") for v in vs} == {"fp32", "bf16", "fp16"}
    for (name, k), values in by_kernel.items():
        if values & {"True", "False"}:
            assert values == {"True", "False"}, (name, k, values)
