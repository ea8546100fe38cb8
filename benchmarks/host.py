"""Host time: what a call or a step costs before its kernels run (`python -m benchmarks.host`; a
section of `make bench`).

On 201 tiny tensors (BERT-base's count, 1 to 64 elements each) the kernels' work is negligible, so
what is timed is Python, the dispatcher and the checks: per call of every public op on the `cpu`
backend (the Python and C++ paths a GPU call also takes, but for its launches), and per step of
every optimizer, beside `torch.optim.AdamW(fused=True)` and the `_foreach_*` ops on the same
tensors.  A step's own host time is the step's with its base optimizer's step replaced by nothing.
One thread, the garbage collector off (as timeit does); median of `--rounds` rounds of `--calls`
calls each, with the spread."""
import argparse
import gc
import json
import os
import statistics
import time

import torch

from fsam_kernels import FSAM, SAM, PACTuning, clip_grad_norm_componentwise_, ops

TENSORS = 201
HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [int(n) for n in torch.randint(1, 65, (TENSORS,), generator=g)]


def host_us(fn, calls, rounds):
    """(median, p25, p75) microseconds a call over `rounds` rounds of `calls` calls."""
    for _ in range(max(5, calls // 10)):
        fn()
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        gc.enable()
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return statistics.median(times), q[0], q[2]


def params_with_grads(numels, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in numels]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def op_calls(numels, backend):
    """{name: a call} of every public op, and the _foreach_ anchors, on the tensors."""
    g = torch.Generator().manual_seed(2)
    P = [torch.randn(n, generator=g) for n in numels]
    G = [torch.randn(n, generator=g) for n in numels]
    F = [g_.abs() for g_ in G]
    k = sum(numels) // 10
    bits, counts = ops.topk_mask_packed(G, k, absolute=True, backend=backend)
    offsets, saved = ops.save_layout(P, counts)
    status = torch.zeros(1, dtype=torch.int32)
    scale = torch.tensor(1e-3)
    save = dict(save_offsets=offsets, saved=saved, mask_bits=bits, status=status, backend=backend)
    log_stds = [torch.full((n,), -7.0) for n in numels]
    pbits, pcounts = ops.pac_noise_mask(P, log_stds, seed=1, step=0, backend=backend)
    poffsets, psaved = ops.save_layout(P, pcounts)
    noise = dict(seed=1, step=0, mask_bits=pbits, save_offsets=poffsets, saved=psaved, status=status, backend=backend)
    clipped = params_with_grads(numels)
    return {
        "fisher_accumulate": lambda: ops.fisher_accumulate(F, G, decay=0.9, alpha=0.1, backend=backend),
        "torch._foreach_addcmul_": lambda: torch._foreach_addcmul_(F, G, G, value=0.1),
        "topk_mask_packed": lambda: ops.topk_mask_packed(F, k, backend=backend),
        "grad_sumsq": lambda: ops.grad_sumsq(P, G, mask_bits=bits, backend=backend),
        "torch._foreach_norm": lambda: torch._foreach_norm(G),
        "perturb": lambda: ops.perturb(P, G, scale, **save),
        "restore": lambda: ops.restore(P, **save),
        "clip_grad_norm_componentwise_": lambda: clip_grad_norm_componentwise_(clipped, 1.0, backend=backend),
        "torch._foreach_mul_": lambda: torch._foreach_mul_(G, 1.0),
        "pac_noise_mask": lambda: ops.pac_noise_mask(P, log_stds, seed=1, step=0, backend=backend),
        "pac_perturb": lambda: ops.pac_perturb(P, log_stds, **noise),
        "pac_restore": lambda: ops.pac_restore(P, log_stds, **noise),
    }


def step_calls(numels, backend):
    """{name: (one optimizer step, the same without its base step)} beside fused AdamW's, each on
    its own tensors."""
    adamw = dict(lr=1e-5, fused=True)
    out = {}
    ps = params_with_grads(numels)
    step = torch.optim.AdamW(ps, **adamw).step
    out["torch.optim.AdamW(fused=True)"] = (step, step)

    def two_pass(opt):
        return lambda: (opt.first_step(), opt.second_step())

    def with_and_without_base(make, call):
        whole, own = make(), make()
        own.base_optimizer.step = lambda *a, **k: None
        return call(whole), call(own)
    fsam = dict(rho=0.05, backend=backend, **adamw)
    out["FSAM step"] = with_and_without_base(
        lambda: FSAM(params_with_grads(numels), torch.optim.AdamW, mask_interval=10**9, **fsam), two_pass)
    out["FSAM mask step"] = with_and_without_base(
        lambda: FSAM(params_with_grads(numels), torch.optim.AdamW, mask_interval=1, **fsam), two_pass)
    out["SAM step"] = with_and_without_base(lambda: SAM(params_with_grads(numels), torch.optim.AdamW, **fsam),
                                            two_pass)
    out["PACTuning step (stage 2)"] = with_and_without_base(
        lambda: PACTuning(params_with_grads(numels), torch.optim.AdamW, num_examples=100, stage1_steps=0, freeze=(),
                          backend=backend, **adamw), lambda pac: lambda: (pac.perturb(), pac.step()))
    clipped = params_with_grads(numels)
    clip = lambda: clip_grad_norm_componentwise_(clipped, 1.0, backend=backend)  # noqa: E731
    out["clip_grad_norm_componentwise_"] = (clip, clip)
    return out


def run(backend="cpu", calls=200, rounds=7):
    torch.set_num_threads(1)
    numels = tiny_tensors()
    rows = []
    for name, fn in op_calls(numels, backend).items():
        median, p25, p75 = host_us(fn, calls, rounds)
        rows.append({"kind": "op", "name": name, "backend": backend, "tensors": TENSORS, "median_us": median,
                     "p25_us": p25, "p75_us": p75, "calls": calls, "rounds": rounds})
    for name, (whole, own) in step_calls(numels, backend).items():
        median, p25, p75 = host_us(whole, calls, rounds)
        own_us = host_us(own, calls, rounds)[0] if own is not whole else median
        rows.append({"kind": "step", "name": name, "backend": backend, "tensors": TENSORS, "median_us": median,
                     "p25_us": p25, "p75_us": p75, "calls": calls, "rounds": rounds, "own_us": own_us})
    ref = {r["name"]: r["median_us"] for r in rows}
    anchors = {"fisher_accumulate": "torch._foreach_addcmul_", "grad_sumsq": "torch._foreach_norm",
               "clip_grad_norm_componentwise_": "torch._foreach_mul_"}
    for r in rows:
        if r["kind"] == "op" and r["name"] in anchors:
            r["vs_anchor"] = r["median_us"] / ref[anchors[r["name"]]]
        if r["kind"] == "step":
            r["own_vs_fused_adamw"] = r["own_us"] / ref["torch.optim.AdamW(fused=True)"]
    return rows


def markdown(rows):
    lines = ["| kind | call | median us | p25-p75 | vs anchor | own us | own / fused AdamW step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_anchor']:.2f}x" if "vs_anchor" in r else ""
        own = f"{r['own_us']:.0f}" if "own_us" in r else ""
        ratio = f"{r['own_vs_fused_adamw']:.2f}" if "own_vs_fused_adamw" in r and not r["name"].startswith("torch") \
            else ""
        lines.append(f"| {r['kind']} | {r['name']} | {r['median_us']:.0f} | {r['p25_us']:.0f}-{r['p75_us']:.0f} | "
                     f"{vs} | {own} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="folder for host.json and host.md (default: a new one under benchmarks/results/local/)")
    a = ap.parse_args(argv)
    rows = run(a.backend, a.calls, a.rounds)
    table = markdown(rows)
    print(table)
    out = a.out or os.path.join(HERE, "results", "local", f"host-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    from .timing import environment
    env = environment("cpu")
    with open(os.path.join(out, "host.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "host.md"), "w") as f:
        f.write(f"# Host time, {TENSORS} tiny tensors, backend {a.backend}, 1 thread (commit {env.get('commit')})"
                f"\n\n{table}\n")
    print(f"\nhost results in {out}")


if __name__ == "__main__":
    main()
