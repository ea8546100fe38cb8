"""Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): DTensors split on dim 0
over a 1-D device mesh, each process holding one shard (uneven ones included: torch.chunk's
split, so the last shards may be shorter or empty).

The kernels run on the local shards; what they compute over the whole model is combined here
with collectives over the mesh's process group: sums (gradient norms, the radix histograms,
PAC-tuning's per-tensor sums) by all-reduce, the tie counts of the top-k by one all-gather.  The
global flat order of the model (tensor order, then row-major over the full tensor) puts the shards
of a tensor in rank order, so each shard's first element has a global index (`offsets`), which
PAC-tuning's noise counters and the top-k's tie rule use.  On one process (`LOCAL`) every
collective is the identity.
"""
import gc

import torch
import torch.distributed as dist

from .ops import counter_bases
from .radix_topk import LOCAL as ONE_PROCESS, Exchange

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:  # a torch built without distributed has no DTensor
    DTensor = Shard = None


def end_process_group():
    """Destroy the default process group, if any, while the interpreter still runs threads: what
    holds it in unreachable reference cycles (a DDP reducer, an FSDP device mesh) is collected
    first.  A gloo group released only at interpreter finalization can abort the process (SIGABRT,
    "terminate called without an active exception")."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def is_sharded(t):
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (a view: writing it writes the parameter), else `t`."""
    return t.to_local() if is_sharded(t) else t


def placement(t):
    """How `t` is placed, for messages."""
    return f"{tuple(t.placements)} (a DTensor)" if is_sharded(t) else "a plain tensor"


def check_placed_like(g, p, what):
    """Refuse a gradient `g` placed otherwise than its parameter `p`: the kernels would read a plain
    full-size gradient of a sharded parameter as its local shard."""
    if is_sharded(g) != is_sharded(p) or (is_sharded(g) and tuple(g.placements) != tuple(p.placements)):
        raise RuntimeError(f"{what} is placed as {placement(g)} but its parameter as {placement(p)}")


def shard_like(t, p):
    """`t`, shaped like the local shard of `p`, as the DTensor sharded like `p` (`t` itself when
    `p` is not sharded)."""
    if not is_sharded(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _split(rows, world, rank):
    """(first row, rows) of `rank`'s piece of dim 0 split as torch.chunk splits it (DTensor's Shard)."""
    size = -(-rows // world)
    first = min(rank * size, rows)
    return first, min(first + size, rows) - first


class Sharding:
    """How a list of parameters is spread over processes: none (this class), or FSDP2's shards
    (ShardedParams).  Collectives act in place on device tensors; none syncs with the host."""

    world, rank = 1, 0

    def all_reduce_(self, t, op="sum"):
        return t

    def exchange(self, layout):
        """The radix top-k's Exchange for a list with this ChunkLayout of local tensors."""
        return ONE_PROCESS

    def offsets(self, params):
        """The global flat index of each tensor's first local element."""
        return counter_bases(params)

    def gather(self, t, like):
        """The full tensor of `like`'s shape from each process's local piece `t` of it."""
        return t


LOCAL = Sharding()


class ShardedParams(Sharding):
    """DTensor parameters sharded on dim 0 over one 1-D mesh."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()

    def all_reduce_(self, t, op="sum"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return t

    def exchange(self, layout):
        return ShardedExchange(self, layout)

    def offsets(self, params):
        bases, total = [], 0
        for p in params:
            rows = p.shape[0]
            bases.append(total + _split(rows, self.world, self.rank)[0] * (p.numel() // rows if rows else 0))
            total += p.numel()
        return bases

    def all_gather(self, t):
        """[world, *t.shape]: every process's `t`, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def gather(self, t, like):
        rows, dtype = like.shape[0], t.dtype
        size = -(-rows // self.world)
        padded = t.new_zeros((size,) + tuple(like.shape[1:]), dtype=torch.uint8 if dtype == torch.bool else dtype)
        padded[: t.shape[0]] = t  # gloo gathers no bool
        return self.all_gather(padded).reshape((self.world * size,) + tuple(like.shape[1:]))[:rows].to(dtype)


class ShardedExchange(Exchange):
    """The radix top-k's stages over shards: histograms summed over the processes; the keys tied
    with the k-th one that come before a local chunk in the global flat order are those of the
    earlier tensors (every process's), of this tensor's shards on lower ranks, and of the earlier
    chunks of this shard.  One all-gather of the per-tensor tie counts."""

    def __init__(self, sharding, layout):
        self.sharding, self.layout = sharding, layout

    def histogram_(self, hist):
        self.sharding.all_reduce_(hist)

    def ties_before(self, ties):
        layout = self.layout
        per_tensor = layout.tensor_sums(ties)  # [tensors]
        every = self.sharding.all_gather(per_tensor)  # [world, tensors]
        order = every.t().reshape(-1)  # tensor by tensor, ranks in order: the global flat order
        before = (torch.cumsum(order, 0) - order).view(-1, self.sharding.world)[:, self.sharding.rank]
        return before[layout.tensor_of_chunk] + layout.before_in_tensor(ties)


def sharding_of(params, names=None):
    """The Sharding of a parameter list: LOCAL when no parameter is a DTensor; ShardedParams when
    all are, sharded on dim 0 of one 1-D mesh (FSDP2's fully_shard); a clear error otherwise."""
    flags = [is_sharded(p) for p in params]
    if not any(flags):
        return LOCAL

    def name(i):
        return names[i] if names is not None and names[i] is not None else f"#{i}"

    if not all(flags):
        i = flags.index(False)
        raise TypeError(f"parameter {name(i)} is a plain tensor while others are DTensors: shard every parameter "
                        "with fully_shard (an FSDP2 root module covers all of them), or none")
    mesh = params[0].device_mesh
    for i, p in enumerate(params):
        if p.device_mesh != mesh:
            raise ValueError(f"parameter {name(i)} is on another device mesh than parameter {name(0)}: one "
                             "optimizer takes the parameters of one mesh")
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"parameter {name(i)} is placed as {tuple(p.placements)} on a {mesh.ndim}-D mesh; "
                             "only FSDP2's sharding on dim 0 of a 1-D mesh (Shard(0),) is supported")
        expected = (_split(p.shape[0], mesh.size(), mesh.get_local_rank())[1],) + tuple(p.shape[1:])
        if tuple(p.to_local().shape) != expected:
            raise ValueError(f"parameter {name(i)}'s local shard is {tuple(p.to_local().shape)}, expected "
                             f"{expected} (torch.chunk's split of {tuple(p.shape)} over {mesh.size()} processes)")
    return ShardedParams(mesh)
