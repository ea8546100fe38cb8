"""FSAM (Zhong et al., 2022): SAM whose perturbation touches only the parameters with the
largest Fisher information, selected by a global top-k over the pool (docs/algorithm.md).

`FisherMask` is the perturbation policy (the Fisher estimates and the mask); `FSAM` composes it
with the two-pass protocol of two_pass.py."""
from collections.abc import Callable
from fractions import Fraction
import math
from typing import Any, Optional, Union

import torch
from torch.optim.optimizer import ParamsT

from .. import backends, ops, radix_topk
from .._checks import check_int, check_number
from ..sharding import LOCAL, local, shard_like
from .perturbation import SUMSQ_ALL, gradients_of
from .sam import SharpnessScale
from .two_pass import SharpnessAwareOptimizer

FISHER_ESTIMATES = ("batch", "ema", "samples")
OUTSIDE_POOL = ("dense", "none")


def fsam4plm(name, param):
    """The official FSAM code's pool: every parameter but biases and embeddings (which it
    perturbs densely)."""
    return "bias" not in name and "embed" not in name


POOL_PRESETS = {"fsam4plm": fsam4plm}


def pool_predicate(pool):
    """The (name, param) -> bool filter for FSAM's `pool` argument (None: every parameter)."""
    if pool is None:
        return None
    if isinstance(pool, str):
        if pool not in POOL_PRESETS:
            raise ValueError(f"pool must be a callable (name, param) -> bool or one of {sorted(POOL_PRESETS)}, "
                             f"got {pool!r}")
        return POOL_PRESETS[pool]
    if not callable(pool):
        raise TypeError(f"pool must be a callable (name, param) -> bool or a preset name, got {type(pool).__name__}")
    return pool


class FisherMask(SharpnessScale):
    """SAM's scale on the entries of a mask of the k entries of the pool (the roles' masked
    tensors) with the largest Fisher estimate, rebuilt every `mask_interval` steps (see FSAM)."""

    def __init__(self, *, k, mask_interval, fisher, fisher_decay, exact_rollback, backend, pool, **scale):
        super().__init__(**scale)
        self.k, self.mask_interval, self.fisher, self.fisher_decay = k, mask_interval, fisher, fisher_decay
        self.exact_rollback = exact_rollback
        self.backend = backend
        self._fisher_op = backends.op("fisher_accumulate_", backend)
        self._sumsq_op = backends.op("grad_sumsq", backend)
        self.estimate = ([torch.zeros_like(p, dtype=torch.float32) for p in pool]
                         if fisher in ("ema", "samples") else None)
        self.samples = 0
        self.steps_since_mask = 0

    def rebuild(self, roles, scores, absolute, check_nan=True, first_hist=None, finite=None):
        """The mask of the top k of `scores` (None: a tensor without gradient scores 0), taken
        unless the device flag `finite` is False; returns whether it was."""
        pool = roles.tensors["masked"]
        scores = [torch.zeros_like(p) if s is None else s for p, s in zip(pool, scores)]
        bits, counts = radix_topk.topk_mask(scores, self.k, backend=self.backend, absolute=absolute,
                                            check_nan=check_nan, first_hist=first_hist,
                                            exchange=roles.sharding.exchange(roles.mask_layout))
        taken = roles.set_mask(bits, counts, finite)
        if taken:
            self.steps_since_mask = 0
        return taken

    def _due(self, roles):
        if roles.mask_bits is None:
            return True
        return self.fisher != "samples" and self.steps_since_mask >= self.mask_interval

    def prepare(self, roles, grads, finite):
        due = self._due(roles)
        pool_grads = grads["masked"]
        # On a mask step the accumulation also counts the top-k's first radix digit.
        first_hist = None
        if self.fisher == "ema":
            if due:
                first_hist = ops.new_first_hist(roles.device)
            self._fisher_op(self.estimate, pool_grads, self.fisher_decay, 1.0 - self.fisher_decay, ~finite, first_hist)
        rebuilt = False
        # A mask step syncs once, after the top-k: non-finite gradients drop the new mask and postpone
        # it to the next step (their scores may be NaN: the ranking then means nothing, but the
        # kernels stay inside their buffers, and no NaN check is needed).
        if due:
            scores, absolute = (self.estimate, False) if self.fisher == "ema" else (pool_grads, True)
            rebuilt = self.rebuild(roles, scores, absolute=absolute, check_nan=False, first_hist=first_hist,
                                   finite=finite)
        self.steps_since_mask += 1
        return rebuilt and self.renormalize

    def accumulate(self, roles, grads):
        """Add the squares of `grads` (the pool's) to F; non-finite gradients are left out."""
        sumsq = self._sumsq_op(roles.tensors["masked"], grads, None, False, 0.0)
        found_inf = ~torch.isfinite(roles.sharding.all_reduce_(sumsq)[SUMSQ_ALL])
        self._fisher_op(self.estimate, grads, 1.0, 1.0, found_inf)
        self.samples += 1

    def snapshot(self):
        # The EMA estimate is updated in place: a copy of it, taken only with exact_rollback (as
        # large as the estimate, held for the step), puts it back; without, a step that raises
        # keeps the first pass's squares in it.
        copy = [f.clone() for f in self.estimate] if self.exact_rollback and self.fisher == "ema" else None
        return self.steps_since_mask, self.samples, copy

    def rollback(self, snapshot):
        self.steps_since_mask, self.samples, copy = snapshot
        if copy is not None:
            torch._foreach_copy_(self.estimate, copy)

    # ---- state -------------------------------------------------------------------------------

    def state(self, roles):
        def copy(t):
            return None if t is None else t.clone()
        return dict(steps_since_mask=self.steps_since_mask, samples=self.samples, k=self.k,
                    mask_bits=copy(roles.mask_bits), chunk_counts=copy(roles.chunk_counts),
                    fisher=None if self.estimate is None else [f.clone() for f in self.estimate])

    def to_checkpoint(self, state, roles):
        """The mask as one uint8 tensor per pool tensor (all zeros before the first mask: a fresh
        optimizer's state is then a template for any checkpoint) and F, sharded like the pool."""
        pool = roles.params["masked"]
        bits = state.pop("mask_bits")
        state.pop("chunk_counts")
        masks = [torch.zeros(t.shape, dtype=torch.bool, device=t.device) if bits is None else
                 roles.mask_layout.unpack(bits, i) for i, t in enumerate(roles.tensors["masked"])]
        state["has_mask"] = bits is not None
        state["mask"] = {str(i): shard_like(m.to(torch.uint8), p) for i, (m, p) in enumerate(zip(masks, pool))}
        if state["fisher"] is not None:
            state["fisher"] = {str(i): shard_like(f, p) for i, (f, p) in enumerate(zip(state["fisher"], pool))}
        return state

    def from_checkpoint(self, state, roles):
        state = dict(state)
        count = len(roles.tensors["masked"])
        masks = [local(state["mask"][str(i)]).bool() for i in range(count)]
        del state["mask"]
        state["mask_bits"], state["chunk_counts"] = roles.mask_layout.pack(masks) if state.pop("has_mask") else (
            None, None)
        if state["fisher"] is not None:
            state["fisher"] = [local(state["fisher"][str(i)]) for i in range(count)]
        return state

    def check_state(self, state, roles):
        """Everything load_state() takes, so that it cannot fail halfway: the counters, k (which
        the sparsity and the pool decide), a mask whose per-chunk counts are its popcounts, with no
        bit past its tensor's end and (unsharded) exactly k set, and a finite, non-negative Fisher
        estimate shaped like the pool."""
        for key in ("steps_since_mask", "samples"):
            check_int(f"the saved {key}", state.get(key), 0)
        if state.get("k") != self.k:
            raise ValueError(f"this state selects k={state.get('k')!r} entries, this optimizer {self.k}: it was saved "
                             "with another sparsity or pool")
        bits, counts = state.get("mask_bits"), state.get("chunk_counts")
        layout = roles.mask_layout
        if (bits is None) != (counts is None):
            raise ValueError("the saved mask_bits and chunk_counts must both be present or both be None")
        if bits is not None:
            for name, t, dtype, numel in (("mask_bits", bits, torch.uint8, layout.mask_bytes),
                                          ("chunk_counts", counts, torch.int32, layout.total_chunks)):
                if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != (numel,):
                    raise ValueError(f"the saved {name} must be a {dtype} tensor of {numel} entries, got "
                                     f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            bits_here = bits.to(roles.device)
            repacked, popcounts = layout.pack([layout.unpack(bits_here, i) for i in range(len(layout.numels))])
            if not torch.equal(repacked, bits_here):
                raise ValueError("the saved mask has bits set past the end of its tensors")
            if not torch.equal(popcounts, counts.to(roles.device)):
                raise ValueError("the saved chunk_counts are not the popcounts of the saved mask")
            if roles.sharding is LOCAL and int(popcounts.sum()) != self.k:
                raise ValueError(f"the saved mask selects {int(popcounts.sum())} entries, not k={self.k}")
        fisher = state.get("fisher")
        if (fisher is None) != (self.estimate is None):
            raise ValueError(f"this state has {'no ' if fisher is None else ''}Fisher estimate; "
                             f"this optimizer uses fisher={self.fisher!r}")
        if fisher is not None:
            if not isinstance(fisher, list) or len(fisher) != len(self.estimate):
                raise ValueError(f"the saved Fisher estimate must be a list of {len(self.estimate)} tensors")
            for i, (saved, f) in enumerate(zip(fisher, self.estimate)):
                if not isinstance(saved, torch.Tensor) or saved.dtype != torch.float32 or saved.shape != f.shape:
                    raise ValueError(f"the saved Fisher estimate {i} must be a float32 tensor of shape "
                                     f"{tuple(f.shape)}")
                if not bool((saved >= 0).all()) or not bool(torch.isfinite(saved).all()):
                    raise ValueError(f"the saved Fisher estimate {i} must be finite and >= 0")

    def load_state(self, state, roles):
        self.steps_since_mask, self.samples = int(state["steps_since_mask"]), int(state["samples"])
        if state["fisher"] is not None:
            for f, saved in zip(self.estimate, state["fisher"]):
                f.copy_(saved)
        if state["mask_bits"] is None:
            roles.clear_mask()
        else:
            roles.set_mask(state["mask_bits"].to(roles.device).clone(), state["chunk_counts"].to(roles.device).clone())


class FSAM(SharpnessAwareOptimizer):
    """Fisher-mask SAM.

    Every `mask_interval` steps (step 0 included) the k = floor((1 - sparsity) * |pool|)
    entries of the pool with the largest Fisher estimate are selected, globally across tensors
    (ties: lower flat index).  Every step perturbs them by rho * m * T^2 g / ||T g|| (norm over
    all gradients; over the masked ones with renormalize=True).

    fisher: "batch" ranks |g| of the current mini-batch at a mask step (the official code);
    "ema" keeps F <- fisher_decay * F + (1 - fisher_decay) * g^2 every step; "samples" sums
    g^2 over the gradients given to accumulate_fisher() and rebuilds only on update_mask()
    (before the first update_mask() the current batch gradient builds the mask).

    pool: None (every trainable parameter), "fsam4plm" (all but biases and embeddings: the
    official code) or a callable (name, param) -> bool; outside_pool="dense" perturbs the others
    densely, "none" leaves them unperturbed (their gradients still count in the norm).
    Parameters frozen at construction (requires_grad=False) are never perturbed and count in
    neither the pool nor k.

    A step that raises is rolled back (docs/errors.md).  With fisher="ema" the estimate is
    updated in place by the first pass: exact_rollback=True copies it at the start of every step
    (4 bytes per pool entry, held until the step ends) so that a step that raises puts it back
    bit for bit; by default the failed step's squares stay in it.
    """

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer], *, rho: float = 0.05,
                 sparsity: float = 0.9, mask_interval: int = 100, fisher: str = "batch", fisher_decay: float = 0.95,
                 renormalize: bool = False, adaptive: bool = False, eta: float = 0.0, norm_eps: float = 1e-12,
                 pool: Union[None, str, Callable[[Optional[str], torch.Tensor], bool]] = None,
                 outside_pool: str = "dense", exact_rollback: bool = False, backend: Optional[str] = "auto",
                 **base_kwargs: Any):
        check_number("sparsity", sparsity, 0.0)
        if not sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f"mask_interval must be an int >= 1, got {mask_interval!r}")
        if fisher not in FISHER_ESTIMATES:
            raise ValueError(f"fisher must be one of {FISHER_ESTIMATES}, got {fisher!r}")
        check_number("fisher_decay", fisher_decay, 0.0)
        if not fisher_decay < 1:
            raise ValueError(f"fisher_decay must be in [0, 1), got {fisher_decay}")
        if outside_pool not in OUTSIDE_POOL:
            raise ValueError(f"outside_pool must be one of {OUTSIDE_POOL}, got {outside_pool!r}")
        if not isinstance(exact_rollback, bool):
            raise TypeError(f"exact_rollback must be a bool, got {type(exact_rollback).__name__}")
        predicate = pool_predicate(pool)
        scale = dict(rho=rho, adaptive=adaptive, eta=eta, norm_eps=norm_eps, renormalize=renormalize)
        SharpnessScale(**scale)  # its checks, before the base optimizer is built
        super().__init__(params, base_optimizer, backend=backend, base_kwargs=base_kwargs)
        self.sparsity, self.outside_pool = float(sparsity), outside_pool
        self._pool, self._predicate = pool, predicate
        roles, k = self._plan_roles()
        in_pool = [r == "masked" for r in roles]
        self._compose(roles,
                      FisherMask(k=k, mask_interval=mask_interval, fisher=fisher, fisher_decay=float(fisher_decay),
                                 exact_rollback=exact_rollback, backend=self.backend, pool=[t for t, keep in zip(self._locals, in_pool) if keep],
                                 **scale))

    def _plan_roles(self):
        """Each parameter's role and the mask's k.  Frozen parameters (requires_grad=False when
        they are added) are in no pool and no count."""
        if self._predicate is not None and isinstance(self._pool, str) and None in self._names:
            raise ValueError(f"pool={self._pool!r} selects by parameter name: pass model.named_parameters()")
        in_pool = [p.requires_grad and (self._predicate is None or bool(self._predicate(name, p)))
                   for name, p in zip(self._names, self._params)]
        if not any(in_pool):
            raise ValueError("pool selects no trainable parameter")
        outside = "dense" if self.outside_pool == "dense" else "norm_only"
        roles = ["masked" if keep else outside if p.requires_grad else "norm_only"
                 for p, keep in zip(self._params, in_pool)]
        # Exact decimal arithmetic: 0.1 * 100 must give 10, not 9.999... -> 9.
        n = sum(p.numel() for p, keep in zip(self._params, in_pool) if keep)
        return roles, math.floor((1 - Fraction(self.sparsity).limit_denominator(10**9)) * n)

    def _apply_roles(self, plan):
        """After add_param_group: the new pool parameters join the pool (Fisher estimates from 0),
        k is that of the larger pool, and the next step builds the mask anew."""
        roles, k = plan
        policy, old = self.perturbation, self.roles.params["masked"]
        if policy.estimate is not None:
            kept = {id(p): f for p, f in zip(old, policy.estimate)}
            policy.estimate = [kept[id(p)] if id(p) in kept else torch.zeros_like(t, dtype=torch.float32)
                               for p, t, r in zip(self._params, self._locals, roles) if r == "masked"]
        policy.k = k
        self._compose(roles, policy)  # new roles: no mask yet

    @property
    def k(self) -> int:
        """How many entries of the pool the mask selects."""
        return self.perturbation.k

    @property
    def mask_bits(self) -> Optional[torch.Tensor]:
        """The pool's packed mask (layout: fsam_kernels/_layout.py), or None before the first."""
        return self.roles.mask_bits

    # ---- the mask ----------------------------------------------------------------------------

    @torch.no_grad()
    def update_mask(self) -> None:
        """Rebuild the mask now: from the current gradients (fisher="batch"), from F ("ema"),
        or from the squares summed by accumulate_fisher() ("samples"; F is then reset)."""
        if self.roles.perturbed:
            raise RuntimeError("update_mask() between first_step() and second_step()")
        policy = self.perturbation
        if policy.fisher == "batch":
            grads = gradients_of(self.roles.params["masked"])
            if all(g is None for g in grads):
                raise RuntimeError("update_mask() with fisher='batch' needs gradients in .grad")
            policy.rebuild(self.roles, grads, absolute=True)
        elif policy.fisher == "samples":
            if policy.samples == 0:
                raise RuntimeError("update_mask() with fisher='samples' needs accumulate_fisher() calls first")
            policy.rebuild(self.roles, policy.estimate, absolute=False)
            for f in policy.estimate:
                f.zero_()
            policy.samples = 0
        else:
            policy.rebuild(self.roles, policy.estimate, absolute=False)

    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """fisher="samples": add the squares of the gradients now in .grad (one example or
        micro-batch) to F.  Non-finite gradients are left out."""
        if self.perturbation.fisher != "samples":
            raise RuntimeError(f"accumulate_fisher() is for fisher='samples', this optimizer uses "
                               f"{self.perturbation.fisher!r}")
        grads = gradients_of(self.roles.params["masked"])
        if all(g is None for g in grads):
            raise RuntimeError("accumulate_fisher() needs gradients in .grad")
        self.perturbation.accumulate(self.roles, grads)

    def mask_of(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask of parameter p as a bool tensor shaped like p (like its local shard
        `p.to_local()` under FSDP2: gather_mask gives the whole); None outside the pool."""
        for i, q in enumerate(self.roles.params["masked"]):
            if q is p:
                if self.roles.mask_bits is None:
                    raise RuntimeError("no mask has been built yet (the first step builds it)")
                return self.roles.mask_layout.unpack(self.roles.mask_bits, i)
        if any(q is p for q in self._params):
            return None
        raise ValueError("p is not a parameter of this optimizer")

    def gather_mask(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask of parameter p over the whole tensor (shaped like p), gathered from every
        process under FSDP2 (a collective: every process calls it); None outside the pool."""
        mask = self.mask_of(p)
        return None if mask is None else self._sharding.gather(mask, p)

    def mask_density(self) -> Optional[float]:
        """Fraction of the pool in the mask (k / |pool|), or None before the first mask."""
        if self.roles.mask_bits is None:
            return None
        return self.k / self.roles.mask_layout.numel
