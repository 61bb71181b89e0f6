// The Python module of the engine's kernels (built by __init__.py).

#include <torch/extension.h>

#include "kernels.h"

// The operators compiled graphs call (their C++ wrappers call them without entering Python).
TORCH_LIBRARY(llmp_native, m) {
  m.def("dense(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_blocks, Tensor value_blocks, Tensor read_blocks, Tensor? mask, "
      "SymInt width, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmp_native, CPU, m) {
  m.impl("dense", &llmp::dense);
  m.impl("paged_decode_attention", &llmp::decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_width", &llmp::vector_width, "float32 lanes of the vectors the kernels use");
  m.def("register_packed", &llmp::register_packed,
        "A stand-in weight's oneDNN-layout weight and, or None, its plain one, for llmp_native::dense");
  m.def("few_rows_limit", &llmp::few_rows_limit,
        "Most rows llmp_native::dense computes with its own bfloat16 kernel from a plain weight (0: none)");
  m.def("unregister_packed", &llmp::unregister_packed, "Forget a stand-in (by its data pointer)");
}
