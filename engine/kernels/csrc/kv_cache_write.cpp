// write_kv_cache: stores new tokens' K/V rows at their slots of the paged cache, converted to the
// cache's dtype (the CPU attention backend's K/V write, before paged_attention reads them).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_vec.h"

namespace {

using conveyor_attention::to_float;

// Copies n elements, converted to the cache's dtype as Tensor.to converts them (float to bfloat16
// or float16 rounds to nearest even; through float between the two 16-bit types).
template <typename ST, typename CT>
inline void convert_row(const ST* __restrict src, CT* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<ST, CT>) {
    std::memcpy(dst, src, n * sizeof(CT));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(to_float(src[i]));
  }
}

template <typename ST, typename CT>
void write_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache, const int64_t* slots64,
                const int32_t* slots32) {
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), row = H * D;
  CT* k_cache = kv_cache.data_ptr<CT>();
  CT* v_cache = k_cache + kv_cache.stride(0);
  const ST* kp = k.data_ptr<ST>();
  const ST* vp = v.data_ptr<ST>();
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots64 != nullptr ? slots64[t] : slots32[t];
      if (slot < 0) continue;  // padding
      for (int64_t h = 0; h < H; ++h) {
        convert_row(kp + t * k.stride(0) + h * k.stride(1), k_cache + slot * row + h * D, D);
        convert_row(vp + t * v.stride(0) + h * v.stride(1), v_cache + slot * row + h * D, D);
      }
    }
  });
}

template <typename ST>
void write_rows_to(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache, const int64_t* s64, const int32_t* s32) {
  switch (kv_cache.scalar_type()) {
    case at::kFloat: return write_rows<ST, float>(k, v, kv_cache, s64, s32);
    case at::kBFloat16: return write_rows<ST, c10::BFloat16>(k, v, kv_cache, s64, s32);
    case at::kHalf: return write_rows<ST, c10::Half>(k, v, kv_cache, s64, s32);
    default: TORCH_CHECK(false, "write_kv_cache: unsupported cache dtype ", kv_cache.scalar_type());
  }
}

// Stores k[t] and v[t] ([T, KVH, D], last dim contiguous, e.g. views of a fused projection) at slot
// slot_mapping[t] (int64 or int32 [T]) of kv_cache [2, num_blocks, block_size, KVH, D], converted
// to the cache's dtype; tokens with a negative slot (padding) are skipped. Bit for bit what
// torch_attention.write_kv stores, in one pass (no index_copy_ pair, no mask).
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor kv_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type() && kv_cache.dim() == 5,
              "write_kv_cache: k and v must be [T, KVH, D] of one dtype, the cache 5-D");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && kv_cache.device().is_cpu() && slot_mapping.device().is_cpu(),
              "write_kv_cache: CPU tensors only");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.size(0) == 2 && kv_cache.size(3) == k.size(1) &&
                  kv_cache.size(4) == k.size(2),
              "write_kv_cache: cache shape does not match k/v");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv_cache: k/v last dim must be contiguous");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous() &&
                  (slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt),
              "write_kv_cache: slot_mapping must be contiguous int64 or int32 [T]");
  const bool wide = slot_mapping.scalar_type() == at::kLong;
  const int64_t* s64 = wide ? slot_mapping.data_ptr<int64_t>() : nullptr;
  const int32_t* s32 = wide ? nullptr : slot_mapping.data_ptr<int32_t>();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  for (int64_t t = 0; t < k.size(0); ++t) {
    const int64_t slot = wide ? s64[t] : s32[t];
    TORCH_CHECK(slot < num_slots, "write_kv_cache: slot ", slot, " of token ", t, " is past the cache's ", num_slots);
  }
  switch (k.scalar_type()) {
    case at::kFloat: return write_rows_to<float>(k, v, kv_cache, s64, s32);
    case at::kBFloat16: return write_rows_to<c10::BFloat16>(k, v, kv_cache, s64, s32);
    case at::kHalf: return write_rows_to<c10::Half>(k, v, kv_cache, s64, s32);
    default: TORCH_CHECK(false, "write_kv_cache: unsupported k/v dtype ", k.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("write_kv_cache", &write_kv_cache); }
