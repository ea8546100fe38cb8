"""The GPU cost budgets, as counts (fsam_kernels.traffic on cuda-sim and interpreted Triton: the
same numbers on every run, no timing): each op's DRAM bytes against the floor docs/algorithm.md
states, the top-k's reads of the scores, and the launches of an FSAM step."""
import math

import pytest
import torch

from fsam_kernels import FSAM, clip_grad_norm_componentwise_, ops, traffic
from fsam_kernels._layout import CHUNK
from test_traffic import COUNTED

pytestmark = pytest.mark.skipif(not COUNTED, reason="neither cuda-sim nor interpreted Triton is here")
BACKENDS = pytest.mark.parametrize("backend", COUNTED)
# layer-like tensors: several chunks, a ragged end, a small bias
NUMELS = [8 * CHUNK, 3 * CHUNK + 77, 2 * CHUNK, 999]


def heavy_tailed(numels, dtype=torch.float32, seed=0):
    """Gradient-like values: Student-t (3 degrees of freedom) times a log-normal scale per tensor."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    return [(t.sample((n,)) * math.exp(float(torch.randn(1, generator=g)) - 6)).to(dtype) for n in numels]


def op_summary(fn, op):
    with traffic.record() as t:
        fn()
    return t.summary()[op], t


def within(summary, share):
    return summary["dram_bytes"] <= (1 + share) * summary["floor_bytes"]


@BACKENDS
def test_fisher_accumulate_moves_12_bytes_a_parameter_within_5_percent(backend):
    grads = heavy_tailed(NUMELS)
    fisher = [g.abs() for g in grads]
    s, _ = op_summary(lambda: ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, backend=backend),
                      "fisher_accumulate")
    assert s["floor_bytes"] == 12 * sum(NUMELS)
    assert within(s, 0.05), s


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_perturb_restore_and_clip_within_10_percent_of_their_floors(backend, dtype):
    grads = heavy_tailed(NUMELS, dtype)
    params = [torch.randn(n).to(dtype) for n in NUMELS]
    k = sum(NUMELS) // 10
    bits, counts = ops.topk_mask_packed(grads, k, absolute=True, backend=backend)
    checks = {"grad_sumsq": lambda: ops.grad_sumsq(params, grads, backend=backend)}
    for label, mask, cnt in (("masked", bits, counts), ("dense", None, None)):
        offsets, saved = ops.save_layout(params, cnt)
        kw = dict(save_offsets=offsets, saved=saved, mask_bits=mask, status=torch.zeros(1, dtype=torch.int32),
                  backend=backend)
        checks[f"perturb {label}"] = lambda kw=kw: ops.perturb(params, grads, torch.tensor(1e-3), **kw)
        checks[f"restore {label}"] = lambda kw=kw: ops.restore(params, **kw)
    clipped = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(clipped, grads):
        p.grad = g.clone()
    checks["clip_grad_norm_componentwise_"] = lambda: clip_grad_norm_componentwise_(clipped, 1e-4, backend=backend)
    for name, fn in checks.items():
        s, _ = op_summary(fn, name.split()[0])
        assert s["floor_bytes"] > 0 and within(s, 0.10), (name, s["dram_bytes"], s["floor_bytes"])


@BACKENDS
def test_an_unclipped_tensor_is_neither_read_nor_written(backend):
    p = torch.nn.Parameter(torch.zeros(2 * CHUNK))
    p.grad = torch.full((2 * CHUNK,), 1e-6)  # norm ~ 9e-5: under max_norm 1
    s, t = op_summary(lambda: clip_grad_norm_componentwise_([p], 1.0, backend=backend), "clip_grad_norm_componentwise_")
    scale = [r for r in t.rows() if r["raw_op"] == "clip_scale_" and r["kind"] == "kernel" and r["backend"] == backend]
    assert [r["buffers"].get("tensors[0]", [0, 0]) for r in scale] == [[0, 0]]


@BACKENDS
@pytest.mark.parametrize("first_hist", [False, True], ids=["scores", "after_first_hist"])
def test_the_top_k_reads_the_scores_at_most_three_times_or_two_after_first_hist(backend, first_hist):
    grads = heavy_tailed(NUMELS)
    scores = [g.float() ** 2 for g in grads]
    hist = None
    if first_hist:
        hist = ops.new_first_hist("cpu")
        ops.fisher_accumulate(scores, grads, decay=0.0, alpha=1.0, first_hist=hist, backend=backend)
    k = sum(NUMELS) // 10
    s, t = op_summary(lambda: ops.topk_mask_packed(scores, k, first_hist=hist, backend=backend), "topk_mask_packed")
    score_sectors = sum(-(-x.nbytes // 32) for x in scores)
    read = written = 0
    for r in t.rows():
        for label, (rd, wr) in r["buffers"].items():
            if label.startswith("scores["):
                read += rd
            if label in ("mask_bits", "bits"):
                written += wr
    assert read == (2 if first_hist else 3) * score_sectors
    mask_sectors = sum(-(-n // CHUNK) for n in NUMELS) * (CHUNK // 8 // 32)
    assert written == mask_sectors  # the mask once


def fsam_step_launches(numels, dtypes, backend, mask_interval=10**9):
    """Launches and syncs of the second FSAM step (a non-mask one), the base AdamW's left out."""
    params = [torch.nn.Parameter(torch.randn(n).to(d)) for n, d in zip(numels, dtypes)]
    opt = FSAM(params, torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_interval=mask_interval, backend=backend,
               lr=1e-5)
    base_step = opt.base_optimizer.step

    def labelled(*args, **kwargs):
        with traffic.label("base optimizer"):
            return base_step(*args, **kwargs)
    opt.base_optimizer.step = labelled

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.first_step()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.second_step()
    step()
    with traffic.record() as t:
        step()
    rows = [r for r in t.rows() if r["op"] != "base optimizer" and r["kernel"] != "aten.randn_like"]
    return rows


@BACKENDS
def test_an_fsam_step_launches_per_dtype_group_not_per_tensor(backend):
    few = fsam_step_launches([CHUNK + 5, 300, 2 * CHUNK], [torch.float32] * 3, backend)
    many = fsam_step_launches([CHUNK + 5, 300, 2 * CHUNK] + [77] * 20, [torch.float32] * 23, backend)
    mixed = fsam_step_launches([CHUNK + 5, 300, 2 * CHUNK] + [77] * 20, [torch.float32] * 3 + [torch.bfloat16] * 20,
                               backend)
    count = lambda rows: sum(r["launches"] for r in rows)  # noqa: E731
    kernels = lambda rows: sorted(r["kernel"] for r in rows if r["kind"] == "kernel" and r["backend"] == backend)  # noqa: E731,E501
    assert count(few) == count(many) and kernels(few) == kernels(many)
    # a second dtype group: each kernel of the step once more, and nothing else
    extra = [k for k in kernels(mixed)]
    for k in kernels(few):
        extra.remove(k)
    assert len(extra) == len([k for k in kernels(few) if "sum_partials" not in k]), (kernels(few), extra)
    assert sum(r["syncs"] for r in few) == 0


@BACKENDS
def test_a_layout_unchanged_since_its_check_is_not_checked_again(backend):
    rows = fsam_step_launches([CHUNK + 5, 300, 2 * CHUNK], [torch.float32] * 3, backend)
    assert not [r["kernel"] for r in rows if "run_ends" in r["kernel"] or "run_order" in r["kernel"]]
    # an outside change of the layout is seen: checked again
    params = [torch.randn(CHUNK + 5)]
    grads = [torch.randn(CHUNK + 5)]
    offsets, saved = ops.save_layout(params)
    status = torch.zeros(1, dtype=torch.int32)
    kw = dict(save_offsets=offsets, saved=saved, status=status, backend=backend)
    for expected in (1, 0):
        with traffic.record() as t:
            ops.perturb(params, grads, torch.tensor(1e-3), **kw)
            ops.restore(params, **kw)
        assert sum("run_ends" in r["kernel"] for r in t.rows()) == expected
    offsets[1] = offsets[1] + 0  # an in-place write, even of the same value
    with traffic.record() as t:
        ops.perturb(params, grads, torch.tensor(1e-3), **kw)
    assert sum("run_ends" in r["kernel"] for r in t.rows()) == 1
