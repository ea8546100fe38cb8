// The Python module fsam_kernels._C: importing it runs the TORCH_LIBRARY registrations of the
// other translation units; the ops are then reached through torch.ops.fsam.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
