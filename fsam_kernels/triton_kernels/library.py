"""torch.ops.fsam_triton.*: the Triton launchers as torch.library ops (the schemas of
fsam_kernels/_schemas.py, impls for CUDA tensors and for CPU tensors under the interpreter,
fake impls for torch.compile, which treats them as opaque calls), each behind the argument contract
of fsam_kernels/_contract.py."""
from .._contract import checked
from .._fakes import register_fakes
from .._schemas import SCHEMAS, define
from . import clip, fisher, pac, perturb, topk

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
    "pac_noise_mask": pac.pac_noise_mask,
    "pac_perturb_": pac.pac_perturb_,
    "pac_restore_": pac.pac_restore_,
    "pac_bound_grads_": pac.pac_bound_grads_,
}

assert set(_IMPLS) == set(SCHEMAS), "every op needs a Triton impl"
_CHECKED = {name: checked(name, impl) for name, impl in _IMPLS.items()}
_lib = define("fsam_triton")
for _name, _impl in _CHECKED.items():
    for _key in ("CUDA", "CPU"):
        _lib.impl(_name, _impl, _key)
register_fakes("fsam_triton")


def impl(name):
    """What torch.ops.fsam_triton.<name> runs (fsam_kernels.traffic runs it under its mode)."""
    return _CHECKED[name]
