"""The main benchmark: `python -m benchmarks.run` (what `make bench` runs).

Kernel microbenchmarks for every family and the whole optimizer step, every provider side by
side in one run, on synthetic sizes and the real parameter lists of benchmarks/param_lists.py.
Writes JSON, CSV, a markdown report and PNG plots to a new folder under benchmarks/results/local/
(--out names another) and prints a summary; every row has its sample count and spread, and a
ratio that they make meaningless is flagged.  `--quick` is a one-minute smoke run; `--help` lists
the flags."""
import argparse
import csv
import json
import os
import time

import torch

from fsam_kernels import backends

from . import kernels, step
from .param_lists import parse_size, shapes_for
from .timing import FEW_SAMPLES, WIDE_SPREAD, copy_bandwidth, environment

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {
    "cpu": {"sizes": "1M,4M,16M,50M", "lists": "minilm,bert-base", "step_lists": "minilm,bert-base"},
    "cuda": {"sizes": "1M,10M,100M", "lists": "minilm,bert-base,roberta-large,opt-1.3b,llama-7b",
             "step_lists": "minilm,bert-base,roberta-large,opt-1.3b"},
}


QUICK = {"sizes": "1M", "lists": "", "step_lists": "1M", "min_time": 0.05, "compile": "none"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", help="synthetic totals, e.g. 1M,4M (default per device)")
    ap.add_argument("--lists", help="real parameter lists for the kernels: minilm,bert-base,roberta-large")
    ap.add_argument("--step-lists", help="parameter lists for the whole-step benchmark ('' for none)")
    ap.add_argument("--families", default=",".join(kernels.FAMILIES))
    ap.add_argument("--providers", help="only providers whose name contains one of these (comma-separated)")
    ap.add_argument("--backends", help="fsam_kernels backends to run (default: every available one)")
    ap.add_argument("--compile", choices=["lists", "all", "none"],
                    help="where to run torch.compile of the eager code (compiling takes seconds per graph; "
                         "default lists)")
    ap.add_argument("--reference-max", default=None,
                    help="largest list the slow eager `reference` backend runs on (default 20M on CPU, 400M on GPU)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per measurement")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="results folder (default: a new one, benchmarks/results/local/<device>-<time>; "
                                  "pass benchmarks/results/<device> to update the committed results)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every family and the step in about a minute on 2 CPU cores: 1M parameters, "
                         "short measurements, no torch.compile (flags given as well win)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no job after this many seconds (the jobs left are listed in the report)")
    return ap.parse_args(argv)


def _split(text):
    return [t for t in (text or "").split(",") if t]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    d = {**DEFAULTS[device], **(QUICK if args.quick else {})}
    args.compile = args.compile or d.get("compile", "lists")
    sizes = _split(args.sizes if args.sizes is not None else d["sizes"])
    lists = _split(args.lists if args.lists is not None else d["lists"])
    step_lists = _split(args.step_lists if args.step_lists is not None else d["step_lists"])
    families = _split(args.families)
    only = _split(args.providers) or None
    ours = _split(args.backends) or backends.native_backends(device)
    min_time = args.min_time or d.get("min_time") or (0.3 if device == "cpu" else 0.5)
    tag = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    out = args.out or os.path.join(HERE, "results", "local", f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)

    from tqdm import tqdm
    env = environment(device)
    started = time.time()
    bw = copy_bandwidth(device)
    env["copy_gbps"] = bw
    reference_max = parse_size(args.reference_max or ("20M" if device == "cpu" else "400M"))
    jobs = [("kernel", f, s) for s in sizes + lists for f in families] + [("step", None, s) for s in step_lists]
    kernel_rows, step_rows, env["not_run"] = [], [], []
    for kind, family, spec in tqdm(jobs, desc="fsam benchmarks", unit="job"):
        if args.budget_s is not None and time.time() - started > args.budget_s:
            env["not_run"].append(f"{kind} {family or ''} {spec}".replace("  ", " "))
            continue
        n = sum(torch.Size(s).numel() for _, s in shapes_for(spec))
        backends_here = [b for b in ours if b != "reference" or n <= reference_max]
        if kind == "kernel":
            with_compile = args.compile == "all" or (args.compile == "lists" and spec in lists)
            kernel_rows += kernels.run(family, spec, device, backends_here, with_compile=with_compile, min_time=min_time,
                                       copy_gbps=bw, only=only)
        else:
            step_rows += step.run(spec, device, backends_here, min_time=min_time, only=only)
        env["seconds"] = time.time() - started
        write_results(out, env, kernel_rows, step_rows, plots=False)  # a run stopped from outside keeps its jobs
    env["seconds"] = time.time() - started
    write_results(out, env, kernel_rows, step_rows, plots=not args.no_plots)
    print(summary(env, kernel_rows, step_rows))
    print(f"\nresults in {out}")


def write_results(out, env, kernel_rows, step_rows, plots=True):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": env, "kernels": kernel_rows, "step": step_rows}, f, indent=1)
    for name, rows in (("kernels.csv", kernel_rows), ("step.csv", step_rows)):
        if rows:
            with open(os.path.join(out, name), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
                w.writeheader()
                w.writerows(rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(summary(env, kernel_rows, step_rows, markdown=True) + "\n")
    if plots:
        from .plots import plot_all
        plot_all(out, kernel_rows, step_rows, env)


def _table(headers, rows, markdown):
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*map(str, r)) for r in rows])


def summary(env, kernel_rows, step_rows, markdown=False):
    head = (f"{'# ' if markdown else ''}fsam_kernels benchmark: {env['device']}\n\n"
            f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
            f"{env['threads']} CPU threads, backends {env['backends']}; measured copy bandwidth "
            f"{env['copy_gbps']:.1f} GB/s (read + write); {env['seconds']:.0f} s in all.\n")
    parts = [head]
    if env.get("not_run"):
        parts.append(f"Not run, over the time budget: {', '.join(env['not_run'])}.\n")
    oom = [r for r in kernel_rows if r.get("oom")]
    if oom:
        parts.append("Out of GPU memory (not measured): " +
                     ", ".join(f"{r['family']} {r['list']} {r['provider']}" for r in oom) + ".\n")
    kernel_rows = [r for r in kernel_rows if not r.get("oom")]
    if kernel_rows:
        rows = [(r["family"], r["list"], f"{r['params'] / 1e6:.1f}M", r["provider"], f"{r['median_ms']:.3f}",
                 f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f}", r["samples"], f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.0f}%",
                 f"{r['full_reads']:.1f}" if r["family"] == "topk" else "",
                 _ratio(r["speedup_vs_published"], r, ".1f"))
                for r in kernel_rows]
        parts.append(("## " if markdown else "") + "Kernels (median ms; GB/s from the bytes each family must move, "
                     "docs/algorithm.md)\n")
        parts.append(_table(["family", "list", "params", "provider", "ms", "p25-p75", "n", "GB/s", "% copy BW",
                             "full reads", "vs published"], rows, markdown))
    if step_rows:
        rows = [(r["list"], f"{r['params'] / 1e6:.1f}M", r["optimizer"], f"{r['median_ms']:.2f}",
                 f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}", r["samples"], _ratio(r["vs_adamw"], r, ".2f"),
                 f"{r['held_bytes_per_param']:.3f}",
                 f"{r['peak_extra_bytes_per_param']:.3f}" if "peak_extra_bytes_per_param" in r else "n/a")
                for r in step_rows]
        parts.append("\n" + ("## " if markdown else "") +
                     "Whole optimizer step (outside forward/backward, AdamW included)\n")
        parts.append(_table(["list", "params", "optimizer", "ms", "p25-p75", "n", "vs AdamW", "held B/param",
                             "peak extra B/param"], rows, markdown))
    if any(r.get("ratio_unsteady") for r in kernel_rows + step_rows):
        parts.append(f"\n(?) after a ratio: this row or its anchor has fewer than {FEW_SAMPLES} samples (n) or an "
                     f"interquartile range over {WIDE_SPREAD:.0%} of its median: the ratio means little. "
                     "Measure again on an idle machine or with a larger --min-time.")
    return "\n".join(parts)


def _ratio(value, row, fmt):
    if not value:
        return ""
    return f"{value:{fmt}}x" + (" (?)" if row.get("ratio_unsteady") else "")


if __name__ == "__main__":
    main()
