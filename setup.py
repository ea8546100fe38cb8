"""Builds fsam_kernels._C: the C++ CPU ops always, the CUDA ops (csrc/cuda/*.cu) when torch has
CUDA and nvcc is found.  FSAM_BUILD_CUDA=0/1 forces either way; TORCH_CUDA_ARCH_LIST is
respected (default "8.0;9.0").  FSAM_WERROR=1 (set by `make test`) makes every warning an error,
host and device; it is off for other builds, so that another compiler's or torch's new warnings
cannot stop an install."""
import glob
import os
import shutil

from setuptools import find_packages, setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_found():
    return CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None)


def _build_cuda(cuda_sources):
    forced = os.environ.get("FSAM_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"FSAM_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    possible = torch.version.cuda is not None and _nvcc_found()
    if forced == "1" and not possible:
        raise SystemExit("FSAM_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found "
                         f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return possible and bool(cuda_sources)


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    werror = os.environ.get("FSAM_WERROR") == "1"
    # No FMA contraction: the kernels round in the same order as the reference backend.  Neither
    # errno nor FP traps are read, and without them GCC vectorises sqrt and selects (the PAC noise).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-Wall"] + (
        ["-Werror"] if werror else [])
    nvcc = ["-O3", "-lineinfo", "--fmad=false", "-Xcompiler", "-Wall"] + (
        ["-Werror", "all-warnings", "-Xcompiler", "-Werror"] if werror else [])
    common = dict(include_dirs=[os.path.join(HERE, "csrc", "include")], extra_link_args=["-fopenmp"])
    if _build_cuda(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension("fsam_kernels._C", cpp_sources + cuda_sources,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    return CppExtension("fsam_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx}, **common)


setup(
    name="fsam_kernels",
    version="0.1.0",
    description="Compiled kernels for Fisher-mask SAM (FSAM) and SAM fine-tuning",
    packages=find_packages(include=["fsam_kernels", "fsam_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
