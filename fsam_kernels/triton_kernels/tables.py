"""Pointer tables: how one Triton launch covers a whole list of tensors.

A list is grouped by dtype (a kernel's element type is a compile-time constant); each group
gets a table of its chunks (tensor, first element, global chunk index; the same chunks as
fsam_kernels/_layout.py) and a table of tensor addresses.  Both are cached: the chunk table
by shapes and dtypes, the addresses by the data pointers, so a step whose gradients land
where they were last time builds nothing."""
from dataclasses import dataclass
import functools

import torch

from .._layout import CHUNK, num_chunks


@dataclass(frozen=True)
class Group:
    dtype: torch.dtype
    members: tuple          # positions in the list
    chunk_tensor: torch.Tensor  # int32 [chunks]: index into `members`
    chunk_start: torch.Tensor   # int64 [chunks]: first element of the chunk in its tensor
    chunk_index: torch.Tensor   # int64 [chunks]: position of the chunk in the whole list
    numel: torch.Tensor         # int64 [members]
    positions: torch.Tensor     # int64 [members]: `members` on the device

    @property
    def chunks(self):
        return self.chunk_tensor.numel()


def _to_device(values, dtype, device):
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned + non_blocking: no host-device sync
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@functools.lru_cache(maxsize=64)
def _groups(signature, device):
    groups, first, by_dtype = [], 0, {}
    for pos, (numel, dtype) in enumerate(signature):
        by_dtype.setdefault(dtype, []).append((pos, numel, first))
        first += num_chunks(numel)
    for dtype, members in by_dtype.items():
        tensor, start, index = [], [], []
        for j, (_, numel, first_chunk) in enumerate(members):
            for c in range(num_chunks(numel)):
                tensor.append(j)
                start.append(c * CHUNK)
                index.append(first_chunk + c)
        groups.append(Group(dtype, tuple(m[0] for m in members), _to_device(tensor, torch.int32, device),
                            _to_device(start, torch.int64, device), _to_device(index, torch.int64, device),
                            _to_device([m[1] for m in members], torch.int64, device),
                            _to_device([m[0] for m in members], torch.int64, device)))
    return tuple(g for g in groups if g.chunks)


def groups(tensors):
    """The dtype groups of a list (tensors of 0 elements take no chunk)."""
    device = tensors[0].device
    return _groups(tuple((t.numel(), t.dtype) for t in tensors), device)


@functools.lru_cache(maxsize=64)
def _first_chunks(numels, device):
    first = [0]
    for n in numels:
        first.append(first[-1] + num_chunks(n))
    return _to_device(first, torch.int64, device)


def first_chunks(tensors):
    """int64 [len + 1] on the list's device: each tensor's first chunk in the list, then the total."""
    return _first_chunks(tuple(t.numel() for t in tensors), tensors[0].device)


@functools.lru_cache(maxsize=256)
def int64_table(values, device):
    """A tuple of ints as an int64 tensor on `device`, built once per tuple."""
    return _to_device(list(values), torch.int64, device)


def addresses(tensors, members, device):
    """int64 table on `device` of the data pointers of tensors[m] for m in members (0 for None)."""
    return int64_table(tuple(0 if tensors[m] is None else tensors[m].data_ptr() for m in members), device)

