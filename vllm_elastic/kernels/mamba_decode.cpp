// One decode step of an elastic Mamba-2 layer (fp32, x86-64 AVX2 + FMA): causal conv
// update + selective state update for one token per request, read straight from the
// layer's in_proj output and written straight into the layer's state, for the elastic
// head order (rank-major: head j reads B/C group j % G, so no per-head copy of B and C).
//
//   proj[t]  = [B (G*N) | C (G*N) | (x_j (P), dt_j, z_j (P)) for each head j]
//   conv channels (state and weights) = [B | C | x_0 .. x_{H-1}]
//   token t updates heads j < heads_t (its state budget's; token_heads, or all of out's)
//   xc = silu(conv(state, x)); dt = softplus(dt + dt_bias_j); dA = exp(dt * A_j)
//   s = s * dA + (dt * xc_p) * B_g;  out[t, j, p] = <s, C_g> + D_j * xc_p
//
// Tokens whose state index is the null block are skipped (no state write, zero output),
// as vLLM's CPU kernels do. Work: first the B/C conv of every token, then the (token,
// head) pairs in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

inline float softplus(float v) { return v <= 20.0f ? std::log1p(std::exp(v)) : v; }

// one conv channel: y = bias + sum_k w[k] * window[k] over the K-1 stored inputs and the
// new one; the window shifts by one (state[k] = state[k + 1], last = new input)
inline float conv_step(float* st, int64_t sk, const float* w, int64_t K, float bias, float in) {
  float y = bias;
  for (int64_t k = 0; k < K - 1; ++k) y += w[k] * st[k * sk];
  y += w[K - 1] * in;
  for (int64_t k = 0; k + 1 < K - 1; ++k) st[k * sk] = st[(k + 1) * sk];
  if (K > 1) st[(K - 2) * sk] = in;
  return silu(y);
}

// s[:N] = s * dA + dtx * b; returns <s, c>
inline float ssu_row(float* s, const float* b, const float* c, int64_t N, float dA, float dtx) {
  int64_t n = 0;
  __m256 acc = _mm256_setzero_ps();
  const __m256 va = _mm256_set1_ps(dA), vx = _mm256_set1_ps(dtx);
  for (; n + 8 <= N; n += 8) {
    __m256 v = _mm256_loadu_ps(s + n);
    v = _mm256_fmadd_ps(v, va, _mm256_mul_ps(vx, _mm256_loadu_ps(b + n)));
    _mm256_storeu_ps(s + n, v);
    acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(c + n), acc);
  }
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  float y = _mm_cvtss_f32(lo);
  for (; n < N; ++n) {
    s[n] = s[n] * dA + dtx * b[n];
    y += s[n] * c[n];
  }
  return y;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mamba_decode: ", name, " must be float32");
}

}  // namespace

// out [T, H, P]; conv_state [blocks, channels >= 2GN + H*P, K-1] (any strides);
// ssm_state [blocks, heads >= H, P, N] (P, N contiguous); proj [T, >= 2GN + H*(2P+1)]
// (rows contiguous); conv_weight [channels >= 2GN + H*P, K]; A, D, dt_bias [>= H];
// state_idx [T, >= 1] (column 0 used); token_heads [T] int32 or none.
void mamba_decode(at::Tensor& out, at::Tensor& conv_state, at::Tensor& ssm_state,
                  const at::Tensor& proj, const at::Tensor& conv_weight,
                  const c10::optional<at::Tensor>& conv_bias, const at::Tensor& A,
                  const at::Tensor& D, const at::Tensor& dt_bias, const at::Tensor& state_idx,
                  const c10::optional<at::Tensor>& token_heads, int64_t groups,
                  int64_t null_block) {
  for (auto* t : {&out, &conv_state, &ssm_state}) check_f32(*t, "state and output");
  check_f32(proj, "proj");
  check_f32(conv_weight, "conv_weight");
  check_f32(A, "A");
  check_f32(D, "D");
  check_f32(dt_bias, "dt_bias");
  const int64_t T = out.size(0), H = out.size(1), P = out.size(2);
  const int64_t N = ssm_state.size(3), G = groups, GN = groups * N, BC = 2 * GN;
  const int64_t K = conv_weight.size(1), stride = 2 * P + 1;
  TORCH_CHECK(out.is_contiguous() && proj.stride(1) == 1 && conv_weight.is_contiguous(),
              "mamba_decode: out, proj rows and conv_weight must be contiguous");
  TORCH_CHECK(ssm_state.stride(3) == 1 && ssm_state.stride(2) == N,
              "mamba_decode: ssm_state's [P, N] must be contiguous");
  TORCH_CHECK(H % G == 0 && proj.size(0) >= T && proj.size(1) >= BC + H * stride &&
                  conv_weight.size(0) >= BC + H * P && conv_state.size(1) >= BC + H * P &&
                  conv_state.size(2) == K - 1 && ssm_state.size(1) >= H &&
                  ssm_state.size(2) == P,
              "mamba_decode: inconsistent shapes");
  TORCH_CHECK(state_idx.scalar_type() == at::kInt && state_idx.size(0) >= T,
              "mamba_decode: state_idx must be int32 with a row per token");
  const int32_t* th = nullptr;
  if (token_heads.has_value()) {
    TORCH_CHECK(token_heads->scalar_type() == at::kInt && token_heads->is_contiguous() &&
                    token_heads->size(0) >= T,
                "mamba_decode: token_heads must be contiguous int32 with a row per token");
    th = token_heads->data_ptr<int32_t>();
  }
  const float* pj = proj.data_ptr<float>();
  const int64_t lp = proj.stride(0);
  const float* w = conv_weight.data_ptr<float>();
  const float* cb = conv_bias.has_value() ? conv_bias->data_ptr<float>() : nullptr;
  const float *a = A.data_ptr<float>(), *d = D.data_ptr<float>(), *db = dt_bias.data_ptr<float>();
  float* cs = conv_state.data_ptr<float>();
  const int64_t cs_b = conv_state.stride(0), cs_c = conv_state.stride(1),
                cs_k = conv_state.stride(2);
  float* ss = ssm_state.data_ptr<float>();
  const int64_t ss_b = ssm_state.stride(0), ss_h = ssm_state.stride(1);
  const int32_t* idx = state_idx.data_ptr<int32_t>();
  const int64_t li = state_idx.stride(0);
  float* o = out.data_ptr<float>();
  std::vector<float> bc(T * BC);  // B and C after the conv, per token

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = idx[t * li];
      if (blk == null_block) continue;
      float* st = cs + blk * cs_b;
      const float* x = pj + t * lp;
      for (int64_t c = 0; c < BC; ++c) {
        bc[t * BC + c] = conv_step(st + c * cs_c, cs_k, w + c * K, K, cb ? cb[c] : 0.f, x[c]);
      }
    }
  });
  at::parallel_for(0, T * H, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> xc(P);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, j = i % H;
      float* y = o + (t * H + j) * P;
      const int64_t blk = idx[t * li];
      if (th && j >= th[t]) continue;  // a head this token's state budget does not hold
      if (blk == null_block) {
        std::fill(y, y + P, 0.f);
        continue;
      }
      const float* row = pj + t * lp + BC + j * stride;  // x_j, dt_j, z_j
      float* st = cs + blk * cs_b;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t c = BC + j * P + p;
        xc[p] = conv_step(st + c * cs_c, cs_k, w + c * K, K, cb ? cb[c] : 0.f, row[p]);
      }
      const float dt = softplus(row[P] + db[j]);
      const float dA = std::exp(dt * a[j]);
      const int64_t g = j % G;
      const float* b = bc.data() + t * BC + g * N;
      const float* c = bc.data() + t * BC + GN + g * N;
      float* s = ss + blk * ss_b + j * ss_h;
      for (int64_t p = 0; p < P; ++p) {
        y[p] = ssu_row(s + p * N, b, c, N, dA, dt * xc[p]) + d[j] * xc[p];
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(vllm_elastic, m) {
  m.def("mamba_decode(Tensor(a!) out, Tensor(b!) conv_state, Tensor(c!) ssm_state, "
        "Tensor proj, Tensor conv_weight, Tensor? conv_bias, Tensor A, Tensor D, "
        "Tensor dt_bias, Tensor state_idx, Tensor? token_heads, int groups, int null_block) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) { m.impl("mamba_decode", &mamba_decode); }
