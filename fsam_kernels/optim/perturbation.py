"""The perturbation of the two-pass optimizers: the parameters by role with the saved originals
that restore them exactly (`ParamRoles`), and the policy that decides e in w + e
(`Perturbation`: SAM/ASAM's scale in sam.py, FSAM's Fisher mask in fsam.py).

Roles: `masked` (perturbed where a packed mask says: FSAM's pool), `dense` (perturbed
everywhere: what SAM does, at the cost of a full copy) and `norm_only` (never perturbed, but
their gradients count in the norm).  Between perturb() and restore() only the originals of the
perturbed entries are kept: for the masked role, compactly, at the offsets of the mask's
per-chunk popcounts (fsam_kernels/_layout.py).
"""
import torch

from .. import backends
from .._checks import check_not_skipped
from .._layout import ChunkLayout
from ..ops import save_layout
from ..sharding import LOCAL, DTensor, check_placed_like, local

ROLES = ("masked", "dense", "norm_only")
_FORMER_NAMES = {"pool": "masked", "rest": "norm_only"}  # in states saved by fsam_kernels 0.1
SUMSQ_ALL, SUMSQ_PERTURBED = 0, 1  # grad_sumsq's entries: over every gradient, over the perturbed entries


def gradients_of(params, sharded=True):
    """The gradients of `params` as the kernels read them (local shards of sharded ones, with
    sharded=True), checked before anything is written (every backend reads them as contiguous
    arrays of the parameter's dtype; PyTorch's .grad setter has checked their shapes)."""
    grads = []
    append = grads.append  # every step, every parameter: kept lean (benchmarks/host.py)
    sharded = sharded and DTensor is not None
    for p in params:
        g = p.grad
        if g is None:
            append(None)
            continue
        if g.is_sparse:
            raise RuntimeError("sparse gradients are not supported by SAM/FSAM")
        if g.dtype is not p.dtype:
            raise RuntimeError(f"a gradient is {g.dtype} {tuple(g.shape)} but its parameter is "
                               f"{p.dtype} {tuple(p.shape)}")
        if sharded and (isinstance(g, DTensor) or isinstance(p, DTensor)):
            check_placed_like(g, p, "a gradient")
            g = local(g)
        append(g if g.is_contiguous() else g.contiguous())
    return grads


class ParamRoles:
    """The parameters of one optimizer split into ROLES (`role_of[i]` for parameter i), with the
    buffers that save and restore what a perturbation changes.  `params[role]` holds the
    parameters as the optimizer got them, `tensors[role]` what the kernels write: the same, or
    their local shards under FSDP2 (`sharding`), whose sums are then combined over the shards."""

    def __init__(self, params, role_of, backend, device, sharding=LOCAL):
        if len(role_of) != len(params) or not set(role_of) <= set(ROLES):
            raise ValueError(f"every parameter needs one role of {ROLES}")
        self.role_of = list(role_of)
        self.params = {r: [p for p, x in zip(params, role_of) if x == r] for r in ROLES}
        self.tensors = {r: [local(p) for p in ps] for r, ps in self.params.items()}
        self.sharding = sharding
        self.device = device
        self._op = {name: backends.op(name, backend) for name in ("grad_sumsq", "perturb_", "restore_")}
        self.mask_layout = ChunkLayout(self.tensors["masked"])
        self.dense_offsets, self.dense_saved = save_layout(self.tensors["dense"])
        self.mask_bits = self.chunk_counts = self.masked_offsets = self.masked_saved = None
        # set on the device by a perturb_/restore_ whose saved layout is bad (it then writes nothing),
        # read at the mask steps' sync: perturbing costs no sync
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self._perturbed = []  # the roles perturb() changed, which restore() puts back

    def gradients(self):
        """{role: the gradients of its tensors}, checked."""
        sharded = self.sharding is not LOCAL
        return {r: gradients_of(ps, sharded) for r, ps in self.params.items()}

    def sumsq(self, grads, adaptive, eta):
        """Device tensor [sum of (T g)^2 over every gradient, the same over what is perturbed]
        (SUMSQ_ALL, SUMSQ_PERTURBED) over the whole model; the masked role counts as perturbed
        only under a mask."""
        op = self._op["grad_sumsq"]
        stats = None  # the first role's sums themselves: no launch to zero and add them
        for role, tensors in self.tensors.items():
            if not tensors:
                continue
            perturbed = role == "dense" or (role == "masked" and self.mask_bits is not None)
            part = op(tensors, grads[role], self.mask_bits if role == "masked" else None, adaptive, eta)
            if stats is not None and perturbed:
                stats += part
            elif stats is not None:
                stats[SUMSQ_ALL] += part[SUMSQ_ALL]
            else:
                stats = part
                if not perturbed:
                    stats[SUMSQ_PERTURBED] = 0.0
        if stats is None:
            stats = torch.zeros(2, dtype=torch.float32, device=self.device)
        return self.sharding.all_reduce_(stats)

    @property
    def perturbed(self):
        return bool(self._perturbed)

    def mask_state(self):
        """The mask and its buffers (references: set_mask replaces them, never writes into them)."""
        return self.mask_bits, self.chunk_counts, self.masked_offsets, self.masked_saved

    def set_mask_state(self, state):
        """Take back a mask_state()."""
        self.mask_bits, self.chunk_counts, self.masked_offsets, self.masked_saved = state

    def set_mask(self, bits, counts, finite=None):
        """Use a new mask of the masked role (its per-chunk popcounts `counts`), unless the 0-dim
        bool device tensor `finite` is False (then nothing changes).  Reads the saved buffer's size
        (under FSDP2 only this process's share of the mask is known), `finite` and the status in one
        sync; returns whether the mask changed."""
        if self.perturbed:
            raise RuntimeError("the mask cannot change while the weights are perturbed")
        offsets, needed = self.mask_layout.save_offsets(counts)
        ok = torch.ones((), dtype=torch.int64, device=needed.device) if finite is None else finite.to(torch.int64)
        ok, needed, skipped = torch.stack([ok, needed, self.status[0].to(torch.int64)]).tolist()  # a mask step's sync
        check_not_skipped(skipped)
        if not ok:
            return False
        if self.masked_saved is None or self.masked_saved.numel() < needed:
            self.masked_saved = torch.empty(needed, dtype=torch.uint8, device=self.device)
        self.mask_bits, self.chunk_counts, self.masked_offsets = bits, counts, offsets
        return True

    def clear_mask(self):
        self.mask_bits = self.chunk_counts = self.masked_offsets = self.masked_saved = None

    def perturb(self, grads, scale, adaptive, eta):
        """w <- w + scale * T^2 g on the perturbed entries, their originals saved first.  The
        masked role stays as it is while it has no mask."""
        op = self._op["perturb_"]
        if self.mask_bits is not None:
            op(self.tensors["masked"], grads["masked"], self.mask_bits, self.masked_offsets, self.masked_saved, scale,
               adaptive, eta, self.status)
            self._perturbed.append("masked")
        if self.tensors["dense"]:
            op(self.tensors["dense"], grads["dense"], None, self.dense_offsets, self.dense_saved, scale, adaptive, eta,
               self.status)
            self._perturbed.append("dense")

    def restore(self):
        """Write back the originals perturb() saved: the weights are bit-exactly those before it
        (a perturb() that raised halfway: those of the roles it changed)."""
        op = self._op["restore_"]
        if "masked" in self._perturbed:
            op(self.tensors["masked"], self.mask_bits, self.masked_offsets, self.masked_saved, self.status)
        if "dense" in self._perturbed:
            op(self.tensors["dense"], None, self.dense_offsets, self.dense_saved, self.status)
        self._perturbed = []

    def signature(self, params):
        """What a saved state must match: each parameter's role, shape and dtype."""
        return [(role, tuple(p.shape), str(p.dtype)) for role, p in zip(self.role_of, params)]

    @staticmethod
    def current_names(signature):
        """A saved signature with the role names of this version."""
        return [(_FORMER_NAMES.get(role, role), *rest) for role, *rest in signature]


class Perturbation:
    """What decides e in w + e.  The protocol calls, per first_step: prepare() (may change the
    roles' mask; returns whether the norm must be recomputed), then scale() on the norm stats."""

    adaptive = False
    eta = 0.0

    def prepare(self, roles, grads, finite):
        return False

    def scale(self, stats, finite):
        raise NotImplementedError

    def state(self, roles):
        """What state_dict() keeps of the policy and of the roles' mask (tensors cloned)."""
        return {}

    def check_state(self, state, roles):
        """Raise if `state` does not fit this policy (before anything is loaded)."""

    def load_state(self, state, roles):
        pass

    def snapshot(self):
        """What prepare() changes, for rollback() after an exception in the step (cheap: no copy
        of a tensor as large as the model)."""
        return None

    def rollback(self, snapshot):
        pass

    def to_checkpoint(self, state, roles):
        """state() as torch.distributed.checkpoint saves it (see ComposedOptimizer.checkpoint_state)."""
        return state

    def from_checkpoint(self, state, roles):
        return state
