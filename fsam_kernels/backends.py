"""Which implementation of the ops runs: `reference` (eager PyTorch), `cpu` (C++), and the
GPU backends as they are built."""
import torch

from . import _extension, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")
_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def available_backends():
    """The backends that can run here, fastest-first for their device."""
    found = []
    if _extension.LOADED:
        found.append("cpu")
        if _extension.has_cuda_kernels() and torch.cuda.is_available():
            found.append("cuda")
    found.append("reference")
    return found


def resolve(backend, device):
    """The backend to use for tensors on `device`; `None` or "auto" picks the fastest."""
    device = torch.device(device)
    if backend is None or backend == "auto":
        _extension.warn_if_missing()
        for name in available_backends():
            if _DEVICE_OF.get(name, device.type) == device.type:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in available_backends():
        raise RuntimeError(f"backend {backend!r} is not available here (available: {available_backends()})")
    if _DEVICE_OF.get(backend, device.type) != device.type:
        raise ValueError(f"backend {backend!r} runs on {_DEVICE_OF[backend]} tensors, got tensors on {device}")
    return backend


def op(name, backend):
    """The implementation of op `name` (e.g. "topk_mask") for a resolved backend."""
    if backend == "reference":
        return getattr(reference, name)
    return getattr(torch.ops.fsam, name)
