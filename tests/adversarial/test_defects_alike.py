"""Every raw op, every argument, one defect at a time, enumerated from the op's schema: each tensor
with another dtype, one entry more or fewer, another shape, a strided view; each list one tensor
short or with its first tensor so changed; each float NaN, negative or infinite; each int negative.
Every backend must accept or refuse it alike (the same exception type), and a refusal must leave
every input as it was: the C++ checks and the Python contract held to one answer, argument by
argument, without a list of cases written by hand."""
import math

import pytest
import torch

from fsam_kernels import backends, ops
from fsam_kernels._layout import CHUNK, FIRST_HIST_SIZE, RADIX_HIST_SIZES, RADIX_STATE_SIZE, STATE_K_LEFT, \
    total_chunks
from conftest import all_backends
from layouts import outcome

CPU_BACKENDS = [b for b, d in all_backends() if d == "cpu"]


def samples():
    """Valid arguments of every op, by name, in schema order: fresh random values, odd sizes."""
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(CHUNK + 5, generator=g), torch.randn(3, 7, generator=g).half()]
    grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    chunks = total_chunks(params)
    bits, counts = ops.topk_mask_packed(grads, 300, absolute=True, backend="reference")
    offsets, saved = ops.save_layout(params, counts)
    state = torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64)
    state[STATE_K_LEFT] = 300
    log_stds = [torch.randn(p.numel(), generator=g) - 4.0 for p in params]
    bases = ops.counter_bases(params)
    noise = (log_stds, bases, 3, 5, 2.0)
    pac_bits, pac_counts = ops.pac_noise_mask(params, log_stds, seed=3, step=5, backend="reference")
    pac_offsets, pac_saved = ops.save_layout(params, pac_counts)
    return {
        "fisher_accumulate_": ([torch.rand(p.shape, generator=g) for p in params], grads, 0.9, 0.1,
                               torch.zeros(1), torch.zeros(FIRST_HIST_SIZE, dtype=torch.int64)),
        "radix_histogram_": (grads, state, 1, True, torch.zeros(RADIX_HIST_SIZES[1], dtype=torch.int64),
                             torch.zeros(64, dtype=torch.int64)),
        "radix_select_": (state, torch.randint(0, 9, (RADIX_HIST_SIZES[0],), generator=g), 0),
        "radix_tie_counts": (grads, state, True, torch.zeros(64, dtype=torch.int64)),
        "radix_mask": (grads, state, torch.zeros(chunks, dtype=torch.int64), torch.zeros(chunks, dtype=torch.int64),
                       True),
        "grad_sumsq": (params, grads, bits, True, 0.01),
        "perturb_": (params, grads, bits, offsets, saved, torch.tensor(0.05), True, 0.01, torch.zeros(1, dtype=torch.int32)),
        "restore_": (params, bits, offsets, saved, torch.zeros(1, dtype=torch.int32)),
        "tensor_sumsq": (grads,),
        "clip_scale_": (grads, torch.rand(len(grads), generator=g), 0.5, 1e-6),
        "pac_noise_mask": (params, *noise),
        "pac_perturb_": (params, *noise, pac_bits, pac_offsets, pac_saved, torch.zeros(1, dtype=torch.int32)),
        "pac_restore_": (params, *noise, pac_bits, pac_offsets, pac_saved, torch.zeros(1, dtype=torch.int32)),
        "pac_bound_grads_": (params, grads, log_stds, [torch.randn(p.numel(), generator=g) for p in params],
                             [p + 0.01 for p in params], torch.full((len(params),), -4.0), bases, 3, 5, 2.0, 1e-3),
    }


OTHER_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float64, torch.bfloat16: torch.float64,
               torch.int64: torch.int32, torch.int32: torch.int64, torch.uint8: torch.int8}


def tensor_defects(t):
    """(label, tensor) variants of one tensor, each with one defect."""
    yield "dtype", t.to(OTHER_DTYPE[t.dtype])
    yield "longer", torch.cat([t.reshape(-1), t.reshape(-1)[:1]]).reshape(-1)
    if t.numel() > 1:
        yield "shorter", t.reshape(-1)[1:].clone()
    if t.dim() == 1 and t.numel() > 1:
        yield "2-D", t.reshape(1, -1).clone()
    yield "strided", torch.stack([t, t], -1)[..., 0]


def defects(name, args):
    """(label, args) with one defect each, read off the schema of op `name`."""
    schema = getattr(torch.ops.fsam, name).default._schema
    for i, a in enumerate(schema.arguments):
        value = args[i]
        kind = str(a.type)
        if kind in ("Tensor", "Optional[Tensor]") and value is not None:
            for label, t in tensor_defects(value):
                yield f"{a.name}:{label}", args[:i] + (t,) + args[i + 1:]
        elif kind in ("List[Tensor]", "List[Optional[Tensor]]") and value:
            yield f"{a.name}:short", args[:i] + (value[:-1],) + args[i + 1:]
            for label, t in tensor_defects(value[0]):
                yield f"{a.name}[0]:{label}", args[:i] + ([t] + value[1:],) + args[i + 1:]
        elif kind == "float":
            for label, v in (("nan", math.nan), ("negative", -1.0), ("inf", math.inf)):
                yield f"{a.name}:{label}", args[:i] + (v,) + args[i + 1:]
        elif kind == "int":
            yield f"{a.name}:negative", args[:i] + (-1,) + args[i + 1:]
        elif kind == "List[int]":
            yield f"{a.name}:short", args[:i] + (value[:-1],) + args[i + 1:]


def clone(args):
    return tuple([t.clone() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else
                 a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def flat(args):
    return [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(samples()))
def test_every_defect_refused_alike(name):
    valid = samples()[name]
    answers = {}
    for label, args in defects(name, valid):
        for backend in CPU_BACKENDS:
            mine = clone(args)
            before = [t.clone() for t in flat(mine)]
            got = outcome(lambda: backends.op(name, backend)(*mine))
            answers.setdefault(label, {})[backend] = got
            if got is not None:
                assert all(torch.equal(x, y) for x, y in zip(flat(mine), before)), (name, label, backend)
    differ = {label: by for label, by in answers.items() if len(set(by.values())) > 1}
    assert not differ, differ
    assert any(v is not None for by in answers.values() for v in by.values())  # the defects are refused somewhere
