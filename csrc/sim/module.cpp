// fsam_kernels._sim: the CUDA ops of csrc/cuda run by the SIMT emulator on CPU tensors, registered
// as torch.ops.fsam_sim.* (the cuda-sim backend).
#include <fsam/py_module.h>

FSAM_PY_MODULE(_sim)
