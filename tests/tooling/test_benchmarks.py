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
