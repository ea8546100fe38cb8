"""fsam_kernels: fused kernels and optimizers for Fisher-mask SAM (FSAM), SAM and ASAM,
component-wise gradient-norm clipping and PAC-tuning."""
from . import ops
from ._extension import LOADED as EXTENSION_LOADED
from .backends import available_backends
from .clipping import clip_grad_norm_componentwise_
from .optim import FSAM, SAM, PACTuning, estimate_k

__all__ = ["FSAM", "SAM", "PACTuning", "estimate_k", "ops", "available_backends", "clip_grad_norm_componentwise_", "EXTENSION_LOADED"]
__version__ = "0.1.0"
