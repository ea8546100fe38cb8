"""The GPU proof's plumbing (`python -m benchmarks.gpu`, the `make gpu-*` targets) as CPU dry
runs: each step runs, writes its log and summary and honours its time budget; the GPU-sized
parameter lists exist."""
import json
import math
import os

import pytest

from benchmarks import gpu, param_lists
from glue_data import tiny_model_dir


def summary(out, step):
    text = (out / f"{step}.md").read_text()
    assert text.startswith(f"# gpu {step}: CPU") and "commit" in text
    assert json.loads((out / f"{step}_environment.json").read_text())["torch"]
    return text


def test_test_step(tmp_path):
    assert gpu.main(["test", "--device", "cpu", "--out", str(tmp_path), "--pytest-args", "tests/ops/test_fallback.py"]) == 0
    text = summary(tmp_path, "test")
    assert "| test_fallback |" in text and "passed" in text
    assert "test_fallback.py" in (tmp_path / "test.log").read_text()


def test_test_step_reports_failures(tmp_path):
    bad = tmp_path / "test_fails.py"
    bad.write_text("def test_fails():\n    assert 1 == 2\n")
    assert gpu.main(["test", "--device", "cpu", "--out", str(tmp_path), "--pytest-args", str(bad)]) == 1
    assert "| test_fails | 0 | 1 | 0 |" in summary(tmp_path, "test")


def test_sanitize_step_without_the_sanitizer(tmp_path):
    """On the CPU the op workload runs alone (every compiled backend against reference)."""
    assert gpu.main(["sanitize", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = summary(tmp_path, "sanitize")
    assert "| none | n/a | 0 |" in text and "every result equal to reference" in text


def test_bench_step_and_its_budget(tmp_path):
    args = ["--sizes", "50K", "--lists", "", "--step-lists", "", "--families", "fisher", "--compile", "none",
            "--min-time", "0.01", "--no-plots"]
    assert gpu.main(["bench", "--device", "cpu", "--out", str(tmp_path), "--bench-args", *args]) == 0
    assert "| fisher | 50K |" in summary(tmp_path, "bench")
    assert gpu.main(["bench", "--device", "cpu", "--out", str(tmp_path), "--budget-s", str(gpu.BENCH_LAST_JOB_S),
                     "--bench-args", *args]) == 0
    assert "Not run, over the time budget: kernel fisher 50K." in summary(tmp_path, "bench")


def test_glue_step_resumes_and_keeps_its_budget(tmp_path, data_dir):  # noqa: F811
    model = tiny_model_dir(tmp_path / "model")
    common = ["glue", "--device", "cpu", "--out", str(tmp_path / "res"), "--data-dir", str(data_dir), "--model-dir",
              model, "--tasks", "rte", "--seeds", "0", "--epochs", "1"]
    glue_args = ["--max-length", "24", "--batch-size", "4", "--work-dir", str(tmp_path / "work"), "--optimizers"]
    assert gpu.main(common + ["--budget-s", "0", "--glue-args", *glue_args, "adamw"]) == 0
    assert "left for the next call: 1 runs (rte/adamw/0)" in summary(tmp_path / "res", "glue")
    assert gpu.main(common + ["--glue-args", *glue_args, "adamw"]) == 0
    assert gpu.main(common + ["--glue-args", *glue_args, "adamw", "fsam"]) == 0  # runs fsam only
    log = (tmp_path / "res" / "glue.log").read_text()
    assert "rte fsam seed 0" in log and "rte adamw seed 0" not in log
    runs = json.loads((tmp_path / "res" / "glue" / "glue_results.json").read_text())["runs"]
    assert sorted(r["optimizer"] for r in runs) == ["adamw", "fsam"]
    assert "All runs done." in summary(tmp_path / "res", "glue")


@pytest.mark.parametrize("name,millions,dtype", [("opt-1.3b", (1300, 1400), "float32"),
                                                 ("llama-7b", (6500, 6800), "bfloat16")])
def test_gpu_sized_lists(name, millions, dtype):
    shapes = param_lists.shapes_for(name)
    n = sum(math.prod(s) for _, s in shapes)
    assert millions[0] * 1e6 < n < millions[1] * 1e6 and len(shapes) > 100
    assert str(param_lists.dtype_of(name)) == f"torch.{dtype}"
    assert os.path.basename(gpu.results_dir("cpu")) == "cpu-dry-run"


def test_glue_step_has_a_fewshot_mode(tmp_path, data_dir):  # noqa: F811
    model = tiny_model_dir(tmp_path / "model")
    argv = ["glue", "--fewshot", "--device", "cpu", "--out", str(tmp_path / "res"), "--data-dir", str(data_dir),
            "--model-dir", model, "--tasks", "rte", "--budget-s", "0"]
    assert gpu.main(argv) == 0
    log = (tmp_path / "res" / "fewshot_glue.log").read_text()
    assert "benchmarks.fewshot_glue" in log and "--clip-norms 0.01 0.05 0.1 0.5 1.0" in log
    assert "--seeds 0 1 2 3 4" in log and "--sizes 100 1000" in log
    assert "left for the next call" in log and "left for the next call" in summary(tmp_path / "res", "fewshot_glue")


def test_fsdp_step_dry_run(tmp_path):
    assert gpu.main(["fsdp", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = summary(tmp_path, "fsdp")
    assert "| 1 | fsam mask step |" in text and "| plain | sam |" in text
