// The engine's CPU kernels: what module.cpp exposes to Python.
#pragma once

#include <torch/extension.h>

namespace llmp {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& value_blocks,
                            const at::Tensor& read, const c10::optional<at::Tensor>& mask, int64_t width,
                            double scale);
int64_t vector_width();

void register_packed(const at::Tensor& stand_in, const at::Tensor& weight, const c10::optional<at::Tensor>& plain);
int64_t few_rows_limit();
void unregister_packed(int64_t key);
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace llmp
