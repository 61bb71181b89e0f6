// Decode attention over the paged KV cache: one query per row, read where the cache holds it.
//
// Each row streams its context's cached tokens once for the scores and once for the values, in
// memory order, with float32 accumulators for every query head (a query head reads its group's key
// head: grouped-query attention). Rows, or rows' ranges of key heads for small batches, are spread
// over ATen's intra-op threads. Built by kernels/__init__.py with the compiler flags of the machine it runs on; the ISA
// macros below pick ATen's vector type for them, as TorchInductor's generated kernels do.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include "kernels.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

inline Vec load(const float* p) { return Vec::loadu(p); }

inline Vec load(const at::BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}

template <typename T>
void decode(const T* q, const T* keys, const T* values, const int64_t* read, const bool* mask,
            int64_t mask_stride, T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
            int64_t blocks_per_row, int64_t block_size, int64_t width, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t context = blocks_per_row * block_size;
  const int64_t token_stride = kv_heads * dim;
  const int64_t block_stride = block_size * token_stride;
  const int64_t chunks = dim / kWidth;
  const int64_t keys_read = std::min(width, context);
  // An item is a row's range of key heads: all of them where rows alone keep every thread busy,
  // fewer (more items) for small batches. Within an item, tokens are read in memory order.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(kv_heads, std::max<int64_t>(1, (2 * threads + rows - 1) / rows));
  const int64_t per_split = (kv_heads + splits - 1) / splits;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(heads * dim), score(heads * context), acc(heads * dim), top(heads), total(heads);
    std::vector<char> valid(context);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / splits;
      const int64_t kv0 = (item % splits) * per_split, kv1 = std::min(kv_heads, kv0 + per_split);
      if (kv0 >= kv1) continue;
      const int64_t h0 = kv0 * group, h1 = kv1 * group;  // the query heads of this item
      const int64_t* blocks = read + row * blocks_per_row;
      for (int64_t h = h0; h < h1; ++h) {
        const T* src = q + (row * heads + h) * dim;
        for (int64_t i = 0; i < dim; ++i) query[h * dim + i] = static_cast<float>(src[i]) * scale;
        top[h] = -std::numeric_limits<float>::infinity();
        total[h] = 0.0f;
      }
      for (int64_t pos = 0; pos < keys_read; ++pos)
        valid[pos] = mask == nullptr || mask[row * mask_stride + pos];
      // Scores: every valid token's keys once, each query head against its key head.
      for (int64_t pos = 0; pos < keys_read; ++pos) {
        if (!valid[pos]) continue;
        const T* token = keys + blocks[pos / block_size] * block_stride + (pos % block_size) * token_stride;
        for (int64_t h = h0; h < h1; ++h) {
          const T* key = token + (h / group) * dim;
          Vec sum(0.0f);
          for (int64_t c = 0; c < chunks; ++c)
            sum = at::vec::fmadd(Vec::loadu(query.data() + h * dim + c * kWidth), load(key + c * kWidth), sum);
          const float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
          score[h * context + pos] = s;
          top[h] = std::max(top[h], s);
        }
      }
      // Softmax weights (unnormalised) and their sums; masked keys weigh nothing.
      for (int64_t h = h0; h < h1; ++h) {
        float* s = score.data() + h * context;
        const Vec shift(top[h]);
        int64_t pos = 0;
        for (; pos + kWidth <= keys_read; pos += kWidth) (Vec::loadu(s + pos) - shift).exp_u20().store(s + pos);
        for (; pos < keys_read; ++pos) s[pos] = std::exp(s[pos] - top[h]);
        for (pos = 0; pos < keys_read; ++pos) total[h] += valid[pos] ? s[pos] : 0.0f;
      }
      // Values: every valid token's values once, added into each query head's accumulator by its weight.
      std::fill(acc.begin() + h0 * dim, acc.begin() + h1 * dim, 0.0f);
      for (int64_t pos = 0; pos < keys_read; ++pos) {
        if (!valid[pos]) continue;
        const T* token = values + blocks[pos / block_size] * block_stride + (pos % block_size) * token_stride;
        for (int64_t h = h0; h < h1; ++h) {
          const T* value = token + (h / group) * dim;
          const Vec w(score[h * context + pos]);
          float* a = acc.data() + h * dim;
          for (int64_t c = 0; c < chunks; ++c)
            at::vec::fmadd(w, load(value + c * kWidth), Vec::loadu(a + c * kWidth)).store(a + c * kWidth);
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        T* dst = out + (row * heads + h) * dim;
        const float inv = total[h] > 0.0f ? 1.0f / total[h] : 0.0f;
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(acc[h * dim + i] * inv);
      }
    }
  });
}

}  // namespace

namespace llmp {

// q [rows, heads, dim]; key/value blocks [blocks, block_size, kv_heads, dim]; read [rows, n] the
// blocks of each row's context in order; mask [rows, m >= width] (true: the key is attended) or
// undefined (every key); keys at `width` and beyond are not read. -> [rows, heads, dim].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key_blocks, const at::Tensor& value_blocks,
                            const at::Tensor& read, const c10::optional<at::Tensor>& mask, int64_t width,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && key_blocks.dim() == 4 && read.dim() == 2, "decode_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == key_blocks.scalar_type() && q.scalar_type() == value_blocks.scalar_type(),
              "decode_attention: dtypes differ");
  TORCH_CHECK(key_blocks.is_contiguous() && value_blocks.is_contiguous(), "decode_attention: cache not contiguous");
  TORCH_CHECK(value_blocks.sizes() == key_blocks.sizes(), "decode_attention: key and value blocks differ in shape");
  TORCH_CHECK(read.scalar_type() == at::kLong, "decode_attention: block ids must be int64");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = key_blocks.size(1), kv_heads = key_blocks.size(2);
  TORCH_CHECK(key_blocks.size(3) == dim && dim % kWidth == 0, "decode_attention: head size must be a multiple of ",
              kWidth);
  TORCH_CHECK(heads % kv_heads == 0, "decode_attention: query heads must be a multiple of key heads");
  TORCH_CHECK(read.size(0) == rows, "decode_attention: one row of blocks per query");
  at::Tensor qc = q.contiguous(), rc = read.contiguous();
  at::Tensor mc;
  if (mask.has_value() && mask->defined()) {
    mc = mask->to(at::kBool).contiguous();
    mc = mc.view({rows, -1});
    TORCH_CHECK(mc.size(1) >= std::min(width, read.size(1) * block_size), "decode_attention: mask narrower than width");
  }
  const int64_t* ids = rc.data_ptr<int64_t>();
  for (int64_t i = 0; i < rc.numel(); ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < key_blocks.size(0), "decode_attention: block id out of range");
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_SWITCH(q.scalar_type(), "decode_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       decode<float>(qc.data_ptr<float>(), key_blocks.data_ptr<float>(),
                                     value_blocks.data_ptr<float>(), rc.data_ptr<int64_t>(),
                                     mc.defined() ? mc.data_ptr<bool>() : nullptr, mc.defined() ? mc.size(1) : 0,
                                     out.data_ptr<float>(), rows,
                                     heads, kv_heads, dim, read.size(1), block_size, width,
                                     static_cast<float>(scale));
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       decode<at::BFloat16>(qc.data_ptr<at::BFloat16>(), key_blocks.data_ptr<at::BFloat16>(),
                                            value_blocks.data_ptr<at::BFloat16>(), rc.data_ptr<int64_t>(),
                                            mc.defined() ? mc.data_ptr<bool>() : nullptr,
                                            mc.defined() ? mc.size(1) : 0, out.data_ptr<at::BFloat16>(), rows, heads, kv_heads, dim, read.size(1),
                                            block_size, width, static_cast<float>(scale));
                     }));
  return out;
}

int64_t vector_width() { return kWidth; }

}  // namespace llmp
