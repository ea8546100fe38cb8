"""The optimizers composed around a base optimizer on the fused kernels: SAM and ASAM, FSAM,
PAC-tuning; the micro-batch drivers of their passes and their torch.distributed.checkpoint
entry points (fsam_kernels.optim.checkpoint)."""
from .composed import ComposedOptimizer
from .fsam import FSAM
from .micro_batches import noise_passes, sharpness_passes, sharpness_step
from .pac import KTable, PACTuning, estimate_k
from .sam import SAM
from .two_pass import SharpnessAwareOptimizer

__all__ = ["ComposedOptimizer", "SharpnessAwareOptimizer", "SAM", "FSAM", "PACTuning", "KTable", "estimate_k",
           "sharpness_step", "sharpness_passes", "noise_passes"]
