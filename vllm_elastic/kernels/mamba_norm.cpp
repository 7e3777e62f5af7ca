// The gated RMSNorm of an elastic Mamba-2 layer (fp32, x86-64 AVX2 + FMA), for the rows of
// several budgets at once, read straight from the layer's scan output and in_proj output:
//
//   proj[t] = [B | C | (x_j (P), dt_j, z_j (P)) for each head j],  y[t] = [H, P]
//   a row of n heads (rank-major: head j = i*G + g is in group g):
//   v[j, p] = y[t, j, p] * silu(z_j[p]);  per group g, over its n/G heads and P channels:
//   out[r, j*P + p] = v[j, p] / sqrt(mean(v^2) + eps) * weight[j*P + p]
//
// Output rows come in segments (seg_rows rows of seg_heads heads each, in order); output
// row r reads token rows[r] (or r without ``rows``), so a mixed batch's rows are gathered
// by budget in the same pass. Columns past a row's n*P are not written.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "vec_math.h"

namespace {

using vllm_elastic_vec::exp8;
using vllm_elastic_vec::hsum8;
using vllm_elastic_vec::silu;

// v[p] = y[p] * silu(z[p]) for p < P; returns sum of v[p]^2
inline float gate_row(const float* y, const float* z, float* v, int64_t P) {
  __m256 acc = _mm256_setzero_ps();
  int64_t p = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; p + 8 <= P; p += 8) {
    const __m256 zz = _mm256_loadu_ps(z + p);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(
                                                    _mm256_setzero_ps(), zz))));
    const __m256 vv = _mm256_mul_ps(_mm256_loadu_ps(y + p), _mm256_mul_ps(zz, sig));
    _mm256_storeu_ps(v + p, vv);
    acc = _mm256_fmadd_ps(vv, vv, acc);
  }
  float sum = hsum8(acc);
  for (; p < P; ++p) {
    v[p] = y[p] * silu(z[p]);
    sum += v[p] * v[p];
  }
  return sum;
}

}  // namespace

void mamba_gated_norm(at::Tensor& out, const at::Tensor& y, const at::Tensor& proj,
                      const at::Tensor& weight, const c10::optional<at::Tensor>& rows,
                      at::IntArrayRef seg_rows, at::IntArrayRef seg_heads, int64_t bc,
                      int64_t groups, double eps) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                  proj.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "mamba_gated_norm: float32 only");
  TORCH_CHECK(y.dim() == 3 && y.stride(2) == 1 && y.stride(1) == y.size(2),
              "mamba_gated_norm: y must be [T, H, P] with contiguous heads");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && proj.dim() == 2 && proj.stride(1) == 1 &&
                  weight.is_contiguous(),
              "mamba_gated_norm: out and proj must be 2-D with unit column stride");
  TORCH_CHECK(seg_rows.size() == seg_heads.size(), "mamba_gated_norm: segment lists differ");
  const int64_t T = y.size(0), H = y.size(1), P = y.size(2), G = groups;
  const int64_t stride = 2 * P + 1;
  int64_t R = 0;
  for (size_t s = 0; s < seg_rows.size(); ++s) {
    const int64_t n = seg_heads[s];
    TORCH_CHECK(n > 0 && n <= H && n % G == 0 && n * P <= out.size(1) &&
                    bc + n * stride <= proj.size(1) && n * P <= weight.numel(),
                "mamba_gated_norm: segment ", s, " has a bad head count");
    R += seg_rows[s];
  }
  TORCH_CHECK(R == out.size(0), "mamba_gated_norm: rows do not add up");
  const int64_t* src = nullptr;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == R,
                "mamba_gated_norm: rows must be a contiguous int64 tensor of the output rows");
    src = rows->data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r)
      TORCH_CHECK(src[r] >= 0 && src[r] < T, "mamba_gated_norm: row index out of range");
  }
  TORCH_CHECK(proj.size(0) == T, "mamba_gated_norm: proj and y have different token counts");
  std::vector<int64_t> row_heads(R);
  for (size_t s = 0, r = 0; s < seg_rows.size(); ++s)
    for (int64_t i = 0; i < seg_rows[s]; ++i) row_heads[r++] = seg_heads[s];
  const float* Y = y.data_ptr<float>();
  const float* PJ = proj.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ly = y.stride(0), lp = proj.stride(0), lo = out.stride(0);
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> v(H * P);
    std::vector<double> ss(G);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = src ? src[r] : r;
      const int64_t n = row_heads[r];
      std::fill(ss.begin(), ss.end(), 0.0);
      for (int64_t j = 0; j < n; ++j) {
        const float* yj = Y + t * ly + j * P;
        const float* zj = PJ + t * lp + bc + j * stride + P + 1;
        ss[j % G] += gate_row(yj, zj, v.data() + j * P, P);
      }
      const double count = double(n / G) * double(P);
      float* o = O + r * lo;
      for (int64_t j = 0; j < n; ++j) {
        const float scale = float(1.0 / std::sqrt(ss[j % G] / count + eps));
        const float* vj = v.data() + j * P;
        const float* wj = W + j * P;
        for (int64_t p = 0; p < P; ++p) o[j * P + p] = vj[p] * scale * wj[p];
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(vllm_elastic, m) {
  m.def("mamba_gated_norm(Tensor(a!) out, Tensor y, Tensor proj, Tensor weight, Tensor? rows, "
        "int[] seg_rows, int[] seg_heads, int bc, int groups, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) { m.impl("mamba_gated_norm", &mamba_gated_norm); }
