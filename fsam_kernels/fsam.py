"""FSAM (Zhong et al., 2022): SAM whose perturbation touches only the parameters with the
largest Fisher information, selected by a global top-k over the pool (SPEC.md section 1)."""
from fractions import Fraction
import math

import torch

from . import ops
from .params import pool_predicate
from ._checks import check_number
from .sam import SharpnessAwareOptimizer

FISHER_ESTIMATES = ("batch", "ema", "samples")
OUTSIDE_POOL = ("dense", "none")


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

    pool: None (every parameter), "fsam4plm" (all but biases and embeddings: the official
    code) or a callable (name, param) -> bool; outside_pool="dense" perturbs the others
    densely, "none" leaves them unperturbed (their gradients still count in the norm).
    """

    def __init__(self, params, base_optimizer, *, rho=0.05, sparsity=0.9, mask_interval=100, fisher="batch",
                 fisher_decay=0.95, renormalize=False, adaptive=False, eta=0.0, norm_eps=1e-12, pool=None,
                 outside_pool="dense", backend="auto", **base_kwargs):
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
        predicate = pool_predicate(pool)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, norm_eps=norm_eps,
                         backend=backend, base_kwargs=base_kwargs)
        if predicate is not None and isinstance(pool, str) and None in self._names:
            raise ValueError(f"pool={pool!r} selects by parameter name: pass model.named_parameters()")
        in_pool = [predicate is None or bool(predicate(name, p)) for name, p in zip(self._names, self._params)]
        pool_idx = [i for i, keep in enumerate(in_pool) if keep]
        if not pool_idx:
            raise ValueError("pool selects no parameter")
        others = [i for i, keep in enumerate(in_pool) if not keep]
        self._set_roles(pool=pool_idx, dense=others if outside_pool == "dense" else [],
                        rest=others if outside_pool == "none" else [])
        self.sparsity, self.mask_interval, self.fisher = float(sparsity), mask_interval, fisher
        self.fisher_decay, self.renormalize, self.outside_pool = float(fisher_decay), bool(renormalize), outside_pool
        n = self._pool_layout.numel
        # Exact decimal arithmetic: 0.1 * 100 must give 10, not 9.999... -> 9.
        self.k = math.floor((1 - Fraction(sparsity).limit_denominator(10**9)) * n)
        self._fisher = ([torch.zeros_like(p, dtype=torch.float32) for p in self._pool]
                        if fisher in ("ema", "samples") else None)
        self._samples = 0
        self._chunk_counts = None
        self._steps_since_mask = 0

    # ---- the mask ----------------------------------------------------------------------------

    def _rebuild_mask(self, scores, absolute, check_nan=True, first_hist=None):
        scores = [torch.zeros_like(p) if s is None else s for p, s in zip(self._pool, scores)]
        bits, counts = self._op["topk_mask"](scores, self.k, absolute, check_nan, first_hist)
        offsets, _ = self._pool_layout.save_offsets(counts)
        if self._pool_saved is None:  # sized for any mask of k entries: no sync to read the exact size
            self._pool_saved = torch.empty(self._pool_layout.saved_bytes_bound(self.k), dtype=torch.uint8,
                                           device=self._device)
        self._mask_bits, self._chunk_counts, self._pool_offsets = bits, counts, offsets
        self._steps_since_mask = 0

    def _mask_due(self):
        if self._mask_bits is None:
            return True
        return self.fisher != "samples" and self._steps_since_mask >= self.mask_interval

    def _before_perturb(self, pool_grads, dense_grads, rest_grads, stats, finite):
        due = self._mask_due()
        # On a mask step the accumulation also counts the top-k's first radix digit.
        first_hist = None
        if self.fisher == "ema":
            if due:
                first_hist = ops.new_first_hist(self._device)
            self._op["fisher_accumulate_"](self._fisher, pool_grads, self.fisher_decay, 1.0 - self.fisher_decay,
                                           ~finite, first_hist)
        # A mask step may sync once: non-finite gradients postpone it to the next step.
        if due and bool(finite):
            # Finite gradients (and so a finite F): the top-k needs no NaN check and no second sync.
            if self.fisher == "ema":
                self._rebuild_mask(self._fisher, absolute=False, check_nan=False, first_hist=first_hist)
            else:
                self._rebuild_mask(pool_grads, absolute=True, check_nan=False)
            if self.renormalize:
                stats = self._sumsq(pool_grads, dense_grads, rest_grads)
        self._steps_since_mask += 1
        return stats

    @torch.no_grad()
    def update_mask(self):
        """Rebuild the mask now: from the current gradients (fisher="batch"), from F ("ema"),
        or from the squares summed by accumulate_fisher() ("samples"; F is then reset)."""
        if self._perturbed:
            raise RuntimeError("update_mask() between first_step() and second_step()")
        if self.fisher == "batch":
            grads = self._grads(self._pool)
            if all(g is None for g in grads):
                raise RuntimeError("update_mask() with fisher='batch' needs gradients in .grad")
            self._rebuild_mask(grads, absolute=True)
        elif self.fisher == "samples":
            if self._samples == 0:
                raise RuntimeError("update_mask() with fisher='samples' needs accumulate_fisher() calls first")
            self._rebuild_mask(self._fisher, absolute=False)
            for f in self._fisher:
                f.zero_()
            self._samples = 0
        else:
            self._rebuild_mask(self._fisher, absolute=False)

    @torch.no_grad()
    def accumulate_fisher(self):
        """fisher="samples": add the squares of the gradients now in .grad (one example or
        micro-batch) to F.  Non-finite gradients are left out."""
        if self.fisher != "samples":
            raise RuntimeError(f"accumulate_fisher() is for fisher='samples', this optimizer uses {self.fisher!r}")
        grads = self._grads(self._pool)
        if all(g is None for g in grads):
            raise RuntimeError("accumulate_fisher() needs gradients in .grad")
        found_inf = ~torch.isfinite(self._op["grad_sumsq"](self._pool, grads, None, False, 0.0)[0])
        self._op["fisher_accumulate_"](self._fisher, grads, 1.0, 1.0, found_inf)
        self._samples += 1

    def mask_of(self, p):
        """The mask of parameter p as a bool tensor shaped like p; None outside the pool."""
        for i, q in enumerate(self._pool):
            if q is p:
                if self._mask_bits is None:
                    raise RuntimeError("no mask has been built yet (the first step builds it)")
                return self._pool_layout.unpack(self._mask_bits, i)
        if any(q is p for q in self._params):
            return None
        raise ValueError("p is not a parameter of this optimizer")

    def mask_density(self):
        """Fraction of the pool in the mask (k / |pool|), or None before the first mask."""
        if self._mask_bits is None:
            return None
        return self.k / self._pool_layout.numel

    # ---- state -------------------------------------------------------------------------------

    def _extra_state(self):
        state = super()._extra_state()
        state.update(
            steps_since_mask=self._steps_since_mask, samples=self._samples, k=self.k,
            mask_bits=None if self._mask_bits is None else self._mask_bits.clone(),
            chunk_counts=None if self._chunk_counts is None else self._chunk_counts.clone(),
            fisher=None if self._fisher is None else [f.clone() for f in self._fisher])
        return state

    def _check_extra_state(self, extra):
        if (extra["fisher"] is None) != (self._fisher is None):
            raise ValueError(f"this state has {'no ' if extra['fisher'] is None else ''}Fisher estimate; "
                             f"this optimizer uses fisher={self.fisher!r}")
        if extra["mask_bits"] is not None and extra["mask_bits"].numel() != self._pool_layout.mask_bytes:
            raise ValueError("the saved mask does not fit this pool")

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self._steps_since_mask, self._samples = int(extra["steps_since_mask"]), int(extra["samples"])
        if extra["fisher"] is not None:
            for f, saved in zip(self._fisher, extra["fisher"]):
                f.copy_(saved)
        if extra["mask_bits"] is None:
            self._mask_bits = self._chunk_counts = self._pool_offsets = self._pool_saved = None
        else:
            self._mask_bits = extra["mask_bits"].to(self._device).clone()
            counts = extra["chunk_counts"].to(self._device).clone()
            self._chunk_counts = counts
            self._pool_offsets, _ = self._pool_layout.save_offsets(counts)
            self._pool_saved = torch.empty(self._pool_layout.saved_bytes_bound(self.k), dtype=torch.uint8,
                                           device=self._device)
