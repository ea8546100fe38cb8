"""The saved-layout cases of the adversarial tests, on any device: guarded buffers, a list of
tensors with a mask and a save layout carrying one mutation, the oracle that says which calls are
refused, and the check of one call against it."""
import torch

from fsam_kernels import backends, ops
from fsam_kernels._layout import ChunkLayout

POISON = 0xA5
GUARD = 64  # poisoned bytes before and after every tensor the ops may write
# the mutations of the save layout (the runs' values: what status leaves to the device), then the
# ones the host sees
RUN_MUTATIONS = ["negative", "misaligned", "overlap", "huge", "past_end", "short"]
MUTATIONS = ["none", "gap", *RUN_MUTATIONS, "saved_unaligned", "saved_aliases_param", "param_twice",
             "grad_aliases_param", "params_overlap"]


class Arena:
    """Guarded buffers: each tensor a view into the middle of a poisoned byte buffer, so that a
    write outside it shows."""

    def __init__(self, device="cpu"):
        self.buffers = []
        self.device = device

    def place(self, nbytes, dtype=torch.uint8):
        buf = torch.full((nbytes + 2 * GUARD,), POISON, dtype=torch.uint8, device=self.device)
        self.buffers.append((buf, nbytes))
        return buf[GUARD: GUARD + nbytes].view(dtype)

    def snapshot(self):
        return [b.clone() for b, _ in self.buffers]

    def guards_intact(self):
        return all(bool((b[:GUARD] == POISON).all() and (b[GUARD + n:] == POISON).all()) for b, n in self.buffers)


def expected_ok(counts, sizes, offsets, capacity, saved_aligned):
    """The oracle: plain Python integers, one chunk after another."""
    end = 0
    for n, size, off in zip(counts, sizes, offsets):
        if off < end or off % size or off + n * size > capacity:
            return False
        end = off + n * size
    return saved_aligned


def _mask(op, params, log_stds, density, seed, g, backend):
    """(bits, counts) of the op's mask: PAC's inexact entries (by the backend that perturbs: the
    noise of two backends may differ in the last bits), or random entries (None: dense)."""
    if op == "pac":
        return ops.pac_noise_mask(params, log_stds, seed=seed, step=1, backend=backend)
    if density == 1:
        return None, None
    device = params[0].device
    return ChunkLayout(params).pack([(torch.rand(p.numel(), generator=g) < density).to(device) for p in params])


def build(case, backend, device="cpu"):
    """(arena, the raw op and its args, the restore and its args, whether the oracle accepts
    (what the host sees, the saved runs), the read-only inputs).  The params are the arena's
    first buffers."""
    sizes, dtypes, density, op, mutation, seed = case
    g = torch.Generator().manual_seed(seed)
    arena = Arena(device)
    params = []
    for n, dt in zip(sizes, dtypes):
        p = arena.place(n * dt.itemsize, dt)
        p.copy_(torch.randn(n, generator=g).to(dt))
        params.append(p)
    grads = [torch.randn(p.numel(), generator=g).to(device, p.dtype) for p in params]
    log_stds = [torch.full((1,), -3.0, device=device) for _ in params]
    nonempty = [i for i, p in enumerate(params) if p.numel()]
    aliasing = mutation in ("saved_aliases_param", "param_twice", "grad_aliases_param", "params_overlap")
    if aliasing and not nonempty or mutation == "grad_aliases_param" and op == "pac":
        mutation, aliasing = "none", False
    if mutation in ("param_twice", "params_overlap"):
        i = nonempty[0]
        extra = params[i] if mutation == "param_twice" else params[i][: max(1, params[i].numel() // 2)]
        params, grads, log_stds = params + [extra], grads + [grads[i][: extra.numel()]], log_stds + [log_stds[i]]
    elif mutation == "grad_aliases_param":
        grads[nonempty[0]] = params[nonempty[0]]
    layout = ChunkLayout(params)
    bits, counts = _mask(op, params, log_stds, density, seed, g, backend)
    offsets, saved = ops.save_layout(params, counts)
    capacity = saved.numel()
    chunk_sizes = [p.element_size() for i, p in enumerate(params) for _ in range(layout.chunks[i])]
    chunk_counts = [int(c) for c in (layout.full_counts() if counts is None else counts)]
    runs = [c for c, n in enumerate(chunk_counts) if n]
    if mutation in ("negative", "misaligned", "overlap", "huge", "past_end", "short") and not runs:
        mutation = "none"
    if mutation == "gap":
        offsets[layout.total_chunks // 2:] += 48
        capacity += 48
    elif mutation == "negative":
        offsets[runs[0]] = -16
    elif mutation == "misaligned":
        offsets[runs[-1]] += 1
    elif mutation == "overlap":
        offsets[runs[-1]] = offsets[runs[0]] - (0 if len(runs) > 1 else 2)
    elif mutation == "huge":
        offsets[runs[-1]] = 2 ** 63 - 16
    elif mutation == "past_end":
        offsets[runs[-1]] = capacity
    elif mutation == "short":
        capacity = int(offsets[runs[-1]]) + chunk_counts[runs[-1]] * chunk_sizes[runs[-1]] - 1
    if mutation == "saved_aliases_param":
        p = params[nonempty[0]]
        saved = p.view(torch.uint8)[: min(capacity, p.numel() * p.element_size())]
    elif mutation == "saved_unaligned":
        saved = arena.place(capacity + 1)[1:]
    else:
        saved = arena.place(capacity)
    if mutation == "saved_aliases_param" and not saved.numel():
        aliasing = False  # nothing to save: no byte shared
    # (what the host sees: no aliasing, `saved` aligned; the saved runs, which status leaves to the device)
    ok = (not aliasing and (mutation != "saved_unaligned" or not saved.numel()),
          expected_ok(chunk_counts, chunk_sizes, [int(o) for o in offsets], saved.numel(), True))
    if op == "pac":
        args = (params, log_stds, ops.counter_bases(params), seed, 1, 2.0, bits, offsets, saved)
        return arena, ("pac_perturb_", args), ("pac_restore_", args), ok, [offsets, bits, *log_stds]
    args = (params, grads, bits, offsets, saved, torch.tensor(0.25, device=device), False, 0.0)
    return arena, ("perturb_", args), ("restore_", (params, bits, offsets, saved)), ok, [offsets, bits, *grads]


def public(name, args, backend):
    if name == "perturb_":
        params, grads, bits, offsets, saved, scale, _, _ = args
        return ops.perturb(params, grads, scale, save_offsets=offsets, saved=saved, mask_bits=bits, backend=backend)
    if name == "restore_":
        params, bits, offsets, saved = args
        return ops.restore(params, save_offsets=offsets, saved=saved, mask_bits=bits, backend=backend)
    params, log_stds, bases, seed, step, max_noise, bits, offsets, saved = args
    fn = ops.pac_perturb if name == "pac_perturb_" else ops.pac_restore
    return fn(params, log_stds, seed=seed, step=step, mask_bits=bits, save_offsets=offsets, saved=saved,
              max_noise=max_noise, bases=bases, backend=backend)


def outcome(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return type(e).__name__
    return None


def check_call(case, backend, device, entry, results):
    """One call of the op of `case` on `backend`: `entry` "raw" (the torch.ops op), "public"
    (fsam_kernels.ops) or "status" (the raw op given a status).  Refused exactly where the oracle
    says, with nothing changed; a bad saved layout given a status skipped, and its restore too;
    accepted: guards intact and the restore exact, the bytes it wrote kept in results[backend, entry]."""
    arena, (name, args), (rname, rargs), (visible_ok, runs_ok), inputs = build(case, backend, device)
    status = torch.zeros(1, dtype=torch.int32, device=device) if entry == "status" else None
    extra = (status,) if entry == "status" else ()
    before = arena.snapshot()
    read_only = [t.clone() if t is not None else None for t in inputs]
    call = (lambda: public(name, args, backend)) if entry == "public" else \
        (lambda: backends.op(name, backend)(*args, *extra))
    got = outcome(call)
    refused = not visible_ok or (not runs_ok and entry != "status")
    assert got == ("ValueError" if refused else None), (backend, entry, case, got)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(inputs, read_only))
    if got is not None:  # refused: nothing changed
        assert all(torch.equal(a, b) for a, b in zip(before, arena.snapshot())), (backend, entry, case)
        return
    if status is not None:
        assert int(status) == (0 if runs_ok else 1), (backend, case)
    if not runs_ok:  # skipped, and its restore with the same status too: nothing written
        assert outcome(lambda: backends.op(rname, backend)(*rargs, status)) is None
        assert all(torch.equal(a, b) for a, b in zip(before, arena.snapshot())), (backend, entry, case)
        return
    assert arena.guards_intact(), (backend, entry, case)
    results[backend, entry] = [t.cpu() for t in arena.snapshot()]
    assert outcome(lambda: backends.op(rname, backend)(*rargs, *extra)) is None
    assert status is None or int(status) == 0
    assert arena.guards_intact()
    assert all(torch.equal(a, b) for a, (b, _) in zip(before[: len(case[0])], arena.buffers)), \
        (backend, entry, case)  # the restore is exact


def same_writes(case, results):
    """Every accepted call wrote the same bytes (weights, saved runs, and the gaps left poisoned);
    PAC's noise may differ in the last bits between backends (its own tests bound it)."""
    first = next(iter(results.values()), None) if case[3] == "perturb" else None
    for key, snap in results.items() if first is not None else ():
        assert all(torch.equal(a, b) for a, b in zip(first, snap)), (key, case)
