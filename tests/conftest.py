import pytest
import torch

import fsam_kernels
from fsam_kernels._layout import CHUNK

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def compiled_backends():
    """(backend, device) pairs of every compiled backend that can run here."""
    runs_on = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}
    return [(b, runs_on[b]) for b in fsam_kernels.available_backends() if b != "reference"]


BACKENDS = pytest.mark.parametrize("backend,device", compiled_backends() or [pytest.param(
    None, None, marks=pytest.mark.skip(reason="no compiled backend built"))])

# Shapes: odd sizes around the chunk boundary, a 0-size tensor, many small tensors.
SHAPE_SETS = {
    "one_odd": [(CHUNK + 3,)],
    "mixed": [(3,), (33, 65), (CHUNK,), (1,), (0,), (2 * CHUNK - 1,), (2, 3, 5)],
    "many": "many",
}


def shapes(name, seed=0):
    if name != "many":
        return SHAPE_SETS[name]
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, 700, (200,), generator=g)]


def randn(shapes_, dtype, device, seed):
    """Fresh random tensors (never zeros); each call with a new seed gives new values."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes_]


def seed_of(*parts):
    """A seed that differs per test case and is stable across runs."""
    import zlib
    return zlib.crc32(repr(parts).encode()) % 100_000
