// Nested-prefix GEMM for x86-64 CPUs with AVX2 + FMA, and AVX-512 where the CPU has it
// (fp32):
//   y[r, :n_s] = x[r, :k_s] @ W[:n_s, :k_s]^T (+ bias[:n_s])   for the rows r of segment s
// (segments in row order; ``rows`` empty: one segment of all rows, so a traced graph
// passes no row count),
// from ONE copy of W stored column-blocked as wp[NB][K][16] (wp[b][k][l] = W[16 b + l][k],
// rows past N zero). Any prefix W[:n, :k] is then a prefix of every 16-row block, so each
// budget of a nested linear (and a batch mixing budgets) is one call reading each weight
// element from memory once.
//
// The input rows are packed once per call (row tiles as [k][tile rows], 8x8 transposes);
// threads split the 16-row weight blocks. Few rows (decode): each block's strip streams
// once over all of k, and while a strip ends the start of the next one is prefetched (a
// budget's strips have gaps, the rest of K, that stop the hardware prefetcher). Many rows
// (Goto order): a panel of 32 blocks x a k slice stays in L2 while chunks of 240 rows pass
// over it, each block's slice in L1 for the chunk's tiles.
// Micro-kernels, chosen once per process (``nested_isa``):
//  * avx512: up to 24 rows x 16 outputs, one zmm accumulator per row, so a decode batch of
//    up to 24 rows streams each strip once;
//  * avx2: 6 rows x 16 outputs in 12 named ymm accumulators (arrays of __m256 make GCC
//    spill them to the stack every iteration).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t NR = 16;       // outputs per block (two ymm, one zmm)
constexpr int64_t MR = 6;        // rows per avx2 micro-tile
constexpr int64_t WR = 24;       // rows per avx512 micro-tile
constexpr int64_t MC = 240;      // rows per chunk (packed inputs in L2)
constexpr int64_t SMALL_M = 24;  // up to this many rows: no k slicing
constexpr int64_t JB = 32;       // blocks per weight panel (L2)
constexpr int64_t PACK_GRAIN = 16;  // row tiles per packing thread (fewer: no fork)
constexpr int64_t TAIL_PF = 512;    // last k steps of a strip that prefetch the next one

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

// y[R][16] as micro() for up to 24 rows in zmm accumulators; with ``pf``, the last TAIL_PF
// steps pull the start of the next strip (a line per step, the rate this strip is read)
// into L2
template <int R>
__attribute__((target("avx512f"))) void micro_wide(const float* a, const float* w, int64_t kc,
                                                  float* y, int64_t ldy, const float* bias,
                                                  bool acc_from_y, const float* pf) {
#define Z(r) __m512 c##r = _mm512_setzero_ps();
  Z(0) Z(1) Z(2) Z(3) Z(4) Z(5) Z(6) Z(7) Z(8) Z(9) Z(10) Z(11) Z(12) Z(13) Z(14) Z(15) Z(16)
  Z(17) Z(18) Z(19) Z(20) Z(21) Z(22) Z(23)
#undef Z
  for (int64_t kk = 0; kk < kc; ++kk, a += R, w += NR) {
    const __m512 w0 = _mm512_load_ps(w);
    if (pf && kk >= kc - TAIL_PF) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + (kk - (kc - TAIL_PF)) * NR), _MM_HINT_T1);
    }
#define F(r) if constexpr (R > r) c##r = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), w0, c##r);
    F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11) F(12) F(13) F(14) F(15) F(16)
    F(17) F(18) F(19) F(20) F(21) F(22) F(23)
#undef F
  }
  const float* base = acc_from_y ? y : bias;
  const int64_t ldb = acc_from_y ? ldy : 0;
#define S(r)                                                                     \
  if constexpr (R > r) {                                                         \
    if (base) c##r = _mm512_add_ps(c##r, _mm512_loadu_ps(base + r * ldb));       \
    _mm512_storeu_ps(y + r * ldy, c##r);                                         \
  }
  S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11) S(12) S(13) S(14) S(15) S(16)
  S(17) S(18) S(19) S(20) S(21) S(22) S(23)
#undef S
}
using Wide = void (*)(const float*, const float*, int64_t, float*, int64_t, const float*, bool,
                      const float*);
template <int... R>
constexpr std::array<Wide, sizeof...(R) + 1> wide_table(std::integer_sequence<int, R...>) {
  return {nullptr, micro_wide<R + 1>...};
}
const auto kWide = wide_table(std::make_integer_sequence<int, WR>{});

const bool kHasAvx512 = __builtin_cpu_supports("avx512f");
bool use_avx512 = kHasAvx512;  // nested_isa() can pin avx2 (tests run both kernels)

// rows x[0..R) of k columns -> ap[kk * ld + i] (8x8 AVX transposes, then scalar edges)
void pack_rows(const float* x, int64_t ldx, int64_t R, int64_t k, float* ap, int64_t ld) {
  int64_t g = 0;
  for (; g + 8 <= R; g += 8) {
    const float* xg = x + g * ldx;
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
      __m256 r0 = _mm256_loadu_ps(xg + kk), r1 = _mm256_loadu_ps(xg + ldx + kk),
             r2 = _mm256_loadu_ps(xg + 2 * ldx + kk), r3 = _mm256_loadu_ps(xg + 3 * ldx + kk),
             r4 = _mm256_loadu_ps(xg + 4 * ldx + kk), r5 = _mm256_loadu_ps(xg + 5 * ldx + kk),
             r6 = _mm256_loadu_ps(xg + 6 * ldx + kk), r7 = _mm256_loadu_ps(xg + 7 * ldx + kk);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = ap + kk * ld + g;
      _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t i = 0; i < 8; ++i)
      for (int64_t c = kk; c < k; ++c) ap[c * ld + g + i] = xg[i * ldx + c];
  }
  for (int64_t i = g; i < R; ++i)
    for (int64_t c = 0; c < k; ++c) ap[c * ld + i] = x[i * ldx + c];
}

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
  const bool wide = use_avx512;
  const int64_t tr = wide ? WR : MR;       // rows per tile
  const int64_t kc_many = wide ? 512 : 256;  // k per slice when rows are many
  const int64_t kslice = M <= SMALL_M ? std::max<int64_t>(kall, 1) : kc_many;
  const int64_t NB = (nmax + NR - 1) / NR;

  // Row tiles of up to ``tr`` rows (never across segments), packed once for all threads
  // as [k_s][ld] each (ld: the tile's rows for avx512, MR for avx2), so a k slice of a
  // tile is contiguous.
  struct Tile { int64_t row, rows, seg, off, ld; };
  std::vector<Tile> tiles;
  int64_t packed = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = start[s]; r < start[s + 1]; r += tr) {
      const int64_t rows = std::min(tr, start[s + 1] - r), ld = wide ? rows : MR;
      tiles.push_back({r, rows, s, packed, ld});
      packed += seg_k[s] * ld;
    }
  const int64_t T = tiles.size();
  // reused between calls (grown, never zero-filled): the packed rows of this call
  static thread_local std::vector<float> apack_store;
  if (static_cast<int64_t>(apack_store.size()) < packed) apack_store.resize(packed);
  float* const apack_data = apack_store.data();
  at::parallel_for(0, T, PACK_GRAIN, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tl = tiles[t];
      pack_rows(X + tl.row * ldx, ldx, tl.rows, seg_k[tl.seg], apack_data + tl.off, tl.ld);
    }
  });
  const int64_t TC = MC / tr;  // tiles per chunk: a chunk's k slice of packed rows in L2

  // Threads split the blocks into ranges of equal work (rows x k over the segments that
  // reach each block): in a mixed batch the first blocks serve every budget and the last
  // only the largest, so an even split of the blocks would leave one thread idle.
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), NB));
  std::vector<int64_t> bound(nt + 1, NB);
  bound[0] = 0;
  {
    std::vector<double> cost(NB, 0.0);
    double total = 0.0;
    for (int64_t b = 0; b < NB; ++b) {
      for (int64_t s = 0; s < S; ++s)
        if (b * NR < seg_n[s]) cost[b] += double(seg_rows[s]) * double(seg_k[s] + 1);
      total += cost[b];
    }
    double acc = 0.0;
    int64_t t = 1;
    for (int64_t b = 0; b < NB && t < nt; ++b) {
      acc += cost[b];
      while (t < nt && acc >= total * double(t) / double(nt)) bound[t++] = b + 1;
    }
  }
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
   for (int64_t th = t0; th < t1; ++th) {
    const int64_t b0 = bound[th], b1 = bound[th + 1];
    alignas(64) float tail[WR * NR];
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
              const float* ap = apack_data + tl.off + pc * tl.ld;
              // with k sliced, the chunk's first tile pulls the next block's slice (64 KB
              // or more away) towards L1 (measured: no gain unsliced, where the next
              // block's strip follows in memory for the full budget)
              const bool pf = kslice < kall && t == tc && b + 1 < je &&
                              kc == std::min(kslice, kall - pc);
              const float* next = wb + K * NR;
              // avx512: the end of a strip (unsliced, when the budget's k leaves a gap) or
              // of the chunk's first tile's slice prefetches the next block's start
              const bool tail_pf = kslice < kall ? t == tc && b + 1 < je : k < K && b + 1 < b1;
              const auto run = [&](float* out, int64_t ld_out) {
                if (wide)
                  kWide[tl.rows](ap, wb, kc, out, ld_out, bb, pc > 0, tail_pf ? next : nullptr);
                else
                  kMicro[pf][tl.rows](ap, wb, kc, out, ld_out, bb, pc > 0, next);
              };
              if (lanes == NR) {
                run(yo, ldy);
                continue;
              }
              // last block of a width that is not a multiple of 16: through a buffer
              for (int64_t i = 0; pc > 0 && i < tl.rows; ++i)
                std::copy(yo + i * ldy, yo + i * ldy + lanes, tail + i * NR);
              run(tail, NR);
              for (int64_t i = 0; i < tl.rows; ++i)
                std::copy(tail + i * NR, tail + i * NR + lanes, yo + i * ldy);
            }
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

// Which micro-kernels nested_mm runs: "avx512" (the default where the CPU has it),
// "avx2", or "" to keep the current choice; returns the choice in force.
std::string nested_isa(const std::string& isa) {
  if (isa == "avx512") {
    TORCH_CHECK(kHasAvx512, "nested_isa: this CPU has no AVX-512");
    use_avx512 = true;
  } else if (isa == "avx2") {
    use_avx512 = false;
  } else {
    TORCH_CHECK(isa.empty(), "nested_isa: 'avx512', 'avx2' or '', not '", isa, "'");
  }
  return use_avx512 ? "avx512" : "avx2";
}

TORCH_LIBRARY(vllm_elastic, m) {
  // rows: SymInt[] so a graph whose segments have dynamic sizes (a mixed-budget graph)
  // keeps them symbolic; the CPU kernel gets them as plain ints
  m.def("nested_mm(Tensor(a!) y, Tensor x, Tensor wp, Tensor? bias, SymInt[] rows, int[] n, "
        "int[] k) -> ()");
  m.def("nested_pack(Tensor w) -> Tensor");
  m.def("nested_isa(str isa) -> str", &nested_isa);
}

TORCH_LIBRARY_IMPL(vllm_elastic, CPU, m) {
  m.impl("nested_mm", &nested_mm);
  m.impl("nested_pack", &nested_pack);
}

// Tracing (torch.compile) sees the op's effect only through its mutated output.
TORCH_LIBRARY_IMPL(vllm_elastic, Meta, m) {
  m.impl("nested_mm", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&, c10::SymIntArrayRef,
                          at::IntArrayRef, at::IntArrayRef) {});
}
