"""The whole optimizer step (everything outside forward/backward, the base AdamW step
included) and the memory each optimizer holds beyond AdamW, on real parameter lists."""
import torch

from fsam_kernels import FSAM, SAM
from fsam_kernels.sharding import is_sharded, local

from . import anchors
from .param_lists import random_tensors, shapes_for
from .timing import measure, unsteady

LR, RHO, SPARSITY = 1e-5, 0.05, 0.9
NEVER = 10**9


# fused AdamW (CPU and CUDA): the base step every optimizer here shares
ADAMW_KWARGS = {"lr": LR, "weight_decay": 0.01, "fused": True}


def optimizers(ours):
    """name -> (params -> (optimizer, step function))."""
    kw = ADAMW_KWARGS
    AdamW = torch.optim.AdamW

    def two_pass(opt):
        def fn():
            opt.first_step()
            opt.second_step()
        return fn

    out = {"adamw": lambda P: (lambda o: (o, o.step))(AdamW(P, **kw))}
    for b in ours:
        out[f"fsam-{b}"] = lambda P, b=b: (lambda o: (o, two_pass(o)))(
            FSAM(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=NEVER, backend=b, **kw))
        out[f"fsam-{b} mask step"] = lambda P, b=b: (lambda o: (o, two_pass(o)))(
            FSAM(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=1, backend=b, **kw))
        out[f"sam-{b}"] = lambda P, b=b: (lambda o: (o, two_pass(o)))(SAM(P, AdamW, rho=RHO, backend=b, **kw))
    out["published-sam (davda54)"] = lambda P: (lambda o: (o, two_pass(o)))(anchors.PublishedSAM(P, AdamW, rho=RHO, **kw))
    out["published-fsam"] = lambda P: (lambda o: (o, two_pass(o)))(
        anchors.PublishedFSAM(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=NEVER, **kw))
    out["published-fsam mask step"] = lambda P: (lambda o: (o, two_pass(o)))(
        anchors.PublishedFSAM(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=1, **kw))
    out["published-ssam-f"] = lambda P: (lambda o: (o, two_pass(o)))(
        anchors.PublishedSSAMF(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=NEVER, **kw))
    out["published-ssam-f mask step"] = lambda P: (lambda o: (o, two_pass(o)))(
        anchors.PublishedSSAMF(P, AdamW, rho=RHO, sparsity=SPARSITY, mask_interval=1, **kw))
    return out


def held_bytes(opt, params):
    """Bytes of every tensor the optimizer holds, less the parameters, their gradients and the
    base optimizer's own state (what it costs beyond AdamW)."""
    # FSDP2's DTensor parameters: the optimizer holds their local shards (and their gradients')
    params = [local(p) for p in params] + [local(p.grad) for p in params if p.grad is not None]
    skip = {p.data_ptr() for p in params}
    base = getattr(opt, "base_optimizer", None)
    if base is None:
        return 0
    seen, total = set(), 0
    stack = [v for k, v in vars(opt).items() if k != "base_optimizer"]
    while stack:
        v = stack.pop()
        if id(v) in seen or v is base:
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            if is_sharded(v):
                stack.append(local(v))
            elif v.data_ptr() not in skip and v.device.type != "meta":
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)
        elif hasattr(v, "__dict__") and type(v).__module__.startswith(("fsam_kernels", "benchmarks")):
            stack.extend(vars(v).values())
    return total


def mid_step_bytes(opt, params):
    """held_bytes between first_step and second_step, where a two-pass optimizer holds most."""
    if not hasattr(opt, "first_step"):
        return 0
    opt.first_step()
    held = held_bytes(opt, params)
    opt.second_step()
    return held


def run(spec, device, ours, *, min_time, only=None):
    shapes = shapes_for(spec)
    n = sum(torch.Size(s).numel() for _, s in shapes)
    rows = []
    for name, make in optimizers(ours).items():
        if only and not any(o in name for o in only):
            continue
        params = [torch.nn.Parameter(t) for t in random_tensors(shapes, device, seed=1)]
        for p, g in zip(params, random_tensors(shapes, device, seed=2)):
            p.grad = g
        opt, fn = make(params)
        fn()  # warm-up: allocates the base state and the mask
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = measure(fn, device, min_time)
        row = {"list": spec, "params": n, "tensors": len(shapes), "optimizer": name, **t,
               "held_bytes": mid_step_bytes(opt, params)}
        row["held_bytes_per_param"] = row["held_bytes"] / n
        if cuda:
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before + row["held_bytes"]
            row["peak_extra_bytes_per_param"] = row["peak_extra_bytes"] / n
        rows.append(row)
        del opt, fn, params
        if cuda:
            torch.cuda.empty_cache()
    adamw = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["vs_adamw"] = r["median_ms"] / adamw["median_ms"] if adamw else None
        r["ratio_unsteady"] = bool(adamw) and (unsteady(r) or unsteady(adamw))
    return rows
