// Projections of packed rows, for compiled graphs to call without entering Python (the operator
// llmp_native::dense; decoder.dense): through oneDNN, or for a bfloat16 step of a few rows through
// this file's own kernel over the plain weight.
//
// oneDNN's bfloat16 kernels read a weight at one row well below the memory's bandwidth (about
// 8 GB/s of 15 on an AMX Xeon's two cores, packed or plain): they are made for row tiles. A few
// rows only need the weight streamed once, each pair of its columns multiplied into float32 sums
// (AVX-512 BF16's dot product), eight output rows at a time with the next eight prefetched.

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <mutex>
#include <unordered_map>

#include "kernels.h"

namespace llmp {

namespace {

struct Weights {
  at::Tensor packed;  // oneDNN's layout
  at::Tensor plain;   // undefined, or the same weight in its plain layout for few_rows
};

std::mutex packed_lock;
std::unordered_map<const void*, Weights> packed;

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr int64_t kFewRows = 4;
constexpr int64_t kOutputs = 8;  // output rows a pass over the weight's rows computes together

// y[m, n] = x[m] . w[n] (+ bias[n]) for n in [n0, n1), in float32 sums; M rows of x at once.
template <int M>
void few_rows_span(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias, at::BFloat16* y,
                   int64_t in, int64_t out, int64_t n0, int64_t n1) {
  auto add = [&](int64_t n) { return bias == nullptr ? 0.0f : static_cast<float>(bias[n]); };
  const __mmask32 tail = static_cast<__mmask32>((1ull << (in % 32)) - 1);
  auto load = [&](const at::BFloat16* row, int64_t k) {
    return k + 32 <= in ? (__m512bh)_mm512_loadu_si512(row + k) : (__m512bh)_mm512_maskz_loadu_epi16(tail, row + k);
  };
  int64_t n = n0;
  for (; n + kOutputs <= n1; n += kOutputs) {
    __m512 sum[M][kOutputs];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < kOutputs; ++r) sum[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) {
      __m512bh xs[M];
      for (int m = 0; m < M; ++m) xs[m] = load(x + m * in, k);
      for (int r = 0; r < kOutputs; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + r + kOutputs) * in + k), _MM_HINT_T0);
        __m512bh row = load(w + (n + r) * in, k);
        for (int m = 0; m < M; ++m) sum[m][r] = _mm512_dpbf16_ps(sum[m][r], row, xs[m]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < kOutputs; ++r) y[m * out + n + r] = at::BFloat16(_mm512_reduce_add_ps(sum[m][r]) + add(n + r));
  }
  for (; n < n1; ++n) {
    __m512 sum[M];
    for (int m = 0; m < M; ++m) sum[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) {
      __m512bh row = load(w + n * in, k);
      for (int m = 0; m < M; ++m) sum[m] = _mm512_dpbf16_ps(sum[m], row, load(x + m * in, k));
    }
    for (int m = 0; m < M; ++m) y[m * out + n] = at::BFloat16(_mm512_reduce_add_ps(sum[m]) + add(n));
  }
}

// x [M <= kFewRows, in] by a plain weight [out, in], both bfloat16, contiguous.
at::Tensor few_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const auto* xs = x.data_ptr<at::BFloat16>();
  const auto* w = weight.data_ptr<at::BFloat16>();
  auto* ys = y.data_ptr<at::BFloat16>();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kBFloat16).contiguous() : at::Tensor();
  const at::BFloat16* bs = b.defined() ? b.data_ptr<at::BFloat16>() : nullptr;
  const int64_t spans = (out + kOutputs - 1) / kOutputs;
  at::parallel_for(0, spans, 16, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kOutputs, n1 = std::min(end * kOutputs, out);
    switch (rows) {
      case 1: few_rows_span<1>(xs, w, bs, ys, in, out, n0, n1); break;
      case 2: few_rows_span<2>(xs, w, bs, ys, in, out, n0, n1); break;
      case 3: few_rows_span<3>(xs, w, bs, ys, in, out, n0, n1); break;
      default: few_rows_span<4>(xs, w, bs, ys, in, out, n0, n1); break;
    }
  });
  return y;
}
#else
constexpr int64_t kFewRows = 0;

at::Tensor few_rows(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "llmp: the few-rows kernel needs AVX-512 BF16");
}
#endif

bool takes_few_rows(const at::Tensor& x, const at::Tensor& plain) {
  return plain.defined() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kFewRows && x.scalar_type() == at::kBFloat16 &&
         plain.scalar_type() == at::kBFloat16 && plain.dim() == 2 && plain.is_contiguous();
}

}  // namespace

int64_t few_rows_limit() { return kFewRows; }

// `weight` of dense() is a plain weight, or a stand-in registered with the oneDNN-layout weight it
// stands for (decoder.Packed) and, where few_rows_limit() > 0, the plain weight too (or an undefined
// tensor: oneDNN alone).
void register_packed(const at::Tensor& stand_in, const at::Tensor& weight, const c10::optional<at::Tensor>& plain) {
  std::lock_guard<std::mutex> guard(packed_lock);
  packed[stand_in.data_ptr()] = Weights{weight, plain.value_or(at::Tensor())};
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
  at::Tensor w = weight, plain = weight;
  {
    std::lock_guard<std::mutex> guard(packed_lock);
    auto found = packed.find(weight.data_ptr());
    if (found != packed.end()) w = found->second.packed, plain = found->second.plain;
  }
  if (takes_few_rows(x, plain)) return few_rows(x.contiguous(), plain, bias);
  c10::List<std::optional<at::Scalar>> scalars;
  scalars.push_back(std::nullopt);
  return linear.call(x.contiguous(), w, bias, "none", scalars, c10::string_view(""));
}

}  // namespace llmp

