"""torch.ops.fsam_triton.*: the Triton launchers as torch.library ops (the schemas of
fsam_kernels/_schemas.py, impls for CUDA tensors and for CPU tensors under the interpreter,
fake impls for torch.compile, which treats them as opaque calls)."""
from .._fakes import register_fakes
from .._schemas import CPU_ONLY, SCHEMAS, define
from . import clip, fisher, perturb, topk

_IMPLS = {
    "fisher_accumulate_": fisher.fisher_accumulate_,
    "radix_histogram_": topk.radix_histogram_,
    "radix_select_": topk.radix_select_,
    "radix_tie_counts": topk.radix_tie_counts,
    "radix_mask": topk.radix_mask,
    "grad_sumsq": perturb.grad_sumsq,
    "perturb_": perturb.perturb_,
    "restore_": perturb.restore_,
    "tensor_sumsq": clip.tensor_sumsq,
    "clip_scale_": clip.clip_scale_,
}

assert set(_IMPLS) == set(SCHEMAS) - set(CPU_ONLY), "every op but the CPU-only ones needs a Triton impl"
_lib = define("fsam_triton")
for _name in _IMPLS:
    for _key in ("CUDA", "CPU"):
        _lib.impl(_name, _IMPLS[_name], _key)
register_fakes("fsam_triton")
