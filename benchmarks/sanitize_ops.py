"""Every op of every compiled backend on `--device`, on odd sizes, one tensor and many (about
400), each dtype, masked and dense: the workload `python -m benchmarks.gpu sanitize` runs under
compute-sanitizer.  Each result is compared with the `reference` backend, so a run that reads
or writes the wrong memory also fails here without the sanitizer."""
import argparse

import torch

from fsam_kernels import available_backends, backends, ops
from fsam_kernels._layout import CHUNK

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def shape_sets(many):
    g = torch.Generator().manual_seed(0)
    return {"one-odd": [(CHUNK + 3,)], "mixed": [(3,), (33, 65), (CHUNK,), (1,), (0,), (2 * CHUNK - 1,)],
            "many": [(int(n),) for n in torch.randint(1, 700, (many,), generator=g)]}


def each_op(backend, device, dtype, shapes, seed):
    """Run every op on `backend` and on `reference`; returns how many op calls ran on `backend`."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads[len(grads) // 2] = None  # a parameter without a gradient
    fisher = [torch.rand(s, generator=g) for s in shapes]
    n = sum(p.numel() for p in params)
    results, calls = {}, {backend: 0, "reference": 0}
    for b, dev in ((backend, device), ("reference", "cpu")):
        def call(op, *args, **kwargs):
            calls[b] += 1
            return op(*args, backend=b, **kwargs)
        on = lambda ts: [None if t is None else t.to(dev, copy=True) for t in ts]  # noqa: E731  (fresh copies)
        P, G, F = on(params), on(grads), on(fisher)
        hist = ops.new_first_hist(dev)
        call(ops.fisher_accumulate, F, G, decay=0.9, alpha=0.1, found_inf=torch.zeros(1, device=dev), first_hist=hist)
        bits, counts = call(ops.topk_mask_packed, F, n // 10, first_hist=hist)
        abits, _ = call(ops.topk_mask_packed, [torch.zeros_like(f) if t is None else t for f, t in zip(F, G)], n // 3,
                        absolute=True)
        # the candidate buffer's paths: always filled, never there
        fbits = [call(ops.topk_mask_packed, F, n // 3, candidate_capacity=c)[0] for c in (n, 0)]
        out = [F, bits, counts, abits, *fbits]
        for mask, adaptive in ((bits, False), (None, True)):
            G0 = [torch.zeros_like(p) if t is None else t for p, t in zip(P, G)]
            sums = call(ops.grad_sumsq, P, G, mask_bits=mask, adaptive=adaptive, eta=0.01)
            offsets, saved = ops.save_layout(P, counts if mask is not None else None)
            before = [p.clone() for p in P]
            call(ops.perturb, P, G0, torch.full((1,), 0.05, device=dev), save_offsets=offsets, saved=saved,
                 mask_bits=mask, adaptive=adaptive, eta=0.01)
            out += [sums, [p.clone() for p in P]]
            call(ops.restore, P, save_offsets=offsets, saved=saved, mask_bits=mask)
            assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(P, before) if x.numel())
        # PAC-tuning's noise (std 1e-2): the restore is exact in every backend; the noise itself
        # differs between backends in the last bits, so only the stage-1 sums are compared
        S = [torch.full((p.numel(),), -4.6, device=dev) for p in P]
        noise = dict(seed=5, step=seed)
        pbits, pcounts = call(ops.pac_noise_mask, P, S, **noise)
        poffsets, psaved = ops.save_layout(P, pcounts)
        before = [p.clone() for p in P]
        call(ops.pac_perturb, P, S, mask_bits=pbits, save_offsets=poffsets, saved=psaved, **noise)
        call(ops.pac_restore, P, S, mask_bits=pbits, save_offsets=poffsets, saved=psaved, **noise)
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(P, before) if x.numel())
        G0 = [torch.zeros_like(p) if t is None else t for p, t in zip(P, G)]
        out.append(call(ops.pac_bound_grads, P, G0, S, [torch.empty(p.numel(), device=dev) for p in P], before,
                        torch.full((len(P),), -4.6, device=dev), 1e-3, **noise))
        results[b] = out
    for got, want in zip(results[backend], results["reference"]):
        for x, y in zip(*(v if isinstance(v, list) else [v] for v in (got, want))):
            torch.testing.assert_close(x.cpu(), y, rtol=2e-5, atol=1e-6)
    assert calls[backend] == calls["reference"]
    return calls[backend]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--many", type=int, help="tensors in the many-tensor list (default 400; 20 on the CPU, whose "
                                             "Triton kernels run interpreted)")
    ap.add_argument("--quick", action="store_true", help="the mixed shapes only: one small call of every op per dtype")
    ap.add_argument("--backends", nargs="+", help="only these backends (default: every one built for --device)")
    a = ap.parse_args(argv)
    a.many = a.many or (400 if a.device == "cuda" else 20)
    mine = [b for b in available_backends() if backends.device_of(b) == a.device and b in (a.backends or [b])]
    missing = sorted(set(a.backends or []) - set(mine))
    if missing:
        raise SystemExit(f"sanitize_ops: backend(s) {missing} not built for {a.device} (built: {available_backends()})")
    calls = 0
    for b in mine:
        for dtype in DTYPES:
            for i, (name, shapes) in enumerate(shape_sets(a.many).items()):
                if not a.quick or name == "mixed":
                    calls += each_op(b, a.device, dtype, shapes, seed=i)
    print(f"sanitize_ops: {calls} op calls on {mine} ({a.device}), every result equal to reference")


if __name__ == "__main__":
    main()
