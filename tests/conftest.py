import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fsam_kernels  # noqa: E402  (after TRITON_INTERPRET)
from fsam_kernels import backends  # noqa: E402
from fsam_kernels._layout import CHUNK  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def compiled_backends():
    """(backend, device) pairs of every compiled backend that can run here."""
    return [(b, backends.device_of(b)) for b in fsam_kernels.available_backends() if b != "reference"]


def all_backends():
    """compiled_backends() and the reference on the CPU."""
    return [("reference", "cpu")] + compiled_backends()


def interpreted(backend, device):
    """Triton under the interpreter: slow, so some tests take fewer cases."""
    return backend == "triton" and device == "cpu"


BACKENDS = pytest.mark.parametrize("backend,device", compiled_backends() or [pytest.param(
    None, None, marks=pytest.mark.skip(reason="no compiled backend built"))])

# The tiers: `pytest -m "not slow"` is the inner loop (a few minutes); CI runs everything.  Slow by
# rule: the interpreted and emulated backends (Triton under the interpreter, cuda-sim), the
# emulator's own tests, spawned process groups, builds and the GPU plans' dry runs; slow by mark
# (@pytest.mark.slow): the long property tests.
SLOW_FILES = {"sim/test_emulator.py", "sim/test_mutations.py", "sim/test_schedules.py", "optimizers/test_ddp.py",
              "optimizers/test_fsdp.py", "integrations/test_finetune_glue.py", "ops/test_triton_aot.py",
              "tooling/test_sdist.py", "tooling/test_ptxas_report.py", "tooling/test_gpu_targets.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = os.path.relpath(str(item.path), os.path.join(ROOT, "tests"))
        params = getattr(item, "callspec", None)
        values = [] if params is None else [str(v) for v in params.params.values()]
        if where in SLOW_FILES or "triton" in values or "cuda-sim" in values:
            item.add_marker(pytest.mark.slow)


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
    return zlib.crc32(repr(parts).encode()) % 100_000


# The emulator's schedules (thread order, warp release) and SM counts (docs/cuda_sim.md).
SIM_ORDERS = [{"FSAM_SIM_ORDER": order, "FSAM_SIM_RELEASE": release}
              for order in ("in-order", "reversed", "random") for release in ("eager", "pass")]
SIM_SCHEDULES = [{**order, "FSAM_SIM_SMS": sms} for order in SIM_ORDERS for sms in ("1", "3", "132")]


@pytest.fixture(autouse=True)
def sim_schedule(request, monkeypatch):
    """Each test runs the emulated CUDA kernels (cuda-sim) under one of SIM_SCHEDULES, chosen by
    its id, so that the parity tests together cover all of them; settings given in the
    environment are kept."""
    if not any(name in os.environ for name in SIM_SCHEDULES[0]):
        for name, value in SIM_SCHEDULES[zlib.crc32(request.node.nodeid.encode()) % len(SIM_SCHEDULES)].items():
            monkeypatch.setenv(name, value)


@pytest.fixture
def data_dir(tmp_path):
    """A miniature GLUE folder (tests/glue_data.py)."""
    from glue_data import write_glue
    return write_glue(tmp_path)
