"""The supported versions, tested: `make versions` (or `python tools/versions.py [NAME ...]`).

Each entry of MATRIX gets a virtual environment of its own (.venv-versions/<name>) with its Python
and pins, builds the package there (CPU kernels and the CUDA emulator; the CUDA C++ kernels are
compiled against every torch by `make test` and `make gpu-rehearsal`), runs SUBSET and adds a row
(date, commit, versions, result) to the table in docs/versions.md.  The pip cap of this machine
is lifted for the entries that need a newer torch than it allows."""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "versions.md")
VENVS = os.path.join(ROOT, ".venv-versions")
# What every entry runs: every op on every backend built, the optimizers end to end, the Trainer.
SUBSET = ("tests/ops", "tests/optimizers/test_optimizers.py", "tests/optimizers/test_mixed_precision.py",
          "tests/integrations/test_trainer.py")
TEST_DEPS = ("pytest", "ninja", "numpy", "setuptools>=64", "wheel", "tqdm")
# name: (python, pins).  The lower bounds of pyproject.toml and the newest releases of the registry
# (transformers 5.25.0 needs kernels>=0.19.1, which the registry does not serve: 5.24 is the newest
# that installs).  docs/versions.md says why transformers 4.57 is outside the declared range.
MATRIX = {
    "oldest": ("3.12", ("torch==2.11.0", "triton==3.6.0", "transformers==5.17.*", "accelerate==1.15.*")),
    "pinned": ("3.11", ("torch==2.14.1", "transformers==5.24.*", "accelerate==1.16.*")),
    "newest": ("3.11", ("torch==2.15.0", "transformers==5.24.*", "accelerate")),
}
TABLE_HEAD = "| date | commit | entry | python | torch | triton | transformers | accelerate | tests | result | minutes |"


def python_for(version):
    """An interpreter of `version`: on PATH, else one of pyenv's."""
    pyenv = os.path.expanduser("~/.pyenv/versions")
    for candidate in [f"python{version}", *sorted(glob.glob(os.path.join(pyenv, f"{version}*", "bin",
                                                                         f"python{version}")))]:
        try:
            if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
                return candidate
        except OSError:
            continue
    raise SystemExit(f"versions: no Python {version} found")


def copy_checkout(dst):
    """The files git knows (tracked, and untracked but not ignored) copied to `dst`: a tree as a
    fresh clone has it, with no build output of this one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))


def run_entry(name, log):
    version, pins = MATRIX[name]
    venv = os.path.join(VENVS, name)
    py = os.path.join(venv, "bin", "python")
    env = {**os.environ, "PIP_CONSTRAINT": os.devnull}  # no pip cap of this machine (it stops at an older torch)
    started = time.time()
    # its own copy of the tree: an in-place build here would replace this checkout's extension
    src = os.path.join(venv, "src")
    shutil.rmtree(src, ignore_errors=True)
    copy_checkout(src)

    def sh(*cmd, **kw):
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, cwd=src, stdout=log, stderr=subprocess.STDOUT, **kw).returncode

    if not os.path.exists(py) and sh(python_for(version), "-m", "venv", venv):
        return None, "venv failed", started
    if sh(py, "-m", "pip", "install", "-q", *pins, *TEST_DEPS, env=env):
        return None, "install failed", started
    env["FSAM_BUILD_CUDA"] = "0"  # the tests read it too: no CUDA kernels to expect
    if sh(py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", ".", env=env):
        return None, "build failed", started
    junit = os.path.join(venv, "junit.xml")
    code = sh(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *SUBSET, env=env)
    versions = json.loads(subprocess.run(
        [py, "-c", "import json, platform, torch, transformers, accelerate\n"
                   "try:\n import triton; t = triton.__version__\nexcept ImportError:\n t = None\n"
                   "print(json.dumps([platform.python_version(), torch.__version__, t, transformers.__version__, "
                   "accelerate.__version__]))"], capture_output=True, text=True, cwd=src).stdout)
    import xml.etree.ElementTree as ET
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result = (f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
              + ("" if code == 0 else f" (exit {code})"))
    return versions, result, started


def record(name, versions, result, started):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    row = (f"| {datetime.date.today()} | {commit} | {name} | " + " | ".join(str(v) for v in versions)
           + f" | the {len(SUBSET)} files above | {result} | {(time.time() - started) / 60:.0f} |")
    with open(PAGE) as f:
        text = f.read()
    head = text.index(TABLE_HEAD)
    end = text.index("\n\n", head)
    text = text[:end] + "\n" + row + text[end:]
    with open(PAGE, "w") as f:
        f.write(text)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"entries to run (default all: {', '.join(MATRIX)})")
    a = ap.parse_args(argv)
    unknown = [n for n in a.names if n not in MATRIX]
    if unknown:
        ap.error(f"unknown entries {unknown}; known: {list(MATRIX)}")
    os.makedirs(VENVS, exist_ok=True)
    failed = False
    for name in a.names or MATRIX:
        with open(os.path.join(VENVS, f"{name}.log"), "a") as log:
            versions, result, started = run_entry(name, log)
        if versions is None:
            versions = [MATRIX[name][0], *MATRIX[name][1][:1], "", "", ""]
        failed |= not re.match(r"\d+ passed, 0 failed", result)
        print(record(name, versions, result, started), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
