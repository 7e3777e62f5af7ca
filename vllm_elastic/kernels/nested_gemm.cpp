// Nested-prefix GEMM for CPUs with AVX2 + FMA (fp32):
//   y[r, :n_s] = x[r, :k_s] @ W[:n_s, :k_s]^T (+ bias[:n_s])   for the rows r of segment s
// (segments in row order; ``rows`` empty: one segment of all rows, so a traced graph
// passes no row count),
// from ONE copy of W stored column-blocked as wp[NB][K][16] (wp[b][k][l] = W[16 b + l][k],
// rows past N zero). Any prefix W[:n, :k] is then a prefix of every 16-row block, so each
// budget of a nested linear (and a batch mixing budgets) is one call reading each weight
// element from memory once.
//
// The input rows are packed once per call (tiles of 6 rows, [k][6]); threads split the
// 16-row weight blocks. Few rows (decode): each block's strip streams once over all of k.
// Many rows (Goto order): a panel of 32 blocks x 256 of k stays in L2 while chunks of 240
// rows pass over it, each block's slice in L1 for the chunk's tiles; the next slice is
// prefetched. The micro-kernel computes 6 rows x 16 outputs in 12 named accumulators
// (arrays of __m256 make GCC spill them to the stack every iteration).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t NR = 16;       // outputs per block (two ymm)
constexpr int64_t MR = 6;        // rows per micro-tile
constexpr int64_t MC = 240;      // rows per chunk (packed inputs in L2)
constexpr int64_t KC = 256;      // k per slice when rows are many
constexpr int64_t SMALL_M = 24;  // up to this many rows: no k slicing
constexpr int64_t JB = 32;       // blocks per weight panel (32 x 16 x 256 floats: L2)
constexpr int64_t PACK_GRAIN = 16;  // row tiles per packing thread (fewer: no fork)

// y[R][16] = a (packed [kc][MR]) @ w ([kc][16]) + (y if acc_from_y, else bias if any)
template <int R, bool PF>
void micro(const float* a, const float* w, int64_t kc, float* y, int64_t ldy,
           const float* bias, bool acc_from_y, const float* pf) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t kk = 0; kk < kc; ++kk, a += MR, w += NR) {
    const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
    if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(pf + kk * NR), _MM_HINT_T0);
#define ELASTIC_ROW(r)                               \
  if constexpr (R > r) {                             \
    const __m256 xb = _mm256_broadcast_ss(a + r);    \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);      \
    c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);      \
  }
    ELASTIC_ROW(0) ELASTIC_ROW(1) ELASTIC_ROW(2) ELASTIC_ROW(3) ELASTIC_ROW(4) ELASTIC_ROW(5)
#undef ELASTIC_ROW
  }
  const float* base = acc_from_y ? y : bias;
  const int64_t ldb = acc_from_y ? ldy : 0;
#define ELASTIC_STORE(r)                                                      \
  if constexpr (R > r) {                                                      \
    if (base) {                                                               \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(base + r * ldb));      \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(base + r * ldb + 8));  \
    }                                                                         \
    _mm256_storeu_ps(y + r * ldy, c##r##0);                                   \
    _mm256_storeu_ps(y + r * ldy + 8, c##r##1);                               \
  }
  ELASTIC_STORE(0) ELASTIC_STORE(1) ELASTIC_STORE(2) ELASTIC_STORE(3) ELASTIC_STORE(4)
  ELASTIC_STORE(5)
#undef ELASTIC_STORE
}

using Micro = void (*)(const float*, const float*, int64_t, float*, int64_t, const float*, bool,
                       const float*);
// [prefetch the next weight slice][rows]
constexpr Micro kMicro[2][MR + 1] = {
    {nullptr, micro<1, false>, micro<2, false>, micro<3, false>, micro<4, false>,
     micro<5, false>, micro<6, false>},
    {nullptr, micro<1, true>, micro<2, true>, micro<3, true>, micro<4, true>, micro<5, true>,
     micro<6, true>}};

void check(const at::Tensor& y, const at::Tensor& x, const at::Tensor& wp,
           const c10::optional<at::Tensor>& bias, at::IntArrayRef rows, at::IntArrayRef n,
           at::IntArrayRef k) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && wp.device().is_cpu(),
              "nested_mm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                  wp.scalar_type() == at::kFloat,
              "nested_mm: float32 only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
              "nested_mm: x and y must be 2-D with unit column stride");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == NR && wp.is_contiguous(),
              "nested_mm: wp must be a contiguous [NB, K, 16] nested_pack output");
  TORCH_CHECK(rows.size() == n.size() && n.size() == k.size(), "nested_mm: segment lists differ");
  int64_t total = 0;
  for (size_t s = 0; s < rows.size(); ++s) {
    TORCH_CHECK(rows[s] >= 0 && n[s] >= 0 && n[s] <= wp.size(0) * NR && k[s] >= 0 &&
                    k[s] <= wp.size(1) && k[s] <= x.size(1) && n[s] <= y.size(1),
                "nested_mm: segment ", s, " out of range");
    total += rows[s];
  }
  TORCH_CHECK(total == x.size(0) && total == y.size(0), "nested_mm: rows do not add up");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                    bias->numel() == wp.size(0) * NR,
                "nested_mm: bias must be nested_pack's padded float32 bias");
  }
}

}  // namespace

void nested_mm(at::Tensor& y, const at::Tensor& x, const at::Tensor& wp,
               const c10::optional<at::Tensor>& bias, at::IntArrayRef rows_in,
               at::IntArrayRef seg_n, at::IntArrayRef seg_k) {
  const int64_t all_rows[1] = {x.size(0)};
  const at::IntArrayRef seg_rows = rows_in.empty() ? at::IntArrayRef(all_rows, 1) : rows_in;
  check(y, x, wp, bias, seg_rows, seg_n, seg_k);
  const int64_t ldx = x.stride(0), ldy = y.stride(0), K = wp.size(1);
  const float* X = x.data_ptr<float>();
  const float* W = wp.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float* B = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t S = seg_rows.size();
  std::vector<int64_t> start(S + 1, 0);
  int64_t nmax = 0, kall = 0;
  for (int64_t s = 0; s < S; ++s) {
    start[s + 1] = start[s] + seg_rows[s];
    nmax = std::max(nmax, seg_n[s]);
    kall = std::max(kall, seg_k[s]);
  }
  const int64_t M = start[S];
  if (M == 0 || nmax == 0) return;
  const int64_t kslice = M <= SMALL_M ? std::max<int64_t>(kall, 1) : KC;
  const int64_t NB = (nmax + NR - 1) / NR;

  // Row tiles of MR rows (never across segments), packed once for all threads as
  // [k_s][MR] each, so a k slice of a tile is contiguous.
  struct Tile { int64_t row, rows, seg, off; };
  std::vector<Tile> tiles;
  int64_t packed = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = start[s]; r < start[s + 1]; r += MR) {
      tiles.push_back({r, std::min(MR, start[s + 1] - r), s, packed});
      packed += seg_k[s] * MR;
    }
  const int64_t T = tiles.size();
  // reused between calls (grown, never zero-filled): the packed rows of this call
  static thread_local std::vector<float> apack_store;
  if (static_cast<int64_t>(apack_store.size()) < packed) apack_store.resize(packed);
  float* const apack_data = apack_store.data();
  at::parallel_for(0, T, PACK_GRAIN, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tl = tiles[t];
      float* ap = apack_data + tl.off;
      const int64_t k = seg_k[tl.seg];
      for (int64_t i = 0; i < tl.rows; ++i) {
        const float* xr = X + (tl.row + i) * ldx;
        for (int64_t kk = 0; kk < k; ++kk) ap[kk * MR + i] = xr[kk];
      }
    }
  });
  const int64_t TC = MC / MR;  // tiles per chunk: a chunk's k slice of packed rows in L2

  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    alignas(32) float tail[MR * NR];
    // Goto order: a panel of JB blocks x kslice of the weight stays in L2 while every
    // chunk of rows passes over it, so the weight streams from memory once per call
    for (int64_t jb = b0; jb < b1; jb += JB) {
      const int64_t je = std::min(b1, jb + JB);
      for (int64_t pc = 0; pc < kall; pc += kslice) {
        for (int64_t tc = 0; tc < T; tc += TC) {
          const int64_t te = std::min(T, tc + TC);
          for (int64_t b = jb; b < je; ++b) {
            const float* wb = W + (b * K + pc) * NR;
            const float* bb = (B && pc == 0) ? B + b * NR : nullptr;
            for (int64_t t = tc; t < te; ++t) {
              const Tile& tl = tiles[t];
              const int64_t n = seg_n[tl.seg], k = seg_k[tl.seg];
              if (b * NR >= n) continue;
              const int64_t lanes = std::min(NR, n - b * NR);
              float* yo = Y + tl.row * ldy + b * NR;
              if (k == 0 || pc >= k) {  // no input columns: bias (or zeros) only
                if (pc == 0 && k == 0)
                  for (int64_t i = 0; i < tl.rows; ++i)
                    for (int64_t l = 0; l < lanes; ++l) yo[i * ldy + l] = bb ? bb[l] : 0.f;
                continue;
              }
              const int64_t kc = std::min(kslice, k - pc);
              const float* ap = apack_data + tl.off + pc * MR;
              // with k sliced, the chunk's first tile pulls the next block's slice (64 KB
              // or more away) towards L1 (measured: no gain unsliced, where the next
              // block's strip follows in memory for the full budget)
              const bool pf = kslice < kall && t == tc && b + 1 < je &&
                              kc == std::min(kslice, kall - pc);
              const Micro micro_r = kMicro[pf][tl.rows];
              const float* next = wb + K * NR;
              if (lanes == NR) {
                micro_r(ap, wb, kc, yo, ldy, bb, pc > 0, next);
                continue;
              }
              // last block of a width that is not a multiple of 16: through a buffer
              for (int64_t i = 0; pc > 0 && i < tl.rows; ++i)
                std::copy(yo + i * ldy, yo + i * ldy + lanes, tail + i * NR);
              micro_r(ap, wb, kc, tail, NR, bb, pc > 0, next);
              for (int64_t i = 0; i < tl.rows; ++i)
                std::copy(tail + i * NR, tail + i * NR + lanes, yo + i * ldy);
            }
          }
        }
      }
    }
  });
}

// [N, K] -> [ceil(N / 16), K, 16]; rows past N are zero.
at::Tensor nested_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "nested_pack: 2-D float32 only");
  const int64_t N = w.size(0), K = w.size(1), NB = (N + NR - 1) / NR;
  auto padded = at::zeros({NB * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({NB, NR, K}).transpose(1, 2).contiguous();
}

TORCH_LIBRARY(vllm_elastic, m) {
  m.def("nested_mm(Tensor(a!) y, Tensor x, Tensor wp, Tensor? bias, int[] rows, int[] n, "
        "int[] k) -> ()");
  m.def("nested_pack(Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) {
  m.impl("nested_mm", &nested_mm);
  m.impl("nested_pack", &nested_pack);
}

// Tracing (torch.compile) sees the op's effect only through its mutated output.
TORCH_LIBRARY_IMPL(vllm_elastic, Meta, m) {
  m.impl("nested_mm", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                          at::IntArrayRef) {});
}
