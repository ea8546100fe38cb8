"""The life of a process that a distributed test spawns: its process group around the work, and an
end that cannot abort the process."""
import gc

import torch.distributed as dist


def run_in_group(work, *args, rank, world, init_method, backend="gloo"):
    """work(*args) inside a process group, then the group's end while the interpreter still runs
    threads: once work returns its locals are gone, a collection frees what still holds the group
    in reference cycles (DDP's reducer, FSDP's device mesh), and the group is destroyed.  A gloo
    group whose last reference goes only at interpreter finalization can abort the process
    (SIGABRT, "terminate called without an active exception"): 1 run in 8 of the distributed
    tests did, before this."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        return work(*args)
    finally:
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
