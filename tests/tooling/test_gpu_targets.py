"""The GPU proof's plumbing (`python -m benchmarks.gpu`, `make gpu-first`, `gpu-second` and the
one-part targets) as CPU dry runs: the plans run their parts within their allowances and the
budget, write as they go and summarise last; the build part's settings and stamp; the sanitizer
probe's refusal; the op selection collects the tests it is meant to run; the GPU-sized parameter
lists exist."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import gpu, param_lists
from conftest import ROOT
from glue_data import tiny_model_dir


def summary(out):
    text = (out / "summary.md").read_text()
    assert text.startswith("# fsam_kernels on CPU") and "commit" in text and "transformers" in text
    parts = {p["part"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}
    return text, parts


def test_first_plan_dry_run(tmp_path, capsys):
    """Every part of gpu-first but the build, small: the op tests (here one file), the sanitizer's
    workload (no sanitizer on the CPU), ncu's workload (no ncu on the CPU), the BERT-base-style
    benchmark on 200K parameters."""
    argv = ["first", "--device", "cpu", "--out", str(tmp_path), "--skip", "build",
            "--pytest-args", "tests/ops/test_fallback.py"]
    assert gpu.main(argv) == 0
    text, parts = summary(tmp_path)
    assert list(parts) == ["build", "ops", "sanitize", "ncu", "bench"]
    assert parts["build"]["status"] == "skipped" and parts["build"]["result"] == "--skip"
    assert all(parts[p]["status"] == "passed" for p in ("ops", "sanitize", "ncu", "bench")), parts
    assert "the workload on cuda-sim: exit 0" in parts["ncu"]["result"]
    assert "passed" in parts["ops"]["result"] and "| test_fallback |" in text
    assert "| none | n/a | 0 |" in text and "every result equal to reference" in text
    assert "copy bandwidth" in parts["bench"]["result"] and "| perturb | 200K |" in text
    assert "| 200K | 0.2M | adamw |" in text  # the whole step against fused AdamW
    assert (tmp_path / "bench" / "results.json").exists() and (tmp_path / "ops.log").exists()
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(text.rstrip().splitlines()[-1])  # the summary is printed last


def test_second_plan_dry_run(tmp_path, data_dir):
    """gpu-second: FSDP2 at world size 1 (the Trainer test needs a GPU) and RTE with AdamW, SAM, FSAM."""
    model = tiny_model_dir(tmp_path / "model")
    argv = ["second", "--device", "cpu", "--out", str(tmp_path / "res"), "--skip", "build", "--data-dir",
            str(data_dir), "--model-dir", model, "--epochs", "1", "--glue-args", "--max-length", "24",
            "--batch-size", "4", "--work-dir", str(tmp_path / "work")]
    assert gpu.main(argv) == 0
    text, parts = summary(tmp_path / "res")
    assert parts["fsdp"]["status"] == "passed" and "| 1 | fsam mask step |" in text and "| plain | sam |" in text
    assert parts["glue"]["status"] == "passed" and "All runs done." in parts["glue"]["result"]
    runs = json.loads((tmp_path / "res" / "glue" / "glue_results.json").read_text())["runs"]
    assert sorted((r["task"], r["optimizer"]) for r in runs) == [("rte", "adamw"), ("rte", "fsam"), ("rte", "sam")]


def test_plan_starts_no_part_that_would_pass_the_budget(tmp_path, monkeypatch):
    ran = []

    def part(name):
        def run(ctx, allowance):
            ran.append((name, allowance))
            return gpu.Outcome("passed", name)
        return run
    monkeypatch.setitem(gpu.PLANS, "first", [("build", 10, 10), ("ops", 100, 100), ("bench", 30, 30)])
    monkeypatch.setattr(gpu, "PARTS", {n: part(n) for n in ("build", "ops", "bench")})
    assert gpu.main(["first", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "50"]) == 0
    assert ran == [("build", 10), ("bench", 30)]
    text, parts = summary(tmp_path)
    assert parts["ops"]["status"] == "skipped" and "would pass the budget of 50 s" in parts["ops"]["result"]
    # parts named on the command line get what is left of the budget
    ran.clear()
    assert gpu.main(["build", "ops", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "50"]) == 0
    assert [n for n, _ in ran] == ["build", "ops"] and 49 < ran[0][1] <= 50 and ran[1][1] <= ran[0][1]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_part_is_stopped_at_its_allowance_and_keeps_its_log(tmp_path):
    """The child and its own children are killed; what it wrote before is in the log."""
    grandchild = "import os; print('grandchild', os.getpid(), flush=True); os.read(os.pipe()[0], 1)"  # blocks for ever
    child = f"import subprocess, sys; print('started', flush=True); subprocess.run([sys.executable, '-c', {grandchild!r}])"
    log = tmp_path / "part.log"
    code, seconds, output = gpu._run_logged([sys.executable, "-c", child], str(log), timeout=2)
    assert code == "timeout" and seconds < 30
    assert "started" in output and "[stopped at its allowance of 2 s]" in log.read_text()
    pid = int(output.split("grandchild ")[1].split()[0])
    deadline = time.time() + 10  # SIGKILL is delivered, not yet acted on, when killpg returns
    while _alive(pid) and time.time() < deadline:
        os.sched_yield()
    assert not _alive(pid)


def test_build_part_settings_and_stamp(tmp_path, monkeypatch):
    """sm_90 only, every core, no emulator (each overridable); a matching stamp skips the build;
    a GPU build without the cuda backend fails."""
    calls = []
    monkeypatch.setattr(gpu, "_run_logged",
                        lambda cmd, log, env=None, timeout=None: calls.append((cmd, env)) or (0, 1, ""))
    monkeypatch.setattr(gpu, "BUILD_STAMP", str(tmp_path / "stamp"))
    monkeypatch.setattr(gpu, "_backends", lambda: ["reference", "cpu"])
    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "FSAM_BUILD_SIM"):
        monkeypatch.delenv(name, raising=False)
    ctx = gpu.Context(gpu.parse_args(["build", "--device", "cpu"]), str(tmp_path))
    outcome = gpu.part_build(ctx, 100)
    assert outcome.status == "passed" and len(calls) == 1
    cmd, env = calls[0]
    assert cmd[1:] == ["-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    assert (env["TORCH_CUDA_ARCH_LIST"], env["MAX_JOBS"], env["FSAM_BUILD_SIM"]) == ("9.0", str(os.cpu_count()), "0")
    assert "already built" in gpu.part_build(ctx, 100).line and len(calls) == 1
    monkeypatch.setenv("FSAM_BUILD_SIM", "1")  # another setting: built again, the setting kept
    assert gpu.part_build(ctx, 100).status == "passed" and len(calls) == 2 and calls[1][1]["FSAM_BUILD_SIM"] == "1"
    ctx.cuda = True  # the stamp matches, but a GPU build must have the GPU backends
    outcome = gpu.part_build(ctx, 100)
    assert outcome.status == "failed" and "missing backends ['cuda', 'triton']" in outcome.line and len(calls) == 2
    assert not (tmp_path / "stamp").exists()
    monkeypatch.setattr(gpu, "_backends", lambda: ["reference", "cpu", "cuda", "triton"])
    monkeypatch.setenv("MAX_JOBS", "3")
    assert gpu.part_build(ctx, 100).status == "passed" and len(calls) == 3 and calls[2][1]["MAX_JOBS"] == "3"
    assert "already built" in gpu.part_build(ctx, 100).line and len(calls) == 3


def test_sanitizer_refusal_is_recorded_in_seconds(tmp_path, monkeypatch):
    """A runtime that refuses compute-sanitizer (gVisor: 'Device not supported') is a refused part,
    not a failed plan, and no tool runs."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '========= Error: Device not supported'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    ctx = gpu.Context(gpu.parse_args(["first", "--device", "cpu"]), str(tmp_path))
    ctx.cuda = True
    outcome = gpu.part_sanitize(ctx, 100)
    assert outcome.status == "refused" and "Device not supported" in outcome.line
    assert not any(f.startswith("sanitize_memcheck") for f in os.listdir(tmp_path))


def test_the_op_selection_collects_the_gpu_backends_cases():
    """OPS_TESTS with OPS_FILTER: every op family's cases and the bit-identity runs, for cuda-sim and
    Triton here (cuda and Triton on a GPU), no reference-only case."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *gpu.OPS_TESTS, "-k", gpu.OPS_FILTER], cwd=ROOT, capture_output=True, text=True)
    ids = [x for x in out.stdout.splitlines() if "::" in x]
    assert out.returncode == 0 and len(ids) > 200, out.stdout[-2000:]
    for module in ("test_fisher_accumulate", "test_topk_mask", "test_radix_stages", "test_perturb_restore",
                   "test_clip", "test_pac_noise", "test_opcheck"):
        assert any(module in i for i in ids), module
    for test in ("test_fsam_runs_are_bit_identical_across_backends", "test_sharpness_step_takes_the_references_steps"):
        assert any(test in i and ("cuda" in i or "triton" in i) for i in ids), test
    assert all("cuda" in i or "triton" in i for i in ids)


def test_test_part_runs_files_in_parallel_and_reports_failures(tmp_path, monkeypatch):
    bad, good = tmp_path / "test_fails.py", tmp_path / "test_passes.py"
    bad.write_text("def test_fails():\n    assert 1 == 2\n")
    good.write_text("import pytest\n\ndef test_passes():\n    pass\n\n"
                    "@pytest.mark.skip\ndef test_skipped():\n    pass\n")
    monkeypatch.setattr(gpu, "PYTEST_JOBS", 2)
    assert gpu.main(["test", "--device", "cpu", "--out", str(tmp_path), "--pytest-args", str(bad), str(good)]) == 1
    text, parts = summary(tmp_path)
    assert parts["test"]["status"] == "failed" and parts["test"]["result"] == "1 passed, 1 failed, 1 skipped"
    assert "| test_fails | 0 | 1 | 0 |" in text and "| test_passes | 1 | 0 | 1 |" in text
    assert "in 2 process(es)" in text and "test_fails.py::test_fails`" in text
    assert sorted(parts["test"]["files"]) == ["test_0.log", "test_0_junit.xml", "test_1.log", "test_1_junit.xml"]


def test_bench_part_keeps_its_budget(tmp_path):
    args = ["--sizes", "50K", "--lists", "", "--step-lists", "", "--families", "fisher", "--compile", "none",
            "--min-time", "0.01", "--budget-s", "0"]
    assert gpu.main(["bench", "--device", "cpu", "--out", str(tmp_path), "--bench-args", *args]) == 0
    text, parts = summary(tmp_path)
    assert "Not run, over the time budget: kernel fisher 50K." in text and "not run: kernel fisher 50K" in \
        parts["bench"]["result"]


def test_glue_part_resumes(tmp_path, data_dir):
    model = tiny_model_dir(tmp_path / "model")
    common = ["glue", "--device", "cpu", "--out", str(tmp_path / "res"), "--data-dir", str(data_dir), "--model-dir",
              model, "--tasks", "rte", "--seeds", "0", "--epochs", "1"]
    glue_args = ["--max-length", "24", "--batch-size", "4", "--work-dir", str(tmp_path / "work")]
    assert gpu.main(common + ["--glue-args", *glue_args, "--budget-s", "0", "--optimizers", "adamw"]) == 0
    assert "left for the next call: 1 runs (rte/adamw/0)" in summary(tmp_path / "res")[0]
    assert gpu.main(common + ["--glue-args", *glue_args, "--optimizers", "adamw", "fsam"]) == 0
    log = (tmp_path / "res" / "glue.log").read_text()
    assert "rte fsam seed 0" in log and "rte adamw seed 0" in log
    runs = json.loads((tmp_path / "res" / "glue" / "glue_results.json").read_text())["runs"]
    assert sorted(r["optimizer"] for r in runs) == ["adamw", "fsam"]
    assert "All runs done." in summary(tmp_path / "res")[0]


def test_glue_part_has_a_fewshot_mode(tmp_path, data_dir):
    model = tiny_model_dir(tmp_path / "model")
    argv = ["glue", "--fewshot", "--device", "cpu", "--out", str(tmp_path / "res"), "--data-dir", str(data_dir),
            "--model-dir", model, "--tasks", "rte", "--glue-args", "--budget-s", "0"]
    assert gpu.main(argv) == 0
    log = (tmp_path / "res" / "fewshot_glue.log").read_text()
    assert "benchmarks.fewshot_glue" in log and "--clip-norms 0.01 0.05 0.1 0.5 1.0" in log
    assert "--seeds 0 1 2 3 4" in log and "--sizes 100 1000" in log
    assert "left for the next call" in log and "left for the next call" in summary(tmp_path / "res")[0]


def test_the_docs_give_the_plans_allowances():
    """docs/gpu.md's table and sentence against PLANS (the one place they are set)."""
    text = open(os.path.join(ROOT, "docs", "gpu.md")).read()
    for name, gpu_s, _ in gpu.PLANS["first"]:
        assert f"| {name} | {gpu_s} s |" in text, name
    for name, gpu_s, _ in gpu.PLANS["second"]:
        assert f"**{name}** ({gpu_s} s" in text or f"runs {name} ({gpu_s} s" in text, name
    assert f"would pass {gpu.PLAN_BUDGET_S:.0f} s" in text
    assert sum(s for _, s, _ in gpu.PLANS["first"]) <= gpu.PLAN_BUDGET_S


def test_bad_command_lines():
    with pytest.raises(SystemExit):
        gpu.parse_args(["first", "ops"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["nonsense"])


@pytest.mark.parametrize("name,millions,dtype", [("opt-1.3b", (1300, 1400), "float32"),
                                                 ("llama-7b", (6500, 6800), "bfloat16")])
def test_gpu_sized_lists(name, millions, dtype, monkeypatch):
    shapes = param_lists.shapes_for(name)
    n = sum(math.prod(s) for _, s in shapes)
    assert millions[0] * 1e6 < n < millions[1] * 1e6 and len(shapes) > 100
    assert str(param_lists.dtype_of(name)) == f"torch.{dtype}"
    monkeypatch.delenv("OUT", raising=False)
    assert os.path.basename(gpu.results_dir("cpu")) == "cpu-dry-run"
    monkeypatch.setenv("OUT", "/somewhere")  # the device tool's folder that comes back
    assert gpu.results_dir("cpu") == "/somewhere" and gpu.results_dir("cpu", "mine") == "mine"
