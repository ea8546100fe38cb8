"""The benchmark harness runs end to end on a tiny configuration and writes every output."""
import json
import os

import pytest

from benchmarks import kernels, run, timing


def test_tiny_benchmark_run(tmp_path):
    out = tmp_path / "res"
    run.main(["--device", "cpu", "--sizes", "50K", "--lists", "", "--step-lists", "50K", "--compile", "none",
              "--min-time", "0.01", "--out", str(out)])
    for name in ("results.json", "kernels.csv", "step.csv", "report.md", "kernels.png", "step.png"):
        assert os.path.getsize(out / name) > 0, name
    data = json.loads((out / "results.json").read_text())
    families = {r["family"] for r in data["kernels"]}
    assert families == set(kernels.FAMILIES) == {"fisher", "topk", "perturb", "restore", "clip", "pac"}
    providers = {r["provider"] for r in data["kernels"]}
    assert {"published-eager", "foreach", "published-cat-topk", "cat-kthvalue", "published-per-tensor",
            "fsam-reference", "fsam-reference-unbuffered"} <= providers
    steps = {r["optimizer"]: r for r in data["step"]}
    assert {"adamw", "published-sam (davda54)", "published-fsam", "published-ssam-f"} <= set(steps)
    assert data["environment"]["copy_gbps"] > 0 and data["environment"]["torch"]
    # the memory accounting sees what each optimizer keeps between its two passes
    assert steps["published-sam (davda54)"]["held_bytes_per_param"] >= 4
    fsam = [r for name, r in steps.items() if name.startswith("fsam-") and "mask" not in name]
    assert fsam and all(r["held_bytes_per_param"] < 1.5 for r in fsam)
    # every row says how many samples its times rest on, and a ratio they cannot carry is flagged
    rows = data["kernels"] + data["step"]
    assert all(r["samples"] >= 1 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] for r in rows)
    report = (out / "report.md").read_text()
    assert "| n |" in report
    for r in data["kernels"]:
        anchor = next(a for a in data["kernels"] if a["family"] == r["family"] and a["provider"].startswith("published"))
        assert r["ratio_unsteady"] == (timing.unsteady(r) or timing.unsteady(anchor))
    for r in data["step"]:
        assert r["ratio_unsteady"] == (timing.unsteady(r) or timing.unsteady(steps["adamw"]))
    flagged = [r for r in rows if r["ratio_unsteady"]]
    assert ("(?) after a ratio" in report) == bool(flagged) and report.count(" (?) |") == len(flagged)


def test_unsteady_rows_and_the_defaults(monkeypatch):
    row = {"median_ms": 10.0, "p25_ms": 9.0, "p75_ms": 11.0, "samples": 20}
    assert not timing.unsteady(row)
    assert timing.unsteady({**row, "samples": timing.FEW_SAMPLES - 1})
    assert timing.unsteady({**row, "p75_ms": 9.0 + 10.0 * timing.WIDE_SPREAD + 0.01})
    assert timing._quantiles([3.0, 1.0, 2.0]) == {"median_ms": 2.0, "p25_ms": 1.0, "p75_ms": 3.0, "samples": 3}
    # make bench writes a new folder; --quick narrows what no flag sets
    seen = {}
    monkeypatch.setattr(run, "write_results", lambda out, *a, **k: seen.setdefault("out", out))
    monkeypatch.setattr(run, "summary", lambda *a, **k: "")
    monkeypatch.setattr(run, "copy_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(run.kernels, "run", lambda family, spec, *a, **k: seen.setdefault("jobs", []).append(spec) or [])
    monkeypatch.setattr(run.step, "run", lambda spec, *a, **k: seen.setdefault("steps", []).append(spec) or [])
    monkeypatch.setattr(run.os, "makedirs", lambda *a, **k: None)
    run.main(["--device", "cpu", "--quick", "--families", "fisher"])
    assert "/results/local/cpu-" in seen["out"] and seen["jobs"] == ["1M"] and seen["steps"] == ["1M"]


@pytest.mark.slow  # spawns a process group
def test_fsdp_step_benchmark(tmp_path):
    """Per process, a mask step adds the three radix histograms and one gather of the tie counts to
    the norm's all-reduce, and sharding divides what each process holds."""
    from benchmarks import fsdp_step
    from benchmarks.param_lists import shapes_for
    from fsam_kernels._layout import RADIX_HIST_SIZES
    fsdp_step.main(["--list", "300K", "--worlds", "1", "2", "--reps", "1", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "fsdp_step.md") > 0
    rows = {(r["world"], r["optimizer"]): r for r in json.loads((tmp_path / "fsdp_step.json").read_text())["rows"]}
    tensors = len(shapes_for("300K"))
    for world in (1, 2):
        mask = rows[world, "fsam mask step"]
        assert mask["collectives"] == 5
        assert mask["payload_bytes"] == 8 * (sum(RADIX_HIST_SIZES) + tensors) + 4 * 2
        assert rows[world, "fsam"]["collectives"] == rows[world, "sam"]["collectives"] == 1
    for name in fsdp_step.OPTIMIZERS:
        assert rows["plain", name]["collectives"] == 0
        assert rows[2, name]["held_bytes"] < 0.6 * rows["plain", name]["held_bytes"]
    assert rows[2, "sam"]["held_bytes"] / rows[2, "sam"]["local_params"] >= 4
    assert rows[2, "fsam"]["held_bytes"] / rows[2, "fsam"]["local_params"] < 0.6
