"""`python -m fsam_kernels`: the environment report names the package, the versions, the backends
and what the extension was built with."""
import json
import os
import subprocess
import sys

import torch

import fsam_kernels
from conftest import ROOT


def report(*blocked):
    """The report's rows, with the modules `blocked` made unimportable first."""
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); "
            "runpy.run_module('fsam_kernels', run_name='__main__')")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split("  ", 1) for line in out.stdout.splitlines())
    return {k.strip(): v.strip() for k, v in rows.items()}


def test_without_the_extension_the_report_says_why():
    rows = report("fsam_kernels._C", "fsam_kernels._sim")
    for row in ("extension (fsam_kernels._C)", "emulated CUDA (fsam_kernels._sim)"):
        assert rows[row].startswith("not loaded: ") and "import of fsam_kernels." in rows[row], rows[row]
    assert rows["CUDA kernels in it"] == "no" and rows["extension built with"] == "-"
    assert "cpu" not in rows["backends available"].split(", ") and "reference" in rows["backends available"]


def test_the_report():
    rows = report()
    assert rows["fsam_kernels"].startswith(fsam_kernels.__version__)
    assert rows["torch"].startswith(torch.__version__) and "CPU capability" in rows["torch"]
    for name in ("python", "triton", "transformers", "accelerate", "CPU vector extensions", "commit"):
        assert rows[name], name
    assert rows["backends available"] == ", ".join(fsam_kernels.available_backends())
    from fsam_kernels import _extension
    expected = "loaded" if _extension.LOADED else f"not loaded: {_extension.LOAD_ERROR}"
    assert rows["extension (fsam_kernels._C)"] == expected
    sim = "loaded" if _extension.SIM_LOADED else f"not loaded: {_extension.SIM_LOAD_ERROR}"
    assert rows["emulated CUDA (fsam_kernels._sim)"] == sim
    if fsam_kernels.EXTENSION_LOADED:  # setup.py's record of the loaded file
        from fsam_kernels import _C
        with open(os.path.join(os.path.dirname(fsam_kernels.__file__), "_build_info.json")) as f:
            entry = json.load(f)[os.path.basename(_C.__file__)]
        assert rows["extension built with"].startswith(f"torch {entry['torch']}, CUDA ")
        for arch in entry["cuda_archs"]:
            assert f"sm_{arch.replace('.', '')}" in rows["extension built with"]
        assert (rows["CUDA kernels in it"] == "yes") == bool(entry["cuda_archs"])
