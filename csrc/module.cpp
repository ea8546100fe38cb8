// fsam_kernels._C: the C++ CPU ops, and the CUDA ops where built.
#include <fsam/py_module.h>

FSAM_PY_MODULE(_C)
