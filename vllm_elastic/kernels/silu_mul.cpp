// SiLU(gate) * up of an elastic gated MLP (fp32, x86-64 AVX2 + FMA), for the rows of
// several budgets in one pass over the band-major gate_up output:
//
//   gu[r] = [gate[0:b0] | up[0:b0] | gate[b0:b1] | up[b0:b1] | ...]   (bounds b0 < b1 < ...)
//   act[r, c] = silu(gate[c]) * up[c]   for the channels c < inter of the row's budget
//
// Rows come in segments (seg_rows rows whose channels end at seg_inter, one of the
// bounds), in order. Columns of act past a row's inter are not written.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "vec_math.h"

void silu_mul_bands(at::Tensor& act, const at::Tensor& gu, at::IntArrayRef seg_rows,
                    at::IntArrayRef seg_inter, at::IntArrayRef bounds) {
  using vllm_elastic_vec::silu;
  using vllm_elastic_vec::silu8;
  TORCH_CHECK(act.scalar_type() == at::kFloat && gu.scalar_type() == at::kFloat,
              "silu_mul_bands: float32 only");
  TORCH_CHECK(act.device().is_cpu() && gu.device().is_cpu(), "silu_mul_bands: CPU tensors only");
  TORCH_CHECK(act.dim() == 2 && gu.dim() == 2 && act.stride(1) == 1 && gu.stride(1) == 1,
              "silu_mul_bands: act and gu must be 2-D with unit column stride");
  TORCH_CHECK(seg_rows.size() == seg_inter.size(), "silu_mul_bands: segment lists differ");
  for (size_t c = 0; c < bounds.size(); ++c)
    TORCH_CHECK(bounds[c] > (c ? bounds[c - 1] : 0), "silu_mul_bands: bounds must increase");
  int64_t R = 0;
  std::vector<int64_t> row_inter;
  for (size_t s = 0; s < seg_rows.size(); ++s) {
    const int64_t inter = seg_inter[s];
    TORCH_CHECK(seg_rows[s] >= 0 &&
                    std::find(bounds.begin(), bounds.end(), inter) != bounds.end() &&
                    2 * inter <= gu.size(1) && inter <= act.size(1),
                "silu_mul_bands: segment ", s, " ends at no band bound or past the tensors");
    row_inter.insert(row_inter.end(), seg_rows[s], inter);
    R += seg_rows[s];
  }
  TORCH_CHECK(R == act.size(0) && R == gu.size(0), "silu_mul_bands: rows do not add up");
  const float* G = gu.data_ptr<float>();
  float* A = act.data_ptr<float>();
  const int64_t lg = gu.stride(0), la = act.stride(0);
  const int64_t widest = R ? *std::max_element(row_inter.begin(), row_inter.end()) : 1;
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(widest, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t a = 0;
      for (const int64_t b : bounds) {
        if (b > row_inter[r]) break;
        const float* gate = G + r * lg + 2 * a;
        const float* up = gate + (b - a);
        float* out = A + r * la + a;
        const int64_t d = b - a;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
          _mm256_storeu_ps(out + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)),
                                                  _mm256_loadu_ps(up + i)));
        for (; i < d; ++i) out[i] = silu(gate[i]) * up[i];
        a = b;
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(vllm_elastic, m) {
  m.def("silu_mul_bands(Tensor(a!) act, Tensor gu, int[] seg_rows, int[] seg_inter, "
        "int[] bounds) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) { m.impl("silu_mul_bands", &silu_mul_bands); }
