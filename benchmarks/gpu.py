"""The GPU proof, run on a machine with an NVIDIA GPU and its own python3 (no download, no install):

    python -m benchmarks.gpu first     # `make gpu-first`: the most valuable checks, inside 9 minutes
    python -m benchmarks.gpu second    # `make gpu-second`: FSDP2 and a GLUE run, if the machine is still there
    python -m benchmarks.gpu PART ...  # `make gpu-<part>`: parts one by one (PARTS below)

A plan runs its parts in order.  Each part has its own time allowance and is stopped at it; no
part starts when the elapsed time plus its allowance would pass the plan's budget (--budget-s,
9 minutes by default: the GPU machines end a command at 10).  Every part writes its log while it
runs and the summary is rewritten after each part, so a command stopped at its limit still
leaves what it did; the summary (device, driver, runtime, versions, commit, what ran, what was
skipped and why) is printed last.  Results go to --out, else $OUT when set, else
benchmarks/results/<gpu name>/.  `--device cpu` runs the same plan on the CPU with small sizes
(the dry runs of the tests and of `make gpu-rehearsal`).

This module imports nothing of fsam_kernels before the build part has run."""
import argparse
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_STAMP = os.path.join(ROOT, "build", "gpu_build.stamp")
PLAN_BUDGET_S = 540.0  # 9 minutes: a GPU machine runs a command for at most 10
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
GLUE_TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")  # small to large: the first calls finish whole tasks
# The op-level correctness tests: every op family against `reference` (poisoned outputs, ties, odd
# sizes, each dtype), the multi-step FSAM and sharpness-step bit-identity runs, PAC-tuning, and the
# no-host-sync tests; -k keeps the cases of the GPU backends (on the CPU: cuda-sim and Triton).
OPS_TESTS = ("tests/ops", "tests/optimizers/test_optimizers.py", "tests/optimizers/test_mixed_precision.py",
             "tests/optimizers/test_pac.py", "tests/adversarial/test_saved_layouts.py")
OPS_FILTER = "cuda or triton"
PYTEST_JOBS = min(8, os.cpu_count() or 1)
TRAINER_FSDP_TEST = "tests/optimizers/test_fsdp.py::test_trainer_under_fsdp2"
BENCH_LAST_JOB_S = 90  # the longest single job of the full benchmark (a 1.3B-parameter step)
# One small call of a CUDA op under a sanitizer; a runtime that refuses the tool fails here in seconds.
SANITIZER_PROBE = ("import ctypes, sys; c = ctypes.CDLL('libcuda.so.1'); d = ctypes.c_int(); x = ctypes.c_void_p(); "
                   "p = ctypes.c_uint64(); rc = c.cuInit(0) or c.cuDeviceGet(ctypes.byref(d), 0) or "
                   "c.cuDevicePrimaryCtxRetain(ctypes.byref(x), d) or c.cuCtxSetCurrent(x) or "
                   "c.cuMemAlloc_v2(ctypes.byref(p), 1024); print('probe: CUDA driver call returned', rc); "
                   "sys.exit(0 if rc == 0 else 1)")
SANITIZER_PROBE_S = 45


@dataclass
class Outcome:
    """What a part did: status is passed, failed, timeout, refused (the machine cannot run it)
    or skipped; line is one sentence for the summary's table; body its own section."""
    status: str
    line: str
    body: str = ""
    seconds: float = 0.0
    files: list = field(default_factory=list)


class Context:
    def __init__(self, a, out):
        self.a, self.device, self.out = a, a.device, out
        self.cuda = a.device == "cuda"


# ---------------------------------------------------------------- running and logging


def _start(cmd, log_path, env=None):
    """Start cmd in a process group of its own, its output streamed into log_path (kept if this
    process is killed); a log holds every call of its part."""
    log = open(log_path, "a")
    offset = log.tell()
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log, offset, time.time()


def _wait(started, timeout):
    """(exit code or "timeout", seconds, this call's output)."""
    proc, log, offset, t0 = started
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the whole group: pytest's and the sanitizer's children too
        proc.wait()
        code = "timeout"
        log.write(f"\n[stopped at its allowance of {timeout:.0f} s]\n")
    log.close()
    with open(log.name, errors="replace") as f:
        f.seek(offset)
        output = f.read()
    return code, time.time() - t0, output


def _run_logged(cmd, log_path, env=None, timeout=None):
    return _wait(_start(cmd, log_path, env), timeout)


def _status(code):
    return "passed" if code == 0 else "timeout" if code == "timeout" else "failed"


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _last(pattern, text, default=""):
    found = re.findall(pattern, text, flags=re.M)
    return found[-1] if found else default


# ---------------------------------------------------------------- the parts


def _source_key(env):
    """What the extension's build depends on: the sources, setup.py, this interpreter and torch,
    and the build settings."""
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(os.path.join(ROOT, "csrc"))):
        for name in sorted(files):
            path = os.path.join(d, name)
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        h.update(f.read())
    settings = [sys.executable, torch.__version__] + [env.get(k, "") for k in BUILD_SETTINGS if k != "MAX_JOBS"]
    h.update(repr(settings).encode())
    return h.hexdigest()


BUILD_SETTINGS = ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "FSAM_BUILD_SIM", "FSAM_BUILD_CUDA", "FSAM_WERROR")


def build_env(base=None):
    """The build's settings: sm_90 only, every core, no emulator (no GPU minutes on it); each can be
    overridden from the environment."""
    env = dict(os.environ if base is None else base)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env.setdefault("FSAM_BUILD_SIM", "0")
    return env


def _backends():
    out = subprocess.run([sys.executable, "-c", "import json, fsam_kernels; "
                          "print(json.dumps(fsam_kernels.available_backends()))"],
                         cwd=ROOT, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def part_build(ctx, allowance):
    """pip install -e . (setup.py build_ext --inplace if pip fails); not again while the build stamp
    says these sources were built with these settings by this interpreter and torch."""
    env = build_env()
    key = _source_key(env)
    code = 0
    if os.path.exists(BUILD_STAMP) and open(BUILD_STAMP).read() == key:
        how = "already built from these sources (the build stamp)"
    else:
        log = os.path.join(ctx.out, "build.log")
        started = time.time()
        code, _, _ = _run_logged([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                                  "-e", "."], log, env=env, timeout=allowance)
        if code not in (0, "timeout"):
            code, _, _ = _run_logged([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], log, env=env,
                                     timeout=max(1.0, allowance - (time.time() - started)))
        how = f"{time.time() - started:.0f} s (" + ", ".join(f"{k}={env[k]}" for k in BUILD_SETTINGS if k in env) + ")"
    found = _backends()
    missing = [b for b in ("cuda", "triton") if ctx.cuda and b not in (found or [])]
    status = _status(code) if code != 0 else "failed" if not found or missing else "passed"
    if os.path.exists(BUILD_STAMP):
        os.remove(BUILD_STAMP)
    if status == "passed":
        os.makedirs(os.path.dirname(BUILD_STAMP), exist_ok=True)
        with open(BUILD_STAMP, "w") as f:
            f.write(key)
    why = f"; missing backends {missing}" if missing else ""
    return Outcome(status, f"{how}; backends {found}{why}", files=["build.log"])


def _test_files(targets):
    """Folders expanded to their test files; files and node ids kept."""
    out = []
    for t in targets:
        path = os.path.join(ROOT, t)
        found = glob.glob(os.path.join(path, "**", "test_*.py"), recursive=True) if os.path.isdir(path) else None
        out += sorted(os.path.relpath(f, ROOT) for f in found) if found is not None else [t]
    return out


def _shards(files, jobs):
    """Files in at most `jobs` groups of about equal size (largest first into the lightest)."""
    groups = [[] for _ in range(max(1, min(jobs, len(files))))]
    weight = [0] * len(groups)
    for f in sorted(files, key=lambda f: -os.path.getsize(os.path.join(ROOT, f.split("::")[0]))):
        i = weight.index(min(weight))
        groups[i].append(f)
        weight[i] += os.path.getsize(os.path.join(ROOT, f.split("::")[0]))
    return [g for g in groups if g]


def _pytest(ctx, name, targets, allowance, select=None):
    """pytest over `targets` in parallel processes (the Triton JIT compiles and the imports are
    per process: one process would spend most of the allowance on them), one file per process
    at a time; -v so that a stopped run's log still says what passed."""
    shards = _shards(_test_files(targets), PYTEST_JOBS)
    runs = []
    for i, files in enumerate(shards):
        tag = name if len(shards) == 1 else f"{name}_{i}"
        junit = os.path.join(ctx.out, f"{tag}_junit.xml")
        if os.path.exists(junit):
            os.remove(junit)
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", f"--junitxml={junit}", "-p", "no:cacheprovider", *files,
               *(["-k", select] if select else [])]
        runs.append((tag, junit, cmd, _start(cmd, os.path.join(ctx.out, f"{tag}.log"))))
    deadline = time.time() + allowance
    codes, outputs, rows, seconds = [], [], [], 0.0
    for tag, junit, cmd, started in runs:
        code, took, output = _wait(started, max(0.1, deadline - time.time()))
        codes.append(code)
        outputs.append(output)
        seconds = max(seconds, took)
        rows += _junit_rows(junit) if os.path.exists(junit) else []
    output = "\n".join(outputs)
    counts = {k: len(re.findall(rf"^\S+::\S+ {k}\b", output, flags=re.M))
              for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    code = "timeout" if "timeout" in codes else next((c for c in codes if c not in (0, 5)), 0 if 0 in codes else 5)
    if code == 5:  # pytest: nothing collected
        code = "nothing collected"
    closing = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n or k == "PASSED")
    select_text = f' -k "{select}"' if select else ""
    body = (f"`pytest {' '.join(targets)}{select_text}` in {len(runs)} process(es): exit {code}, {seconds:.0f} s; "
            f"{closing}\n\n" + _table(["test file", "passed", "failed", "skipped", "seconds"], sorted(rows)))
    failures = sorted(set(re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)\b", output, flags=re.M)))
    if failures:
        body += "\n\nFailed:\n" + "\n".join(f"- `{f}`" for f in failures[:40])
    files = [f"{tag}.log" for tag, *_ in runs] + [f"{tag}_junit.xml" for tag, *_ in runs]
    return Outcome(_status(code), closing, body, files=files)


def _junit_rows(path):
    import xml.etree.ElementTree as ET
    files = {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return []
    for case in root.iter("testcase"):
        name = (case.get("classname") or "").split(".")[-1] or "?"
        row = files.setdefault(name, [name, 0, 0, 0, 0.0])
        outcome = 2 if case.find("failure") is not None or case.find("error") is not None else \
            3 if case.find("skipped") is not None else 1
        row[outcome] += 1
        row[4] += float(case.get("time") or 0)
    return [r[:4] + [f"{r[4]:.1f}"] for r in sorted(files.values())]


def part_ops(ctx, allowance):
    """The op-level correctness tests of the GPU backends (OPS_TESTS, -k OPS_FILTER)."""
    return _pytest(ctx, "ops", ctx.a.pytest_args or list(OPS_TESTS), allowance,
                   None if ctx.a.pytest_args else OPS_FILTER)


def part_test(ctx, allowance):
    """The whole test suite."""
    return _pytest(ctx, "test", ctx.a.pytest_args or ["tests"], allowance)


def part_sanitize(ctx, allowance):
    """compute-sanitizer's tools over benchmarks/sanitize_ops.py (on the CPU: the workload alone).
    A probe first: a runtime that refuses the sanitizer is recorded in seconds."""
    quick = ctx.a.plan == "first"
    script = [sys.executable, "-m", "benchmarks.sanitize_ops", "--device", ctx.device,
              *(["--quick", "--backends", "cuda"] if quick and ctx.cuda else ["--quick"] if quick else [])]
    run_env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # every allocation its own, as the tools need
    started = time.time()
    tools = ["none"]
    if ctx.cuda:
        sanitizer = shutil.which("compute-sanitizer")
        if sanitizer is None:
            return Outcome("refused", "compute-sanitizer is not on PATH")
        code, _, output = _run_logged([sanitizer, "--tool=memcheck", "--error-exitcode=3", sys.executable, "-c",
                                       SANITIZER_PROBE], os.path.join(ctx.out, "sanitize_probe.log"),
                                      timeout=min(SANITIZER_PROBE_S, allowance))
        if code != 0:
            # what the tool said, past the "$ cmd" line
            said = [x.strip("= ") for x in output.splitlines()[1:] if re.search(r"not supported|rror", x)]
            why = said[0] if said else f"exit {code}"
            return Outcome("refused", f"the sanitizer probe failed ({why}) in {time.time() - started:.0f} s; "
                           "compute-sanitizer works only on the Firecracker runtime", files=["sanitize_probe.log"])
        tools = ctx.a.tools or (["memcheck", "racecheck"] if quick else list(SANITIZER_TOOLS))
    rows, failed, timed_out, files = [], False, False, []
    for tool in tools:
        left = allowance - (time.time() - started)
        if left <= 0:
            rows.append([tool, "not run: over the allowance", "", "", ""])
            timed_out = True
            continue
        cmd = script if tool == "none" else [shutil.which("compute-sanitizer"), f"--tool={tool}",
                                             "--error-exitcode=3", "--target-processes=all", *script]
        log = f"sanitize_{tool}.log"
        code, seconds, output = _run_logged(cmd, os.path.join(ctx.out, log), env=run_env, timeout=left)
        summary = re.findall(r"ERROR SUMMARY: (\d+) error", output)
        errors = sum(map(int, summary)) if summary else ("n/a" if tool == "none" else "no summary")
        timed_out |= code == "timeout"
        failed |= code not in (0, "timeout") or errors not in (0, "n/a", "no summary")
        rows.append([tool, errors, code, f"{seconds:.0f}", _last(r"^sanitize_ops: (.*)$", output)])
        files.append(log)
    line = "; ".join(f"{r[0]}: {r[1]} errors, exit {r[2]}" for r in rows)
    status = "failed" if failed else "timeout" if timed_out else "passed"
    return Outcome(status, line, _table(["tool", "errors", "exit", "seconds", "calls"], rows),
                   files=files)


def part_bench(ctx, allowance):
    """benchmarks.run in a child (a kernel fault cannot take the plan down): the first plan's
    BERT-base kernels and step; alone, the whole benchmark.  The copy bandwidth is measured in
    the same run; results are written after every job."""
    out = os.path.join(ctx.out, "bench")
    if ctx.a.plan == "first":
        lists = "bert-base" if ctx.cuda else "200K"
        args = ["--sizes", "", "--lists", lists, "--step-lists", lists, "--compile", "none",
                "--min-time", "0.2" if ctx.cuda else "0.01"]
    else:
        args = []
    # the benchmark checks its budget before each job: leave the last job room to finish
    last_job = min(BENCH_LAST_JOB_S, allowance / 3)
    cmd = [sys.executable, "-m", "benchmarks.run", "--device", ctx.device, "--out", out, "--no-plots",
           "--budget-s", f"{max(0.0, allowance - last_job):.0f}", *args, *(ctx.a.bench_args or [])]
    code, seconds, output = _run_logged(cmd, os.path.join(ctx.out, "bench.log"), timeout=allowance)
    report = os.path.join(out, "report.md")
    body = open(report).read().split("\n", 2)[-1] if os.path.exists(report) else "(no report)"
    results, predicted = os.path.join(out, "results.json"), os.path.join(out, "predicted.md")
    if ctx.cuda and os.path.exists(results):  # the measured times beside the cost model's predictions
        _run_logged([sys.executable, "-m", "benchmarks.traffic", "--compare-bench", results,
                     torch.cuda.get_device_name(), predicted], os.path.join(ctx.out, "bench.log"), timeout=60)
        if os.path.exists(predicted):
            body += "\n\n### Measured against the cost model's prediction\n\n" + open(predicted).read()
    bw = _last(r"measured copy bandwidth ([\d.]+ GB/s)", body, "?")
    left = _last(r"^Not run, over the time budget: (.*)$", body)
    line = f"copy bandwidth {bw}; {len(re.findall(r'^[|] ', body, flags=re.M))} table rows" + (
        f"; not run: {left}" if left else "")
    return Outcome(_status(code), line, body, files=["bench.log", "bench/"])


def _ncu():
    found = shutil.which("ncu") or sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def part_ncu(ctx, allowance):
    """Nsight Compute's counters of every package kernel of the traffic workload (each op family
    once per GPU backend, fp32, at two sizes: benchmarks/traffic.py), set against the model counted
    without a GPU (benchmarks/results/cpu/traffic/ncu_model.json), counter by counter.  On the CPU
    (the dry run): the workload alone, on cuda-sim."""
    log = os.path.join(ctx.out, "ncu.log")
    workload = [sys.executable, "-m", "benchmarks.traffic", "--ncu-workload", ctx.device]
    if not ctx.cuda:
        code, seconds, _ = _run_logged(workload + ["--backends", "cuda-sim", "--ncu-scales", "4096"], log,
                                       timeout=allowance)
        return Outcome(_status(code), f"the workload on cuda-sim: exit {code} (no ncu on the CPU)", files=["ncu.log"])
    ncu = _ncu()
    if ncu is None:
        return Outcome("refused", "no ncu on this machine")
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu", "traffic", "ncu_model.json")) as f:
        kernels = sorted({r["kernel"] for r in json.load(f)["rows"]})
    from fsam_kernels.traffic import NCU_METRICS  # after the build: the package imports
    csv_path = os.path.join(ctx.out, "ncu.csv")
    cmd = [ncu, "--clock-control", "none", "--csv", "--page", "details", "--print-units", "base",
           "--print-kernel-base", "function", "--kernel-name-base", "function",
           "--kernel-name", "regex:^(" + "|".join(kernels) + ")$", "--metrics", ",".join(NCU_METRICS.values()),
           "--log-file", csv_path, *workload]
    code, seconds, output = _run_logged(cmd, log, timeout=allowance)
    md = os.path.join(ctx.out, "ncu_compare.md")
    if os.path.exists(csv_path):
        _run_logged([sys.executable, "-m", "benchmarks.traffic", "--compare", csv_path, md], log, timeout=60)
    body = open(md).read() if os.path.exists(md) else "(no comparison: " + _last(r"^==ERROR==.*$", output, "?") + ")"
    return Outcome(_status(code), body.split("\n", 1)[0][:200], body, files=["ncu.log", "ncu.csv", "ncu_compare.md"])


def part_fsdp(ctx, allowance):
    """benchmarks.fsdp_step at world size 1 (nccl on the GPU; gloo for the dry run), then, on a GPU,
    the Trainer under FSDP2 (accelerate's plugin needs one)."""
    started = time.time()
    cmd = [sys.executable, "-m", "benchmarks.fsdp_step", "--device", ctx.device, "--worlds", "1", "--list",
           ctx.a.fsdp_list or ("bert-base" if ctx.cuda else "300K"), "--out", ctx.out]
    code, seconds, _ = _run_logged(cmd, os.path.join(ctx.out, "fsdp.log"), timeout=allowance)
    md = os.path.join(ctx.out, "fsdp_step.md")
    table = open(md).read().split("\n", 1)[-1] if code == 0 and os.path.exists(md) else "(no result)"
    body = f"`{' '.join(cmd[1:])}`: exit {code}, {seconds:.0f} s\n{table}"
    line = f"fsdp_step exit {code}"
    status = _status(code)
    if ctx.cuda:
        trainer = _pytest(ctx, "trainer_fsdp", [TRAINER_FSDP_TEST], max(1.0, allowance - (time.time() - started)))
        body += "\n\n### The Trainer under FSDP2\n\n" + trainer.body
        line += f"; Trainer under FSDP2: {trainer.line}"
        status = status if trainer.status == "passed" else trainer.status
    return Outcome(status, line, body, files=["fsdp.log", "fsdp_step.md", "fsdp_step.json"])


def part_glue(ctx, allowance):
    """GLUE fine-tuning (benchmarks/finetune_glue.py), resumable: call it again to go on.  The
    second plan: RTE with AdamW, SAM and FSAM, one seed; alone, the five tasks, seeds 0-2."""
    from . import fewshot_glue
    a = ctx.a
    carried = os.path.join(ROOT, ".gpu", "glue")
    glue_dir = a.data_dir or os.environ.get("GLUE_DIR") or (carried if os.path.isdir(carried) else None)
    if not glue_dir:
        return Outcome("refused", "no GLUE data: set GLUE_DIR, pass --data-dir or carry .gpu/glue (make gpu-carry)")
    model_dir = a.model_dir or (os.path.join(ROOT, ".gpu", "minilm-fp16")
                                if os.path.isdir(os.path.join(ROOT, ".gpu", "minilm-fp16")) else None)
    second = a.plan == "second"
    tasks = a.tasks or (["rte"] if second else list(GLUE_TASKS))
    common = ["--data-dir", glue_dir, "--tasks", *tasks, "--budget-s", f"{allowance * 0.9:.0f}",
              *(["--model-dir", model_dir] if model_dir else []), *([] if ctx.cuda else ["--cpu"])]
    if a.fewshot:  # the few-shot study (benchmarks/fewshot_glue.py): every optimizer, the clip sweep
        name, md_name = "fewshot_glue", "fewshot.md"
        cmd = [sys.executable, "-m", "benchmarks.fewshot_glue", *common, "--seeds", *map(str, a.seeds or range(5)),
               "--sizes", *map(str, fewshot_glue.SIZES), "--epochs", *map(str, fewshot_glue.EPOCHS),
               "--optimizers", *FEWSHOT_OPTIMIZERS, "--clip-norms", *map(str, CLIP_NORMS),
               "--out", os.path.join(ctx.out, name)]
    else:
        name, md_name = "glue", "glue.md"
        seeds = a.seeds or ([0] if second else range(3))
        cmd = [sys.executable, "-m", "benchmarks.finetune_glue", *common, "--seeds", *map(str, seeds),
               "--epochs", str(a.epochs), "--out", os.path.join(ctx.out, name), "--resume",
               *(["--optimizers", "adamw", "sam", "fsam"] if second else [])]
    cmd += a.glue_args or []
    code, seconds, output = _run_logged(cmd, os.path.join(ctx.out, f"{name}.log"), timeout=allowance)
    md = os.path.join(ctx.out, name, md_name)
    table = open(md).read().split("\n\n", 2)[-1] if os.path.exists(md) else "(no run finished)"
    left = _last(r"^left for the next call.*$", output, "All runs done.")
    return Outcome(_status(code), f"{seconds:.0f} s in this call. {left}", table, files=[f"{name}.log", f"{name}/"])


# The few-shot study's plan on a GPU: every task of GLUE_TASKS, its sizes and epochs, the papers' clip sweep.
FEWSHOT_OPTIMIZERS = ("adamw", "sam", "fsam", "adamw-clip", "pac")
CLIP_NORMS = (0.01, 0.05, 0.1, 0.5, 1.0)

PARTS = {"build": part_build, "ops": part_ops, "test": part_test, "sanitize": part_sanitize, "ncu": part_ncu,
         "bench": part_bench, "fsdp": part_fsdp, "glue": part_glue}
# (part, seconds allowed on a GPU, seconds allowed for the CPU dry run).  gpu-first's 540 s of
# allowances fit its 540 s budget; a part that ends early leaves its time to the next ones.
PLANS = {
    "first": [("build", 150, 1200), ("ops", 140, 1800), ("sanitize", 80, 300), ("ncu", 70, 600),
              ("bench", 100, 300)],
    "second": [("build", 150, 1200), ("fsdp", 150, 300), ("glue", 230, 600)],
}


# ---------------------------------------------------------------- the plan and its summary


def results_dir(device, out=None):
    if out:
        return out
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    tag = "cpu-dry-run" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    return os.path.join(HERE, "results", tag)


def environment(device):
    from .timing import environment as measured_in
    env = measured_in(device)
    env["kernel"] = platform.release()  # 4.4.0 is gVisor; a Firecracker VM reports its own kernel
    for name in ("transformers", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if device == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip() or None
        except OSError:
            env["driver"] = None
        env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    return env


def write_summary(ctx, env, done, started, final):
    """summary.md (and summary.json) in the results folder: rewritten after every part."""
    head = (f"# fsam_kernels on {env['device']}: `{' '.join(ctx.a.parts)}`\n\n"
            f"driver {env.get('driver')}, CUDA runtime {env.get('cuda')}, kernel {env['kernel']}, "
            f"torch {env['torch']}, "
            f"triton {env['triton']}, transformers {env['transformers']}, accelerate {env['accelerate']}, "
            f"python {env['python']}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
            f"backends {env['backends']}\n\n")
    rows = [[name, o.status, f"{o.seconds:.0f}", f"{allowance:.0f}", o.line.replace("|", "/")]
            for name, allowance, o in done]
    state = (f"{time.time() - started:.0f} s in all" if final else
             f"in progress: {time.time() - started:.0f} s so far")
    text = head + f"{state}; results in `{ctx.out}`\n\n" + _table(["part", "status", "seconds", "allowed", "result"],
                                                                    rows)
    for name, _, o in done:
        if o.body:
            text += f"\n\n## {name}\n\n{o.body}"
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ctx.out, "summary.json"), "w") as f:
        parts = [{"part": n, "allowed_s": al, "status": o.status, "seconds": o.seconds, "result": o.line,
                  "files": o.files} for n, al, o in done]
        json.dump({"environment": env, "parts": parts}, f, indent=1)
    return text


def plan_of(a):
    """[(part, allowance)]: a plan's parts with their own allowances; parts named on the command
    line get what is left of the budget when they start (None here)."""
    if a.plan:
        column = 1 if a.device == "cuda" else 2
        return [(row[0], row[column]) for row in PLANS[a.plan]]
    return [(name, None) for name in a.parts]


def run_plan(ctx, budget_s):
    started = time.time()
    done, env = [], None
    for name, allowance in plan_of(ctx.a):
        elapsed = time.time() - started
        allowance = budget_s - elapsed if allowance is None else allowance
        if name in (ctx.a.skip or []):
            outcome = Outcome("skipped", "--skip")
        elif allowance <= 0 or elapsed + allowance > budget_s:
            outcome = Outcome("skipped", f"not started: {elapsed:.0f} s elapsed + its {allowance:.0f} s would pass "
                                         f"the budget of {budget_s:.0f} s")
        else:
            print(f"benchmarks.gpu: {name} (allowed {allowance:.0f} s, {elapsed:.0f} s elapsed)", flush=True)
            try:
                outcome = PARTS[name](ctx, allowance)
            except Exception as exc:  # noqa: BLE001  (a part's own error is its result; the plan goes on)
                outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
            outcome.seconds = time.time() - started - elapsed
        done.append((name, allowance, outcome))
        env = env or environment(ctx.device)  # after the build: the backends it built
        write_summary(ctx, env, done, started, final=False)
    return done, write_summary(ctx, env or environment(ctx.device), done, started, final=True)


def default_budget(a):
    if a.device == "cuda":
        return PLAN_BUDGET_S
    return sum(row[2] for row in PLANS[a.plan]) if a.plan else 3600.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", metavar="PLAN_OR_PART", help=f"first, second, or parts of {sorted(PARTS)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    ap.add_argument("--out", help="results folder (default $OUT, else benchmarks/results/<gpu name>)")
    ap.add_argument("--budget-s", type=float, help=f"seconds the command may take (default {PLAN_BUDGET_S:.0f} on a "
                                                   "GPU; for the dry run, a plan's allowances, else 3600)")
    ap.add_argument("--skip", nargs="+", choices=sorted(PARTS), help="parts not to run (recorded as skipped)")
    ap.add_argument("--tools", nargs="+", choices=SANITIZER_TOOLS, help="sanitize: the tools (default: all; "
                                                                         "first: memcheck and racecheck)")
    ap.add_argument("--data-dir", help="glue: the GLUE data (default: $GLUE_DIR, else .gpu/glue)")
    ap.add_argument("--model-dir", help="glue: the MiniLM folder (default: .gpu/minilm-fp16 when carried)")
    ap.add_argument("--tasks", nargs="+", choices=GLUE_TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, help="glue: default 0 1 2 (second: 0; the few-shot study: 0 to 4)")
    ap.add_argument("--fewshot", action="store_true", help="glue: the few-shot study instead of full training")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--pytest-args", nargs="+", help="ops, test: what pytest runs instead of the default")
    ap.add_argument("--bench-args", nargs=argparse.REMAINDER, help="bench: more flags for benchmarks.run")
    ap.add_argument("--fsdp-list", help="fsdp: the parameter list (default bert-base; the dry run 300K)")
    ap.add_argument("--glue-args", nargs=argparse.REMAINDER, help="glue: more flags for benchmarks.finetune_glue")
    a = ap.parse_args(argv)
    a.plan = a.parts[0] if a.parts[0] in PLANS else None
    if a.plan and len(a.parts) > 1:
        ap.error(f"a plan ({a.plan}) takes no parts after it")
    unknown = [p for p in a.parts if p not in PARTS and p not in PLANS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}: plans {sorted(PLANS)}, parts {sorted(PARTS)}")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no GPU is visible (use --device cpu for the dry run)")
    out = results_dir(a.device, a.out)
    os.makedirs(out, exist_ok=True)
    ctx = Context(a, out)
    done, text = run_plan(ctx, a.budget_s if a.budget_s is not None else default_budget(a))
    print(text)
    return 0 if all(o.status in ("passed", "skipped", "refused") for _, _, o in done) else 1


if __name__ == "__main__":
    sys.exit(main())
