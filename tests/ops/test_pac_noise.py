"""PAC-tuning's noise ops against the reference backend: the Philox stream, the noise, the mask
of inexact entries, perturb and the bit-exact restore, and stage 1's fused pass against a direct
float64 computation."""
import math
import os
import subprocess
import sys

import pytest
import torch

from fsam_kernels import backends, ops, reference
from fsam_kernels._layout import CHUNK, ChunkLayout

from conftest import BACKENDS, DTYPES, all_backends, interpreted, randn, seed_of, shapes

# every backend that runs here, on its device (Triton on CPU tensors under the interpreter)
PAC = pytest.mark.parametrize("backend,device", all_backends())


def philox_of(values, key):
    out = reference.philox([torch.tensor([v]) for v in values], key)
    return [int(x) for x in out]


def test_philox_known_answers():
    # Random123's known-answer vectors of philox4x32-10
    assert philox_of((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox_of((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox_of((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_philox_matches_triton():
    """Triton's tl.philox (which a Triton kernel would use) gives the reference's stream."""
    if backends._triton_device() != "cpu":
        pytest.skip("checked under the Triton interpreter")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draw(out, seed, step, base, n: tl.constexpr):
        i = tl.arange(0, n).to(tl.int64) + base
        zero = i.to(tl.uint32) * 0
        x0, x1, x2, x3 = tl.philox(seed, i.to(tl.uint32), (i >> 32).to(tl.uint32), zero + step, zero, 10)
        j = tl.arange(0, n) * 4
        tl.store(out + j, x0.to(tl.int64))
        tl.store(out + j + 1, x1.to(tl.int64))
        tl.store(out + j + 2, x2.to(tl.int64))
        tl.store(out + j + 3, x3.to(tl.int64))

    out = torch.zeros(64, dtype=torch.int64)
    seed, step, base = 0x123456789AB, 7, 2 ** 32 - 5  # the counter crosses 2^32
    draw[(1,)](out, seed, step, base, 16)
    idx = torch.arange(16) + base
    ref = reference.philox((idx & 0xFFFFFFFF, idx >> 32, torch.full_like(idx, step), torch.zeros_like(idx)),
                           (seed & 0xFFFFFFFF, seed >> 32))
    assert torch.equal(torch.stack(ref, 1).reshape(-1), out & 0xFFFFFFFF)


def test_normal_statistics_and_counters():
    x = reference.pac_normal(torch.arange(1 << 20), 3, 5)
    assert abs(float(x.mean())) < 5e-3 and abs(float(x.std()) - 1) < 5e-3
    assert float(x.abs().max()) < math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-3
    # 4.5 % of |x| > 2 for a normal: the clamp of the noise bites that often
    assert abs(float((x.abs() > 2).float().mean()) - 0.0455) < 3e-3
    other_step = reference.pac_normal(torch.arange(1 << 12), 3, 6)
    other_seed = reference.pac_normal(torch.arange(1 << 12), 4, 5)
    assert not torch.equal(x[: 1 << 12], other_step) and not torch.equal(x[: 1 << 12], other_seed)
    assert float(torch.corrcoef(torch.stack([x[: 1 << 12], other_step]))[0, 1]).__abs__() < 0.05


def log_stds_for(params, std, seed, per_tensor=False):
    """Log-stds around log(std), varying per element (never constant) unless per_tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        if per_tensor:
            out.append(torch.full((1,), math.log(std)))
        else:
            out.append(math.log(std) + 0.5 * torch.randn(p.numel(), generator=g))
    return out


def perturb_restore(backend, params, log_stds, seed, step, bases=None, poison=True):
    bits, counts = ops.pac_noise_mask(params, log_stds, seed=seed, step=step, bases=bases, backend=backend)
    offsets, saved = ops.save_layout(params, counts)
    if poison:
        saved.fill_(0xFF)
    kw = dict(seed=seed, step=step, mask_bits=bits, save_offsets=offsets, saved=saved, bases=bases, backend=backend)
    ops.pac_perturb(params, log_stds, **kw)
    perturbed = [p.clone() for p in params]
    ops.pac_restore(params, log_stds, **kw)
    return bits, counts, perturbed


@PAC
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["mixed", "many"])
def test_restore_is_bit_exact_over_many_steps(backend, device, dtype, shape_set):
    params = randn(shapes(shape_set), dtype, device, seed_of("pac", backend, dtype, shape_set))
    params = [(p * 0.05).contiguous() for p in params]
    log_stds = [s.to(device) for s in log_stds_for(params, 1e-2, seed_of("std", dtype, shape_set))]
    original = [p.clone() for p in params]
    for step in range(1 if interpreted(backend, device) else 4):  # the interpreter is slow
        bits, counts, perturbed = perturb_restore(backend, params, log_stds, seed=11, step=step)
        for p, o in zip(params, original):
            assert torch.equal(p.view(torch.uint8), o.view(torch.uint8))
        moved = sum(int((q != o).sum()) for q, o in zip(perturbed, original))
        total = sum(p.numel() for p in params)
        assert moved > 0.5 * total  # the noise reached (almost) every entry
        assert 0 < int(counts.sum()) < total


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_runs_hold_exactly_the_masked_originals(backend, device, dtype):
    """perturb_ stores the originals of the masked entries, chunk by chunk at save_offsets, as the
    reference does from the same mask, and writes no other byte of `saved` (poisoned, with
    poisoned slack after the runs)."""
    params = [(p * 0.05).contiguous() for p in randn(shapes("mixed"), dtype, device, seed_of("runs", dtype))]
    s = [t.to(device) for t in log_stds_for(params, 1e-2, seed_of("runs std", dtype))]
    kw = dict(seed=3, step=2)
    bits, counts = ops.pac_noise_mask(params, s, backend=backend, **kw)
    offsets, saved = ops.save_layout(params, counts)
    want = torch.full((saved.numel() + 64,), 0xFF, dtype=torch.uint8)
    ops.pac_perturb([p.cpu().clone() for p in params], [t.cpu() for t in s], mask_bits=bits.cpu(),
                    save_offsets=offsets.cpu(), saved=want, backend="reference", **kw)
    got = torch.full_like(want, 0xFF, device=device)
    ops.pac_perturb(params, s, mask_bits=bits, save_offsets=offsets, saved=got, backend=backend, **kw)
    assert 0 < int(counts.sum()) < sum(p.numel() for p in params)
    assert torch.equal(got.cpu(), want)


@PAC
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_marks_exactly_the_inexact_entries_of_every_value(backend, device, dtype):
    """Over every finite value of a 16-bit dtype, the mask is set exactly where (w + n) - n, each
    sum rounded to the dtype by torch, is not w bit for bit, n being the backend's own noise (the
    perturbation of fp32 zeros).  The CPU backend rounds to half with its own branch-free code."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    w = every[torch.isfinite(every)].contiguous()
    s = log_stds_for([w], 1e-2, seed_of("every value", dtype))
    _, _, (noise,) = perturb_restore(backend, [torch.zeros(w.numel(), device=device)], [s[0].to(device)], 9, 3)
    bits, _ = ops.pac_noise_mask([w.to(device)], [s[0].to(device)], seed=9, step=3, backend=backend)
    marked = ChunkLayout([w]).unpack(bits.cpu(), 0)
    noise = noise.cpu()
    back = ((w.float() + noise).to(dtype).float() - noise).to(dtype)
    want = back.view(torch.int16) != w.view(torch.int16)
    assert 0 < int(want.sum()) < w.numel()
    assert torch.equal(marked, want)


@PAC
def test_inexact_fraction_matches_spec(backend, device):
    """docs/algorithm.md (PAC-tuning): about 5 % of fp32 entries at std 1e-3 and 19 % at 1e-2 are not restored by w - n."""
    params = [p * 0.04 for p in randn([(CHUNK * 8 + 5,)], torch.float32, device, seed_of("fraction"))]
    for std, expected in ((1e-3, 0.05), (1e-2, 0.19)):
        s = [t.to(device) for t in log_stds_for(params, std, 0, per_tensor=True)]
        _, counts, _ = perturb_restore(backend, params, s, 1, 0)
        assert abs(int(counts.sum()) / params[0].numel() - expected) < 0.015


@PAC
def test_noise_follows_global_counters(backend, device):
    """Element j of tensor i draws counter bases[i] + j: splitting a tensor in two (with the
    bases of the whole) gives the same perturbed values."""
    whole = [p * 0.05 for p in randn([(3 * CHUNK + 17,)], torch.float32, device, seed_of("counters"))]
    parts = [whole[0][:CHUNK + 5].clone(), whole[0][CHUNK + 5:].clone()]
    s = [t.to(device) for t in log_stds_for(whole, 1e-2, 4)]
    _, _, a = perturb_restore(backend, whole, s, 5, 2)
    _, _, b = perturb_restore(backend, parts, [s[0][:CHUNK + 5], s[0][CHUNK + 5:]], 5, 2, bases=[0, CHUNK + 5])
    assert torch.equal(a[0], torch.cat(b))


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in all_backends() if b != "reference"] or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="no compiled backend built"))])
def test_noise_agrees_with_reference(backend, device):
    """The same Philox stream; log, cos and exp of two math libraries may differ in the last
    bits, so the noise agrees to a few ulps (and most perturbed weights bit for bit)."""
    params = [p * 0.05 for p in randn([(2 * CHUNK + 3,), (50, 7)], torch.float32, "cpu", seed_of("agree"))]
    s = log_stds_for(params, 1e-2, 1)
    _, _, ref = perturb_restore("reference", [p.clone() for p in params], s, 9, 3)
    _, _, got = perturb_restore(backend, [p.to(device) for p in params], [t.to(device) for t in s], 9, 3)
    for r, c, p in zip(ref, [g.cpu() for g in got], params):
        noise_r, noise_c = (r - p).double(), (c - p).double()
        assert torch.allclose(noise_r, noise_c, rtol=1e-4, atol=1e-8)
        # bit-identical weights: about 70 % for C++ (its own vectorised log/cos/exp against SLEEF),
        # 82-86 % for the interpreter
        assert float((r == c).float().mean()) > 0.5


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in all_backends() if b != "reference"] or [
    pytest.param(None, None, marks=pytest.mark.skip(reason="no compiled backend built"))])
@pytest.mark.parametrize("per_tensor,base", [(False, 0), (True, 0), (False, 2 ** 32 - CHUNK - 7)])
def test_noise_itself_agrees_with_reference(backend, device, per_tensor, base):
    """The noise read directly: weights of zero perturb to exactly n (w + n = n).  A per-element
    and a per-tensor log-std, and counters whose low word wraps inside a chunk (the carry into
    the high word).  The backends' log, cos and exp differ by an ulp or so: |n - n_ref| stays
    within 2e-6 of the noise's scale."""
    numel = 2 * CHUNK + 13
    s = log_stds_for([torch.empty(numel)], 1e-2, 5, per_tensor=per_tensor)
    ref = perturb_restore("reference", [torch.zeros(numel)], s, 12, 4, bases=[base])[2][0]
    got = perturb_restore(backend, [torch.zeros(numel, device=device)], [t.to(device) for t in s], 12, 4,
                          bases=[base])[2][0].cpu()
    assert float(ref.abs().max()) > 0
    assert float((got - ref).abs().max()) <= 2e-6 * float(ref.abs().max())


# One perturbation on the CPU backend of the inputs in argv[1] (made here: torch's own kernels at
# another capability could round them differently), saved to argv[2], with the CPU capability
# ATen runs at.
PERTURB_SCRIPT = """
import sys, torch
from fsam_kernels import ops
params, log_stds, bases = torch.load(sys.argv[1])
kw = dict(seed=12, step=4, bases=bases, backend="cpu")
bits, counts = ops.pac_noise_mask(params, log_stds, **kw)
offsets, saved = ops.save_layout(params, counts)
saved.fill_(0xFF)  # the bytes past the saved entries stay poisoned
ops.pac_perturb(params, log_stds, mask_bits=bits, save_offsets=offsets, saved=saved, **kw)
torch.save({"bits": bits, "saved": saved, "params": params}, sys.argv[2])
print(torch.backends.cpu.get_cpu_capability())
"""


# ATen's CPU capabilities, narrowest first.
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.parametrize("fast", ["AVX512", "AVX2"])
def test_cpu_philox_rounds_agree(tmp_path, fast):
    """The CPU's AVX-512 and AVX2 Philox rounds (csrc/cpu/philox.cpp) and its scalar ones, which
    ATEN_CPU_CAPABILITY=default picks, give the same mask, saved entries and perturbed weights bit
    for bit (the noise itself on zeros, a counter crossing 2^32, an odd tail, a per-tensor std)."""
    if "cpu" not in backends.available_backends():
        pytest.skip("no compiled CPU backend")
    if torch.backends.cpu.get_cpu_capability() not in CAPABILITIES[CAPABILITIES.index(fast):]:
        pytest.skip(f"this CPU has no {fast} Philox path to compare")
    numel = 2 * CHUNK + 13
    params = [torch.zeros(numel), randn([(37,)], torch.bfloat16, "cpu", seed_of("rounds"))[0]]
    log_stds = log_stds_for([params[0]], 1e-2, 5) + [torch.full((1,), math.log(1e-2))]
    torch.save((params, log_stds, [2 ** 32 - CHUNK - 7, 2 ** 33 + 5]), tmp_path / "inputs")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATEN_CPU_CAPABILITY")}
    runs = {}
    for capability in (fast, "DEFAULT"):
        args = [sys.executable, "-c", PERTURB_SCRIPT, str(tmp_path / "inputs"), str(tmp_path / capability)]
        env["ATEN_CPU_CAPABILITY"] = capability.lower()
        out = subprocess.run(args, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == capability
        runs[capability] = torch.load(tmp_path / capability)
    vector, scalar = runs[fast], runs["DEFAULT"]
    assert float(vector["params"][0].abs().max()) > 0
    for name in ("bits", "saved"):
        assert torch.equal(vector[name], scalar[name]), name
    for a, b in zip(vector["params"], scalar["params"]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # the bits, signed zeros included


def direct_bound_terms(params, grads, log_stds, anchors, prior, seed, step, max_noise, coef):
    """Stage 1's per-element terms and sums in float64, from the reference's eps."""
    out = {"log_std_grads": [], "grads": [], "sums": []}
    bases = ops.counter_bases(params)
    for i, (p, g, s, a) in enumerate(zip(params, grads, log_stds, anchors)):
        eps = reference.pac_noise(p.numel(), s, bases[i], seed, step, max_noise, p.device)[0].double()
        s64, b = s.double().reshape(-1), float(prior[i])
        diff = p.double().reshape(-1) - a.double().reshape(-1)
        g64 = g.double().reshape(-1)
        out["log_std_grads"].append(g64 * eps * s64.exp() + (torch.exp(2 * s64 - 2 * b) - 1) * coef)
        out["grads"].append(g64 + math.exp(-2 * b) * diff * coef)
        out["sums"].append(torch.stack([torch.exp(2 * s64).sum(), (diff * diff).sum(), (g64 * g64).sum(), s64.sum()]))
    return out


@PAC
@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_grads_against_float64(backend, device, dtype):
    params = [(p * 0.05).contiguous() for p in randn(shapes("mixed"), dtype, "cpu", seed_of("bg", dtype))]
    anchors = [(p.float() + 0.01 * a).to(dtype) for p, a in zip(params, randn(shapes("mixed"), torch.float32, "cpu",
                                                                             seed_of("anchor", dtype)))]
    grads = [g.contiguous() for g in randn(shapes("mixed"), dtype, "cpu", seed_of("g", dtype))]
    s = log_stds_for(params, 1e-2, 3)
    prior = torch.linspace(-0.3, 0.3, len(params)) + math.log(1e-2)
    coef = 1.0 / (100 * 10.0)
    want = direct_bound_terms(params, grads, s, anchors, prior, 7, 4, 2.0, coef)
    on = [[t.to(device) for t in ts] for ts in (params, s, anchors)]
    log_std_grads = [torch.full((p.numel(),), float("nan"), device=device) for p in params]  # poisoned
    got_grads = [g.to(device) for g in grads]
    sums = ops.pac_bound_grads(on[0], got_grads, on[1], log_std_grads, on[2], prior.to(device), coef, seed=7, step=4,
                               backend=backend).cpu()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for i in range(len(params)):
        assert torch.allclose(log_std_grads[i].cpu().double(), want["log_std_grads"][i], rtol=1e-4, atol=1e-6)
        assert torch.allclose(got_grads[i].cpu().double().reshape(-1), want["grads"][i], rtol=tol, atol=tol * 1e-2)
    assert torch.allclose(sums.T, torch.stack(want["sums"]), rtol=1e-5, atol=1e-9)
    only_sums = ops.pac_bound_grads(on[0], [], on[1], [], on[2], prior.to(device), coef, backend=backend).cpu()
    assert torch.equal(only_sums[[0, 1, 3]], sums[[0, 1, 3]]) and not only_sums[2].any()


def test_bad_arguments_raise_before_writing():
    params = [torch.randn(10)]
    s = [torch.zeros(10)]
    with pytest.raises(ValueError, match="log_stds\\[0\\] has 3 elements"):
        ops.pac_noise_mask(params, [torch.zeros(3)], seed=0, step=0)
    with pytest.raises(TypeError, match="log_stds\\[0\\] must be float32"):
        ops.pac_noise_mask(params, [torch.zeros(10, dtype=torch.float64)], seed=0, step=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        ops.pac_noise_mask(params, s, seed=-1, step=0)
    with pytest.raises(ValueError, match="max_noise"):
        ops.pac_noise_mask(params, s, seed=0, step=0, max_noise=0.0)
    with pytest.raises(ValueError, match="bases"):
        ops.pac_noise_mask(params, s, seed=0, step=0, bases=[0, 1])
    bits, counts = ops.pac_noise_mask(params, [torch.full((10,), 3.0)], seed=0, step=0)
    offsets, saved = ops.save_layout(params, counts)
    assert int(counts.sum()) > 0
    before = params[0].clone()
    with pytest.raises(ValueError, match="saved has"):
        ops.pac_perturb(params, [torch.full((10,), 3.0)], seed=0, step=0, mask_bits=bits, save_offsets=offsets,
                        saved=saved[: 4 * int(counts.sum()) - 1])
    assert torch.equal(params[0], before)
