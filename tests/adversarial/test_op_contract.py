"""The ops' argument contract under attack (docs/errors.md), on every backend built here: random
lists of shapes, dtypes and views, masks, save layouts and one mutation each (offsets negative,
misaligned, overlapping, past the end or near 2**63; a short or misaligned buffer; a parameter
twice; a buffer or gradient that aliases a weight).  Every backend must give the same answer as
an independent oracle: accepted (and then the same bytes everywhere, guard regions untouched,
the restore exact) or refused with the same exception and every input byte for byte as before.
The raw ops (torch.ops.<namespace>, what torch.compile reaches) and the public ones alike, and the
raw ops given `status` (a bad saved layout then writes nothing and sets it: on cuda-sim and
triton through the device-side check that the GPU runs)."""
import math
import os
import subprocess
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from fsam_kernels import backends, ops  # noqa: E402
from fsam_kernels._layout import CHUNK, ChunkLayout  # noqa: E402
from conftest import DTYPES, ROOT, all_backends  # noqa: E402
from layouts import MUTATIONS, check_call, outcome, same_writes  # noqa: E402

# The backends whose tensors are on the CPU (here: all of them).
CPU_BACKENDS = [b for b, d in all_backends() if d == "cpu"]
SIZES = [0, 1, 5, CHUNK - 1, CHUNK, CHUNK + 7, 2 * CHUNK + 3]
PROFILE = settings(max_examples=int(os.environ.get("FSAM_ADVERSARIAL_EXAMPLES", "120")), deadline=None,
                   derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                   phases=[Phase.explicit, Phase.generate, Phase.shrink])


CASES = st.tuples(
    st.lists(st.sampled_from(SIZES), min_size=1, max_size=3),
    st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.sampled_from(["perturb", "pac"]),
    st.sampled_from(MUTATIONS),
    st.integers(0, 2 ** 31 - 1),
).map(lambda c: (c[0], c[1][:len(c[0])], *c[2:]))


@pytest.mark.slow
@PROFILE
@given(CASES)
def test_saved_runs_and_aliasing(case):
    hypothesis.event(f"{case[3]} {case[4]}")
    results = {}
    for backend in CPU_BACKENDS:
        for entry in ("raw", "public", "status"):
            check_call(case, backend, "cpu", entry, results)
    same_writes(case, results)


def test_former_crashes_in_a_subprocess():
    """The offsets that crashed the CPU backend (an end that wrapped around int64) and made
    Triton skip a chunk, on every backend, in a process of their own: each must be refused."""
    code = f"""
import os, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import conftest, torch
from fsam_kernels import backends, ops
for backend in {CPU_BACKENDS!r}:
    p = [torch.randn(5000), torch.randn(300)]
    g = [torch.randn_like(t) for t in p]
    offsets, saved = ops.save_layout(p)
    offsets[1] = 2 ** 63 - 16
    for call in (lambda: ops.perturb(p, g, torch.tensor(0.5), save_offsets=offsets, saved=saved, backend=backend),
                 lambda: backends.op("perturb_", backend)(p, g, None, offsets, saved, torch.tensor(0.5), False, 0.0),
                 lambda: backends.op("restore_", backend)(p, None, offsets, saved)):
        try:
            call()
            print(backend, "accepted")
        except ValueError:
            print(backend, "refused")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for b in CPU_BACKENDS for w in (b, "refused") * 3], done.stdout


def _radix_args(case):
    """The arguments of one radix stage with one defect each (None: valid)."""
    g = torch.Generator().manual_seed(7)
    scores = [torch.randn(CHUNK + 5, generator=g), torch.randn(9, generator=g).half()]
    chunks = 3
    state = torch.tensor([0, 5, 7, 0], dtype=torch.int64)
    hist = torch.zeros(2049, dtype=torch.int64)
    ties, before = torch.zeros(chunks, dtype=torch.int64), torch.zeros(chunks, dtype=torch.int64)
    cand = torch.zeros(64, dtype=torch.int64)
    arena = torch.zeros(4 + 2049, dtype=torch.int64)
    defects = {
        None: {},
        "state_size": {"state": torch.zeros(3, dtype=torch.int64)},
        "state_dtype": {"state": torch.zeros(4, dtype=torch.int32)},
        "state_2d": {"state": torch.zeros(2, 2, dtype=torch.int64)},
        "hist_size": {"hist": torch.zeros(2048, dtype=torch.int64)},
        "digit": {"digit": 3},
        "digit_negative": {"digit": -1},
        "state_in_hist": {"state": arena[:4], "hist": arena[2:2051]},
        "candidates_over_state": {"candidates": arena[:64], "state": arena[:4]},
        "candidates_dtype": {"candidates": torch.zeros(64, dtype=torch.float64)},
        "ties_size": {"ties": torch.zeros(chunks + 1, dtype=torch.int64)},
        "scores_dtype": {"scores": [torch.randn(9, dtype=torch.float64)]},
        "scores_view": {"scores": [torch.randn(9, 9)[:, 1]]},
    }
    a = dict(scores=scores, state=state, hist=hist, digit=1, candidates=cand, ties=ties, before=before)
    a.update(defects[case])
    return a


RADIX_CASES = [None, "state_size", "state_dtype", "state_2d", "hist_size", "digit", "digit_negative", "state_in_hist",
               "candidates_over_state", "candidates_dtype", "ties_size", "scores_dtype", "scores_view"]


@pytest.mark.parametrize("case", RADIX_CASES, ids=str)
def test_radix_stages_refuse_alike(case):
    """radix_histogram_, radix_select_, radix_tie_counts and radix_mask: every backend accepts or
    refuses the same arguments, with the same exception, and a refusal writes nothing."""
    answers = {}
    for backend in CPU_BACKENDS:
        for name in ("radix_histogram_", "radix_select_", "radix_tie_counts", "radix_mask"):
            a = _radix_args(case)
            args = {"radix_histogram_": (a["scores"], a["state"], a["digit"], False, a["hist"], a["candidates"]),
                    "radix_select_": (a["state"], a["hist"], a["digit"]),
                    "radix_tie_counts": (a["scores"], a["state"], False, a["candidates"]),
                    "radix_mask": (a["scores"], a["state"], a["ties"], a["before"], False)}[name]
            tensors = [t for x in args for t in (x if isinstance(x, list) else [x]) if isinstance(t, torch.Tensor)]
            before = [t.clone() for t in tensors]
            got = outcome(lambda: backends.op(name, backend)(*args))
            answers.setdefault(name, {})[backend] = got
            if got is not None:
                assert all(torch.equal(x, y) for x, y in zip(tensors, before)), (backend, name, case)
    for name, by_backend in answers.items():
        assert len(set(by_backend.values())) == 1, (name, case, by_backend)
    refusals = [v for by in answers.values() for v in by.values() if v is not None]
    assert not refusals if case is None else refusals, (case, answers)


FOUND_INF = [torch.tensor([0.0]), torch.tensor(-0.0), torch.tensor([1e-45]), torch.tensor([1e-300], dtype=torch.float64),
             torch.tensor([math.nan]), torch.tensor([math.inf]), torch.tensor([1], dtype=torch.int32),
             torch.tensor([True]), torch.tensor([2 ** 40]), torch.tensor([0.5], dtype=torch.float16)]


@pytest.mark.parametrize("found_inf", FOUND_INF, ids=lambda t: f"{t.dtype}-{t.item()}")
def test_found_inf_means_the_same_everywhere(found_inf):
    """Non-zero (NaN included, whatever the dtype, however small) skips the Fisher update on every
    backend; zero updates it."""
    skip = bool(found_inf.ne(0).item())
    for backend in CPU_BACKENDS:
        f = [torch.rand(CHUNK + 3), torch.rand(5)]
        g = [torch.randn(CHUNK + 3).half(), None]
        before = [x.clone() for x in f]
        backends.op("fisher_accumulate_", backend)(f, g, 0.9, 0.1, found_inf, None)
        assert all(torch.equal(a, b) for a, b in zip(f, before)) == skip, (backend, found_inf)


@pytest.mark.parametrize("defect", ["fisher_twice", "hist_in_fisher", "found_inf_size", "decay_nan", "alpha_inf",
                                    "clip_twice", "norms_in_tensors", "max_norm_nan", "eps_negative"])
def test_fisher_and_clip_refuse_alike(defect):
    for backend in CPU_BACKENDS:
        f = torch.rand(2 * CHUNK)
        fisher, grads, decay, alpha, found, hist = [f[:CHUNK], f[CHUNK:]], [torch.randn(CHUNK)] * 2, 0.9, 0.1, None, None
        tensors, norms, max_norm, eps = [torch.randn(7), torch.randn(CHUNK)], torch.rand(2), 1.0, 1e-6
        if defect == "fisher_twice":
            fisher = [fisher[0], fisher[0]]
        elif defect == "hist_in_fisher":
            hist = torch.zeros(4096, dtype=torch.int64)[: 2049]
            fisher = [hist.view(torch.float32)[:CHUNK], fisher[1]]
        elif defect == "found_inf_size":
            found = torch.zeros(2)
        elif defect == "decay_nan":
            decay = math.nan
        elif defect == "alpha_inf":
            alpha = math.inf
        elif defect == "clip_twice":
            tensors = [tensors[1], tensors[1]]
        elif defect == "norms_in_tensors":
            norms = tensors[1][:2]
        elif defect == "max_norm_nan":
            max_norm = math.nan
        elif defect == "eps_negative":
            eps = -1.0
        written = fisher + tensors + ([hist] if hist is not None else [])
        before = [t.clone() for t in written]
        if defect.startswith(("clip", "norms", "max_norm", "eps")):
            got = outcome(lambda: backends.op("clip_scale_", backend)(tensors, norms, max_norm, eps))
        else:
            got = outcome(lambda: backends.op("fisher_accumulate_", backend)(fisher, grads, decay, alpha, found, hist))
        assert got == "ValueError", (backend, defect, got)
        assert all(torch.equal(a, b) for a, b in zip(written, before)), (backend, defect)


SCALES = {"two_elements": (torch.tensor([0.1, 0.2]), "ValueError"), "float64": (torch.tensor(0.1, dtype=torch.float64),
                                                                          "TypeError"),
          "float16": (torch.tensor([0.1], dtype=torch.float16), "TypeError"), "empty": (torch.zeros(0), "ValueError"),
          "one_by_one": (torch.tensor([[0.1]]), None)}


@pytest.mark.parametrize("defect", SCALES)
def test_perturb_scale_refused_alike(defect):
    """perturb_'s scale: one float32 element of any shape; the same exception on every backend
    (TypeError for the dtype, ValueError for the size), and a refusal writes nothing."""
    scale, wanted = SCALES[defect]
    for backend in CPU_BACKENDS:
        params, grads = [torch.randn(CHUNK + 3), torch.randn(7)], [torch.randn(CHUNK + 3), torch.randn(7)]
        offsets, saved = ops.save_layout(params)
        before = [p.clone() for p in params]
        got = outcome(lambda: backends.op("perturb_", backend)(params, grads, None, offsets, saved, scale, False, 0.0))
        assert got == wanted, (backend, defect, got)
        if wanted is not None:
            assert all(torch.equal(a, b) for a, b in zip(params, before)), (backend, defect)


@pytest.mark.slow
@PROFILE
@given(st.lists(st.sampled_from([0, 1, 3, CHUNK - 1, CHUNK + 2]), min_size=1, max_size=3),
       st.sampled_from(DTYPES), st.integers(1, 4), st.integers(-2, 10 ** 9), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_topk_k_and_ties(sizes, dtype, distinct, k, absolute, seed):
    """Scores with few distinct values (ties everywhere), any k: every backend selects the same
    k entries as the reference (the lowest flat indices among equal scores), or refuses the same k."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(distinct, generator=g)
    scores = [levels[torch.randint(0, distinct, (n,), generator=g)].to(dtype) for n in sizes]
    total = sum(sizes)
    k = k if k < 0 else k % (total + 2)  # sometimes one past the end
    answers = {}
    for backend in CPU_BACKENDS:
        copies = [s.clone() for s in scores]
        try:
            answers[backend] = ops.topk_mask_packed(copies, k, absolute=absolute, backend=backend)
        except ValueError:
            answers[backend] = "ValueError"
        assert all(torch.equal(a, b) for a, b in zip(copies, scores))
    ref = answers["reference"]
    assert (ref == "ValueError") == (not 0 <= k <= total)
    for backend, got in answers.items():
        if ref == "ValueError":
            assert got == "ValueError", backend
        else:
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), backend
            assert int(got[1].sum()) == k
