"""fsam_kernels.traffic: the counts of the cost model, checked where they can be worked out by hand
(a selftest kernel of the emulator, a Triton access pattern, the sectors of a whole-tensor pass),
and the rows and summaries the package's ops give on cuda-sim and on interpreted Triton."""
import numpy as np
import pytest
import torch

from fsam_kernels import _extension, ops, traffic
from fsam_kernels._layout import CHUNK
from conftest import compiled_backends

SIM = pytest.mark.skipif(not _extension.SIM_LOADED, reason="the emulated build (fsam_kernels._sim) is absent")
# The backends whose launches are counted: the emulated CUDA kernels and the interpreted Triton ones.
COUNTED = [b for b, d in compiled_backends() if b == "cuda-sim" or (b == "triton" and d == "cpu")]


@SIM
def test_the_emulators_requests_and_sectors_by_hand():
    # atomic_count, 3 blocks of 256 threads: thread 0 of each adds to out[0] (one atomic request of
    # one lane); the other 255 write one int each: warp 0's 31 lanes (124 bytes, in 4 sectors) and
    # warps 1-7 (128 bytes, 4 sectors each), one request per warp
    with traffic.record() as t:
        torch.ops.fsam_sim.sim_selftest("atomic_count", 3)
    (row,) = [r for r in t.rows() if r["kind"] == "kernel"]
    assert row["backend"] == "cuda-sim" and row["op"] == "sim_selftest" and row["grid"] == 3
    assert (row["requests_written"], row["requests_atomic"], row["requests_read"]) == (3 * 8, 3, 0)
    assert row["bytes_requested"] == 3 * (124 + 7 * 128) + 3 * 4
    assert row["l1_sectors_written"] == 3 * 32 + 3  # the atomics' sector, once per request
    assert row["ideal_sectors"] == 3 * 32 + 3
    assert row["atomics"] == 3
    assert (row["sectors_read"], row["sectors_written"]) == (1, 3 * 32)  # distinct: DRAM
    assert row["buffers"] == {"out": [1, 96]}
    assert row["ncu"]["dram__sectors_write.sum"] == 96


def test_the_triton_request_model_by_hand():
    launch = traffic._TritonLaunch("k", {(4096, 4096 + 4 * 8192): "x"})
    lanes = 4096 + 4 * np.arange(4096, dtype=np.uint64)  # one fp32 block, contiguous
    launch.access("read", lanes, None, 4)
    every_other = np.arange(4096) % 2 == 0
    launch.access("written", lanes + np.uint64(4 * 4096), every_other, 4)
    c = launch.counts
    # 32 lanes of 16 bytes: 128 fp32 elements a request; half the lanes still touch every sector
    assert (c["requests_read"], c["l1_sectors_read"], c["bytes_requested"]) == (32, 512, 16384 + 8192)
    assert (c["requests_written"], c["l1_sectors_written"]) == (32, 512)
    assert c["ideal_sectors"] == 512 + 256
    row = launch.row("op", 0, 0, None)
    assert row["buffers"] == {"x": [512, 512]} and (row["sectors_read"], row["sectors_written"]) == (512, 512)


def test_an_access_outside_the_triton_launchs_storages_is_refused():
    launch = traffic._TritonLaunch("k", {(4096, 8192): "x"})
    with pytest.raises(RuntimeError, match=r"triton: k: an invalid global read of 4 bytes: 0 bytes past the end of x \(4096 bytes\)"):
        launch.access("read", np.array([8192], dtype=np.uint64), None, 4)
    launch.access("read", np.array([8192], dtype=np.uint64), np.array([False]), 4)  # masked off: no access


@pytest.mark.parametrize("backend", COUNTED)
def test_a_whole_tensor_pass_reads_and_writes_each_sector_once(backend):
    n = 2 * CHUNK + 40  # fp32: n / 8 sectors a tensor; bf16: n / 16
    g = torch.Generator().manual_seed(7)
    fisher = [torch.rand(n, generator=g), torch.rand(n, generator=g)]
    grads = [torch.randn(n, generator=g), torch.randn(n, generator=g).bfloat16()]
    with traffic.record() as t:
        ops.fisher_accumulate(fisher, grads, decay=0.5, alpha=2.0, backend=backend)
    seen = {}
    for r in t.rows():
        for label, rw in r["buffers"].items():
            seen[label] = [a + b for a, b in zip(seen.get(label, [0, 0]), rw)]
    assert seen["fisher[0]"] == seen["fisher[1]"] == [n // 8, n // 8]
    assert seen["grads[0]"] == [n // 8, 0] and seen["grads[1]"] == [-(-n // 16), 0]
    s = t.summary()["fisher_accumulate"]
    assert s["calls"] == 1 and s["elements"] == 2 * n and s["tensors"] == 2
    assert s["floor_bytes"] == 4 * n * 4 + 4 * n + 2 * n
    kernels = [r for r in t.rows() if r["backend"] == backend and r["kind"] == "kernel"]
    assert sorted(r["dtype"] for r in kernels) == ["bfloat16", "float32"]  # one launch per dtype group


@pytest.mark.parametrize("backend", COUNTED)
def test_the_ops_rows_name_their_op_and_sum_into_the_summary(backend):
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(CHUNK + 5, generator=g), torch.rand(300, generator=g)]
    with traffic.record() as t:
        ops.topk_mask_packed(scores, 400, backend=backend)
    rows = t.rows()
    assert {r["op"] for r in rows if r["backend"] == backend} == {"topk_mask_packed"}
    assert {r["raw_op"] for r in rows if r["backend"] == backend} >= {"radix_histogram_", "radix_select_",
                                                                       "radix_mask"}
    s = t.summary()["topk_mask_packed"]
    assert s["launches"] == sum(r["launches"] for r in rows if r["op"] == "topk_mask_packed")
    assert s["sectors_read"] == sum(r["sectors_read"] for r in rows if r["op"] == "topk_mask_packed")
    assert s["calls"] == 1 and s["elements"] == CHUNK + 305
    assert s["floor_bytes"] == 4 * (CHUNK + 305) + CHUNK // 8 + 32 + 64  # one read, the mask bits' sectors
    assert s["dram_bytes"] == 32 * (s["sectors_read"] + s["sectors_written"])
    assert 0 < s["sector_efficiency"] <= 1


def test_a_recording_is_one_at_a_time_and_counts_aten_ops():
    with traffic.record() as t:
        with pytest.raises(RuntimeError, match="already active"):
            with traffic.record():
                pass
        x = torch.ones(1000)
        y = (x * 2).sum()
        bool(y > 0)
    kernels = [r["kernel"] for r in t.rows()]
    assert kernels == ["aten.ones", "aten.mul", "aten.sum", "aten.gt", "aten._local_scalar_dense"]
    assert [r["kind"] for r in t.rows()][-1] == "sync" and t.summary()[""]["syncs"] == 1
    assert t.rows()[1]["sectors_read"] == t.rows()[1]["sectors_written"] == 4000 // 32


@SIM
def test_the_tables_per_element_figures_agree_at_two_scales(monkeypatch):
    # benchmarks.traffic carries a list scaled down by s to full size by a line through s and 2 s
    # (bytes = a n + c: c the tensors' and chunks' fixed costs).  Drawn through 1/2048 and 1/4096
    # of MiniLM's 12 largest tensors, and through 1/1024 and 1/2048, the line must give every op
    # the same bytes over its floor at full size, and the same launches and full reads of the
    # scores at each scale: else the table's full-size figures depend on the scale it ran at
    from benchmarks import traffic as table
    for name, value in table.SIM_SETTINGS.items():
        monkeypatch.setenv(name, value)
    found = []
    for scale in (1024, 2048, 4096):
        shapes = sorted(table.scaled_shapes("minilm", scale), key=lambda s: -s[1])[:12]
        case = table.Case(shapes, table.gradients(shapes, None, seed=2), torch.float32, "cuda-sim")
        found.append(table.records(case, steps=False))
    assert set(found[0]) == set(found[1]) == set(found[2]) and len(found[0]) >= 15
    full = found[0]["fisher_accumulate"]["elements"] * 1024  # the tensors at full size
    for item in found[0]:
        assert len({f[item]["launches"] for f in found}) == 1, item
        if "score_reads" in found[0][item]:
            reads = [f[item]["score_reads"] for f in found]
            assert max(reads) - min(reads) <= 0.1, (item, reads)
            continue
        near, far = (table.at_full_size(found[i][item], found[i + 1][item], full)["over_floor"] for i in (0, 1))
        assert abs(near - far) <= 0.03 * far and 0.97 <= near, (item, near, far)
