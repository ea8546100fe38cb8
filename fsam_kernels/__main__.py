"""`python -m fsam_kernels`: what this installation is and can do, for bug reports (in the
manner of `python -m torch.utils.collect_env`): the package's version and commit, the versions
of Python, torch, Triton, CUDA, transformers and accelerate, the GPUs, the backends built and
available, the CUDA architectures compiled into the extension and the CPU's vector capability."""
import importlib
import json
import os
import platform
import subprocess
import sys

import torch


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # noqa: BLE001  (not installed, or broken: either is worth reporting)
        return f"not available ({type(exc).__name__})"


def _commit(here):
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [v for v in ("avx512f", "avx512bw", "avx2", "fma", "neon") if v in flags]
    except OSError:
        pass
    return []


def _build_record(here, name):
    """What setup.py recorded when it built the loaded extension module `name`."""
    module = importlib.import_module(f"fsam_kernels.{name}")
    try:
        with open(os.path.join(here, "_build_info.json")) as f:
            entry = json.load(f)[os.path.basename(module.__file__)]
    except (OSError, ValueError, KeyError):
        return "unknown (no build record for this file)"
    return (f"torch {entry['torch']}, CUDA {entry['cuda'] or 'not built'}"
            + (f", architectures sm_{', sm_'.join(a.replace('.', '') for a in entry['cuda_archs'])}"
               if entry["cuda_archs"] else ""))


def report():
    """The report as (label, value) rows."""
    import fsam_kernels
    from fsam_kernels import _extension, backends
    here = os.path.dirname(os.path.abspath(fsam_kernels.__file__))
    rows = [
        ("fsam_kernels", f"{fsam_kernels.__version__} at {here}"),
        ("commit", _commit(here) or "unknown (not a git checkout)"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, "
                  f"CPU capability {torch.backends.cpu.get_cpu_capability()})"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("accelerate", _version("accelerate")),
        ("CPU vector extensions", ", ".join(_cpu_flags()) or "none found"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                                     f"{p.multi_processor_count} SMs"))
    else:
        rows.append(("GPU", "none visible"))
    rows += [
        ("extension (fsam_kernels._C)", "loaded" if _extension.LOADED else f"not loaded: {_extension.LOAD_ERROR}"),
        ("CUDA kernels in it", "yes" if _extension.LOADED and _extension.has_cuda_kernels() else "no"),
        ("emulated CUDA (fsam_kernels._sim)",
         "loaded" if _extension.SIM_LOADED else f"not loaded: {_extension.SIM_LOAD_ERROR}"),
        ("extension built with", _build_record(here, "_C") if _extension.LOADED else "-"),
        ("backends available", ", ".join(backends.available_backends())),
        ("auto picks", f"cpu tensors: {backends.native_backends('cpu')[0]}"
                       + (f"; cuda tensors: {backends.native_backends('cuda')[0]}"
                          if torch.cuda.is_available() else "")),
    ]
    return rows


def main():
    rows = report()
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))


if __name__ == "__main__":
    main()
