"""`FineTuningTrainer` (alias `FSAMTrainer`): the Hugging Face Trainer with the step of a
fine-tuning method chosen by name from a registry (`METHODS`: "sam", "fsam", "pac"; more register
with `register_method`): SAM/FSAM's two-pass step, or PAC-tuning's noisy pass.  Each method's
optimizer class says what runs before the base step (`training_passes`).

Per optimizer step (one accumulation window) the Trainer's loop hands the micro-batches to
`training_step`; this trainer runs them only when the window is complete: the first pass
over all of them, one perturbation, the second pass over the same micro-batches at it, then
the restore (`fsam_kernels.optim.micro_batches.sharpness_passes`).  The Trainer then does what it
always does with the gradient in .grad, now the second-pass one: unscale, clip, the base
step (skipped by the GradScaler on overflow), the LR scheduler and zero_grad.
"""
import atexit
import functools

import torch
import torch.distributed as dist
from transformers import Trainer

from ..clipping import CLIP_MODES, clip_gradients_
from ..optim import FSAM, SAM, PACTuning
from ..sharding import end_process_group

# name -> optimizer class (built as cls(param_groups, base_optimizer_class, **kwargs)); None
# keeps the Trainer's own optimizer.
METHODS = {"sam": SAM, "fsam": FSAM, "pac": PACTuning}


def register_method(name, cls):
    """Make `FineTuningTrainer(method=name)` build `cls(param_groups, base_cls, **kwargs)`."""
    if not isinstance(name, str) or not isinstance(cls, type):
        raise TypeError("register_method(name, cls) takes a name and an optimizer class")
    METHODS[name] = cls


@functools.cache
def _destroy_process_group_at_exit():
    """Destroy the default process group at interpreter exit, before finalization starts.

    The Trainer (accelerate) creates the group and nothing destroys it.  Left to interpreter
    finalization, a gloo group's worker threads may still be releasing the last collective's
    tensors, which takes the GIL; a thread that asks for the GIL once Python has begun to
    finalize is ended with pthread_exit, whose forced unwind through a noexcept destructor
    aborts the process ("terminate called without an active exception", SIGABRT) after
    training has finished.  atexit handlers run while threads can still take the GIL."""
    atexit.register(end_process_group)


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


_UNSET = object()


class FineTuningTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer step is a fine-tuning method's (SAM's or FSAM's).

    method: a name of METHODS ("fsam", the default, or "sam"), or None for the Trainer's own
    optimizer.  The base optimizer is the one `args.optim` names (AdamW by default) with the
    Trainer's weight-decay groups; method_kwargs go to the method's optimizer (rho, sparsity,
    mask_interval, fisher, pool, ...).  An optimizer of a registered method built by hand may
    instead come in `optimizers=(opt, scheduler)`.  `sharpness=` and `sharpness_kwargs=` are the
    older names of `method=` and `method_kwargs=`.

    sync_perturbation: under DDP, None or False (default) perturbs each replica with its own
    first-pass gradient (the SAM paper's); True all-reduces the first pass so all replicas share
    one.  Under FSDP2 the perturbation is always shared (None or True).

    Gradient accumulation: the first-pass gradient is accumulated over the window's
    micro-batches, the weights are perturbed once, and the second pass accumulates over the same
    micro-batches.  max_grad_norm clips the second-pass gradient after unscaling: as a whole
    (grad_clip="global", the Trainer's own clipping) or each parameter tensor on its own
    (grad_clip="componentwise": fsam_kernels.clip_grad_norm_componentwise_ with
    c = args.max_grad_norm; with method=None too, i.e. AdamW with component-wise clipping).  fp16: the
    first pass is unscaled before first_step; an overflow skips the perturbation, the second
    pass and the base step (the scaler backs off).  The logged loss is the first pass's.
    """

    def __init__(self, *args, method=_UNSET, method_kwargs=_UNSET, sync_perturbation=None, grad_clip="global",
                 sharpness=_UNSET, sharpness_kwargs=_UNSET, **kwargs):
        names = ("method", "method_kwargs")
        if sharpness is not _UNSET or sharpness_kwargs is not _UNSET:  # the older names
            if method is not _UNSET or method_kwargs is not _UNSET:
                raise TypeError("pass method=/method_kwargs= or their older names sharpness=/sharpness_kwargs=, "
                                "not both")
            names, method, method_kwargs = ("sharpness", "sharpness_kwargs"), sharpness, sharpness_kwargs
        method = "fsam" if method is _UNSET else method
        method_kwargs = None if method_kwargs is _UNSET else method_kwargs
        if method is not None and method not in METHODS:
            raise ValueError(f"{names[0]} must be one of {list(METHODS) + [None]}, got {method!r}")
        if method_kwargs is not None and not isinstance(method_kwargs, dict):
            raise TypeError(f"{names[1]} must be a dict, got {type(method_kwargs).__name__}")
        if method is None and method_kwargs:
            raise ValueError(f"{names[1]} given but {names[0]}=None (the Trainer's own optimizer)")
        given = kwargs.get("optimizers", (None, None))[0]
        registered = tuple(METHODS.values())
        if method is not None and given is not None and not isinstance(given, registered):
            raise ValueError(f"optimizers= holds an optimizer that is not {'/'.join(c.__name__ for c in registered)}: "
                             f"pass {names[0]}=None to use it")
        if grad_clip not in CLIP_MODES:
            raise ValueError(f"grad_clip must be one of {CLIP_MODES}, got {grad_clip!r}")
        if grad_clip != "global" and not callable(getattr(Trainer, "_clip_grad_norm", None)):
            raise NotImplementedError("grad_clip='componentwise' replaces Trainer._clip_grad_norm, which this "
                                      "version of transformers does not have")
        self.grad_clip = grad_clip
        self.method = method
        self.method_kwargs = dict(method_kwargs or {})
        self.sync_perturbation = sync_perturbation
        self.method_optimizer = given if isinstance(given, registered) else None
        self._window = []
        super().__init__(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():
            _destroy_process_group_at_exit()
        if self.method_optimizer is not None:
            self.optimizer = _BaseStepOptimizer(self.method_optimizer)

    @property
    def sharpness_optimizer(self):
        """The method's optimizer (the older name of method_optimizer)."""
        return self.method_optimizer

    def create_optimizer(self, model=None):
        if self.method is None or self.optimizer is not None:
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
            raise ValueError(f"optim={self.args.optim!r} cannot be the base optimizer of {self.method}: "
                             "it needs a torch.optim.Optimizer class built from parameter groups")
        clash = set(self.method_kwargs) & set(base_kwargs)
        if clash:
            raise ValueError(f"method options {sorted(clash)} (sharpness_kwargs/method_kwargs) are the base "
                             "optimizer's: set them in TrainingArguments")
        method_kwargs = dict(self.method_kwargs)
        if METHODS[self.method] is PACTuning:  # the bound's n: the training set's size unless given
            method_kwargs.setdefault("num_examples", len(self.train_dataset))
        self.method_optimizer = METHODS[self.method](groups, base_cls, **method_kwargs, **base_kwargs)
        self.optimizer = _BaseStepOptimizer(self.method_optimizer)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, once per optimizer step after the all-reduce; component-wise
        on request.  Returns the norm of the whole gradient before clipping, for the logs."""
        if self.grad_clip == "global":
            return super()._clip_grad_norm(model)
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False)):
            # their flat parameters each hold many tensors; FSDP2's DTensors are the tensors themselves
            raise NotImplementedError("grad_clip='componentwise' under DeepSpeed or FSDP1 (FSDP2 is supported)")
        self.accelerator.unscale_gradients()  # what accelerator.clip_grad_norm_ does first
        backend = None if self.method_optimizer is None else self.method_optimizer.backend
        return clip_gradients_(model.parameters(), self.args.max_grad_norm, self.grad_clip, backend=backend)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.method_optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # the window is reported whole, at its last micro-batch
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        opt = self.method_optimizer
        if isinstance(opt, PACTuning) and opt.k_table is None and opt.stage == 1:
            self._estimate_k(model)
        loss, _ = type(opt).training_passes(
            opt, window, lambda item: super(FineTuningTrainer, self).training_step(model, *item),
            no_sync=lambda: self.accelerator.no_sync(model), sync_perturbation=self.sync_perturbation,
            scaler=self.accelerator.scaler)
        return loss

    def _estimate_k(self, model):
        """PAC-tuning's K table, once before its first step, from the per-example losses of the
        training set (cross-entropy, or the squared error of a regression) with dropout off."""
        def losses(m, batch):
            batch = self._prepare_inputs(batch)
            labels = batch.pop("labels")
            logits = m(**batch).logits.float()
            if labels.is_floating_point():
                return (logits.squeeze(-1) - labels.float()) ** 2
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

        was_training = model.training
        model.eval()
        try:
            self.method_optimizer.estimate_k(model, losses, self.get_train_dataloader(),
                                             progress=not self.args.disable_tqdm)
        finally:
            model.train(was_training)

    def log(self, logs, *args, **kwargs):
        opt = self.method_optimizer
        if opt is not None and "loss" in logs:
            for name in ("skipped_perturbations", "skipped_steps"):
                if hasattr(opt, name):
                    logs[name] = getattr(opt, name)
            if hasattr(opt, "noise_std"):  # PAC-tuning
                logs["noise_std"], logs["pac_stage"] = opt.noise_std(), opt.stage
            else:
                density = opt.mask_density() if hasattr(opt, "mask_density") else 1.0
                if density is not None:
                    logs["mask_density"] = density
        super().log(logs, *args, **kwargs)


FSAMTrainer = FineTuningTrainer  # the older name
