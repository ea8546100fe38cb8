"""fsam_kernels: fused kernels and optimizers for Fisher-mask SAM (FSAM), SAM and ASAM, and
component-wise gradient-norm clipping."""
from . import ops
from ._extension import LOADED as EXTENSION_LOADED
from .backends import available_backends
from .clipping import clip_grad_norm_componentwise_
from .fsam import FSAM
from .sam import SAM

__all__ = ["FSAM", "SAM", "ops", "available_backends", "clip_grad_norm_componentwise_", "EXTENSION_LOADED"]
__version__ = "0.1.0"
