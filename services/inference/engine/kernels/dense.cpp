// Projections of packed rows through oneDNN, for compiled graphs to call without entering Python
// (the operator llmp_native::dense; decoder.dense).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <mutex>
#include <unordered_map>

#include "kernels.h"

namespace llmp {

namespace {
std::mutex packed_lock;
std::unordered_map<const void*, at::Tensor> packed;
}  // namespace

// `weight` of dense() is a plain weight, or a stand-in registered with the oneDNN-layout weight it
// stands for (decoder.Packed).
void register_packed(const at::Tensor& stand_in, const at::Tensor& weight) {
  std::lock_guard<std::mutex> guard(packed_lock);
  packed[stand_in.data_ptr()] = weight;
}

void unregister_packed(int64_t key) {
  std::lock_guard<std::mutex> guard(packed_lock);
  packed.erase(reinterpret_cast<const void*>(key));
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  static auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  at::Tensor w = weight;
  {
    std::lock_guard<std::mutex> guard(packed_lock);
    auto found = packed.find(weight.data_ptr());
    if (found != packed.end()) w = found->second;
  }
  c10::List<std::optional<at::Scalar>> scalars;
  scalars.push_back(std::nullopt);
  return linear.call(x.contiguous(), w, bias, "none", scalars, c10::string_view(""));
}

}  // namespace llmp

