"""The two passes of a SAM/FSAM step over the micro-batches of one optimizer step, for
training loops with gradient accumulation, a GradScaler and DistributedDataParallel.

Semantics: the first-pass gradient is accumulated over all the micro-batches, the weights
are perturbed once from it, and the second pass accumulates over the same micro-batches at
that one perturbation.  Under DDP the perturbation is per replica by default (the SAM
paper's: each replica perturbs with its own gradient, the first pass never all-reduces);
sync_perturbation=True all-reduces the first pass, so every replica takes the same one.
Under FSDP2 (sharded parameters) it is always synchronized: a process holds one shard of the
weights, so all of them perturb one model, from the reduce-scattered (whole-batch) gradient.
The second-pass gradient, the one the base optimizer uses, is always all-reduced.
"""
import contextlib

from ..clipping import CLIP_MODES, clip_gradients_
from ..sharding import LOCAL


def _accumulate(micro_batches, backward, no_sync, sync_last):
    loss = None
    for i, batch in enumerate(micro_batches):
        syncs = no_sync is None or (sync_last and i == len(micro_batches) - 1)
        with contextlib.nullcontext() if syncs else no_sync():
            step_loss = backward(batch)
        loss = step_loss if loss is None else loss + step_loss
    return loss


def synchronized(optimizer, sync_perturbation):
    """Whether the first pass is all-reduced: sync_perturbation, None meaning per replica under
    DDP and synchronized under FSDP2, where per replica does not exist."""
    if optimizer._sharding is LOCAL:
        return bool(sync_perturbation)
    if sync_perturbation is not None and not sync_perturbation:
        raise ValueError("sync_perturbation=False (per replica) needs every replica to hold the whole model; under "
                         "FSDP2 each process holds a shard and all perturb one model: pass None or True")
    return True


def sharpness_passes(optimizer, micro_batches, backward, *, no_sync=None, sync_perturbation=None, scaler=None):
    """Both passes of one step; the caller then clips and takes the base step.

    backward(batch) runs the forward and backward of one micro-batch (its loss already divided
    for the accumulation and scaled by `scaler`) and returns the detached loss.  no_sync: a
    factory of the context that suspends the gradient all-reduce (DDP's `model.no_sync`), None
    when not distributed.  The forward runs inside it, as DDP requires.

    Leaves the second-pass gradient in .grad and the weights restored; returns (the first-pass
    loss summed over the micro-batches, whether the second pass ran).  With a scaler, a
    first-pass overflow skips the perturbation and the second pass: the non-finite gradient
    stays in .grad, so the scaler's unscale_ finds it, skips the base step and backs off."""
    if not micro_batches:
        raise ValueError("micro_batches is empty: a step needs at least one micro-batch")
    loss = _accumulate(micro_batches, backward, no_sync, sync_last=synchronized(optimizer, sync_perturbation))
    finite = optimizer.first_step(scaler=scaler)
    if scaler is not None and not bool(finite):  # one sync per step, as GradScaler.step's own
        optimizer.restore()
        return loss, False
    optimizer.zero_grad()
    _accumulate(micro_batches, backward, no_sync, sync_last=True)
    optimizer.restore()
    return loss, True


def noise_passes(optimizer, micro_batches, backward, *, no_sync=None, sync_perturbation=None, scaler=None):
    """PAC-tuning's one pass of a step (fsam_kernels.PACTuning): perturb, the forward and backward
    of every micro-batch at the noisy weights (the gradient all-reduced at the last), restore, which
    in stage 1 also adds the bound's gradients.  The caller then clips and takes the updates.

    The noise depends only on (seed, step, element), so DDP replicas draw the same one:
    sync_perturbation changes nothing here.  Returns (the loss summed over the micro-batches, True)."""
    if not micro_batches:
        raise ValueError("micro_batches is empty: a step needs at least one micro-batch")
    if scaler is not None:
        raise NotImplementedError("PAC-tuning with a GradScaler (fp16) is not supported: its stage-1 gradients "
                                  "need the unscaled gradient; train in bf16 or fp32")
    optimizer.perturb()
    try:
        loss = _accumulate(micro_batches, backward, no_sync, sync_last=True)
    except BaseException:
        optimizer.cancel()
        raise
    optimizer.restore()
    return loss, True


def sharpness_step(optimizer, micro_batches, loss_fn, *, model=None, scaler=None, max_grad_norm=None,
                   clip="global", sync_perturbation=None):
    """One whole SAM/FSAM step for a plain training loop.

    loss_fn(batch) returns the mean loss of one micro-batch (the forward included); the
    gradient is averaged over the micro-batches.  model: the DistributedDataParallel (or any
    module with `no_sync`) when training distributed.  max_grad_norm clips the second-pass
    gradient (the one the base optimizer uses) after unscaling and after the all-reduce: as a
    whole with clip="global" (torch.nn.utils.clip_grad_norm_), each tensor on its own with
    clip="componentwise" (fsam_kernels.clip_grad_norm_componentwise_).  sync_perturbation: see
    the module's docstring (None: per replica under DDP, synchronized under FSDP2).  With a scaler,
    scaler.update() is called here.  Returns the mean first-pass loss (detached)."""
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    n = len(micro_batches)

    def backward(batch):
        loss = loss_fn(batch) / n
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach()

    loss, second_pass_ran = sharpness_passes(optimizer, micro_batches, backward,
                                             no_sync=getattr(model, "no_sync", None),
                                             sync_perturbation=sync_perturbation, scaler=scaler)
    if max_grad_norm is not None and second_pass_ran:
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_gradients_(params, max_grad_norm, clip, backend=optimizer.backend)
    optimizer.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return loss
