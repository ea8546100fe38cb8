"""FSAM, SAM and PAC-tuning over FSDP2 shards: the communication and time that the exact global
mask adds, and the memory each process holds between the two passes, against SAM's.

    python -m benchmarks.fsdp_step [--list minilm] [--worlds 1 2 3] [--device cpu] [--out DIR]

Each world size runs in its own processes (gloo on the CPU, nccl on GPUs, one per process); the
parameters have the list's shapes, sharded on dim 0 as fully_shard shards them, with random
gradients.  Per optimizer step (first_step and second_step: no forward or backward): the median
time, the collectives the optimizer issues (counted by wrapping torch.distributed's all_reduce and
all_gather) and their payload per process, and the bytes held between the passes (largest over the
processes).  "plain" rows: the same optimizer on unsharded tensors in one process, for comparison
with world size 1.  Writes <out>/fsdp_step.md and fsdp_step.json."""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsam_kernels.sharding import end_process_group

from .param_lists import random_tensors, shapes_for
from .step import held_bytes
from .timing import environment, sync

LR, RHO, SPARSITY, NEVER = 1e-5, 0.05, 0.9, 10**9
OPTIMIZERS = ("fsam mask step", "fsam", "sam", "pac")


def make(name, params):
    from fsam_kernels import FSAM, SAM, PACTuning
    from fsam_kernels.optim.pac import KTable
    sgd = dict(lr=LR)
    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=RHO, **sgd)
    if name == "pac":  # stage 1: the noise, its restore and the fused bound pass
        return PACTuning(params, torch.optim.SGD, num_examples=1000, stage1_steps=NEVER, k_table=KTable([0.01], [0.1]),
                         **sgd)
    interval = 1 if name == "fsam mask step" else NEVER
    return FSAM(params, torch.optim.SGD, rho=RHO, sparsity=SPARSITY, mask_interval=interval, **sgd)


class Counter:
    """Counts the collectives (and their payload bytes per process) of torch.distributed's
    all_reduce and all_gather while active."""

    def __init__(self):
        self.calls = self.bytes = 0
        self._saved = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather"):
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args, _original=original, _name=name, **kwargs):
                tensor = args[1] if _name == "all_gather" else args[0]
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
                return _original(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def step_function(opt):
    if hasattr(opt, "first_step"):
        def fn():
            opt.first_step()
            opt.second_step()
    else:
        def fn():
            opt.perturb()
            opt.step()
    return fn


def held_between_passes(opt, params):
    """SAM/FSAM: every tensor the optimizer holds beyond the base's (benchmarks/step.py);
    PAC-tuning: the mask and saved originals of its noise (its p, b and stage-1 state aside)."""
    if not hasattr(opt, "first_step"):
        opt.perturb()
        held = opt.held_bytes()
        opt.step()
        return held
    opt.first_step()
    held = held_bytes(opt, params)
    opt.second_step()
    return held


def timed(fn, device, reps):
    """Median and quartiles of `reps` calls in ms, every process making the same calls (an
    adaptive repeat count would desynchronise the collectives); each call starts together."""
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.25, 0.75])).tolist()
    return {"median_ms": q[0], "p25_ms": q[1], "p75_ms": q[2]}


def measure_one(name, params, device, reps):
    opt = make(name, params)
    fn = step_function(opt)
    fn()  # warm-up: the base state, the first mask
    with Counter() as counted:
        fn()
    return {"optimizer": name, "collectives": counted.calls, "payload_bytes": counted.bytes,
            **timed(fn, device, reps), "held_bytes": held_between_passes(opt, params)}


def worker(rank, world, port, spec, device, reps, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        measure_world(rank, world, spec, device, reps, out_file)
    finally:
        end_process_group()


def measure_world(rank, world, spec, device, reps, out_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fsam_kernels.sharding import local
    mesh = init_device_mesh(device, (world,))
    shapes = shapes_for(spec)
    rows = []
    for name in OPTIMIZERS:
        params = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]))
                  for t in random_tensors(shapes, device, seed=1)]
        for p, g in zip(params, random_tensors(shapes, device, seed=2)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        row = measure_one(name, params, device, reps)
        largest = torch.tensor([row["held_bytes"], sum(local(p).numel() for p in params)], dtype=torch.float64,
                               device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        row["held_bytes"], row["local_params"] = largest.tolist()
        rows.append({"world": world, **row})
        del params
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)


def plain_rows(spec, device, reps):
    rows = []
    shapes = shapes_for(spec)
    for name in OPTIMIZERS:
        params = [torch.nn.Parameter(t) for t in random_tensors(shapes, device, seed=1)]
        for p, g in zip(params, random_tensors(shapes, device, seed=2)):
            p.grad = g
        rows.append({"world": "plain", **measure_one(name, params, device, reps),
                     "local_params": sum(p.numel() for p in params)})
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", default="minilm", help="a parameter list of benchmarks/param_lists.py or a size")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=10, help="timed steps per optimizer")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    a = ap.parse_args(argv)
    if a.device == "cuda" and max(a.worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {max(a.worlds)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    n = sum(torch.Size(s).numel() for _, s in shapes_for(a.list))
    rows = plain_rows(a.list, a.device, a.reps)
    os.makedirs(a.out, exist_ok=True)
    for world in a.worlds:
        out_file = os.path.join(a.out, f".fsdp_step_world{world}.json")
        mp.spawn(worker, args=(world, free_port(), a.list, a.device, a.reps, out_file), nprocs=world, join=True)
        with open(out_file) as f:
            rows += json.load(f)
        os.remove(out_file)
    env = environment(a.device)
    lines = [f"# Optimizer steps over FSDP2 shards: {a.list} ({n / 1e6:.1f}M fp32 parameters)\n",
             f"{env['device']}; torch {env['torch']}; commit {env['commit']}; "
             f"`python -m benchmarks.fsdp_step --list {a.list} --worlds {' '.join(map(str, a.worlds))} "
             f"--device {a.device}`.\n",
             "One optimizer step without forward or backward (first_step and second_step; PAC-tuning: "
             "perturb and step, in stage 1).  Collectives and payload: what the optimizer sends per process "
             "and step (its all_reduce and all_gather calls).  Held: bytes kept between the passes by the "
             "process holding most (PAC-tuning: its noise's mask and saved originals), in MiB and per "
             "parameter of that process's shards.  `plain`: unsharded tensors, one process.\n",
             "| world | optimizer | median ms | collectives | payload B | held MiB per process | held B/local param |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['optimizer']} | {r['median_ms']:.1f} | {r['collectives']} | "
                     f"{r['payload_bytes']} | {r['held_bytes'] / 2**20:.1f} | "
                     f"{r['held_bytes'] / r['local_params']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "fsdp_step.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "fsdp_step.json"), "w") as f:
        json.dump({"env": env, "list": a.list, "params": n, "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
