// The Python module fsam_kernels._C: importing it runs the TORCH_LIBRARY_IMPL registrations of the
// other translation units (the schemas are defined in fsam_kernels/_schemas.py, imported first).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
