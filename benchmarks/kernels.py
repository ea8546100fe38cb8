"""Kernel microbenchmarks: each family (Fisher accumulation, top-k mask, norm + perturb,
restore, component-wise clipping, PAC-tuning's noise round trip) on one parameter list, every
provider side by side."""
import math

import torch

from fsam_kernels import backends, clip_grad_norm_componentwise_, ops, radix_topk
from fsam_kernels._layout import ChunkLayout
from fsam_kernels.optim.pac import perturb_with_noise

from . import anchors
from .param_lists import dtype_of, random_tensors, shapes_for
from .timing import measure, rotation, unsteady

FAMILIES = ("fisher", "topk", "perturb", "restore", "clip", "pac")
DENSITY = 0.1  # keep 10 % (s = 0.9)
RHO = 0.05
CLIP = 1e-3  # below every tensor's norm: each one is scaled
PAC_STD = 1e-2  # the noise's std: 19 % of fp32 entries are not restored by w - n (docs/algorithm.md)
PAC_INEXACT = 0.19


def bytes_per_param(family):
    """The bytes each family must move per fp32 parameter (docs/algorithm.md, "The kernels")."""
    return {
        "fisher": 12.0,                               # read g, read F, write F
        "topk": 4.0 + 1 / 8,                          # one read of the scores + the mask write (the floor)
        "perturb": 4.0 + 8.0 + 1 / 8 + 8 * DENSITY,   # norm reads g; perturb reads g, w, mask, writes w, saved
        "restore": 1 / 8 + 8 * DENSITY,               # mask, saved read, w written: masked entries only
        "clip": 4.0 + 8.0,                            # the norms read g; the scaling reads and writes it
        # perturb and restore each read w and p and write w; the mask, the inexact entries saved
        "pac": 24.0 + 2 / 8 + 8 * PAC_INEXACT,
    }[family]


def _inputs(family, shapes, device, seed, k, dtype):
    G = random_tensors(shapes, device, dtype, seed=seed)
    x = {"G": G}
    if family == "fisher":
        x["F"] = random_tensors(shapes, device, seed=seed + 1, positive=True)
        return x
    if family == "topk":
        return x
    if family == "pac":
        x["P"] = random_tensors(shapes, device, dtype, seed=seed + 2)
        x["S"] = [torch.full(p.shape, math.log(PAC_STD), device=device) for p in x["P"]]
        return x
    if family == "clip":
        x["P"] = [torch.nn.Parameter(torch.empty_like(g)) for g in G]
        for p, g in zip(x["P"], G):
            p.grad = g
        return x
    x["P"] = random_tensors(shapes, device, dtype, seed=seed + 2)
    # One selection for every provider: the k largest |g|.
    bits, counts = radix_topk.topk_mask(G, k, backend=backends.resolve(None, device), absolute=True)
    layout = ChunkLayout(G)
    x["bits"], x["counts"] = bits, counts
    x["offsets"], total = layout.save_offsets(counts)
    x["saved"] = torch.empty(int(total), dtype=torch.uint8, device=device)
    x["masks"] = [layout.unpack(bits, i).to(torch.float32) for i in range(len(G))]
    return x


def _status(x):
    """The status an optimizer passes to the ops that save: their layout checked on the device,
    no sync (what a step costs)."""
    return torch.zeros(1, dtype=torch.int32, device=x["P"][0].device)


def providers(family, device, ours, with_compile):
    """name -> (setup(x) -> fn).  `ours` are fsam_kernels backends."""
    p = {}
    if family == "fisher":
        p["published-eager"] = lambda x: lambda: anchors.fisher_eager(x["F"], x["G"], 0.95, 0.05)
        p["foreach"] = lambda x: lambda: anchors.fisher_foreach(x["F"], x["G"], 0.95, 0.05)
        if with_compile:
            compiled = torch.compile(anchors.fisher_eager)
            p["compile"] = lambda x: lambda: compiled(x["F"], x["G"], 0.95, 0.05)
        for b in ours:
            op = backends.op("fisher_accumulate_", b)
            p[f"fsam-{b}"] = lambda x, op=op: lambda: op(x["F"], x["G"], 0.95, 0.05, None)
    elif family == "topk":
        p["published-cat-topk"] = lambda x: lambda: anchors.topk_published(x["G"], x["k"])
        p["cat-kthvalue"] = lambda x: lambda: anchors.topk_kthvalue(x["G"], x["k"])
        for b in ours:
            p[f"fsam-{b}"] = lambda x, b=b: lambda: radix_topk.topk_mask(x["G"], x["k"], backend=b, absolute=True)
            # without the candidate buffer: what it saves
            p[f"fsam-{b}-unbuffered"] = lambda x, b=b: lambda: radix_topk.topk_mask(
                x["G"], x["k"], backend=b, absolute=True, candidate_capacity=0)
    elif family == "perturb":
        p["published-eager"] = lambda x: lambda: anchors.perturb_published(x["P"], x["G"], x["masks"], RHO)
        p["foreach"] = lambda x: (lambda old: lambda: anchors.perturb_foreach(x["P"], x["G"], x["masks"], RHO, old))(
            [torch.empty_like(t) for t in x["P"]])
        if with_compile:
            compiled = torch.compile(anchors.perturb_published)
            p["compile"] = lambda x: lambda: compiled(x["P"], x["G"], x["masks"], RHO)
        for b in ours:
            sumsq, perturb = backends.op("grad_sumsq", b), backends.op("perturb_", b)

            def setup(x, sumsq=sumsq, perturb=perturb):
                status = _status(x)

                def fn():
                    stats = sumsq(x["P"], x["G"], x["bits"], False, 0.0)
                    scale = RHO / (stats[0].sqrt() + 1e-12)
                    perturb(x["P"], x["G"], x["bits"], x["offsets"], x["saved"], scale, False, 0.0, status)
                return fn
            p[f"fsam-{b}"] = setup
    elif family == "clip":
        p["published-per-tensor"] = lambda x: lambda: anchors.clip_published(x["P"], CLIP)
        p["foreach"] = lambda x: lambda: anchors.clip_foreach(x["G"], CLIP)
        for b in ours:
            p[f"fsam-{b}"] = lambda x, b=b: lambda: clip_grad_norm_componentwise_(x["P"], CLIP, backend=b)
    elif family == "pac":  # perturb then restore, the noise of one step
        p["published-eager"] = lambda x: lambda: anchors.pac_restore_published(
            x["P"], anchors.pac_noise_published(x["P"], x["S"])[1])
        p["foreach"] = lambda x: (lambda old: lambda: anchors.pac_round_trip_foreach(x["P"], x["S"], old))(
            [torch.empty_like(t) for t in x["P"]])
        for b in ours:
            ops_of = {name: backends.op(name, b) for name in ("pac_noise_mask", "pac_perturb_", "pac_restore_")}

            def setup(x, ops_of=ops_of):
                layout, bases, status = ChunkLayout(x["P"]), ops.counter_bases(x["P"]), _status(x)

                def fn():
                    noise = (x["S"], bases, 0, 1, 2.0)
                    ops_of["pac_restore_"](x["P"], *noise, *perturb_with_noise(ops_of, layout, x["P"], noise, status),
                                           status)
                return fn
            p[f"fsam-{b}"] = setup
    elif family == "restore":
        def published(x):
            saved = anchors.perturb_published(x["P"], x["G"], x["masks"], RHO)
            return lambda: anchors.restore_published(x["P"], saved)
        p["published-eager"] = published
        p["foreach"] = lambda x: (lambda old: lambda: anchors.restore_foreach(x["P"], old))(
            [t.clone() for t in x["P"]])
        for b in ours:
            restore = backends.op("restore_", b)
            p[f"fsam-{b}"] = lambda x, restore=restore: (lambda status: lambda: restore(
                x["P"], x["bits"], x["offsets"], x["saved"], status))(_status(x))
    return p


def run(family, spec, device, ours, *, with_compile, min_time, copy_gbps, only=None):
    """Rows of results for one family on one parameter list."""
    shapes = shapes_for(spec)
    n = sum(torch.Size(s).numel() for _, s in shapes)
    k = int(n * DENSITY)
    dtype = dtype_of(spec)
    working = 4 * n * {"fisher": 2, "topk": 1, "perturb": 4, "restore": 4, "clip": 1, "pac": 4}[family]
    rows = []
    for name, setup in providers(family, device, ours, with_compile).items():
        if only and not any(o in name for o in only):
            continue
        row = {"family": family, "list": spec, "params": n, "tensors": len(shapes), "provider": name,
               "dtype": str(dtype).replace("torch.", "")}
        try:
            fns = [setup(x) for x in rotation(lambda i: {**_inputs(family, shapes, device, 10 * i, k, dtype), "k": k},
                                              working, device)]
            turn = iter(range(1 << 62))
            t = measure(lambda: fns[next(turn) % len(fns)](), device, min_time)
        except torch.OutOfMemoryError:  # the eager anchors' copies do not fit the largest lists
            fns = None
            torch.cuda.empty_cache()
            rows.append({**row, "oom": True})
            continue
        gbps = bytes_per_param(family) * n / (t["median_ms"] * 1e-3) / 1e9
        rows.append({**row, **t,
                     "gbps": gbps, "pct_copy_bw": 100 * gbps / copy_gbps,
                     "full_reads": t["median_ms"] * 1e-3 * copy_gbps * 1e9 / (4 * n)})
        fns = None  # free this provider's inputs before the next one allocates its own
    published = [r for r in rows if r["provider"].startswith("published") and not r.get("oom")]
    for r in rows:
        r["speedup_vs_published"] = (published[0]["median_ms"] / r["median_ms"] if published and not r.get("oom")
                                     else None)
        r["ratio_unsteady"] = bool(r["speedup_vs_published"]) and (unsteady(r) or unsteady(published[0]))
    return rows
