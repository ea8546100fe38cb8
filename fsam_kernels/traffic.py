"""What the GPU kernels would cost, counted without a GPU: every launch's memory traffic, in
Nsight Compute's terms, and every launch, copy and sync a call makes.

    with fsam_kernels.traffic.record() as t:
        ops.perturb(params, grads, scale, ..., backend="cuda-sim")
    t.rows()      # one dict per launch (or fill, copy, sync)
    t.summary()   # the same keys summed per op, with the bytes the op must move (floor_bytes)

Three sources feed it, for the calls made inside the block:
- `cuda-sim`: the emulator (csrc/sim/memory.cpp) sees every access of the CUDA kernels;
- `triton` on CPU tensors (TRITON_INTERPRET=1): the interpreter's loads, stores and atomics;
- `torch`: every ATen op on the tensors (what PyTorch would launch on a GPU: the optimizers' own
  arithmetic, the Triton launchers' buffers and reductions, the eager reference).

The model (docs/kernels.md): a request is one warp-level access instruction (the active lanes of
one warp at one call site and dynamic instance; for Triton, 32 lanes of 16 bytes of the block each);
a sector is an aligned 32-byte piece of global memory, placed by its offset from the base of its
allocation (which a GPU allocator aligns to 256 bytes).  DRAM traffic counts each distinct sector
read and each distinct sector written once per launch: a launch streams through more data than L2
holds, and no reuse across launches is assumed (a buffer smaller than L2, read again by the next
launch, would in fact come from L2).
"""
import contextlib
import json
import math
import os
import threading
from collections import defaultdict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _extension
from ._layout import CHUNK, ChunkLayout, total_chunks

SECTOR = 32
# The raw ops behind each public op; the last of each group is the one that counts its calls.
PUBLIC_OPS = {
    "fisher_accumulate": ("fisher_accumulate_",),
    "topk_mask_packed": ("radix_histogram_", "radix_select_", "radix_tie_counts", "radix_mask"),
    "grad_sumsq": ("grad_sumsq",),
    "perturb": ("perturb_",),
    "restore": ("restore_",),
    "clip_grad_norm_componentwise_": ("tensor_sumsq", "clip_scale_"),
    "pac_noise_mask": ("pac_noise_mask",),
    "pac_perturb": ("pac_perturb_",),
    "pac_restore": ("pac_restore_",),
    "pac_bound_grads": ("pac_bound_grads_",),
}
PUBLIC_OF = {raw: public for public, raws in PUBLIC_OPS.items() for raw in raws}
# Nsight Compute's names for the row keys, so that an ncu run compares name for name.
NCU_METRICS = {
    "requests_read": "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "requests_written": "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "requests_atomic": "l1tex__t_requests_pipe_lsu_mem_global_op_atom.sum",
    "l1_sectors_read": "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1_sectors_written": "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "sectors_read": "dram__sectors_read.sum",
    "sectors_written": "dram__sectors_write.sum",
}
COUNTERS = ("launches", "syncs", "requests", "requests_read", "requests_written", "requests_atomic", "bytes_requested",
            "l1_sectors", "l1_sectors_read", "l1_sectors_written", "ideal_sectors", "sectors_read", "sectors_written",
            "atomics", "shared_bytes")

_active = threading.local()  # the recording of this thread, if any


def _row(backend, op, kernel, kind, **counts):
    row = {"backend": backend, "op": PUBLIC_OF.get(op, op), "raw_op": op, "kernel": kernel, "kind": kind,
           "dtype": _dtype_of(kernel), "elements": 0, "tensors": 0, "launches": int(kind != "sync"),
           "syncs": int(kind == "sync"), "grid": 0, "buffers": {}}
    row.update({k: 0 for k in COUNTERS if k not in row})
    row.update(counts)
    row["requests"] = row["requests_read"] + row["requests_written"] + row["requests_atomic"]
    row["l1_sectors"] = row["l1_sectors_read"] + row["l1_sectors_written"]
    row["ncu"] = {metric: row[key] for key, metric in NCU_METRICS.items()}
    return row


_DTYPE_NAMES = (("c10::BFloat16", "bfloat16"), ("c10::Half", "float16"), ("float", "float32"), ("bf16", "bfloat16"),
                ("fp16", "float16"), ("fp32", "float32"))


def _dtype_of(kernel):
    """The element dtype of a kernel name's first template (or Triton DT) argument, if any."""
    args = kernel.partition("<")[2] or kernel.partition("[")[2]
    first = args.split(",")[0].strip(" >]")
    return next((name for key, name in _DTYPE_NAMES if first == key), None)


class Recording:
    """The launches made while `record()` was active (rows) and the op calls behind them."""

    def __init__(self):
        self._rows = []
        self._calls = []  # (raw op, elements, tensors, floor bytes)

    def rows(self):
        """One dict per launch, fill, copy or sync, in the order they ran (cuda-sim's as each op
        returned).  Keys: backend, op (the public op that launched it), raw_op, kernel, kind,
        dtype, elements and tensors (of the op's tensor list), launches, syncs, grid, requests
        (and _read, _written, _atomic), bytes_requested, l1_sectors (per request, summed),
        ideal_sectors, sectors_read and sectors_written (distinct per launch: DRAM), atomics,
        shared_bytes, buffers ({storage: [sectors read, sectors written]}) and ncu (the counters
        under Nsight Compute's metric names)."""
        return [dict(r) for r in self._rows]

    def summary(self):
        """{op: the counters of its rows summed, with calls, elements and tensors (over the calls
        of its last raw op), floor_bytes (what docs/algorithm.md's table says the calls must move),
        dram_bytes (32 x the sectors read and written) and sector_efficiency (bytes requested per
        32 bytes of the sectors its requests touched; None without requests)}."""
        out = defaultdict(lambda: {k: 0 for k in COUNTERS + ("calls", "elements", "tensors", "floor_bytes")})
        for r in self._rows:
            s = out[r["op"]]
            for k in COUNTERS:
                s[k] += r[k]
        for raw, elements, tensors, floor in self._calls:
            s = out[PUBLIC_OF.get(raw, raw)]
            s["floor_bytes"] += floor
            if raw == PUBLIC_OPS.get(PUBLIC_OF.get(raw), (raw,))[-1]:
                s["calls"] += 1
                s["elements"] += elements
                s["tensors"] += tensors
        for s in out.values():
            s["dram_bytes"] = SECTOR * (s["sectors_read"] + s["sectors_written"])
            s["sector_efficiency"] = s["bytes_requested"] / (SECTOR * s["l1_sectors"]) if s["l1_sectors"] else None
        return dict(out)


@contextlib.contextmanager
def record():
    """Record the launches of the calls made in the block (this thread's; one recording at a
    time): the CUDA kernels under cuda-sim, the Triton kernels under the interpreter, and the ATen
    ops on every tensor."""
    if getattr(_active, "recording", None) is not None:
        raise RuntimeError("traffic.record() is already active in this thread")
    rec = Recording()
    _active.recording = rec
    sim = _extension.SIM_LOADED
    if sim:
        torch.ops.fsam_sim.sim_traffic_start()
    try:
        with _triton_hooks(rec), _TorchOps(rec):
            yield rec
    finally:
        _active.recording = None
        if sim:
            _take_sim_rows(rec, restart=False)


@contextlib.contextmanager
def label(name):
    """Inside a recording: the ATen ops of the block count under op `name` (e.g. a base
    optimizer's step, to tell it from the calls around it)."""
    outer = getattr(_active, "op", None)
    _active.op = _OpCall(name, None, ())
    try:
        yield
    finally:
        _active.op = outer


# ---- cuda-sim: the emulator's rows

def _take_sim_rows(rec, restart):
    text = bytes(torch.ops.fsam_sim.sim_traffic_stop().tolist()).decode()
    if restart:
        torch.ops.fsam_sim.sim_traffic_start()
    for r in json.loads(text):
        requests, sectors, moved = r["requests"], r["sectors"], r["transfer_bytes"]  # [read, write, atomic]
        kind = r["kind"]  # kernel, or a fill, copy, aten kernel or sync of `moved` bytes
        rec._rows.append(_row(
            "cuda-sim", r["op"], r["kernel"], kind, elements=r["elements"], tensors=r["tensors"], grid=r["grid"],
            requests_read=requests[0], requests_written=requests[1], requests_atomic=requests[2],
            bytes_requested=sum(r["bytes"]),
            l1_sectors_read=sectors[0], l1_sectors_written=sectors[1] + sectors[2], ideal_sectors=sum(r["ideal"]),
            sectors_read=r["dram_read"] + (_sectors(moved) if kind == "aten" else 0),
            sectors_written=r["dram_written"] + (_sectors(moved) if kind in ("fill", "copy", "aten") else 0),
            atomics=r["atomics"], shared_bytes=r["shared_bytes"],
            buffers={label: [rd, wr] for label, rd, wr in r["buffers"]}))


def _sectors(nbytes):
    return -(-nbytes // SECTOR)


# ---- triton: the interpreter's accesses

class _TritonLaunch:
    """One interpreted launch: its buffers (the kernel's tensor arguments and the tensors of the
    op that launched it) and what its accesses touched."""

    def __init__(self, kernel, buffers):
        self.kernel = kernel
        spans = sorted((lo, hi, label) for (lo, hi), label in buffers.items())
        self.lo = np.array([s[0] for s in spans], dtype=np.uint64)
        self.hi = np.array([s[1] for s in spans], dtype=np.uint64)
        self.labels = [s[2] for s in spans]
        self.counts = defaultdict(int)
        self.touched = {"read": [], "written": []}  # arrays of (buffer << 40) | sector
        self.grid = 1

    def access(self, kind, ptrs, mask, itemsize):
        addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
        lanes = np.nonzero(np.broadcast_to(np.asarray(mask, dtype=bool).reshape(-1) if mask is not None
                                           else np.ones(1, dtype=bool), addr.shape))[0]
        if lanes.size == 0:
            return
        addr = addr[lanes]
        buf = np.searchsorted(self.lo, addr, side="right").astype(np.int64) - 1
        inside = (buf >= 0) & (addr + np.uint64(itemsize) <= self.hi[np.maximum(buf, 0)])
        if not inside.all():
            self._invalid(kind, addr[~inside][0], itemsize)
        offset = addr - self.lo[buf]
        sector = (buf.astype(np.uint64) << np.uint64(40)) | (offset // np.uint64(SECTOR))
        # a warp's 32 lanes of 16 bytes: at most 128 groups of a block, in the top 8 bits of a key
        # whose low 56 hold a sector (buffer << 40 | sector) or an address (user space: 47 bits)
        group = (lanes // (32 * max(1, 16 // itemsize))).astype(np.uint64) << np.uint64(56)
        self.counts["requests_" + kind] += np.unique(group).size
        self.counts["l1_sectors_" + ("read" if kind == "read" else "written")] += np.unique(group | sector).size
        distinct = np.unique(group | addr)  # lanes asking for one address ask for it once
        per_group = np.unique(distinct >> np.uint64(56), return_counts=True)[1] * itemsize
        self.counts["bytes_requested"] += int(per_group.sum())
        self.counts["ideal_sectors"] += int(np.sum(-(-per_group // SECTOR)))
        if kind == "atomic":
            self.counts["atomics"] += lanes.size
        for side in ("read", "written"):
            if kind == side or kind == "atomic":
                self.touched[side].append(sector)

    def _invalid(self, kind, addr, itemsize):
        """Refuse an access outside every storage, naming the nearest (as cuda-sim does)."""
        addr, where = int(addr), "the launch was given no storage"
        spans = list(zip(self.lo.tolist(), self.hi.tolist(), self.labels))
        if spans:
            lo, hi, label = min(spans, key=lambda s: s[0] - addr if addr < s[0] else max(0, addr + itemsize - s[1]))
            size = f"({hi - lo} bytes), the nearest storage given to the launch"
            where = (f"{lo - addr} bytes before the start of {label} {size}" if addr < lo else
                     f"{addr - hi} bytes past the end of {label} {size}" if addr >= hi else
                     f"at offset {addr - lo} of {label}, {addr + itemsize - hi} bytes past its end {size}")
        raise RuntimeError(f"triton: {self.kernel}: an invalid global {kind} of {itemsize} bytes: {where}")

    def row(self, op, elements, tensors, dtype):
        buffers = {}
        distinct = {}
        for side, arrays in self.touched.items():
            found = np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.uint64)
            distinct[side] = found.size
            ids, counts = np.unique(found >> np.uint64(40), return_counts=True)
            for i, n in zip(ids.tolist(), counts.tolist()):
                buffers.setdefault(self.labels[i], [0, 0])[side == "written"] = n
        kernel = f"{self.kernel}[{dtype}]" if dtype else self.kernel
        return _row("triton", op, kernel, "kernel", elements=elements, tensors=tensors, grid=self.grid,
                    sectors_read=distinct["read"], sectors_written=distinct["written"], buffers=buffers,
                    **dict(self.counts))


def _storage_span(t):
    s = t.untyped_storage()
    return (s.data_ptr(), s.data_ptr() + s.nbytes()) if s.nbytes() else None


@contextlib.contextmanager
def _triton_hooks(rec):
    """Wraps the interpreter's memory ops and launches while recording (no-op without the
    interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter as it

    builder = it.interpreter_builder
    state = {"launch": None}

    def itemsize_of(ptrs):
        bits = ptrs.get_element_ty().primitive_bitwidth
        return max(1, bits // 8)

    def wrap(name, kind, ptr_at, mask_at):
        original = getattr(builder, name)

        def hooked(*args, **kwargs):
            launch = state["launch"]
            if launch is not None:
                ptrs = args[ptr_at]
                mask = args[mask_at].data if mask_at is not None and args[mask_at] is not None else None
                launch.access(kind, ptrs.data, mask, itemsize_of(ptrs))
            return original(*args, **kwargs)
        return original, hooked

    hooks = {"create_masked_load": ("read", 0, 1), "create_masked_store": ("written", 0, 2),
             "create_atomic_rmw": ("atomic", 1, 3), "create_atomic_cas": ("atomic", 0, None)}
    originals = {}
    for name, (kind, ptr_at, mask_at) in hooks.items():
        originals[name], hooked = wrap(name, kind, ptr_at, mask_at)
        setattr(builder, name, hooked)
    original_grid = builder.set_grid_dim

    def set_grid_dim(*dims):
        if state["launch"] is not None:
            state["launch"].grid = math.prod(dims)
        return original_grid(*dims)
    builder.set_grid_dim = set_grid_dim
    original_call = it.GridExecutor.__call__

    def call(executor, *args, **kwargs):
        if getattr(_active, "recording", None) is not rec:
            return original_call(executor, *args, **kwargs)
        op = getattr(_active, "op", None)
        buffers = dict(op.buffers) if op is not None else {}
        named = dict(zip(executor.arg_names, args))
        named.update(kwargs)
        for label, value in named.items():
            if isinstance(value, torch.Tensor) and _storage_span(value):
                buffers.setdefault(_storage_span(value), label)
        dtype = next((v for v in named.values() if isinstance(v, tl.dtype)), None)  # the first constexpr dtype
        state["launch"] = _TritonLaunch(executor.fn.__name__, buffers)
        _active.launching = True  # the interpreter's own copies of the arguments are no GPU work
        try:
            out = original_call(executor, *args, **kwargs)
        finally:
            launch, state["launch"] = state["launch"], None
            _active.launching = False
        rec._rows.append(launch.row(op.name if op else "", op.elements if op else 0, op.tensors if op else 0,
                                    str(dtype).replace("tl.", "") if dtype is not None else None))
        return out

    it.GridExecutor.__call__ = call
    try:
        yield
    finally:
        it.GridExecutor.__call__ = original_call
        builder.set_grid_dim = original_grid
        for name, original in originals.items():
            setattr(builder, name, original)


# ---- torch: the ATen ops a GPU would run as kernels

# ATen ops that launch nothing on a GPU (views and metadata, allocation) and those that make the
# host wait for the device (a value read back).
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "detach_",
             "alias", "set_", "resize_", "_unsafe_view", "_to_copy_meta", "is_same_size", "sym_size", "sym_numel",
             "sym_stride", "sym_storage_offset", "_has_compatible_shallow_copy_type", "is_pinned", "record_stream"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item", "allclose"}


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


class _OpCall:
    def __init__(self, name, schema, args):
        self.name = name
        self.buffers = {}
        self.elements = self.tensors = 0
        first = True
        for arg, value in zip(schema.arguments if schema is not None else (), args):
            if isinstance(value, (list, tuple)) and first and any(isinstance(v, torch.Tensor) for v in value):
                first = False
                self.elements = sum(v.numel() for v in value if v is not None)
                self.tensors = len(value)
            items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, v in items:
                if isinstance(v, torch.Tensor) and _storage_span(v):
                    self.buffers.setdefault(_storage_span(v), arg.name if i is None else f"{arg.name}[{i}]")


class _TorchOps(TorchDispatchMode):
    """Counts the ATen ops as GPU launches, and runs the package's ops (fsam_triton's Python
    impls under this mode, so that their own ATen ops count too) recording their calls."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace in ("fsam", "fsam_sim", "fsam_triton"):
            return self._package_op(func, namespace, args, kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _FREE_OPS or namespace == "prim" or getattr(_active, "launching", False):
            return out
        op = getattr(_active, "op", None)
        nread = sum(t.nbytes for t in _tensors(list(args) + list(kwargs.values())))
        nwritten = sum(t.nbytes for t in _tensors(out if isinstance(out, (list, tuple)) else [out]))
        kind = "sync" if name in _SYNC_OPS else "kernel"
        self.rec._rows.append(_row("torch", op.name if op else "", f"aten.{name}", kind,
                                   elements=op.elements if op else 0, tensors=op.tensors if op else 0,
                                   sectors_read=_sectors(nread), sectors_written=_sectors(nwritten)))
        return out

    def _package_op(self, func, namespace, args, kwargs):
        name = func._schema.name.split("::")[-1]
        schema_args = list(args) + [kwargs.get(a.name, a.default_value) for a in func._schema.arguments[len(args):]]
        outer = getattr(_active, "op", None)
        call = _OpCall(name, func._schema, schema_args)
        _active.op = call
        try:
            self.rec._calls.append((name, call.elements, call.tensors, floor_bytes(name, schema_args)))
            if namespace == "fsam_triton":
                from .triton_kernels import library
                with self:
                    return library.impl(name)(*args, **kwargs)
            return func(*args, **kwargs)
        finally:
            _active.op = outer
            if namespace == "fsam_sim":
                _take_sim_rows(self.rec, restart=True)


# ---- the floors: what docs/algorithm.md's table says each call must move

def _nbytes(tensors):
    return sum(t.nbytes for t in tensors if t is not None)


def _mask_bytes(tensors):
    """The sectors of the mask bits of the tensors' elements (a chunk's bits start a sector)."""
    return sum(SECTOR * (CHUNK // (8 * SECTOR) * (t.numel() // CHUNK) + -(-(t.numel() % CHUNK) // (8 * SECTOR)))
               for t in tensors)


def _touched_sectors(params, mask_bits):
    """Per tensor: the bytes of the 32-byte sectors holding at least one masked entry."""
    layout = ChunkLayout(params)
    out = []
    for i, p in enumerate(params):
        m = layout.unpack(mask_bits.cpu(), i).reshape(-1)
        per = SECTOR // p.element_size()
        pad = (-m.numel()) % per
        m = torch.cat([m, m.new_zeros(pad)]).view(-1, per)
        out.append(int(m.any(1).sum()) * SECTOR)
    return out


def _masked_bytes(params, mask_bits):
    layout = ChunkLayout(params)
    return sum(int(layout.unpack(mask_bits.cpu(), i).sum()) * p.element_size() for i, p in enumerate(params))


def _perturb_floor(params, grads, mask_bits):
    """The offsets and the mask read; each entry saved (w read, its original written), and moved
    where it has a gradient (g read, w written); masked entries as the sectors they touch."""
    if mask_bits is None:
        touched, saved = [p.nbytes for p in params], _nbytes(params)
    else:
        touched, saved = _touched_sectors(params, mask_bits), _masked_bytes(params, mask_bits)
    moved = sum(3 * t if g is not None else t for t, g in zip(touched, grads))
    return _offsets_bytes(params) + (_mask_bytes(params) if mask_bits is not None else 0) + moved + saved


def _offsets_bytes(params):
    return 8 * total_chunks(params)


def floor_bytes(op, args):
    """The bytes raw op `op` must move for these arguments (its schema's order), by
    docs/algorithm.md's table: every input it needs read once, every output written once, a
    masked access as the whole 32-byte sectors it touches.  The top-k's floor is one read of the
    scores and the mask written (at radix_mask; its other stages' floors are 0)."""
    if op == "fisher_accumulate_":
        fisher, grads = args[0], args[1]
        return sum(2 * f.nbytes + (g.nbytes if g is not None else 0) for f, g in zip(fisher, grads))
    if op == "radix_mask":
        return _nbytes(args[0]) + _mask_bytes(args[0])
    if op == "grad_sumsq":
        params, grads, mask_bits, adaptive = args[0], args[1], args[2], args[3]
        return _nbytes(grads) + (_nbytes(p for p, g in zip(params, grads) if g is not None) if adaptive else 0) + (
            _mask_bytes(params) if mask_bits is not None else 0)
    if op == "perturb_":
        return _perturb_floor(args[0], args[1], args[2])
    if op == "restore_":  # the originals read, w written
        params, mask_bits = args[0], args[1]
        if mask_bits is None:
            return _offsets_bytes(params) + 2 * _nbytes(params)
        return _offsets_bytes(params) + _mask_bytes(params) + _masked_bytes(params, mask_bits) + sum(
            _touched_sectors(params, mask_bits))
    if op == "tensor_sumsq":
        return _nbytes(args[0])
    if op == "clip_scale_":
        tensors, norms, max_norm, eps = args
        coef = (max_norm / (norms.float().cpu() + eps)).clamp(max=1.0)
        return sum(2 * t.nbytes for t, c in zip(tensors, coef.tolist()) if c < 1.0)
    if op in ("pac_noise_mask", "pac_perturb_", "pac_restore_"):  # w and log_std read, the mask
        params, log_stds = args[0], args[1]
        base = _nbytes(params) + _nbytes(log_stds) + _mask_bytes(params)
        if op == "pac_noise_mask":
            return base
        # w written, the marked originals saved or written back
        return base + _offsets_bytes(params) + _nbytes(params) + _masked_bytes(params, args[6])
    if op == "pac_bound_grads_":
        params, grads, log_stds, log_std_grads, anchors = args[:5]
        return _nbytes(params) + 2 * _nbytes(grads) + _nbytes(log_stds) + _nbytes(log_std_grads) + _nbytes(anchors)
    return 0
