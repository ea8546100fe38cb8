"""The GPU proof, one command per step (`make gpu-test`, `gpu-sanitize`, `gpu-bench`, `gpu-glue`):

    python -m benchmarks.gpu test       # the test suite on the GPU (every GPU backend against `reference`)
    python -m benchmarks.gpu sanitize   # compute-sanitizer memcheck/racecheck/synccheck/initcheck over every op
    python -m benchmarks.gpu bench      # python -m benchmarks.run --device cuda, within the time budget
    python -m benchmarks.gpu glue       # GLUE fine-tuning, resumable: call it again to go on
    python -m benchmarks.gpu fsdp       # the optimizers over FSDP2 at world size 1 against plain ones

Each step writes its log and a Markdown summary (with device, driver, versions and commit)
under benchmarks/results/<gpu name>/ and prints the summary last.  Each stays within
--budget-s (a GPU machine runs a command for at most 10 minutes): the slow
steps stop starting work once the budget is spent and say what they left.  The default, 480 s,
leaves a minute of a 9-minute target for building the extension.  `--device cpu`
runs the same plumbing on the CPU with small sizes (the CI dry runs)."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

from . import fewshot_glue
from .run import _table
from .timing import environment

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
GLUE_TASKS = ("rte", "mrpc", "stsb", "cola", "sst2")  # small to large: the first calls finish whole tasks
BENCH_LAST_JOB_S = 90  # the longest single benchmark job expected (a 1.3B-parameter step)


def results_dir(device, out=None):
    if out:
        return out
    tag = "cpu-dry-run" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    return os.path.join(HERE, "results", tag)


def _environment(device):
    env = environment(device)
    if device == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip() or None
        except OSError:
            env["driver"] = None
    return env


def _run_logged(cmd, log_path, env=None, timeout=None):
    """Run cmd with its output to log_path; returns (exit code or "timeout", seconds, output)."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            code, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:  # its partial output comes as bytes
            code, output = "timeout", (exc.stdout or b"").decode(errors="replace")
        log.write(output)
    return code, time.time() - start, output


def _write_summary(out, step, env, body):
    head = (f"# gpu {step}: {env['device']}\n\ndriver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
            f"triton {env['triton']}, python {env['python']}, commit {env['commit']}"
            f"{' (dirty)' if env.get('dirty') else ''}, backends {env['backends']}\n\n")
    text = head + body + "\n"
    with open(os.path.join(out, f"{step}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{step}_environment.json"), "w") as f:
        json.dump(env, f, indent=1)
    print(text)


def step_test(a, env, out):
    """pytest over the suite; a table per test file of passed / failed / skipped."""
    junit = os.path.join(out, "test_junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", f"--junitxml={junit}", "-p", "no:cacheprovider",
           *(a.pytest_args or ["tests"])]
    code, seconds, output = _run_logged(cmd, os.path.join(out, "test.log"), timeout=a.budget_s)
    rows = _junit_rows(junit) if os.path.exists(junit) else []
    closing = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    body = (f"`{' '.join(cmd[1:])}`: exit {code}, {seconds:.0f} s; {closing[-1] if closing else 'no pytest summary'}"
            f"\n\n" + _table(["test file", "passed", "failed", "skipped", "seconds"], rows, markdown=True))
    _write_summary(out, "test", env, body)
    return 0 if code == 0 else 1


def _junit_rows(path):
    import xml.etree.ElementTree as ET
    files = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = (case.get("classname") or "").split(".")[-1] or "?"
        row = files.setdefault(name, [name, 0, 0, 0, 0.0])
        outcome = 2 if case.find("failure") is not None or case.find("error") is not None else \
            3 if case.find("skipped") is not None else 1
        row[outcome] += 1
        row[4] += float(case.get("time") or 0)
    return [r[:4] + [f"{r[4]:.1f}"] for r in sorted(files.values())]


def step_sanitize(a, env, out):
    """Every op of every GPU backend under each compute-sanitizer tool (on CPU: the script alone)."""
    script = [sys.executable, "-m", "benchmarks.sanitize_ops", "--device", a.device]
    run_env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # every allocation its own, as the tools need
    sanitizer = shutil.which("compute-sanitizer") if a.device == "cuda" else None
    if a.device == "cuda" and sanitizer is None:
        raise SystemExit("gpu sanitize: compute-sanitizer is not on PATH")
    tools = a.tools if sanitizer else ["none"]
    rows, failed, start = [], False, time.time()
    for tool in tools:
        if time.time() - start > a.budget_s:
            rows.append([tool, "not run: over the time budget", "", ""])
            continue
        cmd = script if tool == "none" else [sanitizer, f"--tool={tool}", "--error-exitcode=3",
                                             "--target-processes=all", *script]
        code, seconds, output = _run_logged(cmd, os.path.join(out, f"sanitize_{tool}.log"), env=run_env,
                                            timeout=max(1, a.budget_s - (time.time() - start)))
        summary = re.findall(r"ERROR SUMMARY: (\d+) error", output)
        errors = sum(map(int, summary)) if summary else ("n/a" if tool == "none" else "no summary")
        ops_line = [x for x in output.splitlines() if x.startswith("sanitize_ops:")]
        failed |= code != 0 or (errors not in (0, "n/a"))
        rows.append([tool, errors, code, f"{seconds:.0f}", ops_line[-1][len("sanitize_ops: "):] if ops_line else ""])
    body = _table(["tool", "errors", "exit", "seconds", "calls"], rows, markdown=True)
    _write_summary(out, "sanitize", env, body)
    return 1 if failed else 0


def step_bench(a, env, out):
    from . import run
    # benchmarks.run checks its budget before each job: leave the last job room to finish
    argv = ["--device", a.device, "--out", out, "--budget-s", str(max(0.0, a.budget_s - BENCH_LAST_JOB_S)),
            *(a.bench_args or [])]
    run.main(argv)
    with open(os.path.join(out, "report.md")) as f:
        _write_summary(out, "bench", env, f.read().split("\n", 2)[-1])
    return 0


def step_glue(a, env, out):
    glue_dir = a.data_dir or os.environ.get("GLUE_DIR")
    if not glue_dir:
        raise SystemExit("gpu glue: set GLUE_DIR or pass --data-dir")
    common = ["--data-dir", glue_dir, "--tasks", *a.tasks, "--budget-s", str(a.budget_s),
              *(["--model-dir", a.model_dir] if a.model_dir else []), *(["--cpu"] if a.device == "cpu" else [])]
    if a.fewshot:  # the few-shot study (benchmarks/fewshot_glue.py): every optimizer, the clip sweep
        name, md_name = "fewshot_glue", "fewshot.md"
        cmd = [sys.executable, "-m", "benchmarks.fewshot_glue", *common, "--seeds", *map(str, a.seeds or range(5)),
               "--sizes", *map(str, fewshot_glue.SIZES), "--epochs", *map(str, fewshot_glue.EPOCHS),
               "--optimizers", *FEWSHOT_OPTIMIZERS, "--clip-norms", *map(str, CLIP_NORMS),
               "--out", os.path.join(out, name)]
    else:
        name, md_name = "glue", "glue.md"
        cmd = [sys.executable, "-m", "benchmarks.finetune_glue", *common, "--seeds", *map(str, a.seeds or range(3)),
               "--epochs", str(a.epochs), "--out", os.path.join(out, name), "--resume"]
    cmd += a.glue_args or []
    code, seconds, output = _run_logged(cmd, os.path.join(out, f"{name}.log"))
    md = os.path.join(out, name, md_name)
    table = "(no run finished)"
    if os.path.exists(md):
        with open(md) as f:
            table = f.read().split("\n\n", 2)[-1]
    left = [x for x in output.splitlines() if x.startswith("left for the next call")]
    _write_summary(out, name, env, f"exit {code}, {seconds:.0f} s in this call. {left[-1] if left else 'All runs done.'}"
                                      f"\n\n{table}")
    return 0 if code == 0 else 1


def step_fsdp(a, env, out):
    """benchmarks.fsdp_step at world size 1 (nccl, the machine's one GPU; gloo for the dry run): the
    step time and held memory of FSAM, SAM and PAC-tuning over FSDP2 shards against the plain ones."""
    cmd = [sys.executable, "-m", "benchmarks.fsdp_step", "--device", a.device, "--worlds", "1", "--list",
           a.fsdp_list or ("bert-base" if a.device == "cuda" else "300K"), "--out", out]
    code, seconds, _ = _run_logged(cmd, os.path.join(out, "fsdp.log"), timeout=a.budget_s)
    md = os.path.join(out, "fsdp_step.md")
    table = "(no result)"
    if code == 0 and os.path.exists(md):
        with open(md) as f:
            table = f.read().split("\n", 1)[-1]
    _write_summary(out, "fsdp", env, f"`{' '.join(cmd[1:])}`: exit {code}, {seconds:.0f} s\n{table}")
    return 0 if code == 0 else 1


# The few-shot study's plan on a GPU: every task of GLUE_TASKS, its sizes and epochs, the papers' clip sweep.
FEWSHOT_OPTIMIZERS = ("adamw", "sam", "fsam", "adamw-clip", "pac")
CLIP_NORMS = (0.01, 0.05, 0.1, 0.5, 1.0)

STEPS = {"test": step_test, "sanitize": step_sanitize, "bench": step_bench, "glue": step_glue, "fsdp": step_fsdp}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<gpu name>)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds this call may take")
    ap.add_argument("--tools", nargs="+", default=list(SANITIZER_TOOLS), choices=SANITIZER_TOOLS)
    ap.add_argument("--data-dir", help="GLUE data (default: $GLUE_DIR)")
    ap.add_argument("--model-dir", help="the MiniLM folder (e.g. the half-precision copy of `make gpu-carry`)")
    ap.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (the few-shot study: 0 to 4)")
    ap.add_argument("--fewshot", action="store_true", help="glue: the few-shot study instead of full training")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--pytest-args", nargs=argparse.REMAINDER, help="test: what pytest runs (default: tests)")
    ap.add_argument("--bench-args", nargs=argparse.REMAINDER, help="bench: more flags for benchmarks.run")
    ap.add_argument("--fsdp-list", help="fsdp: the parameter list (default bert-base; the dry run 300K)")
    ap.add_argument("--glue-args", nargs=argparse.REMAINDER, help="glue: more flags for benchmarks.finetune_glue")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no GPU is visible (use --device cpu for the dry run)")
    out = results_dir(a.device, a.out)
    os.makedirs(out, exist_ok=True)
    return STEPS[a.step](a, _environment(a.device), out)


if __name__ == "__main__":
    sys.exit(main())
