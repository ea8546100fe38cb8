"""`FSAMTrainer`: the Hugging Face Trainer with SAM/FSAM's two-pass step.

Per optimizer step (one accumulation window) the Trainer's loop hands the micro-batches to
`training_step`; this trainer runs them only when the window is complete: the first pass
over all of them, one perturbation, the second pass over the same micro-batches at it, then
the restore (`fsam_kernels.training.sharpness_passes`).  The Trainer then does what it
always does with the gradient in .grad, now the second-pass one: unscale, clip, the base
step (skipped by the GradScaler on overflow), the LR scheduler and zero_grad.
"""
import atexit
import functools

import torch
import torch.distributed as dist
from transformers import Trainer

from ..fsam import FSAM
from ..sam import SAM, SharpnessAwareOptimizer
from ..training import sharpness_passes

SHARPNESS = {"fsam": FSAM, "sam": SAM, None: None}


def _destroy_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def _destroy_process_group_at_exit():
    """Destroy the default process group at interpreter exit, before finalization starts.

    The Trainer (accelerate) creates the group and nothing destroys it.  Left to interpreter
    finalization, a gloo group's worker threads may still be releasing the last collective's
    tensors, which takes the GIL; a thread that asks for the GIL once Python has begun to
    finalize is ended with pthread_exit, whose forced unwind through a noexcept destructor
    aborts the process ("terminate called without an active exception", SIGABRT) after
    training has finished.  atexit handlers run while threads can still take the GIL."""
    atexit.register(_destroy_process_group)


class _BaseStepOptimizer(torch.optim.Optimizer):
    """What the Trainer, its GradScaler and its LR scheduler hold as the optimizer: step() is the
    base step, taken after training_step has restored the weights; state_dict() is the whole
    SAM/FSAM state (the mask included).  Like accelerate's AcceleratedOptimizer it reads every
    attribute through, so it does not call Optimizer.__init__."""

    def __init__(self, sharpness):
        self.sharpness = sharpness

    @property
    def param_groups(self):
        return self.sharpness.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.sharpness.param_groups = self.sharpness.base_optimizer.param_groups = groups

    @property
    def defaults(self):
        return self.sharpness.defaults

    @property
    def state(self):
        return self.sharpness.base_optimizer.state

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("the Trainer's optimizer takes no closure: training_step runs both passes")
        self.sharpness.second_step()

    def zero_grad(self, set_to_none=True):
        self.sharpness.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.sharpness.add_param_group(param_group)

    def state_dict(self):
        return self.sharpness.state_dict()

    def load_state_dict(self, state_dict):
        self.sharpness.load_state_dict(state_dict)

    def __repr__(self):
        return f"BaseStep({self.sharpness!r})"


class FSAMTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer step is SAM's or FSAM's.

    sharpness: "fsam" (default), "sam", or None for the Trainer's own optimizer.  The base
    optimizer is the one `args.optim` names (AdamW by default) with the Trainer's weight-decay
    groups; sharpness_kwargs go to FSAM/SAM (rho, sparsity, mask_interval, fisher, pool, ...).
    A SAM/FSAM built by hand may instead come in `optimizers=(opt, scheduler)`.

    sync_perturbation: under DDP, False (default) perturbs each replica with its own first-pass
    gradient (the SAM paper's); True all-reduces the first pass so all replicas share one.

    Gradient accumulation: the first-pass gradient is accumulated over the window's
    micro-batches, the weights are perturbed once, and the second pass accumulates over the same
    micro-batches.  max_grad_norm clips the second-pass gradient after unscaling.  fp16: the
    first pass is unscaled before first_step; an overflow skips the perturbation, the second
    pass and the base step (the scaler backs off).  The logged loss is the first pass's.
    """

    def __init__(self, *args, sharpness="fsam", sharpness_kwargs=None, sync_perturbation=False, **kwargs):
        if sharpness not in SHARPNESS:
            raise ValueError(f"sharpness must be one of {list(SHARPNESS)}, got {sharpness!r}")
        if sharpness_kwargs is not None and not isinstance(sharpness_kwargs, dict):
            raise TypeError(f"sharpness_kwargs must be a dict, got {type(sharpness_kwargs).__name__}")
        if sharpness is None and sharpness_kwargs:
            raise ValueError("sharpness_kwargs given but sharpness=None (the Trainer's own optimizer)")
        given = kwargs.get("optimizers", (None, None))[0]
        if sharpness is not None and given is not None and not isinstance(given, SharpnessAwareOptimizer):
            raise ValueError("optimizers= holds an optimizer that is not SAM/FSAM: pass sharpness=None to use it")
        self.sharpness = sharpness
        self.sharpness_kwargs = dict(sharpness_kwargs or {})
        self.sync_perturbation = bool(sync_perturbation)
        self.sharpness_optimizer = given if isinstance(given, SharpnessAwareOptimizer) else None
        self._window = []
        super().__init__(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():
            _destroy_process_group_at_exit()
        if self.sharpness_optimizer is not None:
            self.optimizer = _BaseStepOptimizer(self.sharpness_optimizer)

    def create_optimizer(self, model=None):
        if self.sharpness is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if self.optimizer_cls_and_kwargs is not None:
            base_cls, base_kwargs = self.optimizer_cls_and_kwargs
        else:
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        unsupported = {"params", "model", "optimizer_dict"} & set(base_kwargs)
        if unsupported or not isinstance(base_cls, type) or not issubclass(base_cls, torch.optim.Optimizer):
            raise ValueError(f"optim={self.args.optim!r} cannot be the base optimizer of {self.sharpness}: "
                             "it needs a torch.optim.Optimizer class built from parameter groups")
        clash = set(self.sharpness_kwargs) & set(base_kwargs)
        if clash:
            raise ValueError(f"sharpness_kwargs {sorted(clash)} are the base optimizer's: set them in "
                             "TrainingArguments")
        self.sharpness_optimizer = SHARPNESS[self.sharpness](groups, base_cls, **self.sharpness_kwargs,
                                                             **base_kwargs)
        self.optimizer = _BaseStepOptimizer(self.sharpness_optimizer)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sharpness_optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # the window is reported whole, at its last micro-batch
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        loss, _ = sharpness_passes(
            self.sharpness_optimizer, window, lambda item: super(FSAMTrainer, self).training_step(model, *item),
            no_sync=lambda: self.accelerator.no_sync(model), sync_perturbation=self.sync_perturbation,
            scaler=self.accelerator.scaler)
        return loss

    def log(self, logs, *args, **kwargs):
        opt = self.sharpness_optimizer
        if opt is not None and "loss" in logs:
            logs["skipped_perturbations"] = opt.skipped_perturbations
            density = opt.mask_density() if isinstance(opt, FSAM) else 1.0
            if density is not None:
                logs["mask_density"] = density
        super().log(logs, *args, **kwargs)
