"""The ptxas resource report (`nvcc -Xptxas -v`) of every CUDA kernel of csrc/cuda, for sm_80 and
sm_90, without a GPU: registers, shared memory, stack and spill bytes per kernel, and how many
blocks of the kernels' size fit an SM by those numbers.

    python tools/ptxas_report.py [--arch 80 90] [--json]

Each .cu file is compiled for the device only (-cubin), with the flags of the build that matter
to code generation (setup.py: -O3 --fmad=false; torch's COMMON_NVCC_FLAGS), one nvcc per file
and target, in parallel."""
import argparse
from concurrent.futures import ThreadPoolExecutor
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))  # kernels the sources instantiate
# Per SM: registers, shared memory a block may have (bytes, less the 1 KiB the runtime reserves per
# block), resident threads, resident blocks.
SM = {80: dict(regs=65536, smem=164 * 1024, threads=2048, blocks=32),
      90: dict(regs=65536, smem=228 * 1024, threads=2048, blocks=32)}
RESERVED_SMEM = 1024
REG_UNIT = 256  # registers are allocated per warp in units of 256


def nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def block_size():
    """kBlock of csrc/cuda/device.cuh: every kernel's block size."""
    text = open(os.path.join(ROOT, "csrc", "cuda", "device.cuh")).read()
    return int(re.search(r"constexpr int kBlock = (\d+);", text).group(1))


def kernel_names():
    """The __global__ functions the sources and their headers define."""
    names = set()
    for src in SOURCES + HEADERS:
        names |= set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(", open(src).read()))
    return names


def compile_report(source, arch):
    """ptxas -v output of one file for one target."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    includes = [os.path.join(ROOT, "csrc", "include"), *include_paths(), sysconfig.get_paths()["include"]]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc(), "-std=c++20", "-O3", "--fmad=false", *COMMON_NVCC_FLAGS, "-cubin", f"-arch=sm_{arch}",
               "-Xptxas", "-v", *[f"-I{d}" for d in includes], source, "-o", os.path.join(tmp, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {os.path.relpath(source, ROOT)} for sm_{arch}:\n{proc.stderr[-6000:]}")
    return proc.stderr + proc.stdout


def _demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return dict(zip(names, names))
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def blocks_per_sm(arch, regs, smem, threads):
    sm = SM[arch]
    warps = -(-threads // 32)
    by_regs = sm["regs"] // (warps * -(-regs * 32 // REG_UNIT) * REG_UNIT) if regs else sm["blocks"]
    by_smem = sm["smem"] // (smem + RESERVED_SMEM)
    return min(by_regs, by_smem, sm["threads"] // threads, sm["blocks"])


def parse(text, arch, threads):
    """One row per kernel compiled for `arch`."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            current = dict(mangled=m.group(1), arch=int(m.group(2)), regs=0, smem=0, stack=0, spill_stores=0,
                           spill_loads=0)
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        name = names[r["mangled"]].replace("(anonymous namespace)::", "").replace("fsam::cuda::", "")
        r["kernel"] = re.sub(r"^void |\(.*", "", name)  # the template, without the parameter list
        r["blocks_per_sm"] = blocks_per_sm(arch, r["regs"], r["smem"], threads)
    return [r for r in rows if r["arch"] == arch]


def report(archs=(80, 90)):
    threads = block_size()
    jobs = [(src, arch) for arch in archs for src in SOURCES]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        texts = list(pool.map(lambda job: compile_report(*job), jobs))
    rows = []
    for (src, arch), text in zip(jobs, texts):
        for r in parse(text, arch, threads):
            rows.append(dict(r, file=os.path.relpath(src, ROOT)))
    return rows


def table(rows):
    head = ("arch", "regs", "smem", "stack", "spills", "blocks/SM", "kernel")
    lines = ["  ".join(f"{h:>9}" for h in head[:-1]) + "  " + head[-1]]
    for r in sorted(rows, key=lambda r: (r["arch"], r["file"], r["kernel"])):
        lines.append("  ".join(f"{v:>9}" for v in (f"sm_{r['arch']}", r["regs"], r["smem"], r["stack"],
                                                     r["spill_stores"] + r["spill_loads"], r["blocks_per_sm"]))
                     + "  " + r["kernel"])
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=sorted(SM))
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args(argv)
    if nvcc() is None:
        raise SystemExit("ptxas_report: nvcc not found (set CUDA_HOME)")
    rows = report(tuple(a.arch))
    print(json.dumps(rows) if a.json else table(rows))


if __name__ == "__main__":
    sys.exit(main())
