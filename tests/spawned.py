"""The life of a process that a distributed test spawns: its process group around the work, and an
end that cannot abort the process."""
import torch.distributed as dist

from fsam_kernels.sharding import end_process_group


def run_in_group(work, *args, rank, world, init_method, backend="gloo"):
    """work(*args) inside a process group, then the group's end (end_process_group) once work has
    returned and its locals are gone.  Before this, 1 run in 8 of the distributed tests aborted at
    exit (SIGABRT): a DDP reducer held the gloo group until interpreter finalization."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        return work(*args)
    finally:
        end_process_group()
