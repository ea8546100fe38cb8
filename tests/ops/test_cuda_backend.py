"""The CUDA C++ backend without a GPU: built whenever torch has CUDA and nvcc is found, a CUDA
kernel registered for every op that has a CPU one, listed as a backend only where a GPU is, never
chosen by "auto" before Triton until the GPU proof, and fake impls that carry CUDA tensors through
a trace.  (On a GPU the op tests run it against `reference` like every backend.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fsam_kernels
from fsam_kernels import _extension, backends
from fsam_kernels._layout import CHUNK_BYTES, RADIX_HIST_SIZES, RADIX_STATE_SIZE, total_chunks
from fsam_kernels._schemas import SCHEMAS
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))


def cuda_build_expected():
    import ptxas_report
    return torch.version.cuda is not None and ptxas_report.nvcc() is not None and \
        os.environ.get("FSAM_BUILD_CUDA") != "0"


needs_cuda_build = pytest.mark.skipif(not (_extension.LOADED and cuda_build_expected()),
                                      reason="the extension is not built with CUDA here")


@needs_cuda_build
def test_every_cpu_op_has_a_cuda_kernel():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    cpu_ops = [name for name in SCHEMAS if has(f"fsam::{name}", "CPU")]
    assert cpu_ops == list(SCHEMAS)
    assert [name for name in cpu_ops if not has(f"fsam::{name}", "CUDA")] == []
    assert _extension.has_cuda_kernels()


def test_cuda_is_listed_only_with_a_gpu():
    listed = "cuda" in fsam_kernels.available_backends()
    assert listed == (_extension.has_cuda_kernels() and torch.cuda.is_available())
    if not listed:
        with pytest.raises(RuntimeError, match="'cuda' is not available"):
            backends.resolve("cuda", "cpu")


def test_auto_prefers_triton_on_cuda_tensors_until_proven(monkeypatch):
    monkeypatch.setattr(backends, "_triton_usable", lambda: True)
    monkeypatch.setattr(backends, "_triton_device", lambda: "cuda")
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.native_backends("cuda") == ["triton", "cuda", "reference"]
    assert backends.resolve("auto", "cuda") == "triton"
    assert backends.resolve("cuda", "cuda") == "cuda"  # asked for by name, it runs


@needs_cuda_build
def test_the_cuda_build_runs_the_cpu_backend_without_a_gpu():
    script = textwrap.dedent("""
        import torch, fsam_kernels
        from fsam_kernels import _extension
        assert _extension.has_cuda_kernels() and not torch.cuda.is_available()
        assert [b for b in fsam_kernels.available_backends() if b != "cuda-sim"] == ["cpu", "reference"]
        model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Linear(80, 3))
        opt = fsam_kernels.FSAM(model.named_parameters(), torch.optim.AdamW, lr=1e-3, sparsity=0.9)
        assert opt.backend == "cpu"
        x = torch.randn(16, 64)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            model(x).square().mean().backward()
            opt.step(lambda: model(x).square().mean().backward())
            opt.zero_grad()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "ok"


@needs_cuda_build
def test_fake_impls_carry_cuda_tensors():
    """Every op traced on fake CUDA tensors (no GPU needed): outputs on CUDA with the shapes and
    dtypes the CUDA kernels produce, and every op in the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def everything(params, grads, state, hist0, offsets, saved, scale):
        fsam = torch.ops.fsam
        fsam.fisher_accumulate_(params, grads, 0.9, 0.1, None, hist0)
        candidates = torch.empty(512, dtype=torch.int64, device=state.device)
        for digit, size in enumerate(RADIX_HIST_SIZES):
            hist = hist0 if digit == 0 else torch.zeros(size, dtype=torch.int64, device=state.device)
            fsam.radix_histogram_(grads, state, digit, True, hist, candidates)
            fsam.radix_select_(state, hist, digit)
        ties = fsam.radix_tie_counts(grads, state, True, candidates)
        bits, counts = fsam.radix_mask(grads, state, ties, torch.cumsum(ties, 0) - ties, True)
        stats = fsam.grad_sumsq(params, grads, bits, False, 0.0)
        fsam.perturb_(params, grads, bits, offsets, saved, scale, False, 0.0)
        fsam.restore_(params, bits, offsets, saved)
        sums = fsam.tensor_sumsq(grads)
        fsam.clip_scale_(grads, sums.sqrt().float(), 0.5, 1e-6)
        log_stds = [torch.empty(p.numel(), device=p.device) for p in params]
        noise = (log_stds, [0, 5000, 5021], 1, 2, 2.0)
        pac_bits, pac_counts = fsam.pac_noise_mask(params, *noise)
        fsam.pac_perturb_(params, *noise, pac_bits, offsets, saved)
        fsam.pac_restore_(params, *noise, pac_bits, offsets, saved)
        pac_sums = fsam.pac_bound_grads_(params, grads, log_stds, log_stds, params, scale.new_empty(3), *noise[1:],
                                         1e-3)
        return ties, bits, counts, stats, sums, pac_bits, pac_counts, pac_sums

    with FakeTensorMode():
        shapes = [(5000,), (3, 7), (64,)]
        params = [torch.empty(s, device="cuda") for s in shapes]
        grads = [torch.empty(s, device="cuda") for s in shapes]
        args = (params, grads, torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64, device="cuda"),
                torch.zeros(RADIX_HIST_SIZES[0], dtype=torch.int64, device="cuda"),
                torch.zeros(total_chunks(params), dtype=torch.int64, device="cuda"),
                torch.empty(4096, dtype=torch.uint8, device="cuda"), torch.tensor(0.1, device="cuda"))
        ties, bits, counts, stats, sums, pac_bits, pac_counts, pac_sums = everything(*args)
        graph = make_fx(everything, tracing_mode="fake")(*args)
    chunks = total_chunks(params)
    assert ties.device.type == bits.device.type == counts.device.type == stats.device.type == sums.device.type == "cuda"
    assert (sums.shape, sums.dtype) == ((len(shapes),), torch.float64)
    assert (ties.shape, ties.dtype) == ((chunks,), torch.int64)
    assert (bits.shape, bits.dtype) == ((chunks * CHUNK_BYTES,), torch.uint8)
    assert (counts.shape, counts.dtype) == ((chunks,), torch.int32)
    assert (stats.shape, stats.dtype) == ((2,), torch.float32)
    assert (pac_bits.shape, pac_counts.shape) == (bits.shape, counts.shape) and pac_counts.dtype == torch.int32
    assert (pac_sums.shape, pac_sums.dtype, pac_sums.device.type) == ((4, len(shapes)), torch.float64, "cuda")
    called = {str(n.target).split(".")[1] for n in graph.graph.nodes if str(n.target).startswith("fsam.")}
    assert called == set(SCHEMAS)
