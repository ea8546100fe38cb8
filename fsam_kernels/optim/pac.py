"""PAC-tuning (Liu et al., EMNLP 2023) on the fused kernels: PAC-Bayes training of a noise
posterior (stage 1), then perturbed gradient descent with the learned noise (stage 2).

Per step, one forward/backward at w + n with n = exp(p) * clamp(eps, -2, 2): p is a log-std per
element, eps a standard normal regenerated from Philox (seed, step, element index) whenever it is
needed, never stored.  The perturbation keeps only a bit per element and the originals of the
entries where (w + n) - n is not w (a few percent), and the restore is bit-exact.  In stage 1 the
gradients of p, of the per-tensor prior log-std b and of the bound's w-regulariser come from one
fused pass; p and b take Adam steps of their own.  docs/algorithm.md has the formulas and where
this departs from the official code.
"""
from collections.abc import Callable, Iterable, Sequence
import math
from typing import Any, Optional

import torch
from torch.optim.optimizer import ParamsT

from .. import backends
from .._checks import check_int, check_not_skipped, check_number
from .._layout import ChunkLayout
from ..sharding import local, shard_like, sharding_of
from .composed import ComposedOptimizer
from .micro_batches import noise_passes
from .param_groups import param_groups_with_names
from .perturbation import SUMSQ_ALL, gradients_of
from .state_checks import check_optimizer_state

__all__ = ["PACTuning", "KTable", "estimate_k", "DEFAULT_PRIOR_GRID"]

# The official prior grid for K: exp(linspace(-6, -2, 8)).
DEFAULT_PRIOR_GRID = tuple(math.exp(-6.0 + 4.0 * i / 7) for i in range(8))
# The bound's constant: (KL + BOUND_CONSTANT + 3 T) / (n gamma), as the official code has it.
BOUND_CONSTANT = 10.0


class KTable:
    """K(sigma) of the bound: increasing values over a grid of prior stds, interpolated linearly
    between grid points, constant below the first and extended with the last slope above the last
    (the official code's piecewise-linear form)."""

    def __init__(self, grid, values):
        grid = [float(g) for g in grid]
        values = [float(v) for v in values]
        if not grid or len(grid) != len(values):
            raise ValueError(f"a K table needs as many values as grid points (at least one), got {len(grid)} "
                             f"and {len(values)}")
        if any(not b > a for a, b in zip(grid, grid[1:])) or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("a K table needs an increasing grid and finite values >= 0")
        self.grid, self.values = grid, values
        self._on_device = {}

    def _tensors(self, device):
        """The grid and values on `device`, copied there once (a copy per step would sync)."""
        if device not in self._on_device:
            self._on_device[device] = (torch.tensor(self.grid, dtype=torch.float64, device=device),
                                       torch.tensor(self.values, dtype=torch.float64, device=device))
        return self._on_device[device]

    def __call__(self, x):
        """(K(x), dK/dx) for a 0-dim float64 device tensor, without a sync."""
        grid, values = self._tensors(x.device)
        if len(self.grid) == 1:
            return values[0] + 0 * x, torch.zeros_like(x)
        i = (torch.searchsorted(grid, x.reshape(1)) - 1).clamp(0, len(self.grid) - 2)[0]
        slope = (values[i + 1] - values[i]) / (grid[i + 1] - grid[i])
        below = x < grid[0]
        return (torch.where(below, values[0], values[i] + slope * (x - grid[i])),
                torch.where(below, torch.zeros_like(slope), slope))

    def state(self):
        return {"grid": list(self.grid), "values": list(self.values)}


def perturb_with_noise(ops_, layout, params, noise, status):
    """w <- w + n for noise = (log_stds, bases, seed, step, max_noise), with `ops_` a backend's
    pac_noise_mask and pac_perturb_ and `layout` the params' ChunkLayout: the mask of the entries
    to save, the saved buffer sized to it (one sync, which also reads `status`, the int32 [1]
    that the pac_* calls given it set where they skipped), the perturbation.  Returns (bits,
    offsets, saved), what pac_restore_ takes with the same status."""
    bits, counts = ops_["pac_noise_mask"](params, *noise)
    offsets, total = layout.save_offsets(counts)
    total, skipped = torch.stack([total, status[0].to(total.dtype)]).tolist()
    check_not_skipped(skipped)
    saved = torch.empty(total, dtype=torch.uint8, device=offsets.device)
    ops_["pac_perturb_"](params, *noise, bits, offsets, saved, status)
    return bits, offsets, saved


def estimate_k(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], data: Iterable[Any], *,
               params: Optional[Sequence[torch.Tensor]] = None, prior_grid: Sequence[float] = DEFAULT_PRIOR_GRID,
               samples: int = 10, gamma: float = 10.0, seed: int = 0, backend: Optional[str] = "auto",
               progress: bool = True) -> "KTable":
    """The K table of the bound, estimated once before training as the official code does: for
    each prior std sigma of `prior_grid`, `samples` models w + sigma * eps (eps standard normal,
    unclamped) give the losses err of the examples of `data`; K(sigma) is the smallest K with
    exp(1.5 gamma^2 K^2) >= mean exp(gamma (mean err - err)), in closed form; the values are
    then made increasing.  loss_fn(model, batch) returns the batch's per-example losses (or
    one mean, counted as one example).  params: the tensors to perturb (default: the model's
    parameters that require grad); they are restored bit-exactly after each sample.  The model
    runs as it is (train or eval mode), under no_grad.  Under FSDP2 every process runs this with
    its own share of the examples (the same number of batches: each forward is collective); the
    noise is the single-process one and the losses of all processes make K."""
    grid = [float(g) for g in prior_grid]
    if not grid:
        raise ValueError("prior_grid is empty: K needs at least one prior std")
    if any(not (math.isfinite(g) and g > 0) for g in grid):
        raise ValueError(f"prior_grid must hold finite stds > 0, got {grid}")
    check_int("samples", samples, 1)
    check_number("gamma", gamma, 0.0, low_open=True)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("estimate_k: no parameters to perturb")
    device = params[0].device
    backend = backends.resolve(backend, device)
    ops_ = {name: backends.op(name, backend) for name in ("pac_noise_mask", "pac_perturb_", "pac_restore_")}
    sharding = sharding_of(params)
    bases = sharding.offsets(params)
    params = [local(p) for p in params]
    layout = ChunkLayout(params)
    status = torch.zeros(1, dtype=torch.int32, device=device)
    bar = _progress(len(grid) * samples, "estimating K", progress)
    values = []
    with torch.no_grad():
        for g_index, sigma in enumerate(grid):
            log_std = [torch.full((1,), math.log(sigma), dtype=torch.float32, device=device)] * len(params)
            losses = []
            for s in range(samples):
                noise = (log_std, bases, int(seed), g_index * samples + s, math.inf)
                bits, offsets, saved = perturb_with_noise(ops_, layout, params, noise, status)
                try:
                    losses.append(torch.cat([loss_fn(model, batch).detach().double().reshape(-1) for batch in data]))
                finally:
                    ops_["pac_restore_"](params, *noise, bits, offsets, saved, status)
                bar.update(1)
            # log mean exp(gamma (mu - err)) >= 0 (Jensen), so K is real
            log_m = _log_mean_exp_gap(torch.cat(losses), gamma, sharding)
            values.append(math.sqrt(max(log_m, 0.0) * 2.0 / (3.0 * gamma * gamma)))
    bar.close()
    check_not_skipped(int(status))
    increasing = [max(values[: i + 1]) for i in range(len(values))]
    return KTable(grid, increasing)


def _log_mean_exp_gap(err, gamma, sharding):
    """log mean exp(gamma (mean err - err)) over the losses of every process, in float64."""
    moments = sharding.all_reduce_(torch.stack([err.sum(), torch.tensor(float(err.numel()), dtype=torch.float64,
                                                                          device=err.device)]))
    if moments[1] == 0:
        raise ValueError("estimate_k: data gave no losses")
    z = gamma * (moments[0] / moments[1] - err)
    top = sharding.all_reduce_(z.max() if z.numel() else torch.tensor(-math.inf, dtype=torch.float64,
                                                                     device=err.device), op="max")
    total = sharding.all_reduce_(torch.exp(z - top).sum())
    return float(top + torch.log(total) - torch.log(moments[1]))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, desc, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers, not with torch
        return _NoBar()
    return tqdm(total=total, desc=desc)


class PACTuning(ComposedOptimizer):
    """PAC-tuning around a base optimizer (davda54/sam's shape: a base optimizer class, shared
    `param_groups`, params as tensors, groups or `named_parameters()`).

        opt.perturb()                      # w <- w + exp(p) * clamp(eps, -2, 2)
        loss_fn(model(x), y).backward()    # the gradient at the noisy point
        opt.step()                         # exact restore; stage 1: p, b, the bound's w-gradient; base step
        opt.zero_grad()

    or `opt.step(closure)` with a closure that runs the forward and backward.  `restore()` puts
    the weights back (and, in stage 1, adds the bound's w-gradient to .grad) without the updates;
    step() then takes only those.

    num_examples: the training-set size n of the bound; stage1_steps: steps of stage 1 (then
    p and b freeze); gamma: the bound's gamma (a constant, as in the official code); seed: the
    noise's Philox key.  The K table (`estimate_k`, or `opt.estimate_k(model, loss_fn, data)`)
    must be set before a stage-1 step; prior_grid and k_samples are the estimate's (the official
    exp(linspace(-6, -2, 8)) and 10 models per prior std).  Per param group (defaults here): noise_lr, the Adam
    learning rate of p and b (official: 0.1); log_std_power c: p and b start at
    c * log(mean |w|) over the group (official: 2 for the encoder, 1 for the head).
    max_noise: the clamp of eps.  freeze: parameters whose name contains one of these strings
    are frozen (requires_grad=False) and left out, as the official code does with embeddings;
    () freezes nothing (unnamed parameters are never frozen).

    Non-finite gradients skip the whole update (p, b and the base step) with the weights
    restored; `skipped_steps` counts them.  Each step syncs twice: to size the saved
    originals (perturb) and to read the finite flag (step)."""

    training_passes = staticmethod(noise_passes)  # what a training loop runs before the updates

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer], *, num_examples: int,
                 stage1_steps: int, gamma: float = 10.0, seed: int = 0, backend: Optional[str] = "auto",
                 k_table: Optional["KTable"] = None, prior_grid: Sequence[float] = DEFAULT_PRIOR_GRID,
                 k_samples: int = 10, noise_lr: float = 0.1, log_std_power: float = 2.0,
                 noise_betas: tuple[float, float] = (0.9, 0.999), max_noise: float = 2.0,
                 freeze: Sequence[str] = ("embed",), **base_kwargs: Any):
        check_int("num_examples", num_examples, 1)
        check_int("stage1_steps", stage1_steps, 0)
        check_number("gamma", gamma, 0.0, low_open=True)
        check_int("seed", seed, 0, 2 ** 63)
        check_number("noise_lr", noise_lr, 0.0)
        check_number("log_std_power", log_std_power, 0.0, low_open=True)
        check_number("max_noise", max_noise, 0.0, low_open=True, finite=False)
        check_int("k_samples", k_samples, 1)
        prior_grid = tuple(float(g) for g in prior_grid)
        if not prior_grid:
            raise ValueError("prior_grid is empty: K needs at least one prior std")
        if not (isinstance(noise_betas, (tuple, list)) and len(noise_betas) == 2 and
                all(isinstance(b, (int, float)) and 0 <= b < 1 for b in noise_betas)):
            raise ValueError(f"noise_betas must be two numbers in [0, 1), got {noise_betas!r}")
        if isinstance(freeze, str):
            freeze = (freeze,)
        freeze = () if freeze is None else freeze
        if not all(isinstance(f, str) for f in freeze):
            raise TypeError("freeze must be a tuple of name substrings")
        if k_table is not None and not isinstance(k_table, KTable):
            raise TypeError(f"k_table must be a KTable (from estimate_k), got {type(k_table).__name__}")
        groups, names = param_groups_with_names(params)
        groups, names = self._trainable(groups, names, tuple(freeze))
        for g in groups:
            g.setdefault("noise_lr", noise_lr)
            g.setdefault("log_std_power", log_std_power)
            check_number("noise_lr", g["noise_lr"], 0.0)
            check_number("log_std_power", g["log_std_power"], 0.0, low_open=True)
        super().__init__(groups, names, base_optimizer, base_kwargs)
        self.backend = backends.resolve(backend, self._device)
        self._op = {name: backends.op(name, self.backend)
                    for name in ("pac_noise_mask", "pac_perturb_", "pac_restore_", "pac_bound_grads_", "grad_sumsq")}
        self.num_examples, self.stage1_steps, self.gamma = int(num_examples), int(stage1_steps), float(gamma)
        self.seed, self.max_noise, self.k_table = int(seed), float(max_noise), k_table
        self.prior_grid, self.k_samples = prior_grid, int(k_samples)
        self._bases = self._sharding.offsets(self._params)  # global element indices under FSDP2 too
        self._layout = ChunkLayout(self._locals)
        self._status = torch.zeros(1, dtype=torch.int32, device=self._device)  # see perturb_with_noise
        self._numels = torch.tensor([p.numel() for p in self._params], dtype=torch.float64, device=self._device)
        self._init_noise(noise_betas)
        self._step = 0
        self._perturbed = None  # (bits, offsets, saved) between perturb() and the restore
        self._restored = None  # after restore(): whether the gradients were finite (device bool)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._bound = None

    @staticmethod
    def _trainable(groups, names, freeze):
        """The groups without frozen parameters (frozen here when a name matches `freeze`)."""
        kept_groups, kept_names, i = [], [], 0
        for g in groups:
            kept = []
            for p in g["params"]:
                name = names[i]
                i += 1
                if name is not None and any(f in name for f in freeze):
                    p.requires_grad_(False)
                if p.requires_grad:
                    kept.append(p)
                    kept_names.append(name)
            if kept:
                kept_groups.append({**g, "params": kept})
        if not kept_groups:
            raise ValueError("PACTuning: no trainable parameter left (all frozen or requires_grad=False)")
        return kept_groups, kept_names

    def _init_noise(self, betas):
        """p and b at c log(mean |w|) per group; the anchors w0 and the Adam of p and b for stage 1."""
        self.log_stds, self.prior_log_stds, noise_groups = [], [], []
        for g in self.param_groups:
            total = sum(local(p).detach().double().abs().sum() for p in g["params"])
            total = self._sharding.all_reduce_(torch.as_tensor(total, dtype=torch.float64, device=self._device))
            count = sum(p.numel() for p in g["params"])
            start = float(g["log_std_power"] * torch.log(total / max(count, 1)).clamp(min=-80.0))
            p_group = [torch.full(local(p).shape, start, dtype=torch.float32, device=self._device)
                       for p in g["params"]]
            b_group = torch.full((len(g["params"]),), start, dtype=torch.float32, device=self._device)
            self.log_stds += p_group
            self.prior_log_stds.append(b_group)
            noise_groups.append({"params": p_group + [b_group], "lr": g["noise_lr"]})
        if self.stage1_steps > 0:
            self.anchors = [p.detach().clone() for p in self._locals]
            self._log_std_grads = [torch.empty_like(s) for s in self.log_stds]
            self.noise_optimizer = torch.optim.Adam(noise_groups, betas=tuple(betas), eps=1e-8)
        else:
            self.anchors = self._log_std_grads = self.noise_optimizer = None

    def add_param_group(self, param_group):
        if hasattr(self, "log_stds"):
            raise RuntimeError("add_param_group() after construction is not supported: build a new optimizer "
                               "over all the parameters")
        super().add_param_group(param_group)

    @property
    def stage(self) -> int:
        """1 while p and b are trained (the first stage1_steps steps), then 2."""
        return 1 if self._step < self.stage1_steps else 2

    @property
    def skipped_steps(self) -> int:
        """Steps whose update non-finite gradients skipped (syncs)."""
        return int(self._skipped)

    @torch.no_grad()
    def noise_std(self) -> float:
        """The mean of the noise's std exp(p) over every element (for logging; one sync)."""
        total = sum(torch.exp(s).sum(dtype=torch.float64) for s in self.log_stds)
        total = self._sharding.all_reduce_(torch.as_tensor(total, dtype=torch.float64, device=self._device))
        return float(total) / sum(p.numel() for p in self._params)

    def estimate_k(self, model, loss_fn, data, progress=True):
        """Estimate the K table over this optimizer's parameters, its prior_grid and k_samples (see
        estimate_k), and keep it."""
        self.k_table = estimate_k(model, loss_fn, data, params=self._params, prior_grid=self.prior_grid,
                                  samples=self.k_samples, gamma=self.gamma, seed=self.seed, backend=self.backend,
                                  progress=progress)
        return self.k_table

    # ---- the step ----------------------------------------------------------------------------

    def _noise(self):
        return (self.log_stds, self._bases, self.seed, self._step, self.max_noise)

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + exp(p) * clamp(eps, -max_noise, max_noise) with this step's eps."""
        if self._perturbed is not None:
            raise RuntimeError("perturb() called twice: step() or restore() comes between")
        if self._restored is not None:
            raise RuntimeError("perturb() after restore(): call step() to finish the step first")
        if self.stage == 1 and self.k_table is None:
            raise RuntimeError("stage 1 needs the K table: call opt.estimate_k(model, loss_fn, data) or pass "
                               "k_table= (fsam_kernels.optim.pac.estimate_k)")
        self._perturbed = perturb_with_noise(self._op, self._layout, self._locals, self._noise(),  # perturb's sync
                                             self._status)

    def held_bytes(self):
        """Bytes held between perturb() and the restore: the mask bits and the saved originals."""
        if self._perturbed is None:
            return 0
        bits, offsets, saved = self._perturbed
        return bits.numel() + offsets.numel() * offsets.element_size() + saved.numel()

    @torch.no_grad()
    def cancel(self):
        """Put back the exact weights of before perturb() and drop the step (after an error in its
        forward or backward): the next step draws this step's noise again."""
        if self._perturbed is None:
            raise RuntimeError("cancel() without perturb()")
        bits, offsets, saved = self._perturbed
        self._op["pac_restore_"](self._locals, *self._noise(), bits, offsets, saved, self._status)
        self._perturbed = None

    @torch.no_grad()
    def restore(self):
        """Put back the exact weights of before perturb(); in stage 1 also compute the gradients of
        p and b and add the bound's w-regulariser to .grad.  step() then takes only the updates."""
        if self._perturbed is None:
            raise RuntimeError("restore() without perturb(), or twice")
        bits, offsets, saved = self._perturbed
        self._op["pac_restore_"](self._locals, *self._noise(), bits, offsets, saved, self._status)
        self._perturbed = None
        if self.stage == 1:
            self._restored = self._stage1_gradients()
        else:
            grads = gradients_of(self._params)
            sumsq = self._op["grad_sumsq"](self._locals, grads, None, False, 0.0)
            self._restored = torch.isfinite(self._sharding.all_reduce_(sumsq)[SUMSQ_ALL])

    def _stage1_gradients(self):
        """The fused pass, then the bound and b's gradient from its per-tensor sums (on the device).
        Returns the finite flag of the loss gradient."""
        for p in self._params:  # the pass adds the regulariser into .grad: it must be there, contiguous
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        grads = gradients_of(self._params)
        prior = torch.cat(self.prior_log_stds)
        coef = 1.0 / (self.num_examples * self.gamma)
        sums = self._op["pac_bound_grads_"](self._locals, grads, self.log_stds, self._log_std_grads, self.anchors,
                                            prior, self._bases, self.seed, self._step, self.max_noise, coef)
        self._sharding.all_reduce_(sums)
        bound, grad_b = self._bound_and_grad(sums, prior)
        self._bound = bound
        for s, grad in zip(self.log_stds, self._log_std_grads):
            s.grad = grad
        for b, grad in zip(self.prior_log_stds, torch.split(grad_b.float(), [b.numel() for b in self.prior_log_stds])):
            b.grad = grad
        return torch.isfinite(sums[2].sum())

    def _bound_and_grad(self, sums, prior):
        """The bound 1.5 K(e^mean b)^2 gamma + (KL + 10 + 3T) / (n gamma) and its gradient in b,
        float64 on the device (docs/algorithm.md, PAC-tuning)."""
        s, d, _, p_sum = sums
        b = prior.double()
        t = self._numels
        count = b.numel()
        decay = torch.exp(-2.0 * b) * (s + d)
        kl = 0.5 * (decay.sum() - 2.0 * p_sum.sum() + (2.0 * b * t).sum() - t.sum())
        x = torch.exp(b.mean())
        k, slope = self.k_table(x)
        coef = 1.0 / (self.num_examples * self.gamma)
        bound = 1.5 * k * k * self.gamma + (kl + BOUND_CONSTANT + 3.0 * count) * coef
        grad_b = 3.0 * self.gamma * k * slope * x / count + (t - decay) * coef
        return bound, grad_b

    @torch.no_grad()
    def bound(self) -> torch.Tensor:
        """The bound at the current p, b and w (a 0-dim float64 device tensor; stage 1 only)."""
        if self.anchors is None:
            raise RuntimeError("bound() needs stage 1's anchors: this optimizer has no stage 1 (stage1_steps=0) "
                               "or has left it")
        if self.k_table is None:
            raise RuntimeError("bound() needs the K table (estimate_k)")
        prior = torch.cat(self.prior_log_stds)
        sums = self._op["pac_bound_grads_"](self._locals, [], self.log_stds, [], self.anchors, prior, self._bases,
                                            self.seed, self._step, self.max_noise, 0.0)
        return self._bound_and_grad(self._sharding.all_reduce_(sums), prior)[0]

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """The updates of one step: restore (unless restore() came first), then, with finite
        gradients, stage 1's Adam steps of p and b and the base optimizer's step.  With a closure,
        perturb() and the closure (forward and backward) come first; returns its loss."""
        loss = None
        if closure is not None:
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.cancel()
                raise
        if self._perturbed is None and self._restored is None:
            raise RuntimeError("step() without perturb(): perturb the weights, run the forward and backward, "
                               "then step()")
        if self._perturbed is not None:
            self.restore()
        finite, self._restored = self._restored, None
        if bool(finite):  # the one sync of step
            with torch.no_grad():
                if self.stage == 1:
                    self.noise_optimizer.step()
                self._base_step()
        else:
            self._skipped += 1
            self._opt_called = True  # a skipped step still counts as one for LR schedulers (see _base_step)
        self._step += 1
        if self._step == self.stage1_steps:
            self._enter_stage2()
        return loss

    second_step = step  # the two-pass optimizers' last call: the Trainer drives both alike

    def _enter_stage2(self):
        """p and b are final: drop what only stage 1 needs."""
        self.anchors = self._log_std_grads = self.noise_optimizer = None
        for s in self.log_stds:
            s.grad = None
        for b in self.prior_log_stds:
            b.grad = None

    # ---- state -------------------------------------------------------------------------------

    STATE_KEY = "pac"
    MADE_BY = "PACTuning"

    def _check_between_steps(self, call):
        if self._perturbed is not None or self._restored is not None:
            raise RuntimeError(f"{call} in the middle of a step (after perturb() or restore())")

    def _signature(self):
        return [(tuple(p.shape), str(p.dtype)) for p in self._params]

    def _own_state(self):
        clone = lambda ts: None if ts is None else [t.detach().clone() for t in ts]  # noqa: E731
        return {"type": type(self).__name__, "step": self._step, "seed": self.seed, "skipped": self._skipped.clone(),
                "layout": self._signature(), "log_stds": clone(self.log_stds),
                "prior_log_stds": clone(self.prior_log_stds), "anchors": clone(self.anchors),
                "noise_optimizer": None if self.noise_optimizer is None else self.noise_optimizer.state_dict(),
                "k_table": None if self.k_table is None else self.k_table.state()}

    def _layout_matches(self, layout):
        return [tuple(x) for x in layout] == self._signature()

    def _check_tensors(self, name, saved, like, same_dtype):
        """A saved list shaped like `like` (and of its dtypes, or float32), finite."""
        if not isinstance(saved, list) or len(saved) != len(like):
            raise ValueError(f"the saved {name} must be a list of {len(like)} tensors")
        for i, (s, t) in enumerate(zip(saved, like)):
            dtype = t.dtype if same_dtype else torch.float32
            if not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != dtype:
                raise ValueError(f"the saved {name}[{i}] must be a {dtype} tensor of shape {tuple(t.shape)}")
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"the saved {name}[{i}] is not finite")

    def _in_stage1(self, pac):
        return pac["step"] < self.stage1_steps

    def _check_own_state(self, pac):
        if pac.get("seed") != self.seed:
            raise ValueError(f"this state was saved with seed {pac.get('seed')!r}, this optimizer has seed {self.seed}")
        self._check_tensors("log_stds", pac.get("log_stds"), self.log_stds, same_dtype=False)
        self._check_tensors("prior_log_stds", pac.get("prior_log_stds"), self.prior_log_stds, same_dtype=False)
        in_stage1 = self._in_stage1(pac)
        if in_stage1 and (pac.get("anchors") is None or pac.get("noise_optimizer") is None):
            raise ValueError("this state left stage 1 but this optimizer's stage1_steps puts it in stage 1")
        if in_stage1 and self.anchors is None:
            raise ValueError("this optimizer has left stage 1 and dropped its anchors: load a stage-1 state into a "
                             "new optimizer")
        if in_stage1:
            self._check_tensors("anchors", pac["anchors"], self.anchors, same_dtype=True)
            check_optimizer_state("the saved noise optimizer's state", pac["noise_optimizer"],
                                  [p for g in self.noise_optimizer.param_groups for p in g["params"]])
        if not isinstance(pac.get("k_table"), (dict, type(None))):
            raise ValueError("the saved k_table must be a dict (KTable.state()) or None")
        if pac["k_table"] is not None:
            KTable(**pac["k_table"])

    def _inner_optimizers(self, pac):
        return [self.base_optimizer] + ([self.noise_optimizer] if self._in_stage1(pac) else [])

    def _load_own_state(self, pac):
        in_stage1 = self._in_stage1(pac)
        if in_stage1:
            self.noise_optimizer.load_state_dict(pac["noise_optimizer"])
        # nothing below can fail: everything was checked
        with torch.no_grad():
            for dst, src in zip(self.log_stds + self.prior_log_stds, pac["log_stds"] + pac["prior_log_stds"]):
                dst.copy_(src)
            if in_stage1:
                for dst, src in zip(self.anchors, pac["anchors"]):
                    dst.copy_(src)
        self._step = pac["step"]
        self._skipped = pac["skipped"].to(self._device, torch.int64).clone()
        self.k_table = None if pac["k_table"] is None else KTable(**pac["k_table"])
        if not in_stage1:
            self._enter_stage2()

    # ---- torch.distributed.checkpoint (fsam_kernels/optim/checkpoint.py) --------------------------

    def _sharded(self, tensors):
        """{index: the per-element tensor of parameter i as sharded as the parameter}."""
        return {str(i): shard_like(t, p) for i, (t, p) in enumerate(zip(tensors, self._params))}

    def checkpoint_state(self):
        """The own state in the form torch.distributed.checkpoint saves: p, the anchors and the Adam
        moments of p sharded like their parameters (DTensors under FSDP2), every Adam entry present
        (zeros before the first step, which Adam's own start equals)."""
        pac = super().checkpoint_state()
        pac["log_stds"] = self._sharded(pac["log_stds"])
        pac["prior_log_stds"] = {str(i): b for i, b in enumerate(pac["prior_log_stds"])}
        if pac["anchors"] is not None:
            pac["anchors"] = self._sharded(pac["anchors"])
            saved = pac["noise_optimizer"]
            owner = {id(s): p for s, p in zip(self.log_stds, self._params)}
            flat = [t for g in self.noise_optimizer.param_groups for t in g["params"]]
            entries = {}
            for i, t in enumerate(flat):
                entry = saved["state"].get(i) or {"step": torch.zeros(()), "exp_avg": torch.zeros_like(t),
                                                  "exp_avg_sq": torch.zeros_like(t)}
                p = owner.get(id(t))
                entries[str(i)] = {k: v if p is None or k == "step" else shard_like(v, p) for k, v in entry.items()}
            pac["noise_optimizer"] = {"state": entries, "param_groups": saved["param_groups"]}
        return pac

    def checkpoint_template(self, step):
        """What dcp.load fills with a checkpoint saved at `step`: without stage 1's entries past it."""
        pac = self.checkpoint_state()
        if step >= self.stage1_steps:
            pac["anchors"] = pac["noise_optimizer"] = None
        return pac

    def load_checkpoint_state(self, pac, load_base):
        pac = dict(pac)
        pac["log_stds"] = [local(pac["log_stds"][str(i)]) for i in range(len(self._params))]
        pac["prior_log_stds"] = [pac["prior_log_stds"][str(i)] for i in range(len(self.prior_log_stds))]
        if pac["anchors"] is not None:
            pac["anchors"] = [local(pac["anchors"][str(i)]) for i in range(len(self._params))]
            saved = pac["noise_optimizer"]
            pac["noise_optimizer"] = {"state": {int(i): {k: local(v) for k, v in e.items()}
                                                for i, e in saved["state"].items()},
                                      "param_groups": saved["param_groups"]}
        super().load_checkpoint_state(pac, load_base)
