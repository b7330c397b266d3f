// Direct sparse convolution and CSR x dense linear for ntksap.sparse (float32, CPU).
//
// Direct sparse convolution (Park et al., "Faster CNNs with direct sparse convolutions and
// guided pruning", ICLR 2017): the weights are CSR over (out_channels, in_channels*kh*kw).
// For every output channel o, every nonzero weight w = W[o, c, dy, dx] multiplies ONE
// contiguous strip of the padded input plane c (starting at row dy, column dx) and
// accumulates into the output plane. The strip view works because the output is computed
// in the padded input's row width ("wide" rows): out_wide[y * Wq + x] for x < Wq, of which
// only x < Wo are kept. Strides s > 1 use the same contiguous strips on the s*s polyphase
// components of the padded input: phase (py, px) holds in_pad[s*i + py, s*j + px], so
// in_pad[s*y + dy, s*x + dx] = phase(dy % s, dx % s)[y + dy / s, x + dx / s].
//
// Work split: at::parallel_for over (image, output channel) pairs (torch's thread pool,
// so torch.set_num_threads applies). The inner loop keeps a chunk of up to 8 x 16 output
// floats in AVX-512 registers (or a plain loop the compiler vectorises) and streams every
// nonzero of the row over it: one load + one FMA per 16 MACs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kVec = 16;  // floats per AVX-512 register
constexpr int64_t kSlack = 8 * kVec + 64;  // readable garbage after every plane (floats)

// acc[0 : V*16) = sum_j vals[j] * base[offs[j] + 0 : V*16)
template <int V>
inline void strip_chunk(const float* __restrict base, const int64_t* __restrict offs,
                        const float* __restrict vals, int64_t nnz, float* __restrict acc) {
#ifdef __AVX512F__
  __m512 r[V];
  for (int v = 0; v < V; ++v) r[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nnz; ++j) {
    const __m512 w = _mm512_set1_ps(vals[j]);
    const float* p = base + offs[j];
    for (int v = 0; v < V; ++v) r[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + v * kVec), r[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + v * kVec, r[v]);
#else
  float r[V * kVec];
  for (int i = 0; i < V * kVec; ++i) r[i] = 0.f;
  for (int64_t j = 0; j < nnz; ++j) {
    const float w = vals[j];
    const float* p = base + offs[j];
#pragma GCC ivdep
    for (int i = 0; i < V * kVec; ++i) r[i] += w * p[i];
  }
  for (int i = 0; i < V * kVec; ++i) acc[i] = r[i];
#endif
}

// A tensor the kernels read through a raw pointer: on the CPU, strided (not sparse / mkldnn).
void check_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == torch::kStrided, what, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

// The CSR invariants every index the kernels form relies on, in O(rows): dtypes, shapes,
// contiguity, rowptr[0] == 0, rowptr never decreasing, rowptr[rows] == nnz == len(values).
// Columns are checked against the fan-in separately (check_cols, or strip_offsets).
void check_csr(const torch::Tensor& rowptr, const torch::Tensor& col, const torch::Tensor& val,
               int64_t rows) {
  check_cpu(rowptr, "rowptr");
  check_cpu(col, "col_idx");
  check_cpu(val, "values");
  TORCH_CHECK(rowptr.dtype() == torch::kInt32 && col.dtype() == torch::kInt32,
              "rowptr and col_idx must be int32, got ", rowptr.dtype(), " and ", col.dtype());
  TORCH_CHECK(val.dtype() == torch::kFloat32, "values must be float32, got ", val.dtype());
  TORCH_CHECK(rowptr.dim() == 1 && col.dim() == 1 && val.dim() == 1,
              "rowptr, col_idx and values must be 1-D");
  TORCH_CHECK(rows >= 0 && rowptr.size(0) == rows + 1, "rowptr must have out_channels + 1 = ",
              rows + 1, " entries, got ", rowptr.size(0));
  TORCH_CHECK(rowptr.is_contiguous() && col.is_contiguous() && val.is_contiguous(),
              "CSR arrays must be contiguous");
  TORCH_CHECK(col.numel() == val.numel(), "col_idx and values must have the same length, got ",
              col.numel(), " and ", val.numel());
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0, "rowptr[0] = ", rp[0], ", must be 0");
  int decreasing = 0;  // branch-free: the loop vectorises
  for (int64_t i = 0; i < rows; ++i) decreasing |= rp[i + 1] < rp[i];
  if (decreasing)
    for (int64_t i = 0; i < rows; ++i)
      TORCH_CHECK(rp[i + 1] >= rp[i], "rowptr decreases at index ", i, ": rowptr[", i,
                  "] = ", rp[i], " > rowptr[", i + 1, "] = ", rp[i + 1]);
  TORCH_CHECK(rp[rows] == col.numel(), "rowptr[-1] = ", rp[rows],
              " must equal nnz = len(col_idx) = ", col.numel());
}

// Every column in [0, K) (`what` names K in the message). One unsigned max over the array
// (negative columns are huge as unsigned): vectorised, ~nnz / 16 cycles.
void check_cols(const int32_t* cp, int64_t nnz, int64_t K, const char* what) {
  uint32_t top = 0;
  for (int64_t j = 0; j < nnz; ++j) top = std::max(top, static_cast<uint32_t>(cp[j]));
  if (nnz == 0 || static_cast<int64_t>(top) < K) return;
  for (int64_t j = 0; j < nnz; ++j)
    TORCH_CHECK(cp[j] >= 0 && cp[j] < K, "col_idx[", j, "] = ", cp[j], " is outside [0, ", K,
                ") (", what, ")");
}

// Whether p[0 : n) holds no NaN or inf. A sparse product skips the zero weights that the
// dense product multiplies: 0 * NaN and 0 * inf are NaN there, so an input holding them
// must be recomputed densely (the callers do). Integer tests of the exponent bits (all
// ones for NaN / inf) only: -ffast-math folds floating tests such as v * 0 or v != v away.
// AVX-512: the largest exponent field seen, two accumulators.
inline bool all_finite(const float* p, int64_t n) {
#ifdef __AVX512F__
  const __m512i e = _mm512_set1_epi32(0x7f800000);
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 2 * kVec <= n; k += 2 * kVec) {
    a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512(p + k), e));
    a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_loadu_si512(p + k + kVec), e));
  }
  for (; k < n; k += kVec) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, n - k)) - 1);
    a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p + k), e));
  }
  return _mm512_cmpeq_epi32_mask(_mm512_max_epu32(a0, a1), e) == 0;
#else
  uint32_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, p + k, sizeof u);
    bad |= (u & 0x7f800000u) == 0x7f800000u;
  }
  return bad == 0;
#endif
}

#ifdef __AVX512F__
// Lanes of v that are NaN or inf (an integer test of the exponent bits).
inline __mmask16 nonfinite_mask(__m512 v) {
  const __m512i e = _mm512_set1_epi32(0x7f800000);
  return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), e), e);
}
#endif

// relu that keeps NaN, as torch's: max(0, v) returns its SECOND operand when either is NaN
// (MAXPS semantics), so the order matters: v NaN -> v.
#ifdef __AVX512F__
inline __m512 relu_keep_nan(__m512 v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }
#endif
inline float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }  // NaN < 0 is false

// Largest stride / padding / kernel size the kernels take: keeps every size product far
// from int64 overflow (s * s polyphase components, padded planes).
constexpr int64_t kMaxGeom = int64_t{1} << 16;

}  // namespace

namespace {

struct ConvGeometry {
  int64_t C, H, W, O, kh, kw, s, pad, Ho, Wo, Hq, Wq, plane;
  // element strides (image, channel, row; columns are contiguous) of the input, the output
  // and the residual: they may be views, e.g. the interior of a padded buffer
  int64_t xsN, xsC, xsH, osN, osC, osH, rsN, rsC, rsH;
};

// dst[0 : Wq) = [0] * pad + src[0 : W) + [0] * (Wq - pad - W): one padded input row.
// Rows are 8-34 floats here, so per-row loop and call overhead matters: AVX-512 masked
// loads/stores do a row in 1-3 instructions pairs (masked-off lanes are never touched, so
// reading "before" src or writing past dst[Wq) is safe). With kTest, the loaded registers
// are also tested for NaN / inf (no second pass over the input): acc = max(acc, exponent
// bits of v), all ones iff some v was NaN / inf. Integer operations only: -ffast-math
// folds a floating test such as v * 0 away (it did, silently). Two vector operations per
// 16 floats, no mask-register chain (and + compare + kor cost 5-7 % of a ResNet-20
// 16-channel conv).
#ifdef __AVX512F__
using TestAcc = __m512i;
inline TestAcc test_acc() { return _mm512_setzero_si512(); }
inline TestAcc test_acc_add(TestAcc acc, __m512 v) {
  return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7f800000)));
}
inline bool test_acc_bad(TestAcc acc) {
  return _mm512_cmpeq_epi32_mask(acc, _mm512_set1_epi32(0x7f800000)) != 0;
}
#else
using TestAcc = bool;  // whether a NaN / inf was seen
inline TestAcc test_acc() { return false; }
inline bool test_acc_bad(TestAcc acc) { return acc; }
#endif
template <bool kTest>
inline void pad_row(float* __restrict dst, const float* __restrict src, int64_t W, int64_t pad,
                    int64_t Wq, TestAcc& acc) {
#ifdef __AVX512F__
  for (int64_t k = 0; k < Wq; k += kVec) {
    const int64_t lo = std::max<int64_t>(0, pad - k);                    // first valid lane
    const int64_t hi = std::min<int64_t>(kVec, std::max<int64_t>(0, pad + W - k));  // end
    const __mmask16 ld = hi > lo ? static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1))
                                 : static_cast<__mmask16>(0);
    const __mmask16 st = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, Wq - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(ld, src + (k - pad));
    if (kTest) acc = test_acc_add(acc, v);
    _mm512_mask_storeu_ps(dst + k, st, v);
  }
#else
  for (int64_t k = 0; k < pad; ++k) dst[k] = 0.f;
  for (int64_t k = 0; k < W; ++k) dst[pad + k] = src[k];
  for (int64_t k = pad + W; k < Wq; ++k) dst[k] = 0.f;
  if (kTest) acc = acc || !all_finite(src, W);
#endif
}

// dst[k] = src[2 * k] for k < count: one row of a stride-2 polyphase component (the scalar
// strided loop was a tenth of the batch-64 time of ResNet-20's two downsampling stages).
inline void deinterleave_row(float* __restrict dst, const float* __restrict src, int64_t count) {
#ifdef __AVX512F__
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t k = 0; k < count; k += kVec) {
    const int64_t n = std::min<int64_t>(kVec, count - k);  // outputs in this step
    const int64_t m = 2 * n - 1;  // source floats read: src[2k, 2k + m)
    const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, m)) - 1);
    const __mmask16 hi = m > kVec ? static_cast<__mmask16>((1u << (m - kVec)) - 1) : 0;
    const __m512 a = _mm512_maskz_loadu_ps(lo, src + 2 * k);
    const __m512 b = _mm512_maskz_loadu_ps(hi, src + 2 * k + kVec);
    _mm512_mask_storeu_ps(dst + k, static_cast<__mmask16>((1u << n) - 1),
                          _mm512_permutex2var_ps(a, even, b));
  }
#else
  for (int64_t k = 0; k < count; ++k) dst[k] = src[2 * k];
#endif
}

// d[0 : len) = act(a[0 : len) + bias [+ r[0 : len)]): one output row segment of the epilogue
// (relu keeps NaN, as torch's).
template <bool kRes, bool kRelu>
inline void epilogue_row(const float* __restrict a, float* __restrict d, const float* __restrict r,
                         int64_t len, float bias) {
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(bias);
  for (int64_t k = 0; k < len; k += kVec) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(kVec, len - k)) - 1);
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + k), b);
    if (kRes) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r + k));
    if (kRelu) v = relu_keep_nan(v);
    _mm512_mask_storeu_ps(d + k, m, v);
  }
#else
  for (int64_t k = 0; k < len; ++k) {
    const float v = a[k] + bias + (kRes ? r[k] : 0.f);
    d[k] = kRelu ? relu_keep_nan(v) : v;
  }
#endif
}

// A group of G images' padded polyphase planes, laid out (C, s*s, G, plane) so that one
// input channel's planes of all G images are contiguous: a strip then runs across images.
// dst[((c*s*s + py*s + px) * G + g) * plane + qy*Wq + qx] =
//   x[n0 + g, c, s*qy + py - pad, s*qx + px - pad], zero outside the input.
// Only the phases some nonzero weight reads (`used`) are written (a 1x1 stride-2
// shortcut reads one of four). kSlack zeros follow the last plane. With `test`, returns
// whether channels [c_begin, c_end) of the G images hold a NaN or inf anywhere (all of
// them, not only the phases read: a dense conv multiplies the unread ones by its zero
// weights); the chain executor tests its values where they are made instead.
bool prepare_group(const float* __restrict src0, int64_t G, float* __restrict dst_grp,
                   const ConvGeometry& g, const std::vector<char>& used, int64_t c_begin,
                   int64_t c_end, bool test) {
  const int64_t s = g.s, pad = g.pad, H = g.H, W = g.W, Wq = g.Wq, Hq = g.Hq, plane = g.plane;
  bool bad = false;
  // The s == 1 copy below tests every row it copies; strided copies skip rows and columns,
  // and a layer without nonzeros copies nothing: those scan the input first.
  if (test && (s != 1 || !used[0]))
    for (int64_t c = c_begin; c < c_end && !bad; ++c)
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t yy = 0; yy < H; ++yy)
          bad |= !all_finite(src0 + gi * g.xsN + c * g.xsC + yy * g.xsH, W);
  for (int64_t c = c_begin; c < c_end; ++c)
    for (int64_t ph = 0; ph < s * s; ++ph) {
      if (!used[ph]) continue;
      const int64_t py = ph / s, px = ph % s;
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* src = src0 + gi * g.xsN + c * g.xsC;
        float* dst = dst_grp + ((c * s * s + ph) * G + gi) * plane;
        if (s == 1) {
          // Zero the top pad rows and everything after the last input row (bottom pad,
          // the extra row); each input row becomes one padded row [0]*pad + src + [0]*...
          for (int64_t k = 0; k < pad * Wq; ++k) dst[k] = 0.f;
          for (int64_t k = (pad + H) * Wq; k < plane; ++k) dst[k] = 0.f;
          TestAcc acc = test_acc();
          if (test) {
            for (int64_t yy = 0; yy < H; ++yy)
              pad_row<true>(dst + (yy + pad) * Wq, src + yy * g.xsH, W, pad, Wq, acc);
            bad |= test_acc_bad(acc);
          } else {
            for (int64_t yy = 0; yy < H; ++yy)
              pad_row<false>(dst + (yy + pad) * Wq, src + yy * g.xsH, W, pad, Wq, acc);
          }
          continue;
        }
        std::memset(dst, 0, sizeof(float) * plane);
        const int64_t qx0 = pad > px ? (pad - px + s - 1) / s : 0;  // first column inside
        const int64_t xx0 = s * qx0 + px - pad;
        const int64_t count = xx0 < W ? std::min(Wq - qx0, (W - 1 - xx0) / s + 1) : 0;
        for (int64_t qy = 0; qy < Hq; ++qy) {
          const int64_t yy = s * qy + py - pad;  // phase row qy = input row yy
          if (yy < 0 || yy >= H) continue;
          const float* __restrict srow = src + yy * g.xsH + xx0;
          float* __restrict drow = dst + qy * Wq + qx0;
          if (s == 2)
            deinterleave_row(drow, srow, count);
          else
            for (int64_t k = 0; k < count; ++k) drow[k] = srow[k * s];
        }
      }
    }
  if (c_end == g.C) std::memset(dst_grp + g.C * s * s * G * plane, 0, sizeof(float) * kSlack);
  return bad;
}

// Strip offset of every nonzero (CSR column c * kh * kw + dy * kw + dx) inside a group's
// prepared planes (G images, layout of prepare_group), and which polyphase components
// (`used`, s * s entries) some nonzero reads.
void strip_offsets(const int32_t* cp, int64_t nnz, const ConvGeometry& g, int64_t G,
                   std::vector<char>& used, std::vector<int64_t>& offs) {
  const int64_t s = g.s, khw = g.kh * g.kw;
  offs.resize(nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t cc = cp[j] / khw, r = cp[j] % khw, dy = r / g.kw, dx = r % g.kw;
    TORCH_CHECK(cp[j] >= 0 && cc < g.C, "col_idx[", j, "] = ", cp[j], " is outside [0, ",
                g.C * khw, ") (in_channels * kh * kw = ", g.C, " * ", g.kh, " * ", g.kw, ")");
    const int64_t ph = (dy % s) * s + (dx % s);
    used[ph] = 1;
    offs[j] = ((cc * s * s + ph) * G) * g.plane + (dy / s) * g.Wq + (dx / s);
  }
}

void dispatch_chunk(int64_t vecs, const float* base, const int64_t* offs, const float* vals,
                    int64_t n, float* acc) {
  switch (vecs) {
    case 16: strip_chunk<16>(base, offs, vals, n, acc); break;
    case 15: strip_chunk<15>(base, offs, vals, n, acc); break;
    case 14: strip_chunk<14>(base, offs, vals, n, acc); break;
    case 13: strip_chunk<13>(base, offs, vals, n, acc); break;
    case 12: strip_chunk<12>(base, offs, vals, n, acc); break;
    case 11: strip_chunk<11>(base, offs, vals, n, acc); break;
    case 10: strip_chunk<10>(base, offs, vals, n, acc); break;
    case 9: strip_chunk<9>(base, offs, vals, n, acc); break;
    case 8: strip_chunk<8>(base, offs, vals, n, acc); break;
    case 7: strip_chunk<7>(base, offs, vals, n, acc); break;
    case 6: strip_chunk<6>(base, offs, vals, n, acc); break;
    case 5: strip_chunk<5>(base, offs, vals, n, acc); break;
    case 4: strip_chunk<4>(base, offs, vals, n, acc); break;
    case 3: strip_chunk<3>(base, offs, vals, n, acc); break;
    case 2: strip_chunk<2>(base, offs, vals, n, acc); break;
    default: strip_chunk<1>(base, offs, vals, n, acc); break;
  }
}

// Output channels [o_begin, o_end) of a group of G images from its prepared planes.
// The wide output strip of the group has G * plane floats (image gi at gi * plane, row y
// at y * Wq; rows >= Ho and columns >= Wo are garbage). Chunk-outer, channel-inner: one
// chunk (up to 16 x 16 floats, in registers) is computed for every output channel in turn,
// so the input window it reads stays in L1/L2 across channels.
void conv_group(const float* __restrict prep, int64_t G, const ConvGeometry& g,
                const int32_t* rp, const int64_t* offs, const float* vals, const float* bias,
                const float* res_grp, float* out_grp, bool relu, int64_t o_begin,
                int64_t o_end) {
  alignas(64) float acc[16 * kVec];
  const int64_t Wq = g.Wq, Wo = g.Wo, Ho = g.Ho, rows_per_img = g.Hq + 1;
  // The strip ends after the last valid output of the last image.
  const int64_t L = (G - 1) * g.plane + Ho * Wq;
  const int64_t Lr = (L + kVec - 1) / kVec * kVec;
  // Valid output segments of the current chunk: (offset in acc, length, offset in the
  // group's output for channel 0). Computed once per chunk, used by every output channel
  // (the divisions here were most of the epilogue's cost on 8x8 maps).
  struct Seg {
    int64_t a, len, at, rat;  // rat: the same position in the residual
  };
  std::vector<Seg> segs;
  segs.reserve(16 * kVec / std::max<int64_t>(1, Wq) + 2);
  for (int64_t i0 = 0; i0 < Lr; i0 += 16 * kVec) {
    const int64_t vecs = std::min<int64_t>(16, (Lr - i0) / kVec);
    const int64_t i1 = std::min(i0 + vecs * kVec, L);
    segs.clear();
    for (int64_t R = i0 / Wq; R * Wq < i1; ++R) {
      const int64_t gi = R / rows_per_img, y = R % rows_per_img;
      if (y >= Ho) continue;
      const int64_t a = std::max(i0, R * Wq), b = std::min(i1, R * Wq + Wo);
      const int64_t x0 = a - R * Wq;
      if (a < b)
        segs.push_back({a - i0, b - a, gi * g.osN + y * g.osH + x0, gi * g.rsN + y * g.rsH + x0});
    }
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int64_t j0 = rp[o], n = rp[o + 1] - j0;
      if (n > 0) {
        dispatch_chunk(vecs, prep + i0, offs + j0, vals + j0, n, acc);
      } else {
        std::memset(acc, 0, sizeof(float) * vecs * kVec);  // a dead channel: bias only
      }
      const float bo = bias ? bias[o] : 0.f;
      const int64_t oo = o * g.osC, ro = o * g.rsC;
      float* const d = out_grp + oo;
      const float* const r = res_grp ? res_grp + ro : nullptr;
      if (r && relu)
        for (const Seg& q : segs) epilogue_row<true, true>(acc + q.a, d + q.at, r + q.rat, q.len, bo);
      else if (r)
        for (const Seg& q : segs) epilogue_row<true, false>(acc + q.a, d + q.at, r + q.rat, q.len, bo);
      else if (relu)
        for (const Seg& q : segs) epilogue_row<false, true>(acc + q.a, d + q.at, nullptr, q.len, bo);
      else
        for (const Seg& q : segs) epilogue_row<false, false>(acc + q.a, d + q.at, nullptr, q.len, bo);
    }
  }
}

}  // namespace

// A strided float32 4-d tensor whose last dimension is contiguous, else a contiguous copy.
torch::Tensor rows_contiguous(const torch::Tensor& t) {
  return t.stride(3) == 1 && t.stride(2) >= t.size(3) ? t : t.contiguous();
}

// x: (N, C, H, W) float32 with C = in_channels; CSR over (O, C*kh*kw) with column
// c*kh*kw + dy*kw + dx; bias: (O,) or empty; residual: (N, O, Ho, Wo) or empty; out:
// (N, O, Ho, Wo) buffer or empty; returns (act(conv + bias + residual) (in `out` when it
// fits), whether x held no NaN / inf, whether values and bias hold none). When x held one,
// the output is NOT what the dense conv gives (that multiplies the NaN / inf by the zero
// weights too): the caller recomputes it densely. x, residual and out may be strided views
// whose rows are contiguous (e.g. the interior of a zero-padded buffer). Every array is
// checked before it is indexed (rowptr in O(O), columns while forming the strip offsets):
// bad ones raise, never read out of bounds.
// x_padded: the caller promises that x is the interior [pad : pad + H, pad : pad + W] of a
// buffer (N, C, H + 2 pad + 1, W + 2 pad) whose border is zero and which is followed by at
// least kSlack readable floats (what ntksap.sparse's BufferPool.get(pad=...) gives). When x's
// strides and storage say so too, a stride-1 conv reads that buffer in place: no padded copy.
// x_finite: the caller promises that x holds no NaN / inf (a sparse conv of the same model
// wrote it from a finite input with finite weights): an in-place read then skips its scan
// for NaN / inf (the copy tests for free; the scan cost 10-13 % of a 98 %-sparse conv).
std::tuple<torch::Tensor, bool, bool> sparse_conv2d(
    torch::Tensor x, torch::Tensor rowptr, torch::Tensor col, torch::Tensor val,
    torch::Tensor bias, int64_t in_channels, int64_t kh, int64_t kw, int64_t stride, int64_t pad,
    torch::Tensor residual, bool relu, torch::Tensor out, bool x_padded, bool x_finite) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32, got ", x.dtype());
  TORCH_CHECK(stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1 && in_channels >= 1 &&
                  stride <= kMaxGeom && pad <= kMaxGeom && kh <= kMaxGeom && kw <= kMaxGeom,
              "bad conv geometry: in_channels=", in_channels, ", kernel ", kh, "x", kw,
              ", stride ", stride, ", pad ", pad, " (each >= 1, pad >= 0, at most ", kMaxGeom,
              ")");
  TORCH_CHECK(x.size(1) == in_channels, "x has ", x.size(1), " channels, the weight expects ",
              in_channels);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "x must have H, W >= 1, got ", x.sizes());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= 1, "rowptr must be 1-D with >= 1 entry");
  x = rows_contiguous(x);
  ConvGeometry g;
  const int64_t N = x.size(0);
  g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = rowptr.size(0) - 1;
  check_csr(rowptr, col, val, g.O);
  g.kh = kh, g.kw = kw, g.s = stride, g.pad = pad;
  const int64_t Hp = g.H + 2 * pad, Wp = g.W + 2 * pad;
  TORCH_CHECK(Hp >= kh && Wp >= kw, "padded input ", Hp, "x", Wp, " is smaller than the kernel ",
              kh, "x", kw);
  g.Ho = (Hp - kh) / g.s + 1, g.Wo = (Wp - kw) / g.s + 1;
  g.Hq = (Hp + g.s - 1) / g.s, g.Wq = (Wp + g.s - 1) / g.s;  // polyphase plane size
  g.plane = (g.Hq + 1) * g.Wq;  // +1 row: strips of garbage columns may overrun
  g.xsN = x.stride(0), g.xsC = x.stride(1), g.xsH = x.stride(2);
  const int64_t O = g.O, Ho = g.Ho, Wo = g.Wo, s = g.s;

  const bool has_bias = bias.defined() && bias.numel() > 0;
  const bool has_res = residual.defined() && residual.numel() > 0;
  if (has_bias) {
    check_cpu(bias, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.numel() == O && bias.dtype() == torch::kFloat32 &&
                    bias.is_contiguous(),
                "bias must be a contiguous float32 vector of the ", O, " output channels");
  }
  if (has_res) {
    check_cpu(residual, "residual");
    TORCH_CHECK(residual.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
                    residual.dtype() == torch::kFloat32,
                "residual must have the output's shape (N, O, Ho, Wo) = ",
                torch::IntArrayRef({N, O, Ho, Wo}), ", float32; got ", residual.sizes(), " ",
                residual.dtype());
    residual = rows_contiguous(residual);
  }
  // `out`: a caller's reusable buffer (a fresh multi-MB tensor per call costs ~1 ms of
  // page faults at batch 64 on the machine this was tuned on); allocated when unusable.
  auto overlaps = [](const torch::Tensor& a, const torch::Tensor& b) {
    const char* a0 = static_cast<const char*>(a.data_ptr());
    const char* b0 = static_cast<const char*>(b.data_ptr());
    const int64_t an = (a.size(0) - 1) * a.stride(0) + (a.size(1) - 1) * a.stride(1) +
                       (a.size(2) - 1) * a.stride(2) + a.size(3);
    const int64_t bn = (b.size(0) - 1) * b.stride(0) + (b.size(1) - 1) * b.stride(1) +
                       (b.size(2) - 1) * b.stride(2) + b.size(3);
    return a0 < b0 + 4 * bn && b0 < a0 + 4 * an;
  };
  if (!(out.defined() && out.device().is_cpu() && out.layout() == torch::kStrided &&
        out.dim() == 4 && out.sizes() == torch::IntArrayRef({N, O, Ho, Wo}) &&
        out.dtype() == torch::kFloat32 && out.stride(3) == 1 && out.stride(2) >= Wo &&
        out.stride(1) >= Ho * out.stride(2) && out.stride(0) >= O * out.stride(1) &&
        (N == 0 || O == 0 || (!overlaps(out, x) && (!has_res || !overlaps(out, residual))))))
    out = torch::empty({N, O, Ho, Wo}, x.options());
  const bool finite_weights = all_finite(val.data_ptr<float>(), val.numel()) &&
                              (!has_bias || all_finite(bias.data_ptr<float>(), O));
  if (N == 0 || O == 0) return {out, true, finite_weights};
  g.osN = out.stride(0), g.osC = out.stride(1), g.osH = out.stride(2);
  g.rsN = has_res ? residual.stride(0) : 0, g.rsC = has_res ? residual.stride(1) : 0;
  g.rsH = has_res ? residual.stride(2) : 0;

  // In place: x is the interior of a zero-bordered buffer laid out exactly like one
  // image's prepared planes (C, plane), so a group is one image and needs no copy. (Even
  // on 8x8 maps, where several images per strip would cut loop overhead, skipping the
  // copy measured faster: ResNet-20 layer3 convs 0.16 -> 0.10-0.13 ms at batch 64.)
  // The promise is checked against x's storage (never read outside it); its zero border
  // cannot be checked cheaply (a non-zero one gives wrong sums, no out-of-bounds read).
  const int64_t before = pad * Wp + pad;  // floats of border before x[n, 0, 0, 0]
  const bool in_place =
      x_padded && s == 1 && g.xsH == Wp && g.xsC == g.plane && g.xsN == g.C * g.plane &&
      x.storage_offset() >= before &&
      x.storage_offset() - before + N * g.xsN + kSlack <=
          static_cast<int64_t>(x.storage().nbytes() / sizeof(float));

  // Images per group: enough that a group's strip is ~1000 floats (small feature maps
  // otherwise spend their time in per-channel loop overhead), and enough groups for the
  // threads.
  const int64_t threads = at::get_num_threads();
  int64_t G = std::max<int64_t>(1, 1024 / g.plane);
  G = std::min(G, std::max<int64_t>(1, N / (2 * threads)));
  if (in_place) G = 1;
  const int64_t groups = (N + G - 1) / G;
  auto group_size = [&](int64_t gr) { return std::min(G, N - gr * G); };
  const int64_t per_group = g.C * s * s * G * g.plane + kSlack;

  // Strip offset of every nonzero inside a group's prepared planes (depends on G), and
  // which polyphase components are read at all.
  const int64_t nnz = col.numel();
  const int32_t* cp = col.data_ptr<int32_t>();
  std::vector<char> used(s * s, 0);
  auto offsets = [&](int64_t gsize, std::vector<int64_t>& offs) {
    strip_offsets(cp, nnz, g, gsize, used, offs);
  };
  std::vector<int64_t> offs_full, offs_last;
  offsets(G, offs_full);
  const int64_t last = group_size(groups - 1);
  if (last != G) offsets(last, offs_last);

  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* resp = has_res ? residual.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // The prepared planes of group gr: in place, or copied into `buf`; channels
  // [c_begin, c_end) are tested for NaN / inf on the way (in place: scanned whole, border
  // included, right before the group's convolution reads them from cache).
  std::atomic<bool> nonfinite{false};
  auto planes = [&](int64_t gr, float* buf, int64_t c_begin, int64_t c_end) -> const float* {
    const int64_t n0 = gr * G;
    bool bad;
    const float* prep;
    if (in_place) {
      prep = xp + n0 * g.xsN - before;
      bad = !x_finite && !all_finite(prep + c_begin * g.plane, (c_end - c_begin) * g.plane);
    } else {
      bad = prepare_group(xp + n0 * g.xsN, group_size(gr), buf, g, used, c_begin, c_end, true);
      prep = buf;
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
    return prep;
  };
  auto compute = [&](int64_t gr, const float* prep, int64_t o_begin, int64_t o_end) {
    const int64_t gs = group_size(gr), n0 = gr * G;
    const int64_t* of = gs == G ? offs_full.data() : offs_last.data();
    conv_group(prep, gs, g, rp, of, vp, bp, resp ? resp + n0 * g.rsN : nullptr,
               op + n0 * g.osN, relu, o_begin, o_end);
  };

  // Little work (batch 1 on small or very sparse layers: a few microseconds): the calling
  // thread does it all; waking the pool would cost more than it saves.
  const bool serial = threads == 1 || N * (nnz + O) * g.Ho * g.Wq < (int64_t{1} << 17);
  if (serial) {
    thread_local std::vector<float> buf;
    if (!in_place && static_cast<int64_t>(buf.size()) < per_group) buf.resize(per_group);
    for (int64_t gr = 0; gr < groups; ++gr) compute(gr, planes(gr, buf.data(), 0, g.C), 0, O);
  } else if (groups >= 2 * threads) {
    // Many groups: one task per group, its planes prepared in a per-thread buffer that
    // stays in cache while every output channel reads it.
    at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> buf;
      if (!in_place && static_cast<int64_t>(buf.size()) < per_group) buf.resize(per_group);
      for (int64_t gr = b; gr < e; ++gr) compute(gr, planes(gr, buf.data(), 0, g.C), 0, O);
    });
  } else {
    // Few images (batch 1): prepare each group once (channels split), then split the
    // output channels between the threads.
    thread_local std::vector<float> buf;
    if (!in_place && static_cast<int64_t>(buf.size()) < groups * per_group)
      buf.resize(groups * per_group);
    float* pp = buf.data();  // not `buf` inside the tasks: thread_local, other threads' own
    for (int64_t gr = 0; gr < groups; ++gr) {
      float* dst = pp + gr * per_group;
      // in place: the scan alone, in this thread (cheaper than waking the pool)
      const float* prep = in_place ? planes(gr, nullptr, 0, g.C) : dst;
      if (!in_place)
        at::parallel_for(0, g.C, 1, [&](int64_t b, int64_t e) { planes(gr, dst, b, e); });
      at::parallel_for(0, O, 1, [&](int64_t b, int64_t e) { compute(gr, prep, b, e); });
    }
  }
  return {out, !nonfinite.load(), finite_weights};
}

// x: (N, K) float32 with K = in_features; CSR over (O, K); returns (act(x @ W.T + bias),
// (N, O); whether x held no NaN / inf). When it held one, the output is left uncomputed:
// the dense product multiplies the NaN / inf by the zero weights too (NaN), which the
// caller computes densely. Every array is checked before it is indexed: rowptr in O(O)
// up front, each column as the product reads it (a column outside [0, in_features) is
// skipped, then reported: never read). A separate O(nnz) scan cost 1.1 us of a 20 us
// batch-1 call (1024 x 1024 at 98 %), the test inside the loop 0.5 us with the rest.
std::tuple<torch::Tensor, bool> sparse_linear(torch::Tensor x, torch::Tensor rowptr,
                                              torch::Tensor col, torch::Tensor val,
                                              torch::Tensor bias, int64_t in_features, bool relu) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (N, in_features), got ", x.dim(), "-D");
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32, got ", x.dtype());
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " features, the weight expects ",
              in_features);
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= 1, "rowptr must be 1-D with >= 1 entry");
  x = x.contiguous();
  const int64_t N = x.size(0), K = x.size(1), O = rowptr.size(0) - 1;
  check_csr(rowptr, col, val, O);
  const int32_t* cp = col.data_ptr<int32_t>();
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias) {
    check_cpu(bias, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.numel() == O && bias.dtype() == torch::kFloat32 &&
                    bias.is_contiguous(),
                "bias must be a contiguous float32 vector of the ", O, " outputs");
  }
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  auto out = torch::empty({N, O}, x.options());
  float* op = out.data_ptr<float>();
  if (N == 0 || O == 0) return {out, true};
  if (!all_finite(x.data_ptr<float>(), N * K)) return {out, false};
  const uint32_t uK = static_cast<uint32_t>(K);  // a negative column is >= uK as unsigned
  if (N < 8) {
    // Few samples: one gathered dot product per (sample, output).
    const float* xp = x.data_ptr<float>();
    std::atomic<bool> outside{false};
    at::parallel_for(0, O, 16, [&](int64_t b, int64_t e) {
      bool bad = false;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = b; o < e; ++o) {
          float a = bp ? bp[o] : 0.f;
          for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
            const uint32_t c = static_cast<uint32_t>(cp[j]);
            if (c >= uK) {
              bad = true;
              continue;
            }
            a += vp[j] * xp[n * K + c];
          }
          op[n * O + o] = relu ? relu_keep_nan(a) : a;
        }
      if (bad) outside.store(true, std::memory_order_relaxed);
    });
    if (outside.load()) check_cols(cp, col.numel(), K, "in_features");
    return {out, true};
  }
  // Many samples: out^T[o, :] = sum_j W[o, k_j] * x^T[k_j, :], contiguous along the batch.
  auto xt = x.t().contiguous();  // (K, N)
  const float* xtp = xt.data_ptr<float>();
  auto outt = torch::empty({O, N}, x.options());
  float* otp = outt.data_ptr<float>();
  std::atomic<bool> outside{false};
  at::parallel_for(0, O, 4, [&](int64_t b, int64_t e) {
    bool bad = false;
    for (int64_t o = b; o < e; ++o) {
      float* d = otp + o * N;
      const float bo = bp ? bp[o] : 0.f;
      for (int64_t n = 0; n < N; ++n) d[n] = bo;
      for (int32_t j = rp[o]; j < rp[o + 1]; ++j) {
        const uint32_t c = static_cast<uint32_t>(cp[j]);
        if (c >= uK) {
          bad = true;
          continue;
        }
        const float w = vp[j];
        const float* __restrict s = xtp + static_cast<int64_t>(c) * N;
        for (int64_t n = 0; n < N; ++n) d[n] += w * s[n];
      }
      if (relu)
        for (int64_t n = 0; n < N; ++n) d[n] = relu_keep_nan(d[n]);
    }
    if (bad) outside.store(true, std::memory_order_relaxed);
  });
  if (outside.load()) check_cols(cp, col.numel(), K, "in_features");
  out.copy_(outt.t());
  return {out, true};
}

// ===========================================================================================
// Chain executor: a run of sparse convs (ResNet stages, VGG blocks) in ONE call.
//
// Two layouts, chosen per forward by the batch size:
// - "blocked" (16 images per group): every value is (C, H + 2B, W + 2B, 16) floats, the 16
//   images of a group interleaved in the innermost dimension, with a B-pixel zero border
//   (B = the largest padding in the chain). One output pixel of 16 images is one AVX-512
//   register, so every strip load is ALIGNED and never splits a cache line (the NCHW kernel
//   above reads unaligned strips: about half its loads split lines, which capped it near
//   one FMA per cycle), strides > 1 need no polyphase copy (the strip just steps 2 pixels),
//   no "wide-row" garbage is computed, and bias, residual and ReLU are applied to the
//   accumulators in registers before the one store.
// - "spatial" (one image at a time): the NCHW kernel above (conv_group) on per-image padded
//   buffers, for batches below 16 and the images left over after the full groups.
// Every group / image runs the whole chain depth-first in the thread that took it (its
// values stay in that core's cache; no fork/join per layer, no Python per layer). When
// there are fewer groups + images than threads (batch 1), each op instead splits its output
// channels between the threads.
namespace {

struct ChainOp {
  int64_t in = 0, res = -1;  // value ids (value 0 = the chain input, value k + 1 = op k's output)
  int64_t O = 0, C = 0, kh = 1, kw = 1, s = 1, p = 0;
  bool relu = false;
  const int32_t* rp = nullptr;
  const int32_t* cp = nullptr;
  const float* vp = nullptr;
  const float* bp = nullptr;
  int64_t nnz = 0;
};

struct ValueGeom {
  int64_t C, H, W;
};

// Per input size: geometry of every value, per-op strip offsets for both layouts.
struct ChainPlan {
  std::vector<ValueGeom> values;
  std::vector<std::vector<int64_t>> boffs;  // blocked: offset of every nonzero (floats)
  std::vector<std::vector<int64_t>> soffs;  // spatial: offset inside the (prepared) planes
  std::vector<ConvGeometry> sgeom;          // spatial: conv geometry (G = 1)
  std::vector<std::vector<char>> sused;     // spatial: polyphase components read
  std::vector<char> in_place;               // spatial: input read in place (s == 1, p == B)
  // Slots: values of the same shape share one when their lifetimes do not overlap; a slot
  // never changes shape, so its zero border is written once per thread (first use).
  std::vector<int64_t> seg;                 // op -> segment (see run_blocked)
  std::vector<int64_t> slot;                // value -> slot
  std::vector<int64_t> boff, soff;          // slot -> offset (floats) in a task's scratch
  int64_t btotal = 0, stotal = 0, sprep = 0;  // floats per task: blocked / spatial (+ prep)
  uint64_t id = 0;                          // unique per plan (scratch ownership)
};

#ifdef __AVX512F__
// In-register 16 x 16 float transpose: r[i][j] -> r[j][i]. Converts between NCHW rows of 16
// images and the interleaved layout (gathers / scatters measured 6 / 40 ns each here).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane k = column 4k + j of rows 4i .. 4i + 3
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// A chunk of R output rows x V output pixels of one output channel, 16 images per pixel:
// acc[r][v] = bias + sum_j vals[j] * src[offs[j] + r * in_row + v * S * 16 : +16]
// (S = 0: runtime stride), then + residual, ReLU, one store per output pixel. R * V <= 16
// accumulators: two rows share each weight broadcast and offset load, and each call does
// twice the work of a one-row chunk (the per-call cost, mostly the mispredicted exit of
// the nonzero loop, is amortised).
template <int V, int R, int S>
void bchunk(const float* __restrict src, const int64_t* __restrict offs,
            const float* __restrict vals, int64_t n, float bias, const float* __restrict res,
            float* __restrict d, bool relu, int64_t stride, int64_t in_row, int64_t out_row) {
  const int64_t step = (S == 0 ? stride : S) * kVec;
#ifdef __AVX512F__
  __m512 acc[R * V];
  const __m512 b = _mm512_set1_ps(bias);
  for (int i = 0; i < R * V; ++i) acc[i] = b;
  for (int64_t j = 0; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(vals[j]);
    const float* p = src + offs[j];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v)
        acc[r * V + v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + r * in_row + v * step),
                                         acc[r * V + v]);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      __m512 a = acc[r * V + v];
      if (res) a = _mm512_add_ps(a, _mm512_loadu_ps(res + r * out_row + v * kVec));
      if (relu) a = relu_keep_nan(a);
      _mm512_storeu_ps(d + r * out_row + v * kVec, a);
    }
#else
  float acc[R * V * kVec];
  for (int i = 0; i < R * V * kVec; ++i) acc[i] = bias;
  for (int64_t j = 0; j < n; ++j) {
    const float w = vals[j];
    const float* p = src + offs[j];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v)
#pragma GCC ivdep
        for (int l = 0; l < kVec; ++l)
          acc[(r * V + v) * kVec + l] += w * p[r * in_row + v * step + l];
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < kVec; ++l) {
        float x = acc[(r * V + v) * kVec + l] + (res ? res[r * out_row + v * kVec + l] : 0.f);
        d[r * out_row + v * kVec + l] = relu ? relu_keep_nan(x) : x;
      }
#endif
}

using BChunkFn = void (*)(const float*, const int64_t*, const float*, int64_t, float,
                          const float*, float*, bool, int64_t, int64_t, int64_t);
constexpr int kMaxV = 8;  // output pixels per chunk row (see blocked_op)
constexpr int64_t kBand = 2;  // output rows an op computes per wavefront round

template <int R, int S, int... Vs>
constexpr std::array<BChunkFn, sizeof...(Vs)> bchunk_row(std::integer_sequence<int, Vs...>) {
  return {&bchunk<Vs + 1, R, S>...};
}
// [rows - 1][stride kind: 1, 2, other][V - 1]
const std::array<std::array<std::array<BChunkFn, kMaxV>, 3>, 2> kBChunk = {{
    {{bchunk_row<1, 1>(std::make_integer_sequence<int, kMaxV>{}),
      bchunk_row<1, 2>(std::make_integer_sequence<int, kMaxV>{}),
      bchunk_row<1, 0>(std::make_integer_sequence<int, kMaxV>{})}},
    {{bchunk_row<2, 1>(std::make_integer_sequence<int, kMaxV>{}),
      bchunk_row<2, 2>(std::make_integer_sequence<int, kMaxV>{}),
      bchunk_row<2, 0>(std::make_integer_sequence<int, kMaxV>{})}},
}};

// Zero the B-wide border of a (C, H + 2B [+ extra rows], W + 2B, lanes) value.
void zero_border(float* buf, int64_t C, int64_t H, int64_t W, int64_t B, int64_t lanes,
                 int64_t extra_rows) {
  if (B == 0 && extra_rows == 0) return;
  const int64_t Wb = W + 2 * B, Hb = H + 2 * B + extra_rows, row = Wb * lanes;
  for (int64_t c = 0; c < C; ++c) {
    float* plane = buf + c * Hb * row;
    std::memset(plane, 0, sizeof(float) * B * row);
    for (int64_t y = B; y < B + H; ++y) {
      std::memset(plane + y * row, 0, sizeof(float) * B * lanes);
      std::memset(plane + y * row + (B + W) * lanes, 0, sizeof(float) * B * lanes);
    }
    std::memset(plane + (B + H) * row, 0, sizeof(float) * (Hb - B - H) * row);
  }
}

// Output channels [o0, o1) of one op on one blocked group. Chunks of up to 2 rows x 8
// pixels, balanced along a row (32 -> 4 x 8, 14 -> 2 x 7): 16 independent accumulators
// cover the FMA latency of two FMA units, and a chunk's input window (C x (kh + 1) rows x
// (8 s + kw) pixels x 64 bytes) stays in L1 for C <= 16. Measured on ResNet-20 at 98.2 %,
// batch 64, one thread, all convs: one row of 16 pixels 5.27 ms, one row of 8 5.03 ms.
void blocked_op(const ChainOp& op, const std::vector<int64_t>& offs, const float* in,
                const ValueGeom& gi, float* out, const ValueGeom& go, const float* res,
                int64_t B, int64_t o0, int64_t o1, int64_t ya, int64_t yb) {
  const int64_t Wbi = gi.W + 2 * B, Wbo = go.W + 2 * B, Hbo = go.H + 2 * B, s = op.s;
  const int kind = s == 1 ? 0 : s == 2 ? 1 : 2;
  const int64_t pieces = (go.W + kMaxV - 1) / kMaxV;
  const int64_t chunk = (go.W + pieces - 1) / pieces;
  const int64_t in_row = s * Wbi * kVec, out_row = Wbo * kVec;
  for (int64_t y = ya; y < yb; y += 2) {
    const int64_t rows = std::min<int64_t>(2, yb - y);
    for (int64_t x0 = 0; x0 < go.W; x0 += chunk) {
      const int64_t V = std::min<int64_t>(chunk, go.W - x0);
      const BChunkFn fn = kBChunk[rows - 1][kind][V - 1];
      const float* src = in + (y * s * Wbi + x0 * s) * kVec;
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t at = ((o * Hbo + y + B) * Wbo + x0 + B) * kVec;
        const int64_t j0 = op.rp[o];
        fn(src, offs.data() + j0, op.vp + j0, op.rp[o + 1] - j0, op.bp ? op.bp[o] : 0.f,
           res ? res + at : nullptr, out + at, op.relu, s, in_row, out_row);
      }
    }
  }
}

// A task's scratch: 64-byte aligned, zero-initialised, one per (plan, layout) and thread,
// remembering which slots already have their zero border. Owned by the executor (freed
// with the model).
struct Scratch {
  std::vector<float> raw;
  std::vector<char> zeroed;
  float* base() {
    auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
    return raw.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

std::atomic<uint64_t> g_plan_ids{1};

}  // namespace

// forward's status: the output is exact; a NaN / inf may have reached a conv's input (the
// output may not be what the dense convs give, which multiply it by their zero weights
// too: the caller recomputes layer by layer); a tensor changed since construction
// (nothing computed: the caller builds a new executor, which checks them again).
//
// Where a NaN / inf can come from: the chain's input (tested while it is copied in), the
// weights or biases (tested at construction: a chain holding one reports kNonFinite
// without computing), or an activation overflowing float32 (tested where it reaches the
// output, while it is copied out). Testing every value an op makes cost 6-9 % of a
// batch-1 ResNet-20 call (the 98 %-sparse epilogues are much of the work), so an overflow
// whose inf vanishes before the output (relu(-inf) = 0) is not seen.
enum ChainStatus : int64_t { kExact = 0, kNonFinite = 1, kStale = 2 };

class SparseChainExec {
 public:
  // specs[k] = {in, res, O, C, kh, kw, stride, pad, relu}; tensors: CSR + bias (empty = none).
  // Every array is checked here, once: rowptr (O(O)) and the columns (O(nnz)) are then
  // COPIED, so the indices the executor forms never change behind its back; values and
  // bias are read in place. forward reports kStale when a source tensor was written in
  // place (its version counter moved) or moved to other storage since.
  SparseChainExec(std::vector<torch::Tensor> rowptrs, std::vector<torch::Tensor> cols,
                  std::vector<torch::Tensor> vals, std::vector<torch::Tensor> biases,
                  std::vector<std::vector<int64_t>> specs, int64_t output)
      : src_rowptrs_(std::move(rowptrs)), src_cols_(std::move(cols)), vals_(std::move(vals)),
        biases_(std::move(biases)), output_(output) {
    const int64_t n = static_cast<int64_t>(specs.size());
    TORCH_CHECK(n > 0 && static_cast<int64_t>(src_rowptrs_.size()) == n &&
                    static_cast<int64_t>(src_cols_.size()) == n &&
                    static_cast<int64_t>(vals_.size()) == n &&
                    static_cast<int64_t>(biases_.size()) == n,
                "one spec and one CSR triple + bias per op");
    TORCH_CHECK(output >= 1 && output <= n, "output must be the value of an op");
    ops_.resize(n);
    for (int64_t k = 0; k < n; ++k) {
      const auto& sp = specs[k];
      TORCH_CHECK(sp.size() == 9, "an op spec has 9 entries");
      ChainOp& op = ops_[k];
      op.in = sp[0], op.res = sp[1], op.O = sp[2], op.C = sp[3], op.kh = sp[4], op.kw = sp[5];
      op.s = sp[6], op.p = sp[7], op.relu = sp[8] != 0;
      TORCH_CHECK(op.in >= 0 && op.in <= k && op.res >= -1 && op.res <= k,
                  "op ", k, " reads a value that is not computed before it");
      TORCH_CHECK(op.s >= 1 && op.p >= 0 && op.kh >= 1 && op.kw >= 1 && op.C >= 1 &&
                      op.s <= kMaxGeom && op.p <= kMaxGeom && op.kh <= kMaxGeom &&
                      op.kw <= kMaxGeom && op.C <= (int64_t{1} << 31) / (op.kh * op.kw),
                  "op ", k, ": bad conv geometry (in_channels ", op.C, ", kernel ", op.kh, "x",
                  op.kw, ", stride ", op.s, ", pad ", op.p, ")");
      TORCH_CHECK(op.in == 0 || ops_[op.in - 1].O == op.C, "op ", k, " reads value ", op.in,
                  " (", op.in == 0 ? 0 : ops_[op.in - 1].O, " channels) but expects ", op.C);
      TORCH_CHECK(op.res <= 0 || ops_[op.res - 1].O == op.O, "op ", k, " adds value ", op.res,
                  " (", op.res <= 0 ? 0 : ops_[op.res - 1].O, " channels) to its ", op.O,
                  " output channels");
      try {
        TORCH_CHECK(op.O >= 0, "out_channels must be >= 0, got ", op.O);
        TORCH_CHECK(src_rowptrs_[k].dim() == 1 && src_rowptrs_[k].size(0) >= 1,
                    "rowptr must be 1-D with >= 1 entry");
        check_csr(src_rowptrs_[k], src_cols_[k], vals_[k], op.O);
        check_cols(src_cols_[k].data_ptr<int32_t>(), src_cols_[k].numel(),
                   op.C * op.kh * op.kw, "in_channels * kh * kw");
        if (biases_[k].defined() && biases_[k].numel() > 0) {
          check_cpu(biases_[k], "bias");
          TORCH_CHECK(biases_[k].dim() == 1 && biases_[k].numel() == op.O &&
                          biases_[k].dtype() == torch::kFloat32 && biases_[k].is_contiguous(),
                      "bias must be a contiguous float32 vector of the ", op.O,
                      " output channels");
        }
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "op ", k, ": ", e.what_without_backtrace());
      }
      rowptrs_.push_back(src_rowptrs_[k].clone());
      cols_.push_back(src_cols_[k].clone());
      op.rp = rowptrs_[k].data_ptr<int32_t>();
      op.cp = cols_[k].data_ptr<int32_t>();
      op.vp = vals_[k].data_ptr<float>();
      op.nnz = cols_[k].numel();
      if (biases_[k].defined() && biases_[k].numel() > 0) op.bp = biases_[k].data_ptr<float>();
      finite_weights_ = finite_weights_ && all_finite(op.vp, op.nnz) &&
                        (!op.bp || all_finite(op.bp, op.O));
      B_ = std::max(B_, op.p);
    }
    for (int64_t k = 0; k < n; ++k)
      seen_.push_back(snapshot(k));
    last_.assign(n + 1, -1);
    for (int64_t k = 0; k < n; ++k) {
      last_[ops_[k].in] = std::max(last_[ops_[k].in], k);
      if (ops_[k].res >= 0) last_[ops_[k].res] = std::max(last_[ops_[k].res], k);
    }
    last_[output_] = n;
  }

  // Whether a source tensor changed since construction (see the constructor): O(ops).
  bool stale() const {
    for (size_t k = 0; k < ops_.size(); ++k)
      if (snapshot(k) != seen_[k]) return true;
    return false;
  }

  int64_t border() const { return B_; }

  // Per-op wall time (summed over threads, seconds) while profiling is on.
  void set_profile(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    profile_ = on;
    op_seconds_.assign(ops_.size(), 0.0);
  }
  std::vector<double> op_seconds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return op_seconds_;
  }

  // policy: 0 = auto (groups of 16 in the blocked layout, the rest spatial), 1 = blocked
  // only (the last group padded with zero images), 2 = spatial only.
  // split_work: with fewer groups + images than threads, an op whose MACs (per image or
  // group) reach this splits its output channels between the threads (-1: never).
  // out: a reusable (N, C, H, W) float32 contiguous buffer for the result, or empty
  // (a fresh multi-MB tensor per call costs page faults: ~1 ms per 4 MB here).
  // wavefront: run same-size segments as row-band wavefronts (blocked layout; False: op
  // after op, for comparison).
  // Returns (output, ChainStatus).
  std::tuple<torch::Tensor, int64_t> forward(torch::Tensor x, int64_t policy, int64_t split_work,
                                             std::optional<torch::Tensor> out_buffer,
                                             bool wavefront) {
    check_cpu(x, "x");
    TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
    TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32, got ", x.dtype());
    TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "x must have H, W >= 1, got ", x.sizes());
    TORCH_CHECK(policy >= 0 && policy <= 2, "policy must be 0 (auto), 1 (blocked), 2 (spatial)");
    if (stale()) return {torch::Tensor(), kStale};
    if (!finite_weights_) return {torch::Tensor(), kNonFinite};
    x = x.contiguous();
    const int64_t N = x.size(0);
    const ChainPlan& plan = plan_for(x.size(1), x.size(2), x.size(3));
    const ValueGeom& go = plan.values[output_];
    torch::Tensor out = out_buffer.value_or(torch::Tensor());
    if (!(out.defined() && out.device().is_cpu() && out.layout() == torch::kStrided &&
          out.sizes() == torch::IntArrayRef({N, go.C, go.H, go.W}) &&
          out.dtype() == torch::kFloat32 && out.is_contiguous() &&
          out.data_ptr() != x.data_ptr()))
      out = torch::empty({N, go.C, go.H, go.W}, x.options());
    if (N == 0) return {out, kExact};
    int64_t groups = policy == 2 ? 0 : policy == 1 ? (N + kVec - 1) / kVec : N / kVec;
    const int64_t first_single = std::min(N, groups * kVec);
    const int64_t singles = N - first_single, tasks = groups + singles;
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t threads = at::get_num_threads();
    const int64_t nslots = static_cast<int64_t>(plan.boff.size());
    std::atomic<bool> nonfinite{false};  // a NaN / inf in some conv's input
    auto run_task = [&](int64_t t, int64_t split) {
      if (t < groups) {
        Scratch& sc = scratch(plan, true, plan.btotal, nslots);
        run_blocked(plan, xp, N, t * kVec, sc, op, split, wavefront, nonfinite);
      } else {
        Scratch& sc = scratch(plan, false, plan.stotal + plan.sprep, nslots);
        run_single(plan, xp, first_single + (t - groups), sc, op, split, nonfinite);
      }
    };
    if (tasks >= threads || threads == 1 || split_work < 0) {
      // Dynamic assignment, big tasks first (groups of 16, then single images): a static
      // split by count would give one thread a group and two images, the other two images.
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
        for (int64_t t = next++; t < tasks; t = next++) run_task(t, -1);
      });
    } else {
      for (int64_t t = 0; t < tasks; ++t) run_task(t, split_work);
    }
    return {out, nonfinite.load() ? kNonFinite : kExact};
  }

 private:
  // This thread's scratch for (plan, layout), made on first use.
  Scratch& scratch(const ChainPlan& plan, bool blocked, int64_t floats, int64_t slots) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& sc = scratch_[std::make_tuple(std::this_thread::get_id(), plan.id, blocked)];
    if (!sc) {
      sc = std::make_unique<Scratch>();
      sc->raw.assign(floats + 16, 0.f);
      sc->zeroed.assign(slots, 0);
    }
    return *sc;
  }

  const ChainPlan& plan_for(int64_t C, int64_t H, int64_t W) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto key = std::make_tuple(C, H, W);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    ChainPlan plan;
    const int64_t n = static_cast<int64_t>(ops_.size()), B = B_;
    plan.values.push_back({C, H, W});
    for (int64_t k = 0; k < n; ++k) {
      const ChainOp& op = ops_[k];
      const ValueGeom gi = plan.values[op.in];
      TORCH_CHECK(gi.C == op.C, "op ", k, " expects ", op.C, " input channels, got ", gi.C);
      const int64_t Hp = gi.H + 2 * op.p, Wp = gi.W + 2 * op.p;
      TORCH_CHECK(Hp >= op.kh && Wp >= op.kw, "op ", k, ": input smaller than the kernel");
      const ValueGeom go{op.O, (Hp - op.kh) / op.s + 1, (Wp - op.kw) / op.s + 1};
      if (op.res >= 0) {
        const ValueGeom& gr = plan.values[op.res];
        TORCH_CHECK(gr.C == go.C && gr.H == go.H && gr.W == go.W,
                    "op ", k, ": the residual's shape differs from the output's");
      }
      plan.values.push_back(go);
      // blocked offsets (relative to output pixel (0, 0)'s strip start)
      const int64_t Hbi = gi.H + 2 * B, Wbi = gi.W + 2 * B, khw = op.kh * op.kw;
      std::vector<int64_t> bo(op.nnz);
      for (int64_t j = 0; j < op.nnz; ++j) {
        const int64_t cc = op.cp[j] / khw, r = op.cp[j] % khw, dy = r / op.kw, dx = r % op.kw;
        bo[j] = ((cc * Hbi + dy + B - op.p) * Wbi + dx + B - op.p) * kVec;
      }
      plan.boffs.push_back(std::move(bo));
      // spatial geometry and offsets (the NCHW kernel, one image)
      ConvGeometry g{};
      g.C = gi.C, g.H = gi.H, g.W = gi.W, g.O = op.O, g.kh = op.kh, g.kw = op.kw, g.s = op.s;
      g.pad = op.p, g.Ho = go.H, g.Wo = go.W;
      g.Hq = (Hp + op.s - 1) / op.s, g.Wq = (Wp + op.s - 1) / op.s;
      g.plane = (g.Hq + 1) * g.Wq;
      const int64_t sin_plane = (gi.H + 2 * B + 1) * Wbi, sout_plane = (go.H + 2 * B + 1) * (go.W + 2 * B);
      g.xsC = sin_plane, g.xsH = Wbi, g.xsN = gi.C * sin_plane;
      g.osC = sout_plane, g.osH = go.W + 2 * B, g.osN = go.C * sout_plane;
      g.rsC = g.osC, g.rsH = g.osH, g.rsN = g.osN;
      const char ip = op.s == 1 && op.p == B;
      std::vector<char> used(op.s * op.s, 0);
      std::vector<int64_t> so;
      strip_offsets(op.cp, op.nnz, g, 1, used, so);
      if (!ip) plan.sprep = std::max(plan.sprep, gi.C * op.s * op.s * g.plane + kSlack);
      plan.sgeom.push_back(g);
      plan.soffs.push_back(std::move(so));
      plan.sused.push_back(std::move(used));
      plan.in_place.push_back(ip);
    }
    // Segments: consecutive stride-1 ops that keep the map size (ResNet-20: conv1 and stage 1,
    // then stage 2's and stage 3's same-size convs) run as a row-band wavefront in the
    // blocked layout (run_blocked); every other op is a segment of its own.
    plan.seg.assign(n, 0);
    for (int64_t k = 1; k < n; ++k) {
      auto same = [&](int64_t q) {
        const ValueGeom &a = plan.values[ops_[q].in], &b = plan.values[q + 1];
        return ops_[q].s == 1 && a.H == b.H && a.W == b.W;
      };
      const bool join = same(k) && same(k - 1) &&
                        plan.values[k].H == plan.values[k + 1].H &&
                        plan.values[k].W == plan.values[k + 1].W;
      plan.seg[k] = plan.seg[k - 1] + (join ? 0 : 1);
    }
    // A value's slot is free once the segment of the last op reading it has run (ops of a
    // segment run interleaved, so they count as simultaneous; an op never writes over its
    // own input or residual); only a slot of the same shape is reused.
    std::vector<int64_t> last_seg(n + 1, -1);
    for (int64_t v = 0; v <= n; ++v)
      last_seg[v] = last_[v] >= n ? INT64_MAX : last_[v] < 0 ? -1 : plan.seg[last_[v]];
    std::vector<int64_t> holder;  // slot -> value now in it
    plan.slot.assign(n + 1, -1);
    auto take = [&](int64_t v, int64_t now) {
      const ValueGeom& g = plan.values[v];
      for (size_t sl = 0; sl < holder.size(); ++sl) {
        const ValueGeom& h = plan.values[holder[sl]];
        if (last_seg[holder[sl]] < now && h.C == g.C && h.H == g.H && h.W == g.W) {
          holder[sl] = v;
          return static_cast<int64_t>(sl);
        }
      }
      holder.push_back(v);
      const int64_t bsize = g.C * (g.H + 2 * B) * (g.W + 2 * B) * kVec;
      const int64_t ssize = g.C * (g.H + 2 * B + 1) * (g.W + 2 * B) + kSlack;
      plan.boff.push_back(plan.btotal);
      plan.soff.push_back(plan.stotal);
      plan.btotal += (bsize + 15) / 16 * 16;  // slots start 64-byte aligned
      plan.stotal += (ssize + 15) / 16 * 16;
      return static_cast<int64_t>(holder.size() - 1);
    };
    plan.slot[0] = take(0, -1);
    for (int64_t k = 0; k < n; ++k) plan.slot[k + 1] = take(k + 1, plan.seg[k]);
    plan.id = g_plan_ids.fetch_add(1);
    return plans_.emplace(key, std::move(plan)).first->second;
  }

  // Value v's zero border in this thread's scratch (blocked: 16 lanes; spatial: 1 lane and
  // the extra row the NCHW kernel's strips may touch), written once per slot: nothing
  // writes a border afterwards, and a slot never changes shape.
  void zero_border_once(Scratch& sc, const ChainPlan& plan, int64_t v, float* buf,
                        bool blocked) const {
    char& done = sc.zeroed[plan.slot[v]];
    if (done) return;
    const ValueGeom& g = plan.values[v];
    zero_border(buf, g.C, g.H, g.W, B_, blocked ? kVec : 1, blocked ? 0 : 1);
    done = 1;
  }

  // Images [n0, n0 + 16) (zeros beyond N) through the chain in the blocked layout.
  // Sets `nonfinite` when a NaN / inf is in the input or the output (see ChainStatus).
  void run_blocked(const ChainPlan& plan, const float* xp, int64_t N, int64_t n0, Scratch& sc,
                   float* outp, int64_t split, bool wavefront,
                   std::atomic<bool>& nonfinite) const {
    const int64_t B = B_, lanes = std::min<int64_t>(kVec, N - n0);
    float* base = sc.base();
    auto buf = [&](int64_t v) { return base + plan.boff[plan.slot[v]]; };
    auto border = [&](int64_t v) { zero_border_once(sc, plan, v, buf(v), true); };
    {  // the input, interleaved
      const ValueGeom& g = plan.values[0];
      const int64_t Hb = g.H + 2 * B, Wb = g.W + 2 * B;
      float* d = buf(0);
      if (lanes < kVec) std::memset(d, 0, sizeof(float) * g.C * Hb * Wb * kVec);  // empty lanes
      border(0);
      const int64_t img = g.C * g.H * g.W;
      bool bad = false;
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t y = 0; y < g.H; ++y) {
          // one row of all images: x outer, lanes inner (each store fills one vector)
          const float* src = xp + ((n0 * g.C + c) * g.H + y) * g.W;
          float* dst = d + ((c * Hb + y + B) * Wb + B) * kVec;
#ifdef __AVX512F__
          // 16 pixels of the 16 images at a time: rows = images, transposed to pixels
          // (NaN / inf tested on the loaded rows)
          __mmask16 badm = 0;
          for (int64_t x0 = 0; x0 < g.W; x0 += kVec) {
            const int64_t w = std::min<int64_t>(kVec, g.W - x0);
            const __mmask16 m = static_cast<__mmask16>((1u << w) - 1);
            __m512 r[16];
            for (int64_t l = 0; l < kVec; ++l) {
              r[l] = l < lanes ? _mm512_maskz_loadu_ps(m, src + l * img + x0) : _mm512_setzero_ps();
              badm |= nonfinite_mask(r[l]);
            }
            transpose16(r);
            for (int64_t i = 0; i < w; ++i) _mm512_storeu_ps(dst + (x0 + i) * kVec, r[i]);
          }
          bad |= badm != 0;
#else
          for (int64_t x = 0; x < g.W; ++x)
            for (int64_t l = 0; l < lanes; ++l) dst[x * kVec + l] = src[l * img + x];
          for (int64_t l = 0; l < lanes; ++l) bad |= !all_finite(src + l * img, g.W);
#endif
        }
      if (bad) nonfinite.store(true, std::memory_order_relaxed);
    }
    // Rows [ya, yb) of op k.
    auto rows = [&](size_t k, int64_t ya, int64_t yb) {
      const ChainOp& op = ops_[k];
      const ValueGeom &gi = plan.values[op.in], &go = plan.values[k + 1];
      float* out = buf(k + 1);
      const float* res = op.res >= 0 ? buf(op.res) : nullptr;
      const int64_t work = op.nnz * (yb - ya) * go.W;
      const auto t0 = profile_ ? Clock::now() : Clock::time_point{};
      if (split >= 0 && work >= split)
        at::parallel_for(0, op.O, 1, [&](int64_t b, int64_t e) {
          blocked_op(op, plan.boffs[k], buf(op.in), gi, out, go, res, B, b, e, ya, yb);
        });
      else
        blocked_op(op, plan.boffs[k], buf(op.in), gi, out, go, res, B, 0, op.O, ya, yb);
      if (profile_) record(k, t0);
    };
    // Segment by segment. Inside a segment, a row-band wavefront: round after round, each
    // op computes the next rows its input (and residual) already has, so every row is read
    // by the next op while it is still in L2 (a whole value of 16 images is MBs: computed
    // op after op, the next op read it back from L3).
    const size_t n = ops_.size();
    std::vector<int64_t> done(n + 1, 0);  // value -> rows computed (value 0: all)
    done[0] = plan.values[0].H;
    for (size_t k0 = 0; k0 < n;) {
      size_t k1 = k0 + 1;
      while (k1 < n && plan.seg[k1] == plan.seg[k0]) ++k1;
      for (size_t k = k0; k < k1; ++k) border(k + 1);
      if (k1 - k0 == 1 || !wavefront) {
        for (size_t k = k0; k < k1; ++k) {
          rows(k, 0, plan.values[k + 1].H);
          done[k + 1] = plan.values[k + 1].H;
        }
      } else {
        for (bool left = true; left;) {
          left = false;
          bool moved = false;
          for (size_t k = k0; k < k1; ++k) {
            const ChainOp& op = ops_[k];
            const int64_t H = plan.values[k + 1].H, Hin = plan.values[op.in].H;
            const int64_t y0 = done[k + 1];
            if (y0 == H) continue;
            int64_t y1 = std::min(H, y0 + kBand);
            auto ready = [&](int64_t y_end) {  // rows [0, y_end) computable?
              const int64_t need = std::min(Hin, (y_end - 1) * op.s - op.p + op.kh);
              return done[op.in] >= need && (op.res < 0 || done[op.res] >= y_end);
            };
            while (y1 > y0 && !ready(y1)) --y1;
            if (y1 > y0) {
              rows(k, y0, y1);
              done[k + 1] = y1;
              moved = true;
            }
            left = left || done[k + 1] < H;
          }
          TORCH_CHECK(moved || !left, "chain wavefront stalled (internal error)");
        }
      }
      k0 = k1;
    }
    const ValueGeom& g = plan.values[output_];
    const int64_t Hb = g.H + 2 * B, Wb = g.W + 2 * B;
    const float* s = buf(output_);
    const int64_t img = g.C * g.H * g.W;
    bool bad = false;  // an overflow that reached the output (tested on the way out)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t y = 0; y < g.H; ++y) {
        float* dst = outp + ((n0 * g.C + c) * g.H + y) * g.W;
        const float* src = s + ((c * Hb + y + B) * Wb + B) * kVec;
#ifdef __AVX512F__
        const __mmask16 used = static_cast<__mmask16>((1u << lanes) - 1);  // real images
        __mmask16 badm = 0;
        for (int64_t x0 = 0; x0 < g.W; x0 += kVec) {
          const int64_t w = std::min<int64_t>(kVec, g.W - x0);
          const __mmask16 m = static_cast<__mmask16>((1u << w) - 1);
          __m512 r[16];
          for (int64_t i = 0; i < kVec; ++i) {
            r[i] = i < w ? _mm512_loadu_ps(src + (x0 + i) * kVec) : _mm512_setzero_ps();
            badm |= nonfinite_mask(r[i]) & used;
          }
          transpose16(r);
          for (int64_t l = 0; l < lanes; ++l) _mm512_mask_storeu_ps(dst + l * img + x0, m, r[l]);
        }
        bad |= badm != 0;
#else
        for (int64_t x = 0; x < g.W; ++x)
          for (int64_t l = 0; l < lanes; ++l) dst[l * img + x] = src[x * kVec + l];
        for (int64_t l = 0; l < lanes; ++l) bad |= !all_finite(dst + l * img, g.W);
#endif
      }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  }

  // Image n through the chain with the NCHW kernel, values in padded per-image planes.
  // Sets `nonfinite` as run_blocked does.
  void run_single(const ChainPlan& plan, const float* xp, int64_t n, Scratch& sc, float* outp,
                  int64_t split, std::atomic<bool>& nonfinite) const {
    const int64_t B = B_;
    float* base = sc.base();
    auto buf = [&](int64_t v) { return base + plan.soff[plan.slot[v]]; };
    float* prep_buf = base + plan.stotal;
    auto border = [&](int64_t v) { zero_border_once(sc, plan, v, buf(v), false); };
    auto interior = [&](int64_t v) {
      const ValueGeom& g = plan.values[v];
      return buf(v) + B * (g.W + 2 * B) + B;
    };
    {
      const ValueGeom& g = plan.values[0];
      float* d = buf(0);
      border(0);
      const int64_t Wb = g.W + 2 * B, plane = (g.H + 2 * B + 1) * Wb;
      // the image is contiguous: one test (per-row calls cost ~3 % at batch 1)
      if (!all_finite(xp + n * g.C * g.H * g.W, g.C * g.H * g.W))
        nonfinite.store(true, std::memory_order_relaxed);
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t y = 0; y < g.H; ++y)
          std::memcpy(d + c * plane + (y + B) * Wb + B, xp + ((n * g.C + c) * g.H + y) * g.W,
                      sizeof(float) * g.W);
    }
    for (size_t k = 0; k < ops_.size(); ++k) {
      const ChainOp& op = ops_[k];
      const ConvGeometry& g = plan.sgeom[k];
      border(k + 1);
      const auto t0 = profile_ ? Clock::now() : Clock::time_point{};
      const float* prep;
      if (plan.in_place[k]) {
        prep = buf(op.in);
      } else {
        prepare_group(interior(op.in), 1, prep_buf, g, plan.sused[k], 0, g.C, false);
        prep = prep_buf;
      }
      const float* res = op.res >= 0 ? interior(op.res) : nullptr;
      float* out = interior(k + 1);
      const int64_t work = op.nnz * g.Ho * g.Wo;
      if (split >= 0 && work >= split)
        at::parallel_for(0, op.O, 1, [&](int64_t b, int64_t e) {
          conv_group(prep, 1, g, op.rp, plan.soffs[k].data(), op.vp, op.bp, res, out, op.relu,
                     b, e);
        });
      else
        conv_group(prep, 1, g, op.rp, plan.soffs[k].data(), op.vp, op.bp, res, out, op.relu, 0,
                   op.O);
      if (profile_) record(k, t0);
    }
    const ValueGeom& g = plan.values[output_];
    const int64_t Wb = g.W + 2 * B, plane = (g.H + 2 * B + 1) * Wb;
    const float* s = buf(output_);
    // an overflow that reached the output: one test over the whole slot (its zero border
    // and extra row included; nothing writes them)
    if (!all_finite(s, g.C * plane)) nonfinite.store(true, std::memory_order_relaxed);
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t y = 0; y < g.H; ++y)
        std::memcpy(outp + ((n * g.C + c) * g.H + y) * g.W, s + c * plane + (y + B) * Wb + B,
                    sizeof(float) * g.W);
  }

  // A tensor's version counter (-1 for inference tensors, which have none: torch refuses
  // in-place writes to them outside inference mode), storage address and size.
  using Stamp = std::tuple<int64_t, const void*, int64_t>;
  static Stamp stamp(const torch::Tensor& t) {
    if (!t.defined()) return {0, nullptr, 0};
    return {t.is_inference() ? -1 : t._version(), t.data_ptr(), t.numel()};
  }
  std::array<Stamp, 4> snapshot(size_t k) const {
    return {stamp(src_rowptrs_[k]), stamp(src_cols_[k]), stamp(vals_[k]), stamp(biases_[k])};
  }
  // the caller's CSR tensors (for stale()), values and biases (read in place), and the
  // executor's own copies of the index arrays
  std::vector<torch::Tensor> src_rowptrs_, src_cols_, vals_, biases_, rowptrs_, cols_;
  std::vector<std::array<Stamp, 4>> seen_;  // per op, at construction
  bool finite_weights_ = true;              // no NaN / inf in any values or bias
  std::vector<ChainOp> ops_;
  using Clock = std::chrono::steady_clock;
  void record(size_t k, Clock::time_point t0) const {
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(mutex_);
    if (k < op_seconds_.size()) op_seconds_[k] += dt;
  }
  bool profile_ = false;
  mutable std::vector<double> op_seconds_;
  std::vector<int64_t> last_;  // value -> the last op reading it (the output: past the end)
  int64_t output_ = 0, B_ = 0;
  std::map<std::tuple<int64_t, int64_t, int64_t>, ChainPlan> plans_;
  std::map<std::tuple<std::thread::id, uint64_t, bool>, std::unique_ptr<Scratch>> scratch_;
  mutable std::mutex mutex_;
};

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_conv2d", &sparse_conv2d, "direct sparse convolution (CSR weights), float32",
        py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("bias"),
        py::arg("in_channels"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("pad"),
        py::arg("residual"), py::arg("relu"), py::arg("out"), py::arg("x_padded") = false,
        py::arg("x_finite") = false);
  m.def("sparse_linear", &sparse_linear, "CSR x dense linear, float32", py::arg("x"),
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("bias"),
        py::arg("in_features"), py::arg("relu"));
  m.def("has_avx512", &has_avx512, "compiled with AVX-512 intrinsics");
  py::class_<SparseChainExec>(m, "SparseChainExec")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<std::vector<int64_t>>, int64_t>(),
           py::arg("rowptrs"), py::arg("cols"), py::arg("values"), py::arg("biases"),
           py::arg("specs"), py::arg("output"))
      .def("forward", &SparseChainExec::forward, py::arg("x"), py::arg("policy") = 0,
           py::arg("split_work") = -1, py::arg("out") = py::none(), py::arg("wavefront") = true,
           py::call_guard<py::gil_scoped_release>())
      .def("border", &SparseChainExec::border)
      .def("stale", &SparseChainExec::stale)
      .def("set_profile", &SparseChainExec::set_profile, py::arg("on"))
      .def("op_seconds", &SparseChainExec::op_seconds);
}
