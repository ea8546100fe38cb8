"""Every Triton kernel specialisation the launchers can request, compiled ahead of time for a
GPU that need not be here, with its resources: `python -m fsam_kernels.triton_kernels.aot --arch 90`.

The launchers are driven on small CPU tensors with every dtype and every combination of their
ops' boolean and optional arguments (read off the op schemas, so a new option is covered
without editing this file).  Each launch goes through Triton's own JIT path (its argument
binder, alignment specialisation and the launch options the launcher passes) with a stand-in
driver that only names the target and a launch that only compiles.  The PTX of every
specialisation then goes through `ptxas -v` for registers and spill bytes; shared memory is
Triton's own figure.  Run it in a process without TRITON_INTERPRET (the interpreter replaces
the JIT)."""
import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .._layout import CHUNK_BYTES, FIRST_HIST_SIZE, RADIX_HIST_SIZES, RADIX_STATE_SIZE, total_chunks
from .._schemas import SCHEMAS
from ..ops import FLOAT_DTYPES, save_layout
from . import clip, fisher, pac, perturb, saved_runs, topk
from .library import _IMPLS

MODULES = (clip, fisher, pac, perturb, saved_runs, topk)
SHAPES = [(5,), (3, 7), (4099,)]  # odd sizes, one over a chunk


class _TargetOnly:
    """What JITFunction.run asks of a driver, for a target that is not installed."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(target, compiled):
    """Launches compile for `target` and append (JITFunction, CompiledKernel) to `compiled`."""
    run = JITFunction.run

    def warmup_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self, kernel))
        return kernel
    def forget_targets():  # each kernel caches its binder and compiled code per device, not per target
        for m in MODULES:
            for f in vars(m).values():
                if isinstance(f, JITFunction):
                    f.device_caches.clear()
    previous = driver._active  # None where no GPU driver is (reset_active would fail there)
    driver.set_active(_TargetOnly(target))
    JITFunction.run = warmup_run
    forget_targets()
    try:
        yield
    finally:
        JITFunction.run = run
        forget_targets()
        driver.set_active(previous)


def _argument(op, name, dtype, params):
    """The value of argument `name` of `op` that is given (not None)."""
    chunks = total_chunks(params)
    bits = torch.zeros(chunks * CHUNK_BYTES, dtype=torch.uint8)
    save_offsets, saved = save_layout(params)
    values = {
        "fisher": lambda: [torch.rand(p.shape) for p in params],
        "grads": lambda: [torch.randn(p.shape).to(dtype) for p in params[:-1]] + [
            torch.randn(params[-1].shape).to(dtype) if op.startswith("pac_") else None],
        "scores": lambda: params, "params": lambda: params, "k": lambda: 3,
        "decay": lambda: 0.9, "alpha": lambda: 0.1, "eta": lambda: 0.01,
        "found_inf": lambda: torch.zeros(1), "first_hist": lambda: torch.zeros(FIRST_HIST_SIZE, dtype=torch.int64),
        "mask_bits": lambda: bits, "scale": lambda: torch.tensor(0.5),
        "save_offsets": lambda: save_offsets, "saved": lambda: saved,
        "status": lambda: torch.zeros(1, dtype=torch.int32),
        "state": lambda: torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64),
        "hist": lambda: torch.zeros(max(RADIX_HIST_SIZES), dtype=torch.int64),
        "ties": lambda: torch.zeros(chunks, dtype=torch.int64),
        "ties_before": lambda: torch.zeros(chunks, dtype=torch.int64),
        "candidates": lambda: torch.zeros(64, dtype=torch.int64),
        "tensors": lambda: params, "norms": lambda: torch.rand(len(params)), "max_norm": lambda: 0.05,
        "eps": lambda: 1e-6,
        "log_stds": lambda: [torch.full((p.numel(),), -4.0) for p in params[:-1]] + [torch.full((1,), -4.0)]
        if op != "pac_bound_grads_" else [torch.full((p.numel(),), -4.0) for p in params],
        "log_std_grads": lambda: [torch.empty(p.numel()) for p in params],
        "anchors": lambda: [p.clone() for p in params], "prior_log_stds": lambda: torch.full((len(params),), -4.0),
        "bases": lambda: [0, 5, 26], "seed": lambda: 3, "step": lambda: 2 ** 40 + 1, "max_noise": lambda: 2.0,
        "coef": lambda: 1e-3,
    }
    if name not in values:
        raise KeyError(f"aot: no sample value for argument {name!r} of a Triton op: add one to _argument")
    return values[name]()


# Integer arguments that select a specialisation: every value.
ENUMERATED = {"digit": range(len(RADIX_HIST_SIZES))}
# List arguments that may also be empty together (which selects another specialisation).
EMPTY_TOGETHER = {"pac_bound_grads_": ("grads", "log_std_grads")}


def cases():
    """(op, dtype, keyword arguments) for every dtype and every combination of each op's
    boolean, optional and ENUMERATED arguments."""
    for name, schema in SCHEMAS.items():
        arguments = torch._C.parse_schema(f"fsam_triton::{name}{schema}").arguments
        choices = [[False, True] if isinstance(a.type, torch._C.BoolType) else
                   [None, "given"] if isinstance(a.type, torch._C.OptionalType) else
                   list(ENUMERATED[a.name]) if a.name in ENUMERATED else ["given"] for a in arguments]
        for dtype in FLOAT_DTYPES:
            params = [torch.randn(s).to(dtype) for s in SHAPES]
            for combo in itertools.product(*choices):
                kwargs = {a.name: _argument(name, a.name, dtype, params) if isinstance(v, str) else v
                          for a, v in zip(arguments, combo)}
                yield name, dtype, kwargs
                if name in EMPTY_TOGETHER:
                    yield name, dtype, {**kwargs, **{k: [] for k in EMPTY_TOGETHER[name]}}


def defined_kernels():
    """Names of the launchable kernels of the backend (JIT functions named *_kernel)."""
    return sorted(n for m in MODULES for n, f in vars(m).items() if isinstance(f, JITFunction) and n.endswith("_kernel"))


def _ptxas_usage(ptx, capability, fp_fusion):
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    arch = sm_arch_from_capability(capability)
    if f".target {arch}" not in ptx:
        raise RuntimeError(f"aot: the PTX was not generated for {arch}")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-v", f"--gpu-name={arch}",
               *([] if fp_fusion else ["--fmad=false"]), src, "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"aot: cannot read the ptxas -v report:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_all(capability):
    """One row per distinct specialisation compiled for sm_<capability>."""
    target = GPUTarget("cuda", capability, 32)
    compiled = []
    with compile_only(target, compiled):
        for name, _, kwargs in cases():
            _IMPLS[name](**kwargs)
    rows, seen = [], set()
    for fn, kernel in compiled:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        meta = kernel.metadata
        regs, spill_st, spill_ld = _ptxas_usage(kernel.asm["ptx"], capability, meta.enable_fp_fusion)
        constants = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in kernel.src.constants.items()}
        rows.append({"kernel": fn.__name__, "arch": f"sm_{capability}", "constexprs": {
            k: str(v) for k, v in constants.items() if k in fn.arg_names and k != "BLOCK"},
            "num_warps": meta.num_warps, "shared_bytes": meta.shared, "registers": regs,
            "spill_store_bytes": spill_st, "spill_load_bytes": spill_ld})
    return rows


def table(rows):
    """Per kernel: specialisations, and the worst registers / shared memory / spills among them."""
    out = ["| arch | kernel | specialisations | warps | max registers | max shared B | spill B |", "|---|---|---|---|---|---|---|"]
    for (arch, name), rs in itertools.groupby(sorted(rows, key=lambda r: (r["arch"], r["kernel"])),
                                              key=lambda r: (r["arch"], r["kernel"])):
        rs = list(rs)
        out.append(f"| {arch} | {name} | {len(rs)} | {max(r['num_warps'] for r in rs)} | "
                   f"{max(r['registers'] for r in rs)} | {max(r['shared_bytes'] for r in rs)} | "
                   f"{max(r['spill_store_bytes'] + r['spill_load_bytes'] for r in rs)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("aot: unset TRITON_INTERPRET: the interpreter replaces the compiler")
    rows = [r for cap in a.arch for r in compile_all(cap)]
    if a.json:
        print(json.dumps({"triton": triton.__version__, "defined": defined_kernels(), "rows": rows}))
    else:
        print(f"Triton {triton.__version__}: {len(rows)} specialisations\n\n{table(rows)}")


if __name__ == "__main__":
    main()
