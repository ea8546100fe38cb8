"""The source distribution: it carries every source and header the extension is built from, and
it installs, built from this tree into a fresh virtual environment (torch taken from this one),
with FSAM_BUILD_CUDA=0 and no emulator to keep CI's time, then imported from outside the tree
and used for one FSAM step on its C++ backend."""
import os
import re
import subprocess
import sys
import tarfile
import venv

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import versions  # noqa: E402


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """Built from a copy of the files git knows (as a fresh clone has them): setuptools would also
    take whatever an earlier build listed in the tree's *.egg-info."""
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("sdist")
    versions.copy_checkout(str(tree))
    # from outside the tree: a build/ folder there would shadow the `build` package
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(tree)],
                          cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (tarball,) = out.glob("fsam_kernels-*.tar.gz")
    return tarball


def test_sdist_carries_every_source_and_header(sdist):
    import fsam_kernels
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert sdist.name == f"fsam_kernels-{fsam_kernels.__version__}.tar.gz"
    wanted = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py", "fsam_kernels/py.typed"}
    for top in ("csrc", "fsam_kernels"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            wanted |= {os.path.relpath(os.path.join(d, f), ROOT) for f in files
                       if f.endswith((".h", ".cuh", ".cpp", ".cu", ".py"))}
    assert any(w.endswith(".cuh") for w in wanted) and any(w.startswith("csrc/sim/") for w in wanted)
    assert not wanted - names, sorted(wanted - names)


def test_sdist_installs_and_takes_a_step(sdist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "torch_from_the_test_env.pth"), "w") as f:  # torch without a 5 GB install
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    build_env = {**os.environ, "FSAM_BUILD_CUDA": "0", "FSAM_BUILD_SIM": "0", "MAX_JOBS": str(os.cpu_count())}
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", str(sdist)],
                          cwd=tmp_path, env=build_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step = ("import torch, fsam_kernels as f\n"
            "assert f.EXTENSION_LOADED and 'site-packages' in f.__file__, f.__file__\n"
            "built = f.available_backends()\n"
            "assert 'cpu' in built and 'cuda' not in built and 'cuda-sim' not in built, built\n"
            "model = torch.nn.Linear(8, 2)\n"
            "opt = f.FSAM(model.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.5, backend='cpu', lr=1e-2)\n"
            "before = [p.detach().clone() for p in model.parameters()]\n"
            "x = torch.randn(4, 8)\n"
            "def loss():\n"
            "    value = model(x).square().sum()\n"
            "    value.backward()\n"
            "    return value\n"
            "loss()\n"
            "opt.step(loss)\n"
            "assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))\n"
            "print('stepped', f.__version__, built)\n")
    ran = subprocess.run([python, "-c", step], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert ran.returncode == 0 and "stepped" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = subprocess.run([python, "-m", "fsam_kernels"], cwd=tmp_path, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    assert re.search(rf"extension built with +torch {re.escape(torch.__version__)}, CUDA not built\n", report.stdout), \
        report.stdout
