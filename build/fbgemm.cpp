// fbgemm's linear kernels for src/quant/fbgemm.rs. tch stopped wrapping them in 0.22, while libtorch
// (2.0.1 and 2.11 alike) still has the operators, so both builds call them here with the same source.
// A tch tensor handle is a heap `at::Tensor*` that tch frees with `delete`.
// Errors come back as a malloc'd message (NULL on success) for the caller to free.
#include <ATen/ops/fbgemm_linear_fp16_weight_fp32_activation.h>
#include <ATen/ops/fbgemm_linear_int8_weight_fp32_activation.h>
#include <ATen/ops/fbgemm_pack_gemm_matrix_fp16.h>
#include <ATen/ops/fbgemm_pack_quantized_matrix.h>

#include <cstring>
#include <exception>

namespace {
template <class F> char *into(at::Tensor **out, F f) {
  try {
    *out = new at::Tensor(f());
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
} // namespace

extern "C" {
char *arcana_fbgemm_linear_int8(at::Tensor **out, const at::Tensor *input, const at::Tensor *weight,
                                const at::Tensor *packed, const at::Tensor *col_offsets, double weight_scale,
                                int64_t weight_zero_point, const at::Tensor *bias) {
  return into(out, [&] {
    return at::fbgemm_linear_int8_weight_fp32_activation(*input, *weight, *packed, *col_offsets, weight_scale,
                                                         weight_zero_point, *bias);
  });
}

// The bias is a `Tensor` in 2.0.1 and an optional one in 2.11; a tensor converts to either.
char *arcana_fbgemm_linear_fp16(at::Tensor **out, const at::Tensor *input, const at::Tensor *packed,
                                const at::Tensor *bias) {
  return into(out, [&] { return at::fbgemm_linear_fp16_weight_fp32_activation(*input, *packed, *bias); });
}

char *arcana_fbgemm_pack_fp16(at::Tensor **out, const at::Tensor *weight) {
  return into(out, [&] { return at::fbgemm_pack_gemm_matrix_fp16(*weight); });
}

char *arcana_fbgemm_pack_int8(at::Tensor **out, const at::Tensor *weight) {
  return into(out, [&] { return at::fbgemm_pack_quantized_matrix(*weight); });
}
}
