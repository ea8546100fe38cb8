"""torch.ops.fsam_triton.*: the Triton launchers as torch.library ops (the schemas of
fsam_kernels/_schemas.py, impls for CUDA tensors and for CPU tensors under the interpreter,
fake impls for torch.compile, which treats them as opaque calls)."""
from .._fakes import register_fakes
from .._schemas import SCHEMAS, define
from . import fisher, perturb, topk

_IMPLS = {
    "fisher_accumulate_": fisher.fisher_accumulate_,
    "topk_mask": topk.topk_mask,
    "grad_sumsq": perturb.grad_sumsq,
    "masked_perturb_": perturb.masked_perturb_,
    "masked_restore_": perturb.masked_restore_,
}

assert set(_IMPLS) == set(SCHEMAS), "every op needs a Triton impl"
_lib = define("fsam_triton")
for _name in SCHEMAS:
    for _key in ("CUDA", "CPU"):
        _lib.impl(_name, _IMPLS[_name], _key)
register_fakes("fsam_triton")
