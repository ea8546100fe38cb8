"""The benchmark harness runs end to end on a tiny configuration and writes every output."""
import json
import os

from benchmarks import kernels, run


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
