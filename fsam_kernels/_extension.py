"""Loads the compiled ops (fsam_kernels._C, and fsam_kernels._sim: the CUDA kernels run by the SIMT
emulator, torch.ops.fsam_sim) and registers their fake impls for torch.compile.

Without the extension the package still imports and runs on the `reference` backend; it
warns once.
"""
import functools
import warnings

import torch

from . import _schemas  # noqa: F401  (defines torch.ops.fsam before the extension registers its impls)

try:
    from . import _C  # noqa: F401  (its TORCH_LIBRARY_IMPL blocks register the CPU (and CUDA) kernels)
    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc

LOADED = LOAD_ERROR is None

SIM_LIBRARY = _schemas.define("fsam_sim")  # before the emulated build registers its impls
try:
    from . import _sim  # noqa: F401
    SIM_LOAD_ERROR = None
except ImportError as exc:  # not built (FSAM_BUILD_SIM=0), or built against another torch
    SIM_LOAD_ERROR = exc
SIM_LOADED = SIM_LOAD_ERROR is None
_warned = False


def warn_if_missing():
    global _warned
    if not LOADED and not _warned:
        _warned = True
        warnings.warn(f"fsam_kernels._C is not available ({LOAD_ERROR}); only the 'reference' backend "
                      "runs. Build it with `pip install --no-build-isolation -e .`", RuntimeWarning,
                      stacklevel=3)


@functools.lru_cache(maxsize=None)  # asked at every call's backend choice: the registry is read once
def has_cuda_kernels():
    """Whether the extension registered a CUDA kernel for every op."""
    return LOADED and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam::{name}", "CUDA")
                          for name in _schemas.SCHEMAS)


from ._fakes import register_fakes  # noqa: E402

if LOADED:
    register_fakes("fsam")
if SIM_LOADED:
    register_fakes("fsam_sim")
