"""Timing, the copy-bandwidth yardstick and the environment a result was measured in."""
import os
import platform
import statistics
import subprocess

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, min_time=0.5):
    """Median, 25th and 75th percentile of fn's time in ms and the number of timed samples, after a
    warm-up call.

    CPU: torch.utils.benchmark (blocked_autorange: a sample is a block's mean); CUDA:
    triton.testing.do_bench's every timed call when Triton is there, else CUDA events over 50 calls."""
    fn()
    sync(device)
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
            return _quantiles(do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)), return_mode="all"))
        except ImportError:
            times = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return _quantiles(times)
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return _quantiles([t * 1e3 for t in m.times])


# A ratio of medians means little when either time's interquartile range is this wide against its
# median, or when it rests on fewer samples than this.
WIDE_SPREAD, FEW_SAMPLES = 0.25, 5


def _quantiles(times):
    times = sorted(times)
    if len(times) < 4:
        q = {"median_ms": statistics.median(times), "p25_ms": times[0], "p75_ms": times[-1]}
    else:
        p25, median, p75 = statistics.quantiles(times, n=4)
        q = {"median_ms": median, "p25_ms": p25, "p75_ms": p75}
    return {**q, "samples": len(times)}


def unsteady(row):
    """Whether a measured row's spread or sample count makes ratios against it meaningless."""
    return row["samples"] < FEW_SAMPLES or (row["p75_ms"] - row["p25_ms"]) > WIDE_SPREAD * row["median_ms"]


def copy_bandwidth(device, nbytes=None):
    """GB/s of a large same-device copy, counting bytes read + written."""
    nbytes = nbytes or (1 << 30 if torch.device(device).type == "cuda" else 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def rotation(make_inputs, working_bytes, device, flush_bytes=None):
    """Enough independent input sets that cycling through them keeps the last-level cache from
    flattering small sizes (at least `flush_bytes` in all, at most 8 sets)."""
    flush_bytes = flush_bytes or ((100 << 20) if torch.device(device).type == "cuda" else (128 << 20))
    count = max(1, min(8, -(-flush_bytes // max(working_bytes, 1))))
    return [make_inputs(i) for i in range(count)]


def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpu": _cpu_name()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({env['cpu']}, {env['threads']} threads)"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                       text=True).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":!/benchmarks/results"], cwd=here, capture_output=True, text=True).stdout.strip()
        env["dirty"] = bool(dirty)
    except OSError:
        env["commit"] = None
    carried = os.path.join(os.path.dirname(here), ".gpu", "commit")  # make gpu-carry's: a copy without .git
    if env["commit"] is None and os.path.exists(carried):
        with open(carried) as f:
            words = f.read().split()
        env["commit"], env["dirty"] = words[0], "dirty" in words[1:]
    import fsam_kernels
    env["backends"] = fsam_kernels.available_backends()
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
