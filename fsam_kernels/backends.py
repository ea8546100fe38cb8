"""Which implementation of the ops runs: `reference` (eager PyTorch), `cpu` (C++), the GPU
backends as they are built, and `cuda-sim`: the CUDA kernels run on CPU tensors by the SIMT
emulator of csrc/sim, for testing them without a GPU (never chosen by "auto")."""
import functools
import importlib.util
import os
from typing import Optional, Union

import torch

from . import _contract, _extension, reference

BACKENDS = ("reference", "cpu", "cuda", "triton", "cuda-sim")


def _triton_device():
    """Where the Triton kernels run: CUDA, or the CPU under the interpreter."""
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"


def device_of(backend: str) -> Optional[str]:
    """The device type a backend's kernels take (None: any)."""
    return {"cpu": "cpu", "cuda": "cuda", "triton": _triton_device(), "cuda-sim": "cpu"}.get(backend)


@functools.lru_cache(maxsize=None)  # a file-system search: once
def _triton_installed():
    return importlib.util.find_spec("triton") is not None


def _triton_usable():
    return _triton_installed() and (_triton_device() == "cpu" or torch.cuda.is_available())


# The backends of CUDA tensors in the order "auto" tries them.  Triton comes first until the CUDA
# C++ backend has passed the GPU proof (make gpu-first, docs/gpu.md): the run that sees it pass
# puts the faster of the two first, by the measured benchmark, in the same commit as the results.
CUDA_PREFERENCE = ("triton", "cuda")


def available_backends() -> list[str]:
    """The backends that can run here, in the order "auto" prefers them for their device."""
    found = []
    if _extension.LOADED:
        found.append("cpu")
    gpu = {"cuda": _extension.has_cuda_kernels() and torch.cuda.is_available(), "triton": _triton_usable()}
    found += [name for name in CUDA_PREFERENCE if gpu[name]]
    if _extension.SIM_LOADED:
        found.append("cuda-sim")
    found.append("reference")
    return found


def native_backends(device_type: str) -> list[str]:
    """The available backends that run natively on tensors of `device_type`, in the order "auto"
    takes them (the interpreted Triton kernels and the emulated CUDA ones are for testing: never
    among them)."""
    return [name for name in available_backends() if device_of(name) in (None, device_type)
            and name != "cuda-sim" and not (name == "triton" and _triton_device() == "cpu")]


def resolve(backend: Optional[str], device: Union[torch.device, str]) -> str:
    """The backend to use for tensors on `device`; `None` or "auto" picks the fastest."""
    device = torch.device(device)
    if backend is None or backend == "auto":
        _extension.warn_if_missing()
        return native_backends(device.type)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in available_backends():
        raise RuntimeError(f"backend {backend!r} is not available here (available: {available_backends()})")
    if device_of(backend) not in (None, device.type):
        raise ValueError(f"backend {backend!r} runs on {device_of(backend)} tensors, got tensors on {device}")
    return backend


# The torch.ops namespace of each compiled backend's ops (the schemas of _schemas.py in each).
NAMESPACES = {"cpu": "fsam", "cuda": "fsam", "triton": "fsam_triton", "cuda-sim": "fsam_sim"}


_REFERENCE = {}  # the reference ops behind the contract, wrapped once


def op(name, backend):
    """The implementation of op `name` (e.g. "topk_mask") for a resolved backend."""
    if backend == "reference":
        if name not in _REFERENCE:
            _REFERENCE[name] = _contract.checked(name, getattr(reference, name))
        return _REFERENCE[name]
    if backend == "triton":
        from .triton_kernels import library  # noqa: F401  (defines torch.ops.fsam_triton)
    return getattr(getattr(torch.ops, NAMESPACES[backend]), name)
