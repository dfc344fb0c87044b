// The routed LoRA delta for float32 tensors on the CPU, in one call per adapted layer.
//
// For a small model's decode step each torch op costs a few microseconds of dispatch, more than
// the arithmetic of a rank-16 product; doing both products of every row here replaces four ops
// per layer (reshape, mm, view, addmm_) with one. Each row is computed on its own, so a row's
// result does not depend on which other rows or adapters share its batch.
#include <torch/extension.h>

#include <vector>

// result[m] += scales[s] * (x[m] · A[s·R .. s·R+R)ᵀ) · Bt[s·R .. s·R+R)   with s = indices[m / rows_per_item]
//   result [M, out], x [M, in]: float32, contiguous (any leading shape, flattened)
//   A [S·R, in], Bt [S·R, out]: float32, contiguous; the adapter at index s owns rows s·R .. s·R+R
//   indices [items] int64: one adapter index per batch item, -1 for the base (nothing added)
//   scales [S] float32: alpha/r per adapter
// Returns false, touching nothing, when the call does not fit (another dtype or device, strided
// rows, more than max_rows rows, autograd recording): the caller then uses torch ops.
bool lora_add_(torch::Tensor result, torch::Tensor x, torch::Tensor A, torch::Tensor Bt,
               torch::Tensor indices, torch::Tensor scales, int64_t rank, int64_t max_rows) {
  const auto f32 = torch::kFloat;
  if (result.scalar_type() != f32 || x.scalar_type() != f32 || !x.device().is_cpu() ||
      !result.is_contiguous() || !x.is_contiguous() || at::GradMode::is_enabled())
    return false;
  const int64_t in = A.size(1), out = Bt.size(1);
  const int64_t rows = x.numel() / in, items = indices.numel();
  if (rows > max_rows) return false;
  TORCH_CHECK(A.scalar_type() == f32 && Bt.scalar_type() == f32 && A.is_contiguous() && Bt.is_contiguous(),
              "lora_add_: the stacks must be float32 and contiguous");
  TORCH_CHECK(x.numel() == rows * in && result.numel() == rows * out,
              "lora_add_: x and result do not have the same rows");
  TORCH_CHECK(items > 0 && rows % items == 0, "lora_add_: rows are not a multiple of the items");
  const int64_t rows_per_item = rows / items;
  const int64_t* index = indices.data_ptr<int64_t>();
  const float* scale = scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* bp = Bt.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  std::vector<float> h(rank);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t s = index[m / rows_per_item];
    if (s < 0) continue;
    const float* xr = xp + m * in;
    for (int64_t r = 0; r < rank; ++r) {
      const float* a = ap + (s * rank + r) * in;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < in; ++k) acc += xr[k] * a[k];
      h[r] = acc * scale[s];
    }
    float* y = rp + m * out;
    for (int64_t r = 0; r < rank; ++r) {
      const float* b = bp + (s * rank + r) * out;
      const float hr = h[r];
#pragma omp simd
      for (int64_t n = 0; n < out; ++n) y[n] += hr * b[n];
    }
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add_", &lora_add_, "result += routed LoRA delta (float32, CPU)");
}
