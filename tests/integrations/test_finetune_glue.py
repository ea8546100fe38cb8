"""benchmarks/finetune_glue.py and the few-shot study on it (benchmarks/fewshot_glue.py): the GLUE
file formats, the official metrics and baselines, the few-shot draws, the clear message without
data, and whole runs on a tiny random BERT."""
import json
import math
import os

import numpy as np
import pytest
import torch

from benchmarks import fewshot_glue
from benchmarks import finetune_glue as fg
from glue_data import tiny_model_dir

def test_read_split(data_dir):
    assert fg.read_split(data_dir, "cola", "dev") == ([("the cat sat .",), ("sat cat the .",)], [1, 0])
    assert fg.read_split(data_dir, "sst2", "dev") == ([("a fine film ",), ("a dull film ",)], [1, 0])
    texts, labels = fg.read_split(data_dir, "mrpc", "dev")
    assert texts[0] == ("the cat sat .", "a cat sat .") and labels == [1, 0]
    assert fg.read_split(data_dir, "stsb", "dev") == ([("a cat .", "the cat ."), ("a dog .", "the cat .")], [4.2, 0.5])
    assert fg.read_split(data_dir, "rte", "dev")[1] == [1, 0]
    assert len(fg.read_split(data_dir, "rte", "train")[0]) == 8


def test_metrics():
    p, t = [1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0, 0]
    tp, tn, fp, fn = 2, 2, 2, 1
    m = fg.metrics("cola", p, t)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["matthews"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert fg.metrics("mrpc", p, t)["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    pred, gold = [0.3, 2.0, 2.0, 3.5, 1.0], [1.0, 3.0, 2.0, 4.0, 2.0]
    s = fg.metrics("stsb", pred, gold)
    assert s["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    ranks_p, ranks_g = [0, 2.5, 2.5, 4, 1], [0, 3, 1.5, 4, 1.5]  # ties take their average rank
    assert s["spearman"] == pytest.approx(np.corrcoef(ranks_p, ranks_g)[0, 1])


def test_missing_data_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no GLUE data for RTE.*--data-dir"):
        fg.main(["--data-dir", str(tmp_path / "nowhere"), "--tasks", "rte"])


@pytest.mark.parametrize("task,optimizer", [("rte", "fsam"), ("stsb", "adamw"), ("rte", "pac")])
def test_one_run_end_to_end(tmp_path, data_dir, capsys, task, optimizer):
    model = tiny_model_dir(tmp_path)
    fg.main(["--data-dir", str(data_dir), "--model-dir", model, "--max-length", "24", "--epochs", "2",
             "--batch-size", "4", "--mask-interval", "2", "--cpu", "--work-dir", str(tmp_path / "work"),
             "--single", task, optimizer, "0"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[7:])
    assert r["task"] == task and r["optimizer"] == optimizer and r["steps"] == 4
    assert r["metric"] == ("accuracy" if task == "rte" else "pearson") and -1 <= r["score"] <= 1
    assert 0 < r["optimizer_s"] < r["wall_s"] and r["peak_mem_mib"] > 0
    assert r["skipped_perturbations"] == (0 if optimizer == "fsam" else None)
    assert r["skipped_steps"] == (0 if optimizer == "pac" else None)
    if optimizer == "pac":  # the K estimate is timed on its own, outside the optimizer's share
        assert 0 < r["k_estimate_s"] < r["wall_s"] - r["optimizer_s"]
    else:
        assert r["k_estimate_s"] is None
    assert torch.isfinite(torch.tensor(r["train_loss"]))


def test_a_failed_run_ends_the_call_with_its_error(tmp_path, data_dir):
    """Two runs at a time: the FSAM run fails on its argument, the call exits with that error and
    keeps no result of the failed run."""
    with pytest.raises(SystemExit, match="(?s)rte/fsam/seed 0 failed.*sparsity"):
        fg.main(["--data-dir", str(data_dir), "--model-dir", tiny_model_dir(tmp_path), "--tasks", "rte",
                 "--optimizers", "adamw", "fsam", "--sparsity", "1.5", "--max-length", "24", "--epochs", "1",
                 "--batch-size", "4", "--cpu", "--jobs", "2", "--work-dir", str(tmp_path / "work"),
                 "--out", str(tmp_path / "res")])
    saved = tmp_path / "res" / "glue_results.json"
    assert not saved.exists() or all(r["optimizer"] != "fsam" for r in json.loads(saved.read_text())["runs"])
    with pytest.raises(SystemExit):
        fg.parse_args(["--jobs", "0"])


def test_append_replaces_only_the_rerun(tmp_path):
    def row(task, opt, seed, score):
        return {"task": task, "optimizer": opt, "seed": seed, "metric": "accuracy", "score": score, "wall_s": 1.0,
                "optimizer_share": 0.1, "peak_mem_mib": 1.0, "device": "cpu"}
    fg.write_results(tmp_path, [row("rte", "adamw", 0, 0.5), row("rte", "fsam", 0, 0.6)], "first", append=False)
    fg.write_results(tmp_path, [row("rte", "adamw", 0, 0.7)], "second", append=True)
    saved = json.loads((tmp_path / "glue_results.json").read_text())
    assert [c["command"] for c in saved["commands"]] == ["first", "second"]
    assert sorted((r["optimizer"], r["score"]) for r in saved["runs"]) == [("adamw", 0.7), ("fsam", 0.6)]
    md = (tmp_path / "glue.md").read_text()
    assert md.index("| adamw |") < md.index("| fsam |") and "70.00" in md


def test_fewshot_draws_are_stratified_and_seeded():
    targets = [0] * 70 + [1] * 30
    picked = fg.fewshot_indices(targets, 10, seed=3, stratified=True)
    assert len(picked) == len(set(picked)) == 10 and sorted(picked) == picked
    assert sum(targets[i] for i in picked) == 3  # the labels in their training-set proportions
    assert picked == fg.fewshot_indices(targets, 10, seed=3, stratified=True)
    assert picked != fg.fewshot_indices(targets, 10, seed=4, stratified=True)
    odd = fg.fewshot_indices([0] * 5 + [1] * 4 + [2] * 2, 4, seed=0, stratified=True)  # largest remainders
    assert len(odd) == 4 and sorted(odd) == odd
    assert len(fg.fewshot_indices([0.5] * 50, 7, seed=0, stratified=False)) == 7
    with pytest.raises(ValueError, match="the training set has 50 examples"):
        fg.fewshot_indices([0.5] * 50, 51, seed=0, stratified=False)


def test_baselines_of_a_model_that_learned_nothing():
    assert fg.baseline("rte", [1, 0, 0, 0]) == 0.75
    assert fg.baseline("sst2", [1, 1, 0]) == pytest.approx(2 / 3)
    assert fg.baseline("mrpc", [1, 0, 0, 1]) == pytest.approx(2 * 2 / (2 * 2 + 2))
    assert fg.baseline("cola", [1, 0]) == 0.0 and fg.baseline("stsb", [0.1, 4.0]) == 0.0


def test_clip_norms_expand_only_the_componentwise_runs():
    a = fg.parse_args(["--tasks", "rte", "--optimizers", "adamw", "adamw-clip", "--seeds", "0", "1",
                       "--clip-norms", "0.01", "0.1"])
    plan = fg.planned_runs(a)
    assert [(r["optimizer"], r["clip_norm"], r["seed"]) for r in plan] == [
        ("adamw", None, 0), ("adamw-clip", 0.01, 0), ("adamw-clip", 0.1, 0),
        ("adamw", None, 1), ("adamw-clip", 0.01, 1), ("adamw-clip", 0.1, 1)]
    assert fg.label(plan[1]) == "adamw-clip c=0.01" and fg.label(plan[0]) == "adamw"


def test_fewshot_study_end_to_end(tmp_path, data_dir):
    """Two sizes, two optimizers, two seeds through the study driver: per-size results, the
    combined report with failures, the plot, and a second call that has nothing left to run."""
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "study"
    argv = ["--sizes", "4", "6", "--epochs", "1", "1", "--out", str(out), "--data-dir", str(data_dir),
            "--model-dir", model, "--tasks", "rte", "--optimizers", "adamw", "adamw-clip", "--clip-norms", "0.01",
            "--seeds", "0", "1", "--max-length", "24", "--batch-size", "4", "--cpu", "--jobs", "2",
            "--work-dir", str(tmp_path / "work")]
    fewshot_glue.main(argv)
    runs = [r for r, _ in fewshot_glue.load_runs(str(out), [4, 6])]
    assert sorted((r["train_examples"], fg.label(r), r["seed"]) for r in runs) == sorted(
        (n, name, s) for n in (4, 6) for name in ("adamw", "adamw-clip c=0.01") for s in (0, 1))
    assert all(r["failed"] == (r["score"] <= r["baseline"]) for r in runs)
    cores = len(os.sched_getaffinity(0))
    assert all(r["jobs"] == 2 and r["threads"] == max(1, cores // 2) for r in runs)  # the cores shared out
    md = (out / "fewshot.md").read_text()
    assert "8 runs 2 at a time" in md and "| failed |" in md and "adamw-clip c=0.01" in md and "benchmarks.finetune_glue" in md
    assert (out / "fewshot.png").stat().st_size > 0
    mtime = (out / "n4" / "glue_results.json").stat().st_mtime
    fewshot_glue.main(argv)  # resumed: nothing left
    assert (out / "n4" / "glue_results.json").stat().st_mtime == mtime
    with pytest.raises(SystemExit):
        fewshot_glue.main(["--sizes", "4", "--epochs", "1", "2", "--out", str(out)])
