"""`python -m fsam_kernels`: the environment report names the package, the versions, the backends
and what the extension was built with."""
import json
import os
import subprocess
import sys

import torch

import fsam_kernels
from conftest import ROOT


def test_the_report():
    out = subprocess.run([sys.executable, "-m", "fsam_kernels"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split("  ", 1) for line in out.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["fsam_kernels"].startswith(fsam_kernels.__version__)
    assert rows["torch"].startswith(torch.__version__) and "CPU capability" in rows["torch"]
    for name in ("python", "triton", "transformers", "accelerate", "CPU vector extensions", "commit"):
        assert rows[name], name
    assert rows["backends available"] == ", ".join(fsam_kernels.available_backends())
    assert rows["extension (fsam_kernels._C)"] == ("loaded" if fsam_kernels.EXTENSION_LOADED else rows[
        "extension (fsam_kernels._C)"])
    if fsam_kernels.EXTENSION_LOADED:  # setup.py's record of the loaded file
        from fsam_kernels import _C
        with open(os.path.join(os.path.dirname(fsam_kernels.__file__), "_build_info.json")) as f:
            entry = json.load(f)[os.path.basename(_C.__file__)]
        assert rows["extension built with"].startswith(f"torch {entry['torch']}, CUDA ")
        for arch in entry["cuda_archs"]:
            assert f"sm_{arch.replace('.', '')}" in rows["extension built with"]
        assert (rows["CUDA kernels in it"] == "yes") == bool(entry["cuda_archs"])
