// The Python module of an extension: importing it runs the TORCH_LIBRARY_IMPL registrations of its
// other translation units (the schemas are defined in fsam_kernels/_schemas.py, imported first).
#pragma once

#include <Python.h>

#define FSAM_PY_MODULE(name)                                                                   \
  extern "C" PyObject* PyInit_##name(void) {                                                   \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr}; \
    return PyModule_Create(&module_def);                                                       \
  }
