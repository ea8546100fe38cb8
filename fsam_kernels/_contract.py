"""The argument contract of every op, checked in Python: by the public entry points of ops.py and,
through `checked`, by the raw ops of the Python backends (`reference`, torch.ops.fsam_triton).  The
C++ backends check the same contract in csrc/include/fsam/checks.h (tests/adversarial holds them
to the same answers).  Every check runs before anything is written, costs host work and memory in
O(tensors + chunks), and raises TypeError for a wrong type or dtype and ValueError for anything
else, naming the argument (docs/errors.md).

The saved runs of a perturbation (check_saved_runs) depend on the mask's and the offsets' values:
a call without `status` reads them on the host (for GPU tensors, one sync); a call with `status`
leaves them to its backend, which checks them without a sync and writes nothing when they are bad
(fsam_kernels/_schemas.py).
"""
import inspect
import weakref

import torch

from ._checks import check_number
from ._layout import CHUNK_BYTES, FIRST_HIST_SIZE, RADIX_HIST_SIZES, RADIX_STATE_SIZE, SAVE_ALIGN, chunk_popcounts, \
    chunk_sizes, num_chunks, total_chunks

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor_list(name, tensors, *, optional=False):
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor")
    out = list(tensors)
    for i, t in enumerate(out):
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
        if t.is_sparse:
            raise ValueError(f"{name}[{i}] is sparse; only dense tensors are supported")
    return out


def device_of(**lists):
    """The one device of every tensor of the lists (CPU when there is none)."""
    device = None
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, other tensors on {device}: one call takes one device")
    return device or torch.device("cpu")


# c10's names of the dtypes, which the C++ checks print: the messages match word for word.
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool"}


def type_name(dtype):
    return _C10_NAMES.get(dtype, str(dtype))


def check_floats(name, tensors, fp32_only=False):
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be float32, bfloat16 or float16, got {type_name(t.dtype)}")
        if fp32_only and t.dtype != torch.float32:
            raise TypeError(f"{name}[{i}] must be float32")


def check_contiguous(name, tensors):
    for i, t in enumerate(tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (in-place ops write through it)")


def check_grads(params, grads, *, params_name="params", same_dtype=True):
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} tensors, {params_name} has {len(params)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if g.numel() != p.numel():
            raise ValueError(f"grads[{i}] has {g.numel()} elements, {params_name}[{i}] has {p.numel()}")
        if same_dtype and g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] is {type_name(g.dtype)} but {params_name}[{i}] is {type_name(p.dtype)}")


def check_buffer(name, t, dtype, numel, device):
    """A contiguous 1-D `dtype` tensor on `device` with `numel` entries (None: any)."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise TypeError(f"{name} must be a contiguous 1-D {dtype} tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D {dtype} tensor, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} entries, expected {numel}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the tensors on {device}")


def check_flag(name, t, device):
    """A one-element real tensor on the device (found_inf: non-zero, NaN included, means skip)."""
    if not isinstance(t, torch.Tensor) or t.is_complex():
        raise TypeError(f"{name} must be a one-element real tensor on {device}")
    if t.numel() != 1 or t.device != device:
        raise ValueError(f"{name} must be a one-element tensor on {device}, got {t.numel()} elements on {t.device}")


def check_disjoint(written, read=()):
    """No byte range of a written tensor overlaps another tensor's: no output aliases an input,
    and nothing is written twice.  `written`, `read`: (name, list of tensors or None) pairs, each
    tensor already checked contiguous.  O(n log n) in the number of tensors; no element is read."""
    ranges = []
    for is_written, pairs in ((True, written), (False, read)):
        for name, tensors in pairs:
            single = isinstance(tensors, torch.Tensor) or tensors is None
            for i, t in enumerate([tensors] if single else tensors):
                if t is not None and t.numel():
                    begin = t.data_ptr()
                    ranges.append((begin, begin + t.numel() * t.element_size(), name if single else f"{name}[{i}]",
                                   is_written))
    ranges.sort(key=lambda r: r[0])
    furthest = furthest_written = None
    for r in ranges:
        hit = furthest_written if furthest_written and r[0] < furthest_written[1] else \
            furthest if r[3] and furthest and r[0] < furthest[1] else None
        if hit:
            raise ValueError(f"{hit[2]} and {r[2]} share memory; an op's outputs may not overlap each other or its "
                             "inputs")
        if furthest is None or r[1] > furthest[1]:
            furthest = r
        if r[3] and (furthest_written is None or r[1] > furthest_written[1]):
            furthest_written = r


def saved_entries(tensors, mask_bits):
    """Per chunk (int64): how many values it saves, the popcount of its mask bits (every element
    without a mask)."""
    if mask_bits is not None:
        return chunk_popcounts(mask_bits)
    return chunk_sizes([t.numel() for t in tensors]).to(torch.int64)


def saved_runs_error(tensors, mask_bits, save_offsets, saved):
    """What is wrong with the saved runs, or None: chunk c of `tensors` saves saved_entries(c)
    values of its tensor's dtype from byte save_offsets[c] of `saved`; each run starts aligned, at
    or after the previous run's end (chunk order, no overlap) and ends inside `saved`, every end
    computed without overflow.  Reads the offsets and the mask (one sync on a GPU)."""
    if not save_offsets.numel():
        return None
    sizes = torch.repeat_interleave(torch.tensor([t.element_size() for t in tensors], dtype=torch.int64),
                                    torch.tensor([num_chunks(t.numel()) for t in tensors], dtype=torch.int64))
    entries, offsets = torch.stack([saved_entries(tensors, mask_bits).to(save_offsets.device), save_offsets]).cpu()
    capacity = saved.numel()
    nbytes = entries * sizes  # at most CHUNK * 4
    ends = offsets + nbytes  # wraps where an offset is past `capacity`: such a chunk is refused first
    previous = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
    misplaced = (offsets < previous) | (offsets % sizes != 0)
    outside = (offsets > capacity) | (nbytes > capacity - offsets)
    bad = misplaced | outside
    if not bad.any():
        return None
    c = int(bad.nonzero()[0])
    if misplaced[c]:
        return (f"save_offsets[{c}] = {int(offsets[c])} must be a multiple of {int(sizes[c])} at or after the end "
                f"of the previous run ({int(previous[c])}): runs lie in chunk order without overlap")
    return (f"saved has {capacity} bytes but the run of chunk {c} ({int(entries[c])} values from byte "
            f"{int(offsets[c])}) ends past it: size it with save_layout(params, chunk_counts)")


def check_saved_runs(tensors, mask_bits, save_offsets, saved):
    error = saved_runs_error(tensors, mask_bits, save_offsets, saved)
    if error:
        raise ValueError(error)


class CheckedLayouts:
    """Saved layouts that passed their check and have not changed since: the same tensors (held by
    weak reference), at the same version (PyTorch counts every in-place change) and data, for a
    parameter list of the same sizes and dtypes and a `saved` of the same size.  With a status its
    tensor and version belong to the key too (a bad layout has set it, and nothing of ours clears
    it).  The C++ backends keep the same (csrc/include/fsam/checked_layouts.h)."""

    KEPT = 16

    def __init__(self):
        self._kept = []  # the most recently used first

    @staticmethod
    def _ref(t):
        return None if t is None else (weakref.ref(t), t._version, t.data_ptr())

    @staticmethod
    def _matches(ref, t):
        if ref is None or t is None:
            return ref is None and t is None
        return ref[0]() is t and not t.is_inference() and t._version == ref[1] and t.data_ptr() == ref[2]

    @staticmethod
    def _shape(params, saved):
        return tuple((p.numel(), p.element_size()) for p in params), saved.numel(), saved.data_ptr()

    def contains(self, params, mask_bits, save_offsets, saved, status):
        shape = self._shape(params, saved)
        for i, (s, refs) in enumerate(self._kept):
            if s == shape and all(self._matches(r, t) for r, t in zip(refs, (save_offsets, mask_bits, status))):
                self._kept.insert(0, self._kept.pop(i))
                return True
        return False

    def add(self, params, mask_bits, save_offsets, saved, status):
        tensors = (save_offsets, mask_bits, status)
        if any(t is not None and t.is_inference() for t in tensors):
            return
        self._kept.insert(0, (self._shape(params, saved), tuple(self._ref(t) for t in tensors)))
        del self._kept[self.KEPT:]


CHECKED_LAYOUTS = CheckedLayouts()


def host_runs_pass(tensors, mask_bits, save_offsets, saved, status):
    """Whether a call writes, its saved runs read on the host (the reference backend) unless
    CHECKED_LAYOUTS holds them: without `status` they passed the contract already; with it the call
    writes nothing when status is non-zero or the runs are bad, which then sets it to 1."""
    if status is None:
        return True
    if CHECKED_LAYOUTS.contains(tensors, mask_bits, save_offsets, saved, status):
        return not status.item()
    if not status.item() and saved_runs_error(tensors, mask_bits, save_offsets, saved):
        status.fill_(1)
    if status.item():
        return False
    CHECKED_LAYOUTS.add(tensors, mask_bits, save_offsets, saved, status)
    return True


def check_saving(params, grads, mask_bits, save_offsets, saved, status, device, *, runs, extra_read=()):
    """The buffers of a perturbation or a restore of `params` (checked floats, contiguous):
    mask_bits, save_offsets, saved (starting SAVE_ALIGN-aligned) and status, nothing written
    overlapping anything, and, where `runs` and without `status`, the saved runs (False: the
    caller hands them to a raw op, which reads them itself)."""
    chunks = total_chunks(params)
    if mask_bits is not None:
        check_buffer("mask_bits", mask_bits, torch.uint8, chunks * CHUNK_BYTES, device)
    check_buffer("save_offsets", save_offsets, torch.int64, chunks, device)
    check_buffer("saved", saved, torch.uint8, None, device)
    if status is not None:
        check_buffer("status", status, torch.int32, 1, device)
    if saved.numel() and saved.data_ptr() % SAVE_ALIGN:  # (an empty tensor's data_ptr() is 0)
        raise ValueError(f"saved must start on a {SAVE_ALIGN}-byte boundary")
    check_disjoint([("params", params), ("saved", saved), ("status", status)],
                   [("grads", grads), ("mask_bits", mask_bits), ("save_offsets", save_offsets), *extra_read])
    if runs and status is None and not CHECKED_LAYOUTS.contains(params, mask_bits, save_offsets, saved, None):
        check_saved_runs(params, mask_bits, save_offsets, saved)
        CHECKED_LAYOUTS.add(params, mask_bits, save_offsets, saved, None)


def _params(params, grads=None):
    params = tensor_list("params", params)
    check_floats("params", params)
    check_contiguous("params", params)
    if grads is None:
        return params, None
    grads = tensor_list("grads", grads, optional=True)
    check_floats("grads", grads)
    check_contiguous("grads", grads)
    check_grads(params, grads)
    return params, grads


def check_scale(scale, device):
    """A one-element float32 tensor on the device, of any shape: TypeError for another type or
    dtype, ValueError for another size or device (as the C++ check, which sees it flattened)."""
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"scale must be a one-element float32 tensor on {device}")
    if scale.numel() != 1 or scale.device != device:
        raise ValueError(f"scale must be a one-element float32 tensor on {device}, got {scale.numel()} elements on "
                         f"{scale.device}")


# Each op's raw arguments, in the order of its schema (fsam_kernels/_schemas.py).

def fisher_accumulate_(fisher, grads, decay, alpha, found_inf=None, first_hist=None):
    fisher = tensor_list("fisher", fisher)
    grads = tensor_list("grads", grads, optional=True)
    check_floats("fisher", fisher, fp32_only=True)
    check_floats("grads", grads)
    check_contiguous("fisher", fisher)
    check_contiguous("grads", grads)
    check_grads(fisher, grads, params_name="fisher", same_dtype=False)
    device = device_of(fisher=fisher, grads=grads)
    check_number("decay", decay, 0)
    check_number("alpha", alpha, 0)
    if found_inf is not None:
        check_flag("found_inf", found_inf, device)
    if first_hist is not None:
        check_buffer("first_hist", first_hist, torch.int64, FIRST_HIST_SIZE, device)
    check_disjoint([("fisher", fisher), ("first_hist", first_hist)], [("grads", grads), ("found_inf", found_inf)])


def _radix(scores, state, hist=None, digit=None, candidates=None, written=()):
    scores = tensor_list("scores", scores)
    check_floats("scores", scores)
    check_contiguous("scores", scores)
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a tensor, got {type(state).__name__}")
    device = device_of(scores=scores) if scores else state.device
    check_buffer("state", state, torch.int64, RADIX_STATE_SIZE, device)
    if digit is not None:
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < len(RADIX_HIST_SIZES):
            raise ValueError(f"digit must be in [0, {len(RADIX_HIST_SIZES)}), got {digit!r}")
        check_buffer("hist", hist, torch.int64, RADIX_HIST_SIZES[digit], device)
    if candidates is not None:
        check_buffer("candidates", candidates, torch.int64, None, device)
    buffers = {"state": state, "hist": hist, "candidates": candidates}
    check_disjoint([(k, v) for k, v in buffers.items() if k in written],
                   [("scores", scores)] + [(k, v) for k, v in buffers.items() if k not in written])
    return scores, device


def radix_histogram_(scores, state, digit, absolute, hist, candidates=None):
    _radix(scores, state, hist, digit, candidates, written=("state", "hist", "candidates"))


def radix_select_(state, hist, digit):
    _radix([], state, hist, digit, written=("state",))


def radix_tie_counts(scores, state, absolute, candidates=None):
    _radix(scores, state, candidates=candidates)


def radix_mask(scores, state, ties, ties_before, absolute):
    scores, device = _radix(scores, state)
    for name, t in (("ties", ties), ("ties_before", ties_before)):
        check_buffer(name, t, torch.int64, total_chunks(scores), device)


def grad_sumsq(params, grads, mask_bits=None, adaptive=False, eta=0.0):
    params, grads = _params(params, grads)
    device = device_of(params=params, grads=grads)
    if mask_bits is not None:
        check_buffer("mask_bits", mask_bits, torch.uint8, total_chunks(params) * CHUNK_BYTES, device)
    check_number("eta", eta, 0)


def perturb_(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0, status=None, *, runs=True):
    params, grads = _params(params, grads)
    device = device_of(params=params, grads=grads)
    check_scale(scale, device)
    check_number("eta", eta, 0)
    check_saving(params, grads, mask_bits, save_offsets, saved, status, device, runs=runs,
                 extra_read=[("scale", scale)])


def restore_(params, mask_bits, save_offsets, saved, status=None, *, runs=True):
    params, _ = _params(params)
    check_saving(params, None, mask_bits, save_offsets, saved, status, device_of(params=params), runs=runs)


def tensor_sumsq(tensors):
    tensors = tensor_list("tensors", tensors)
    check_floats("tensors", tensors)
    check_contiguous("tensors", tensors)
    device_of(tensors=tensors)


def clip_scale_(tensors, norms, max_norm, eps):
    tensors = tensor_list("tensors", tensors)
    check_floats("tensors", tensors)
    check_contiguous("tensors", tensors)
    device = device_of(tensors=tensors) if tensors or not isinstance(norms, torch.Tensor) else norms.device
    check_buffer("norms", norms, torch.float32, len(tensors), device)
    check_number("max_norm", max_norm, 0, finite=False)
    check_number("eps", eps, 0)
    check_disjoint([("tensors", tensors)], [("norms", norms)])


def pac_noise(params, log_stds, bases, seed, step, max_noise, *, per_element=False):
    """The arguments every PAC noise op shares; returns (params, log_stds, device)."""
    params, _ = _params(params)
    log_stds = tensor_list("log_stds", log_stds)
    check_floats("log_stds", log_stds, fp32_only=True)
    check_contiguous("log_stds", log_stds)
    if len(log_stds) != len(params):
        raise ValueError(f"log_stds has {len(log_stds)} tensors, params has {len(params)}")
    for i, (p, s) in enumerate(zip(params, log_stds)):
        if s.numel() != p.numel() and (s.numel() != 1 or per_element):
            raise ValueError(f"log_stds[{i}] has {s.numel()} elements; params[{i}] has {p.numel()}"
                             f"{'' if per_element else ' (or give 1)'}")
    device = device_of(params=params, log_stds=log_stds)
    pac_scalars(bases, seed, step, max_noise, len(params))
    return params, log_stds, device


def pac_scalars(bases, seed, step, max_noise, tensors):
    """The noise's counters and clamp: one base per tensor, seed, step, max_noise."""
    bases = list(bases)
    if len(bases) != tensors or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bases):
        raise ValueError(f"bases must hold one int >= 0 per tensor ({tensors}), got {bases!r}")
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    if isinstance(max_noise, bool) or not isinstance(max_noise, (int, float)) or not max_noise > 0:
        raise ValueError(f"max_noise must be a number > 0 (inf: no clamp), got {max_noise!r}")


def pac_noise_mask(params, log_stds, bases, seed, step, max_noise):
    pac_noise(params, log_stds, bases, seed, step, max_noise)


def _pac_shift(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None, *,
               runs=True):
    params, log_stds, device = pac_noise(params, log_stds, bases, seed, step, max_noise)
    if mask_bits is None:
        raise ValueError("mask_bits is required: pac_noise_mask gives it")
    check_saving(params, None, mask_bits, save_offsets, saved, status, device, runs=runs,
                 extra_read=[("log_stds", log_stds)])


pac_perturb_ = pac_restore_ = _pac_shift


def pac_bound_grads_(params, grads, log_stds, log_std_grads, anchors, prior_log_stds, bases, seed, step, max_noise,
                     coef):
    params, log_stds, device = pac_noise(params, log_stds, bases, seed, step, max_noise, per_element=True)
    grads = tensor_list("grads", grads)
    log_std_grads = tensor_list("log_std_grads", log_std_grads)
    anchors = tensor_list("anchors", anchors)
    if len(grads) != len(log_std_grads) or (grads and len(grads) != len(params)):
        raise ValueError("grads and log_std_grads must both have one tensor per parameter, or both be empty")
    if len(anchors) != len(params):
        raise ValueError(f"anchors has {len(anchors)} tensors, params has {len(params)}")
    for name, tensors in (("grads", grads), ("log_std_grads", log_std_grads), ("anchors", anchors)):
        check_floats(name, tensors, fp32_only=name == "log_std_grads")
        check_contiguous(name, tensors)
        for i, (p, t) in enumerate(zip(params, tensors)):
            if t.numel() != p.numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements, params[{i}] has {p.numel()}")
            if name != "log_std_grads" and t.dtype != p.dtype:
                raise TypeError(f"{name}[{i}] is {type_name(t.dtype)} but params[{i}] is {type_name(p.dtype)}")
    device_of(params=params, grads=grads, log_std_grads=log_std_grads, anchors=anchors)
    check_buffer("prior_log_stds", prior_log_stds, torch.float32, len(params), device)
    check_disjoint([("grads", grads), ("log_std_grads", log_std_grads)],
                   [("params", params), ("anchors", anchors), ("prior_log_stds", prior_log_stds),
                    ("log_stds", log_stds)])


def check(name, *args, **options):
    """Check op `name`'s raw arguments (positional, in its schema's order); `options`: its
    checker's keywords (runs=False for the ops that save: the raw op reads the runs itself)."""
    globals()[name](*args, **options)


def checked(name, impl):
    """`impl` (op `name` of a Python backend) behind the contract: what its torch.ops op runs.
    Its parameters are read once, here: a call only fills in what it leaves out."""
    parameters = list(inspect.signature(impl).parameters.values())
    names = [p.name for p in parameters]
    checker = globals()[name]

    def op(*args, **kwargs):
        if kwargs or len(args) < len(names):
            unknown = set(kwargs) - set(names[len(args):])
            if unknown or len(args) > len(names):
                raise TypeError(f"{name}() got unexpected arguments: {sorted(unknown) or len(args)}")
            missing = [p.name for p in parameters[len(args):] if p.name not in kwargs and p.default is p.empty]
            if missing:
                raise TypeError(f"{name}() missing arguments: {missing}")
            args = args + tuple(kwargs.get(p.name, p.default) for p in parameters[len(args):])
        checker(*args)
        return impl(*args)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = impl.__doc__
    return op
