// The pre-norm of an elastic layer (fp32, x86-64 AVX2 + FMA) for the rows of several
// budgets stacked in one buffer, in one pass:
//
//   residual[r, :w] += x[r, :w];   x[r, :w] = residual[r, :w] / rms(residual[r, :w]) * weight[:w]
//
// where w is the width (hidden channels) of the row's budget. Rows come in segments
// (seg_rows rows of seg_width channels each, in order); columns past a row's width are
// not touched. What vLLM's fused add-RMSNorm does per budget, without a call per budget.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

void segments_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                           at::IntArrayRef seg_rows, at::IntArrayRef seg_width, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat,
              "segments_add_rms_norm: float32 only");
  TORCH_CHECK(x.device().is_cpu() && residual.device().is_cpu() && weight.device().is_cpu(),
              "segments_add_rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && residual.dim() == 2 && x.stride(1) == 1 &&
                  residual.stride(1) == 1 && weight.is_contiguous(),
              "segments_add_rms_norm: x and residual must be 2-D with unit column stride");
  TORCH_CHECK(seg_rows.size() == seg_width.size(), "segments_add_rms_norm: segment lists differ");
  int64_t R = 0;
  std::vector<int64_t> row_width;
  for (size_t s = 0; s < seg_rows.size(); ++s) {
    const int64_t w = seg_width[s];
    TORCH_CHECK(seg_rows[s] >= 0 && w > 0 && w <= x.size(1) && w <= residual.size(1) &&
                    w <= weight.numel(),
                "segments_add_rms_norm: segment ", s, " is wider than the tensors");
    row_width.insert(row_width.end(), seg_rows[s], w);
    R += seg_rows[s];
  }
  TORCH_CHECK(R == x.size(0) && R == residual.size(0), "segments_add_rms_norm: rows do not add up");
  float* X = x.data_ptr<float>();
  float* S = residual.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  const int64_t lx = x.stride(0), ls = residual.stride(0);
  const int64_t widest = R ? *std::max_element(row_width.begin(), row_width.end()) : 1;
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / widest), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = X + r * lx;
      float* sr = S + r * ls;
      const int64_t w = row_width[r];
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= w; i += 8) {
        const __m256 v = _mm256_add_ps(_mm256_loadu_ps(sr + i), _mm256_loadu_ps(xr + i));
        _mm256_storeu_ps(sr + i, v);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float sum = vllm_elastic_vec::hsum8(acc);
      for (; i < w; ++i) {
        sr[i] += xr[i];
        sum += sr[i] * sr[i];
      }
      const float scale = 1.0f / std::sqrt(sum / float(w) + float(eps));
      const __m256 sc = _mm256_set1_ps(scale);
      i = 0;
      for (; i + 8 <= w; i += 8)
        _mm256_storeu_ps(xr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(sr + i), sc),
                                               _mm256_loadu_ps(W + i)));
      for (; i < w; ++i) xr[i] = sr[i] * scale * W[i];
    }
  });
}

TORCH_LIBRARY_FRAGMENT(vllm_elastic, m) {
  m.def("segments_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, int[] seg_rows, "
        "int[] seg_width, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) {
  m.impl("segments_add_rms_norm", &segments_add_rms_norm);
}
