// Makes the shared library importable as chanflex_kernels._C; importing it runs
// the static TORCH_LIBRARY registrations of the other translation units.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "chanflex op registrations", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
